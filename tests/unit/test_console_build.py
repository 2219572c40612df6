"""The console shipped in the package is built from the sources in ``console/`` as they are now.

``console/scripts/stamp.mjs`` records a digest of the sources in ``build-info.json`` at build time; this test
recomputes it the same way, so editing the front end without ``make console`` fails here (no Node.js needed).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from llmos.console import STATIC_DIR

SOURCES = Path(__file__).resolve().parents[2] / "console"
INPUTS = ["index.html", "package.json", "package-lock.json", "tsconfig.json", "vite.config.ts", "public", "src"]


def _files(relative: str) -> list[str]:
    path = SOURCES / relative
    if path.is_dir():
        return [name for child in sorted(path.iterdir()) for name in _files(f"{relative}/{child.name}")]
    return [relative]


def sources_digest() -> str:
    digest = hashlib.sha256()
    for relative in sorted(name for item in INPUTS for name in _files(item)):
        digest.update(relative.encode() + b"\0")
        digest.update((SOURCES / relative).read_bytes() + b"\0")
    return digest.hexdigest()


def test_the_built_console_matches_its_sources() -> None:
    info = json.loads((STATIC_DIR / "build-info.json").read_text())
    assert info["sources_sha256"] == sources_digest(), "console/ changed since the last build: run `make console`"


def test_index_references_only_files_that_ship() -> None:
    index = (STATIC_DIR / "index.html").read_text()
    referenced = re.findall(r'(?:src|href)="/console/([^"]+)"', index)
    assert any(name.endswith(".js") for name in referenced) and any(name.endswith(".css") for name in referenced)
    for name in referenced:
        assert (STATIC_DIR / name).is_file(), name
    assert "<script>" not in index, "inline scripts would be blocked by the console's Content-Security-Policy"
