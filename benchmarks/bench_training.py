"""Training benchmark script: the same as `llmos bench --suite training`.

Needs `llmos pull smollm2` (the safetensors copy it trains is made on first use).
"""

from __future__ import annotations

import sys

from llmos.cli import main

if __name__ == "__main__":
    main(["bench", "--suite", "training", *sys.argv[1:]])
