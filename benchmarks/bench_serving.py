"""Serving benchmark script: the same as `llmos bench` (llmos serve vs llama_cpp.server on one GGUF).

python benchmarks/bench_serving.py [--model smollm2] [--levels 1,4,16,64] [--max-tokens 128]
"""

from __future__ import annotations

import sys

from llmos.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
