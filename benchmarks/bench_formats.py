"""Formats benchmark script: the same as `llmos bench --suite formats` (issue 22: ONNX Runtime vs PyTorch, llama.cpp).

Makes `minilm`, `minilm:onnx`, `smollm2:safetensors` and `smollm2:onnx` where the store lacks them (needs
`llmos pull smollm2` first).
"""

from __future__ import annotations

import sys

from llmos.cli import main

if __name__ == "__main__":
    main(["bench", "--suite", "formats", *sys.argv[1:]])
