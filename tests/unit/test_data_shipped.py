from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest

from llmos.data.cleaning import CleanOptions, clean
from llmos.data.readers import read_dataset
from llmos.data.shipped import heldout_split, heldout_text_path, load_qa, qa_path
from llmos.errors import InvalidInputError


def test_qa_file_has_60_facts_with_5_variants_each() -> None:
    rows = load_qa()
    assert len(rows) == 300
    assert all(set(row) == {"prompt", "completion", "fact", "variant"} for row in rows)
    by_fact: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_fact[row["fact"]].append(row)
    assert sorted(by_fact) == list(range(60))
    for fact, variants in by_fact.items():
        assert sorted(v["variant"] for v in variants) == [0, 1, 2, 3, 4], fact
        assert len({v["completion"] for v in variants}) == 1, fact  # one fixed answer per fact
        assert len({v["prompt"] for v in variants}) == 5, fact
    assert len({row["prompt"] for row in rows}) == 300
    assert len({row["completion"] for row in rows}) == 60


def test_qa_file_is_a_valid_completion_dataset() -> None:
    rows, report = read_dataset(qa_path())
    assert (report.format, report.shape, report.rows, report.skipped) == ("jsonl", "completion", 300, [])
    assert all(row["prompt"].endswith(("?", ".")) and len(row["completion"]) < 120 for row in rows)


def test_heldout_split_is_variant_4() -> None:
    train, heldout = heldout_split(load_qa())
    assert (len(train), len(heldout)) == (240, 60)
    assert {row["variant"] for row in heldout} == {4}
    assert {row["variant"] for row in train} == {0, 1, 2, 3}
    assert sorted(row["fact"] for row in heldout) == list(range(60))
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in heldout}
    with pytest.raises(InvalidInputError, match="row 0 has no integer 'variant'"):
        heldout_split([{"prompt": "q", "completion": "a"}])


def test_heldout_text() -> None:
    text = heldout_text_path().read_text(encoding="utf-8")
    assert 2500 <= len(text.split()) <= 3500
    assert text.isascii() or all(ord(ch) < 0x2100 for ch in text)
    assert "Zephyr" not in text  # independent of the QA facts


def test_default_cleaning_keeps_every_qa_row() -> None:
    rows = load_qa()
    cleaned, report = clean(rows, CleanOptions(languages=("en",)))
    assert cleaned == rows
    assert report["rows_out"] == 300 and sum(report["dropped"].values()) == 0
