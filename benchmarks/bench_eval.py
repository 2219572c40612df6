"""Evaluation benchmark script: the same as `llmos bench --suite eval`.

`llmos eval` perplexity throughput (tokens scored per second) on the shipped held-out text against a plain
transformers strided loop, same model (the float32 safetensors copy of SmolLM2) and window; llmos on the GGUF as a
second line. Needs `llmos pull smollm2` (the safetensors copy is made on first use). Extra arguments go to
`llmos bench`, e.g. `--repeats 5`.
"""

from __future__ import annotations

import sys

from llmos.cli import main

if __name__ == "__main__":
    main(["bench", "--suite", "eval", *sys.argv[1:]])
