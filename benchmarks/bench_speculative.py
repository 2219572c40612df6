"""Speculative-decoding benchmark script: the same as `llmos bench --suite speculative`.

Decode tok/s of one client on prompts that repeat, quote or lightly edit a passage given in the prompt and on
ordinary chat prompts: llmos with speculative decoding, llmos without it (`speculative: false`) and
llama_cpp.server on the same GGUF, interleaved.

python benchmarks/bench_speculative.py [--model smollm2] [--max-tokens 256] [--repeats 2] [--no-peer]
"""

from __future__ import annotations

import sys

from llmos.cli import main

if __name__ == "__main__":
    main(["bench", "--suite", "speculative", *sys.argv[1:]])
