"""Row shapes: classify, validate and flatten dataset rows.

Contract: a row is a ``dict`` of exactly one shape, checked in this order:

* chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`` (a non-empty list);
* completion: ``{"prompt": str, "completion": str}``;
* text: ``{"text": str}``.

Any other fields ("id", "split", "input_ids", ...) are allowed and ignored here. :func:`row_shape` and
:func:`dataset_shape` raise :class:`~llmos.errors.InvalidInputError` naming the fields found, the accepted shapes and,
for datasets, the index of the first offending row. :func:`row_text` flattens a row into one string and
:func:`row_content_key` gives the canonical string two rows share exactly when their shape fields are equal (extra
fields do not count), which is what exact deduplication and deterministic splitting hash.
"""

from __future__ import annotations

import json
from typing import Any

from llmos.errors import InvalidInputError

Row = dict[str, Any]

SHAPES = ("text", "completion", "chat")
ROLES = ("system", "user", "assistant")

ACCEPTED = (
    'text {"text": str}, completion {"prompt": str, "completion": str}, '
    'or chat {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}'
)


def check_row(row: object, where: str = "row", *, list_accepted: bool = True) -> str:
    """The shape of ``row``; raise InvalidInputError whose message starts with ``where`` (e.g. "line 7").

    ``list_accepted=False`` leaves the list of accepted shapes out of the message (for callers that print it once).
    """
    suffix = f"; accepted shapes: {ACCEPTED}" if list_accepted else ""
    if not isinstance(row, dict):
        raise InvalidInputError(f"{where} is a {type(row).__name__}, not an object{suffix}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise InvalidInputError(f'{where} has "messages" that is not a non-empty list{suffix}')
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise InvalidInputError(f"{where}: message {i} is a {type(message).__name__}, not an object")
            role = message.get("role")
            if role not in ROLES:
                raise InvalidInputError(f"{where}: message {i} has role {role!r}; accepted roles: {', '.join(ROLES)}")
            if not isinstance(message.get("content"), str):
                raise InvalidInputError(f'{where}: message {i} has no string "content"')
        return "chat"
    if "prompt" in row or "completion" in row:
        if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            return "completion"
        if "text" not in row:
            raise InvalidInputError(
                f'{where} has fields {sorted(map(str, row))} but a completion row needs both "prompt" and '
                f'"completion" as strings{suffix}'
            )
    if isinstance(row.get("text"), str):
        return "text"
    raise InvalidInputError(f"{where} has fields {sorted(map(str, row))}, which match no accepted shape{suffix}")


def row_shape(row: Row) -> str:
    """Return ``"text"``, ``"completion"`` or ``"chat"``; raise InvalidInputError when the row has none of them."""
    return check_row(row)


def dataset_shape(rows: list[Row]) -> str:
    """The one shape every row shares; raise naming the first row that has another (or no) shape."""
    if not isinstance(rows, list):
        raise InvalidInputError(f"a dataset is a list of rows, not a {type(rows).__name__}")
    if not rows:
        raise InvalidInputError("the dataset is empty")
    first: str | None = None
    for index, row in enumerate(rows):
        shape = check_row(row, f"row {index}")
        if first is None:
            first = shape
        elif shape != first:
            raise InvalidInputError(
                f"row {index} has shape {shape!r} but row 0 has shape {first!r}; all rows of a dataset must share "
                "one shape"
            )
    assert first is not None
    return first


def row_text(row: Row) -> str:
    """The row as one string: the text; prompt + completion; or ``"role: content"`` lines for chat."""
    shape = row_shape(row)
    if shape == "text":
        return str(row["text"])
    if shape == "completion":
        return str(row["prompt"]) + str(row["completion"])
    return "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"])


def row_fields(row: Row) -> list[str]:
    """The string contents of the row's shape fields, in order (text; prompt, completion; message contents)."""
    shape = row_shape(row)
    if shape == "text":
        return [row["text"]]
    if shape == "completion":
        return [row["prompt"], row["completion"]]
    return [m["content"] for m in row["messages"]]


def row_content_key(row: Row) -> str:
    """A canonical string of the row's shape fields only, equal for two rows exactly when their content is equal."""
    shape = row_shape(row)
    content: list[Any]
    if shape == "text":
        content = [shape, row["text"]]
    elif shape == "completion":
        content = [shape, row["prompt"], row["completion"]]
    else:
        content = [shape, [[m["role"], m["content"]] for m in row["messages"]]]
    return json.dumps(content, ensure_ascii=False, separators=(",", ":"))
