"""Deterministic dataset splits (train / validation / test, or any named fractions).

Contract: :func:`split` puts every row in exactly one split. The split of a row depends only on ``seed`` and the row's
content (``sha256(seed, row_content_key(row))`` mapped to [0, 1) and compared with the cumulative fractions, in the
order the fractions are given), never on its position or on the other rows: reordering, adding or removing rows never
moves an existing row to another split, and identical rows always share a split (no train/test leakage through exact
duplicates). Fractions must be non-negative, sum to 1 within 1e-6 and be named ``[a-z_]+``. The returned rows are
copies in input order; the report is ``{"seed", "fractions", "counts"}``.

A split dataset stored as one file carries each row's split in a ``"split"`` field: :func:`tag_splits` produces that
list and :func:`split_rows` selects one split from it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from llmos.data.rows import Row, dataset_shape, row_content_key
from llmos.errors import InvalidInputError

DEFAULT_FRACTIONS: Mapping[str, float] = MappingProxyType({"train": 0.8, "validation": 0.1, "test": 0.1})
SPLIT_NAME = re.compile(r"[a-z_]+")


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not SPLIT_NAME.fullmatch(name):
        raise InvalidInputError(f"a split name must match [a-z_]+, not {name!r}", param="split")
    return name


def validate_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Check names and values; return the fractions as a plain dict in the given order."""
    if not isinstance(fractions, Mapping) or not fractions:
        raise InvalidInputError("fractions must map at least one split name to a fraction", param="fractions")
    checked: dict[str, float] = {}
    for name, value in fractions.items():
        _check_name(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise InvalidInputError(
                f"the fraction of split {name!r} must be a non-negative number, not {value!r}", param="fractions"
            )
        checked[name] = float(value)
    total = sum(checked.values())
    if abs(total - 1.0) > 1e-6:
        raise InvalidInputError(f"the fractions must sum to 1, but they sum to {total:g}", param="fractions")
    return checked


def bucket(row: Row, seed: int) -> float:
    """The row's position in [0, 1): a hash of the seed and its content."""
    digest = hashlib.sha256(f"{seed}\x00{row_content_key(row)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split(
    rows: list[Row], *, fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0
) -> tuple[dict[str, list[Row]], dict[str, Any]]:
    """Split rows by content hash; see the module docstring."""
    checked = validate_fractions(fractions)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInputError(f"seed must be an integer, not {seed!r}", param="seed")
    dataset_shape(rows)
    names = list(checked)
    bounds: list[float] = []
    total = 0.0
    for name in names:
        total += checked[name]
        bounds.append(total)
    # the last split with a non-zero fraction takes everything up to 1.0, whatever the rounding
    last = max(i for i, name in enumerate(names) if checked[name] > 0)
    splits: dict[str, list[Row]] = {name: [] for name in names}
    for row in rows:
        u = bucket(row, seed)
        chosen = last
        for i, upper in enumerate(bounds):
            if i >= last:
                break
            if checked[names[i]] > 0 and u < upper:
                chosen = i
                break
        splits[names[chosen]].append(dict(row))
    report: dict[str, Any] = {
        "seed": seed,
        "fractions": checked,
        "counts": {name: len(split_rows_) for name, split_rows_ in splits.items()},
    }
    return splits, report


def split_rows(rows: list[Row], split_name: str) -> list[Row]:
    """The rows whose ``"split"`` field equals ``split_name``, in order."""
    _check_name(split_name)
    return [row for row in rows if row.get("split") == split_name]


def tag_splits(splits: Mapping[str, list[Row]]) -> list[Row]:
    """One list of copies of all rows, each with its ``"split"`` field set, split after split."""
    tagged: list[Row] = []
    for name, rows in splits.items():
        _check_name(name)
        tagged.extend({**row, "split": name} for row in rows)
    return tagged
