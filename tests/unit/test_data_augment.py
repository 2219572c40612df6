from __future__ import annotations

import pytest

from llmos.data.augment import PARAPHRASE_INSTRUCTION, augment_rules, clean_paraphrase, expand_templates, paraphrase
from llmos.errors import InvalidInputError

QA = [
    {"prompt": "What colour is the K7?", "completion": "Fjord Blue.", "id": 1},
    {"prompt": "How heavy is the K7?", "completion": "1.18 kg.", "id": 2},
]


# --- templates -------------------------------------------------------------------------------------------------------


def test_expand_templates_cartesian_product_in_order() -> None:
    rows = expand_templates(
        {
            "template": {
                "prompt": "What is the {attr} of {product}?",
                "completion": "The {product} {attr} is {{secret}}.",
            },
            "values": {"attr": ["weight", "price"], "product": ["K7", "K9", 3]},
        }
    )
    assert len(rows) == 6
    assert rows[0] == {"prompt": "What is the weight of K7?", "completion": "The K7 weight is {secret}."}
    assert rows[2]["prompt"] == "What is the weight of 3?"
    assert rows[5] == {"prompt": "What is the price of 3?", "completion": "The 3 price is {secret}."}


def test_expand_chat_template() -> None:
    rows = expand_templates(
        {
            "template": {
                "messages": [{"role": "user", "content": "Hi {name}"}, {"role": "assistant", "content": "Hey"}]
            },
            "values": {"name": ["Ann", "Bo"]},
        }
    )
    assert [r["messages"][0]["content"] for r in rows] == ["Hi Ann", "Hi Bo"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"template": {"prompt": "{a} {b}", "completion": "x"}, "values": {"a": ["1"]}}, "without values: b"),
        ({"template": {"prompt": "{a}", "completion": "x"}, "values": {"a": ["1"], "c": ["2"]}}, "never uses: c"),
        ({"template": {"prompt": "{a.upper}", "completion": "x"}, "values": {"a": ["1"]}}, "plain names"),
        ({"template": {"prompt": "{a!r}", "completion": "x"}, "values": {"a": ["1"]}}, "plain names"),
        ({"template": {"prompt": "{a", "completion": "x"}, "values": {"a": ["1"]}}, "not a valid template"),
        ({"template": {"prompt": "{a}", "completion": "x"}, "values": {"a": []}}, "non-empty list"),
        ({"template": {"question": "{a}"}, "values": {"a": ["1"]}}, "match no accepted shape"),
        ({"values": {}}, "a template spec is"),
    ],
)
def test_expand_templates_errors(spec: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        expand_templates(spec)


def test_expand_templates_is_bounded_before_rendering() -> None:
    values = {name: [str(i) for i in range(50)] for name in "abc"}  # 125,000 rows
    with pytest.raises(InvalidInputError, match="125000 rows, more than the limit of 100000"):
        expand_templates({"template": {"text": "{a}{b}{c}"}, "values": values})


# --- rules -----------------------------------------------------------------------------------------------------------


def test_augment_rules_adds_marked_variants_after_each_original() -> None:
    rows, report = augment_rules(QA, templates=["Q: {prompt}", "{prompt} Please answer briefly.", "{prompt}"])
    assert [r["prompt"] for r in rows] == [
        "What colour is the K7?",
        "Q: What colour is the K7?",
        "What colour is the K7? Please answer briefly.",
        "How heavy is the K7?",
        "Q: How heavy is the K7?",
        "How heavy is the K7? Please answer briefly.",
    ]
    assert [r.get("augmented") for r in rows] == [None, "rule", "rule"] * 2
    assert all(r["completion"] == QA[0]["completion"] for r in rows[:3])
    assert rows[1]["id"] == 1
    assert report["added"] == 4 and report["per_template"]["{prompt}"] == 0
    assert "augmented" not in QA[0]


def test_augment_rules_chat_rewrites_last_user_message() -> None:
    chat = [
        {
            "messages": [
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "second"},
                {"role": "assistant", "content": "done"},
            ]
        }
    ]
    rows, _ = augment_rules(chat, templates=["Q: {prompt}"])
    assert [m["content"] for m in rows[1]["messages"]] == ["first", "ok", "Q: second", "done"]
    assert chat[0]["messages"][2]["content"] == "second"


def test_augment_rules_errors() -> None:
    with pytest.raises(InvalidInputError, match="needs completion or chat rows"):
        augment_rules([{"text": "x"}], templates=["Q: {prompt}"])
    with pytest.raises(InvalidInputError, match=r"must use the placeholder \{prompt\}"):
        augment_rules(QA, templates=["Q: {question}"])
    with pytest.raises(InvalidInputError, match="at least one"):
        augment_rules(QA, templates=[])


# --- model paraphrases -----------------------------------------------------------------------------------------------


class FakeModel:
    """Answers each instruction with a scripted reply; records every batch."""

    def __init__(self, replies: list[list[str]]) -> None:
        self.replies = replies
        self.calls: list[list[str]] = []

    def __call__(self, instructions: list[str]) -> list[str]:
        self.calls.append(instructions)
        return self.replies[len(self.calls) - 1]


def test_paraphrase_batches_once_per_round_and_cleans_outputs() -> None:
    model = FakeModel(
        [
            ['Rewritten question: "Which colour does the K7 have?"', "Sure! Here it is:\nWhat is the K7's weight?"],
            ["What colour is the K7?", "What does the K7 weigh? " * 10],
        ]
    )
    rows, report = paraphrase(QA, model, variants=2)
    assert len(model.calls) == 2
    assert model.calls[0][0] == f"{PARAPHRASE_INSTRUCTION}\n\nWhat colour is the K7?"
    assert model.calls[0] == model.calls[1]
    assert rows[:2] == QA
    assert rows[2:] == [
        {"prompt": "Which colour does the K7 have?", "completion": "Fjord Blue.", "id": 1, "augmented": "model"},
        {"prompt": "What is the K7's weight?", "completion": "1.18 kg.", "id": 2, "augmented": "model"},
    ]
    assert report["rejected"] == {"empty": 0, "identical": 1, "too_long": 1, "duplicate": 0}
    assert (report["added"], report["calls"], report["requested"]) == (2, 2, 4)


def test_paraphrase_rejects_empty_and_repeated_outputs() -> None:
    model = FakeModel([["Which colour has the K7?", "  "], ["which colour has the K7", "'' "]])
    rows, report = paraphrase(QA, model, variants=2)
    assert len(rows) == 3
    assert report["rejected"] == {"empty": 2, "identical": 0, "too_long": 0, "duplicate": 1}


def test_paraphrase_chat_and_errors() -> None:
    chat = [{"messages": [{"role": "user", "content": "Is it blue?"}, {"role": "assistant", "content": "Yes."}]}]
    rows, _ = paraphrase(chat, lambda batch: ["Q: Does it come in blue?"] * len(batch))
    assert rows[1]["messages"] == [
        {"role": "user", "content": "Does it come in blue?"},
        {"role": "assistant", "content": "Yes."},
    ]
    with pytest.raises(InvalidInputError, match="returned 1 outputs for 2 instructions"):
        paraphrase(QA, lambda batch: ["only one"])
    with pytest.raises(InvalidInputError, match="variants"):
        paraphrase(QA, lambda batch: batch, variants=0)
    with pytest.raises(InvalidInputError, match="needs completion or chat rows"):
        paraphrase([{"text": "x"}], lambda batch: batch)


def test_clean_paraphrase() -> None:
    assert clean_paraphrase("1. “How much is it?”\nExplanation: ...") == "How much is it?"
    assert clean_paraphrase("Paraphrase - What is it?") == "What is it?"
    assert clean_paraphrase("\n\n") == ""
