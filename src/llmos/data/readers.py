"""Read dataset files into rows, and write/read the canonical JSON Lines form.

Contract: :func:`read_dataset` turns one user file into ``(rows, ReadReport)``. The format comes from the extension
(``.jsonl``/``.ndjson``/``.json``: JSON Lines or one top-level JSON array; ``.csv``; ``.txt``/``.md``; ``.parquet``)
or, for any other name, from sniffing the first bytes. Every returned row has the same shape (see
:mod:`llmos.data.rows`); extra fields are kept. CSV and Parquet columns ``question``/``answer`` become
``prompt``/``completion`` when there is no ``prompt``/``completion`` pair.

Memory is bounded by ``max_line_bytes``, never by the file: lines are read in binary with bounded reads, and a line
longer than the cap is drained in chunks without being kept, then treated as malformed ("line N is longer than X
bytes"). Invalid UTF-8, invalid JSON, a non-object JSON value and a row of another (or no) shape are malformed too.
With ``on_error="fail"`` (the default) any malformed line raises :class:`~llmos.errors.InvalidInputError` listing the
first ten line numbers and reasons; with ``on_error="skip"`` they are skipped and listed in ``ReadReport.skipped``
(details of the first 1000, ``skipped_total`` counts all). A file without rows raises "the dataset is empty"; an
unknown format or shape raises with what was found and what is accepted. Messages name the file by its base name only.

:func:`write_jsonl` writes the canonical form (``json.dumps(row, ensure_ascii=False, sort_keys=True)`` per line,
``"\\n"`` endings, atomically via a temporary file) and :func:`read_jsonl` reads it back strictly.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import decimal
import importlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from llmos.data.rows import ACCEPTED, Row, check_row
from llmos.errors import InvalidInputError

ON_ERROR = ("fail", "skip")
TEXT_MODES = ("line", "paragraph", "document")
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".markdown": "text",
    ".parquet": "parquet",
    ".pq": "parquet",
}
ACCEPTED_FORMATS = "JSON Lines (.jsonl, .json), CSV (.csv), text (.txt, .md) or Parquet (.parquet)"
MAX_SKIPPED_DETAILS = 1000
MAX_ERRORS_SHOWN = 10
DRAIN_CHUNK = 1 << 16
SNIFF_BYTES = 4096
BOM = b"\xef\xbb\xbf"
PARQUET_MAGIC = b"PAR1"


@dataclass
class ReadReport:
    """What :func:`read_dataset` read: detected format and shape, row count and the malformed lines it skipped."""

    format: str
    shape: str
    rows: int
    skipped: list[tuple[int, str]] = field(default_factory=list)
    skipped_total: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "shape": self.shape,
            "rows": self.rows,
            "skipped": [{"line": number, "reason": reason} for number, reason in self.skipped],
            "skipped_total": self.skipped_total,
        }


class _Collector:
    """Accumulates rows of one shape and the malformed records, in file order."""

    def __init__(self, name: str, label: str) -> None:
        self.name = name
        self.label = label
        self.rows: list[Row] = []
        self.shape: str | None = None
        self.errors: list[tuple[int, str]] = []
        self.error_total = 0
        self.shape_errors = 0

    def bad(self, number: int, reason: str) -> None:
        self.error_total += 1
        if len(self.errors) < MAX_SKIPPED_DETAILS:
            self.errors.append((number, reason))

    def add(self, row: object, number: int) -> None:
        where = f"{self.label} {number}"
        try:
            shape = check_row(row, where, list_accepted=False)
        except InvalidInputError as exc:
            self.shape_errors += 1
            self.bad(number, exc.message)
            return
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            self.shape_errors += 1
            self.bad(number, f"{where} has shape {shape!r} but the rows before it have shape {self.shape!r}")
            return
        assert isinstance(row, dict)
        self.rows.append(row)

    def finish(self, fmt: str, on_error: str) -> tuple[list[Row], ReadReport]:
        shown = "; ".join(reason for _, reason in self.errors[:MAX_ERRORS_SHOWN])
        if self.error_total > MAX_ERRORS_SHOWN:
            shown += f"; and {self.error_total - MAX_ERRORS_SHOWN} more"
        accepted = f" Accepted row shapes: {ACCEPTED}." if self.shape_errors else ""
        if self.error_total and on_error == "fail":
            raise InvalidInputError(
                f"{self.error_total} malformed {self.label}{'s' if self.error_total > 1 else ''} in {self.name}: "
                f"{shown}.{accepted} Fix them, or pass on_error='skip' to skip them.",
                param="path",
            )
        if not self.rows or self.shape is None:
            detail = ""
            if self.error_total:
                detail = f": every {self.label} of {self.name} was malformed ({shown}).{accepted}"
            raise InvalidInputError(f"the dataset is empty{detail}", param="path")
        report = ReadReport(fmt, self.shape, len(self.rows), list(self.errors), self.error_total)
        return self.rows, report


# --- bounded binary line reading ------------------------------------------------------------------------------------


def _lines(f: IO[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None, str]]:
    """Yield ``(line number, bytes without the line ending, "")`` or ``(number, None, reason)`` for a too-long line.

    At most ``max_line_bytes + 1`` bytes of one line are ever held; the rest of a longer line is read and dropped.
    """
    number = 0
    while True:
        line = f.readline(max_line_bytes + 1)
        if not line:
            return
        number += 1
        if number == 1 and line.startswith(BOM):
            line = line[len(BOM) :]
        if line.endswith(b"\n"):
            line = line[:-1]
        elif len(line) > max_line_bytes:
            while True:
                chunk = f.readline(DRAIN_CHUNK)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield number, None, f"line {number} is longer than {max_line_bytes} bytes"
            continue
        if line.endswith(b"\r"):
            line = line[:-1]
        yield number, line, ""


def _decoded_lines(f: IO[bytes], max_line_bytes: int) -> Iterator[tuple[int, str | None, str]]:
    """Like :func:`_lines` but decoded from UTF-8; invalid UTF-8 gives ``(number, None, reason)``."""
    for number, raw, reason in _lines(f, max_line_bytes):
        if raw is None:
            yield number, None, reason
            continue
        try:
            yield number, raw.decode("utf-8"), ""
        except UnicodeDecodeError as exc:
            yield number, None, f"line {number} is not valid UTF-8 (byte {exc.start + 1})"


# --- format detection -----------------------------------------------------------------------------------------------


def _first_char(head: bytes) -> str:
    stripped = head.removeprefix(BOM).lstrip()
    return chr(stripped[0]) if stripped else ""


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # a multi-byte character cut by the sniff window is fine
        return exc.start >= len(head) - 3 and exc.reason == "unexpected end of data"
    return True


def _sniff(path: Path, head: bytes) -> str:
    ext = path.suffix.lower()
    if ext in EXTENSIONS:
        fmt = EXTENSIONS[ext]
        if fmt == "parquet" and not head.startswith(PARQUET_MAGIC):
            raise InvalidInputError(f"{path.name} is not a Parquet file (it does not start with PAR1)", param="path")
        return fmt
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if not _looks_like_text(head):
        raise InvalidInputError(
            f"cannot read {path.name}: unknown format (extension {ext or 'none'!r}, binary content); "
            f"accepted formats: {ACCEPTED_FORMATS}",
            param="path",
        )
    if _first_char(head) in ("{", "["):
        return "jsonl"
    first_line = head.removeprefix(BOM).split(b"\n", 1)[0].decode("utf-8", "replace")
    columns = {c.strip().lower() for c in first_line.split(",")}
    if "," in first_line and (columns & {"text", "prompt", "question"}):
        return "csv"
    return "text"


# --- JSON ------------------------------------------------------------------------------------------------------------


def _json_kind(value: object) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _read_json(
    path: Path, f: IO[bytes], head: bytes, size: int, max_line_bytes: int, on_error: str
) -> tuple[list[Row], ReadReport]:
    first = _first_char(head)
    whole_file = first == "[" or (first == "{" and path.suffix.lower() == ".json")
    if whole_file and size > max_line_bytes:
        if first == "[":
            raise InvalidInputError(
                f"{path.name} starts with '[' (one JSON array) and is larger than {max_line_bytes} bytes; a JSON array "
                "is read whole, so convert it to JSON Lines (one object per line)",
                param="path",
            )
        whole_file = False
    if whole_file:
        try:
            value = json.loads(f.read().decode("utf-8-sig"))
        except (ValueError, RecursionError):
            value = None  # not one JSON document: read it as JSON Lines below
        f.seek(0)
        if isinstance(value, list):
            collector = _Collector(path.name, "element")
            for index, item in enumerate(value, start=1):
                if isinstance(item, dict):
                    collector.add(item, index)
                else:
                    collector.bad(index, f"element {index} is a JSON {_json_kind(item)}, not an object")
            return collector.finish("json", on_error)
        if isinstance(value, dict):
            collector = _Collector(path.name, "line")
            collector.add(value, 1)
            return collector.finish("json", on_error)
    collector = _Collector(path.name, "line")
    for number, text, reason in _decoded_lines(f, max_line_bytes):
        if text is None:
            collector.bad(number, reason)
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            collector.bad(number, f"line {number} is not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        except (ValueError, RecursionError):
            collector.bad(number, f"line {number} is not valid JSON")
            continue
        if not isinstance(value, dict):
            collector.bad(number, f"line {number} is a JSON {_json_kind(value)}, not an object")
            continue
        collector.add(value, number)
    return collector.finish("jsonl", on_error)


# --- CSV -------------------------------------------------------------------------------------------------------------


def _tabular_row(row: Row) -> Row:
    """Map question/answer columns to prompt/completion when the row has no prompt/completion pair."""
    if "question" in row and "answer" in row and "prompt" not in row and "completion" not in row:
        row = dict(row)
        row["prompt"] = row.pop("question")
        row["completion"] = row.pop("answer")
    return row


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    old = csv.field_size_limit()
    csv.field_size_limit(max(limit, 1))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _csv_header(header: list[str], name: str) -> list[str]:
    columns: list[str] = []
    for position, raw in enumerate(header, start=1):
        column = raw.strip()
        if column.lower() in ("text", "prompt", "completion", "question", "answer"):
            column = column.lower()
        if not column:
            column = f"column_{position}"
        if column in columns:
            raise InvalidInputError(f"the CSV header of {name} names column {column!r} twice", param="path")
        columns.append(column)
    found = set(columns)
    if not ({"prompt", "completion"} <= found or {"question", "answer"} <= found or "text" in found):
        raise InvalidInputError(
            f"the CSV header of {name} has columns {columns}, which match no accepted shape; a CSV dataset needs a "
            "'text' column, 'prompt' and 'completion' columns, or 'question' and 'answer' columns",
            param="path",
        )
    return columns


def _read_csv(path: Path, f: IO[bytes], max_line_bytes: int, on_error: str) -> tuple[list[Row], ReadReport]:
    bad_lines: dict[int, str] = {}

    def lines() -> Iterator[str]:
        for number, text, reason in _decoded_lines(f, max_line_bytes):
            if text is None:
                bad_lines[number] = reason
                yield "\n"
            else:
                yield text + "\n"

    collector = _Collector(path.name, "line")
    with _csv_field_limit(max_line_bytes):
        reader = csv.reader(lines())
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise InvalidInputError(f"the CSV header of {path.name} cannot be read: {exc}", param="path") from None
        if header is None or not any(h.strip() for h in header):
            raise InvalidInputError(f"the dataset is empty: {path.name} has no CSV header", param="path")
        if 1 in bad_lines:
            raise InvalidInputError(f"the CSV header of {path.name} cannot be read: {bad_lines[1]}", param="path")
        columns = _csv_header(header, path.name)
        previous = reader.line_num
        while True:
            start = previous + 1
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                collector.bad(start, f"line {start} is not valid CSV ({exc})")
                previous = reader.line_num
                continue
            previous = reader.line_num
            bad = [n for n in range(start, reader.line_num + 1) if n in bad_lines]
            if bad:
                collector.bad(bad[0], bad_lines[bad[0]])
                continue
            if not record or (len(record) == 1 and not record[0].strip() and len(columns) > 1):
                continue
            if len(record) != len(columns):
                collector.bad(start, f"line {start} has {len(record)} fields but the header has {len(columns)}")
                continue
            collector.add(_tabular_row(dict(zip(columns, record, strict=True))), start)
    return collector.finish("csv", on_error)


# --- text ------------------------------------------------------------------------------------------------------------


def _read_text(
    path: Path, f: IO[bytes], size: int, max_line_bytes: int, on_error: str, text_mode: str
) -> tuple[list[Row], ReadReport]:
    if text_mode == "document":
        collector = _Collector(path.name, "document")
        if size > max_line_bytes:
            collector.bad(1, f"the document is longer than {max_line_bytes} bytes")
            return collector.finish("text", on_error)
        try:
            text = f.read().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            collector.bad(1, f"the document is not valid UTF-8 (byte {exc.start + 1})")
            return collector.finish("text", on_error)
        if text.strip():
            collector.add({"text": text.strip()}, 1)
        return collector.finish("text", on_error)
    if text_mode == "line":
        collector = _Collector(path.name, "line")
        for number, line, reason in _decoded_lines(f, max_line_bytes):
            if line is None:
                collector.bad(number, reason)
            elif line.strip():
                collector.add({"text": line.rstrip()}, number)
        return collector.finish("text", on_error)
    collector = _Collector(path.name, "paragraph")
    parts: list[str] = []
    start = 0
    held = 0
    failure = ""

    def flush() -> None:
        nonlocal parts, held, failure
        if failure:
            collector.bad(start, failure)
        elif parts:
            collector.add({"text": "\n".join(parts).strip()}, start)
        parts, held, failure = [], 0, ""

    for number, line, reason in _decoded_lines(f, max_line_bytes):
        if line is not None and not line.strip():
            flush()
            continue
        if not parts and not failure:
            start = number
        if line is None:
            failure = failure or f"paragraph at line {start}: {reason}"
            parts = []
            continue
        if failure:
            continue
        held += len(line) + 1
        if held > max_line_bytes:
            failure = f"paragraph at line {start} is longer than {max_line_bytes} bytes"
            parts = []
            continue
        parts.append(line.rstrip())
    flush()
    return collector.finish("text", on_error)


# --- Parquet ---------------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | dt.timedelta):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _read_parquet(path: Path, on_error: str) -> tuple[list[Row], ReadReport]:
    try:
        pq = importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise InvalidInputError(
            f"reading {path.name} needs pyarrow, which is not installed: pip install pyarrow", param="path"
        ) from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError family
        raise InvalidInputError(f"{path.name} is not a readable Parquet file: {exc}", param="path") from None
    collector = _Collector(path.name, "row")
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                collector.add(_tabular_row(_jsonable(row)), number)
    except InvalidInputError:
        raise
    except Exception as exc:
        raise InvalidInputError(f"{path.name} is not a readable Parquet file: {exc}", param="path") from None
    return collector.finish("parquet", on_error)


# --- public API ------------------------------------------------------------------------------------------------------


def read_dataset(
    path: Path,
    *,
    on_error: str = "fail",
    max_line_bytes: int = 16 * 1024 * 1024,
    text_mode: str = "line",
) -> tuple[list[Row], ReadReport]:
    """Read one dataset file; see the module docstring for formats, limits and errors."""
    if on_error not in ON_ERROR:
        raise InvalidInputError(f"on_error must be one of {', '.join(ON_ERROR)}, not {on_error!r}", param="on_error")
    if text_mode not in TEXT_MODES:
        raise InvalidInputError(
            f"text_mode must be one of {', '.join(TEXT_MODES)}, not {text_mode!r}", param="text_mode"
        )
    if isinstance(max_line_bytes, bool) or not isinstance(max_line_bytes, int) or max_line_bytes < 1:
        raise InvalidInputError(
            f"max_line_bytes must be a positive integer, not {max_line_bytes!r}", param="max_line_bytes"
        )
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path.name} does not exist or is not a file", param="path")
    size = path.stat().st_size
    if size == 0:
        raise InvalidInputError(f"the dataset is empty: {path.name} has no bytes", param="path")
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
        f.seek(0)
        fmt = _sniff(path, head)
        if fmt == "jsonl":
            return _read_json(path, f, head, size, max_line_bytes, on_error)
        if fmt == "csv":
            return _read_csv(path, f, max_line_bytes, on_error)
        if fmt == "text":
            return _read_text(path, f, size, max_line_bytes, on_error, text_mode)
    return _read_parquet(path, on_error)


def write_jsonl(rows: list[Row], path: Path) -> None:
    """Write rows in the canonical form, atomically: the file at ``path`` is either the old one or complete."""
    lines: list[str] = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InvalidInputError(f"row {index} is a {type(row).__name__}, not an object", param="rows")
        try:
            lines.append(json.dumps(row, ensure_ascii=False, sort_keys=True, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"row {index} cannot be written as JSON: {exc}", param="rows") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for line in lines:
                f.write(line.encode("utf-8"))
                f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_jsonl(path: Path) -> list[Row]:
    """Read a canonical JSON Lines file (as written by :func:`write_jsonl`); any bad line raises."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path.name} does not exist or is not a file", param="path")
    rows: list[Row] = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise InvalidInputError(f"{path.name} line {number} is not valid JSON", param="path") from None
            if not isinstance(value, dict):
                raise InvalidInputError(
                    f"{path.name} line {number} is a JSON {_json_kind(value)}, not an object", param="path"
                )
            rows.append(value)
    return rows
