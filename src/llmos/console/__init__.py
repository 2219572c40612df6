"""The web console's built assets (``static/``), produced from ``console/`` at the repository root by ``make console``.

Contract: :data:`STATIC_DIR` holds ``index.html``, ``assets/`` (content-hashed JS and CSS) and ``build-info.json``
(the digest of the sources they were built from, checked by ``tests/unit/test_console_build.py``). Nothing here
needs Node.js at run time; the API layer serves these files at ``/console``.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
