from __future__ import annotations

import pytest

from llmos.data.tokenize import tokenize
from llmos.errors import InvalidInputError


def encode(text: str) -> list[int]:
    return [len(word) for word in text.split()]


def test_counts_ids_and_report() -> None:
    rows = [{"text": "a bb ccc"}, {"text": "dddd"}, {"prompt": "one ", "completion": "two three"}]
    out, report = tokenize(rows, encode)
    assert [r["num_tokens"] for r in out] == [3, 1, 3]
    assert out[0]["input_ids"] == [1, 2, 3]
    assert out[2]["input_ids"] == [3, 3, 5]
    assert "num_tokens" not in rows[0]
    assert report == {"rows": 3, "total_tokens": 7, "min": 1, "max": 3, "mean": 7 / 3, "p50": 3.0, "p95": 3.0}


def test_without_ids_and_custom_text() -> None:
    rows = [{"prompt": "ignored words here", "completion": "x y", "input_ids": [9]}]
    out, report = tokenize(rows, encode, text_of=lambda row: row["completion"], keep_ids=False)
    assert out == [{"prompt": "ignored words here", "completion": "x y", "num_tokens": 2}]
    assert report["total_tokens"] == 2


def test_bad_input() -> None:
    with pytest.raises(InvalidInputError, match="the dataset is empty"):
        tokenize([], encode)
    with pytest.raises(InvalidInputError, match="row 0"):
        tokenize([{"text": "a"}], lambda text: text)  # type: ignore[arg-type,return-value]
