"""Ray benchmark script: the same as `llmos bench --suite ray`.

Needs the Ray extra (`pip install 'llmos[ray]'`, part of `make test`'s dev install): it pulls the bundled model into
a private store and starts (and stops) its own loopback Ray cluster.
"""

from __future__ import annotations

import sys

from llmos.cli import main

if __name__ == "__main__":
    main(["bench", "--suite", "ray", *sys.argv[1:]])
