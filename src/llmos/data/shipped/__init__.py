"""Original evaluation data shipped with llmos (package data; all content is invented for llmos).

Contract:

* ``zephyr_qa.jsonl`` (:func:`qa_path`, :func:`load_qa`): 300 completion rows about a fictional product, the Zephyr
  Kettle K7 made by the fictional company Lumora Labs. There are 60 facts (``"fact"``: 0..59), each asked in 5
  phrasings (``"variant"``: 0..4) with one fixed answer string shared by all phrasings of the fact. The facts are
  specific invented names and numbers, so a model that was not fine-tuned on them answers wrong. Rows:
  ``{"prompt", "completion", "fact", "variant"}``, canonical JSON Lines.
* Held-out questions: variant 4 of every fact is never used for training. :func:`heldout_split` returns
  ``(train rows = variants 0-3, heldout rows = variant 4)``; a model fine-tuned on the train rows is evaluated on the
  heldout rows, whose answers it has seen but whose wording it has not.
* ``heldout_text.txt`` (:func:`heldout_text_path`): about 2,700 words of original English prose (a history-style essay,
  a how-to, a short story and a short essay) for perplexity evaluation.
"""

from __future__ import annotations

from pathlib import Path

from llmos.data.readers import read_jsonl
from llmos.data.rows import Row
from llmos.errors import InvalidInputError

HERE = Path(__file__).resolve().parent
HELDOUT_VARIANT = 4
TRAIN_VARIANTS = (0, 1, 2, 3)


def qa_path() -> Path:
    """The path of ``zephyr_qa.jsonl``."""
    return HERE / "zephyr_qa.jsonl"


def load_qa() -> list[Row]:
    """All 300 Zephyr K7 question/answer rows, in file order (fact, then variant)."""
    return read_jsonl(qa_path())


def heldout_split(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """``(train, heldout)``: rows with variant 0-3 and rows with variant 4, each in input order."""
    train: list[Row] = []
    heldout: list[Row] = []
    for index, row in enumerate(rows):
        variant = row.get("variant") if isinstance(row, dict) else None
        if variant == HELDOUT_VARIANT and not isinstance(variant, bool):
            heldout.append(row)
        elif variant in TRAIN_VARIANTS and not isinstance(variant, bool):
            train.append(row)
        else:
            raise InvalidInputError(f"row {index} has no integer 'variant' between 0 and 4 (found {variant!r})")
    return train, heldout


def heldout_text_path() -> Path:
    """The path of ``heldout_text.txt``."""
    return HERE / "heldout_text.txt"
