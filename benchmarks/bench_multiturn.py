"""Multi-turn benchmark script: the same as `llmos bench --suite multiturn`.

Time to first token of turns 2-6 of chat conversations under a ~900-token system prompt (each turn resends the whole
history), with 1 and 4 conversations at once, and of 16 clients sharing one system prompt with llmos's prefix cache
on and off; llmos serve vs llama_cpp.server on the same GGUF in one run.

python benchmarks/bench_multiturn.py [--model smollm2] [--max-tokens 40] [--repeats 2] [--no-peer]
"""

from __future__ import annotations

import sys

from llmos.cli import main

if __name__ == "__main__":
    main(["bench", "--suite", "multiturn", *sys.argv[1:]])
