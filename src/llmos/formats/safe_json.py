"""JSON from files and peers that cannot exhaust the parser.

Contract: :func:`loads` parses JSON text like :func:`json.loads` but first measures its nesting without recursion
and refuses anything nested deeper than ``max_depth`` (default :data:`MAX_DEPTH`) with
:class:`~llmos.errors.InvalidModelFileError` naming ``what``; malformed or non-UTF-8 input gets the same error, so a
caller never sees ``RecursionError``, ``ValueError`` or ``UnicodeDecodeError``. :func:`read` does the same for a file,
refusing it beyond ``max_bytes`` before reading it. Every JSON the store reads from a model file, a manifest or a
remote server goes through here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmos.edge.runner import MAX_JSON_DEPTH as MAX_DEPTH
from llmos.edge.runner import json_depth
from llmos.errors import InvalidModelFileError

# The edge runner imports nothing from llmos (it ships alone in a bundle), so the depth scan lives there and this
# module reuses it rather than keeping a second copy.


def depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in the JSON text ``data`` (brackets inside strings do not count).

    Exact for valid JSON; for malformed input it is some number, and the parser refuses the text anyway. Linear in
    the text, with no recursion and no Python loop per character.
    """
    if data.count(b"[") + data.count(b"{") == 0:
        return 0
    return json_depth(data)


def loads(text: str | bytes, what: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``text`` (JSON), refusing nesting deeper than ``max_depth``; ``what`` names it in errors."""
    data = text.encode("utf-8", errors="surrogatepass") if isinstance(text, str) else bytes(text)
    if data.count(b"[") + data.count(b"{") > max_depth and (found := depth(data)) > max_depth:
        raise InvalidModelFileError(f"{what}: JSON nested {found} levels deep (the limit is {max_depth})")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError as exc:  # not reached after the depth check; kept so no caller ever sees one
        raise InvalidModelFileError(f"{what}: JSON nested too deeply") from exc
    except UnicodeDecodeError as exc:
        raise InvalidModelFileError(f"{what}: not valid UTF-8 (byte {exc.start})") from exc
    except ValueError as exc:
        raise InvalidModelFileError(f"{what}: not valid JSON ({exc})") from exc


def read(path: Path, max_bytes: int, *, what: str | None = None, max_depth: int = MAX_DEPTH) -> Any:
    """Parse the JSON file at ``path`` (at most ``max_bytes``), with the checks of :func:`loads`."""
    name = what or path.name
    try:
        if path.stat().st_size > max_bytes:
            raise InvalidModelFileError(f"{name}: larger than {max_bytes} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidModelFileError(f"{name}: cannot be read ({exc.strerror or exc})") from exc
    return loads(data, name, max_depth=max_depth)
