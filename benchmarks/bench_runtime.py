"""Runtime benchmark script: the same as `llmos bench --suite runtime`.

Needs `llmos pull smollm2 && llmos convert smollm2 && llmos pull minilm` first.
"""

from __future__ import annotations

import sys

from llmos.cli import main

if __name__ == "__main__":
    main(["bench", "--suite", "runtime", *sys.argv[1:]])
