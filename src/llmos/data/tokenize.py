"""Token counts for a dataset.

Contract: :func:`tokenize` calls ``encode`` once per row on ``text_of(row)`` (by default
:func:`~llmos.data.rows.row_text`) and returns new rows with ``"num_tokens"`` and, when ``keep_ids``, ``"input_ids"``
(a list of ints), plus a report ``{"rows", "total_tokens", "min", "max", "mean", "p50", "p95"}``. The tokenizer is a
plain callable, so this module never loads a model. An empty dataset, or ``encode`` returning something that is not a
sequence of integers, raises :class:`~llmos.errors.InvalidInputError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llmos.data.rows import Row, row_text
from llmos.errors import InvalidInputError


def tokenize(
    rows: list[Row],
    encode: Callable[[str], Sequence[int]],
    *,
    text_of: Callable[[Row], str] = row_text,
    keep_ids: bool = True,
) -> tuple[list[Row], dict[str, Any]]:
    """Add token counts (and ids) to each row; see the module docstring."""
    if not rows:
        raise InvalidInputError("the dataset is empty", param="rows")
    out: list[Row] = []
    counts: list[int] = []
    for index, row in enumerate(rows):
        ids = encode(text_of(row))
        if isinstance(ids, str | bytes) or not all(isinstance(i, int | np.integer) for i in ids):
            raise InvalidInputError(f"the tokenizer returned something other than token ids for row {index}")
        new = dict(row)
        new["num_tokens"] = len(ids)
        if keep_ids:
            new["input_ids"] = [int(i) for i in ids]
        else:
            new.pop("input_ids", None)
        out.append(new)
        counts.append(len(ids))
    values = np.asarray(counts, dtype=np.float64)
    report: dict[str, Any] = {
        "rows": len(out),
        "total_tokens": int(sum(counts)),
        "min": int(min(counts)),
        "max": int(max(counts)),
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
    }
    return out, report
