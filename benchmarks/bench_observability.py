"""Observability benchmark script: the same as `llmos bench --suite observability`.

Throughput at 16 concurrent streaming clients with /metrics scraped every second and the console's runtime page
polling, versus neither (the issue bounds the cost at 2%). The model is copied into a private store of its own.

python benchmarks/bench_observability.py [--model smollm2] [--max-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import sys

from llmos.cli import main

if __name__ == "__main__":
    main(["bench", "--suite", "observability", *sys.argv[1:]])
