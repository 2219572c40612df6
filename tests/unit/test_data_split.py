from __future__ import annotations

import random
from typing import Any

import pytest

from llmos.data.split import split, split_rows, tag_splits
from llmos.errors import InvalidInputError

ROWS = [{"prompt": f"question {i}", "completion": f"answer {i}", "id": i} for i in range(2000)]


def ids(rows: list[dict[str, Any]]) -> set[int]:
    return {row["id"] for row in rows}


def test_every_row_lands_in_exactly_one_split_with_roughly_the_fractions() -> None:
    splits, report = split(ROWS)
    assert list(splits) == ["train", "validation", "test"]
    assert sorted(id_ for part in splits.values() for id_ in ids(part)) == list(range(2000))
    counts = report["counts"]
    assert sum(counts.values()) == 2000
    assert 1500 < counts["train"] < 1700
    assert 120 < counts["validation"] < 280 and 120 < counts["test"] < 280
    assert report["seed"] == 0
    assert report["fractions"] == {"train": 0.8, "validation": 0.1, "test": 0.1}


def test_deterministic_and_independent_of_order_and_other_rows() -> None:
    first, _ = split(ROWS, seed=7)
    shuffled = list(ROWS)
    random.Random(3).shuffle(shuffled)
    second, _ = split(shuffled, seed=7)
    subset, _ = split(ROWS[:100], seed=7)
    for name in first:
        assert ids(first[name]) == ids(second[name])
        assert ids(subset[name]) == ids(first[name]) & set(range(100))
    other, _ = split(ROWS, seed=8)
    assert ids(other["test"]) != ids(first["test"])


def test_identical_content_shares_a_split() -> None:
    rows = [{"text": "same", "id": 1}, {"text": "same", "id": 2}] + [{"text": f"t{i}", "id": i + 3} for i in range(50)]
    splits, _ = split(rows, fractions={"a": 0.5, "b": 0.5})
    together = [name for name, part in splits.items() if {1, 2} <= ids(part)]
    assert len(together) == 1


def test_zero_fraction_and_single_split() -> None:
    splits, report = split(ROWS[:200], fractions={"train": 0.9, "dev": 0.0, "test": 0.1})
    assert splits["dev"] == [] and report["counts"]["dev"] == 0
    splits, _ = split(ROWS[:50], fractions={"all": 1.0})
    assert len(splits["all"]) == 50


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        ({"train": 0.8, "test": 0.1}, "sum to 0.9"),
        ({"train": 1.2, "test": -0.2}, "non-negative"),
        ({"Train": 1.0}, r"\[a-z_\]\+"),
        ({}, "at least one"),
    ],
)
def test_bad_fractions_are_refused(fractions: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        split(ROWS[:10], fractions=fractions)


def test_tag_and_select_splits() -> None:
    splits, _ = split(ROWS[:300], seed=1)
    tagged = tag_splits(splits)
    assert len(tagged) == 300
    assert all(row["split"] in splits for row in tagged)
    for name, part in splits.items():
        selected = split_rows(tagged, name)
        assert ids(selected) == ids(part)
        assert all(row["split"] == name for row in selected)
    assert "split" not in splits["train"][0]  # tagging copies rows
    assert split_rows(tagged, "nothing") == []
