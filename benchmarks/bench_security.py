"""Security benchmark script: the same as `llmos bench --suite security`.

Needs nothing beyond `make install`: it pulls the bundled model into two private stores of its own.
"""

from __future__ import annotations

import sys

from llmos.cli import main

if __name__ == "__main__":
    main(["bench", "--suite", "security", *sys.argv[1:]])
