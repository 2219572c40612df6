"""Batch-efficiency benchmark script: the same as `llmos bench --suite batch`.

Raw llama_decode throughput of 1, 4, 8 and 16 sequences decoding together (the served model's LlamaCppModel driven
directly) against llmos serve and llama_cpp.server answering as many concurrent clients.

python benchmarks/bench_batch.py [--model smollm2] [--levels 1,4,8,16] [--max-tokens 128] [--repeats 2] [--no-peer]
"""

from __future__ import annotations

import sys

from llmos.cli import main

if __name__ == "__main__":
    main(["bench", "--suite", "batch", *sys.argv[1:]])
