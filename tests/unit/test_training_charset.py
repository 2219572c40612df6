"""The character tokenizer: exact round trips, fixed special ids, and a real Hugging Face save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llmos.errors import InvalidInputError
from llmos.training.charset import SPECIAL_TOKENS, build_char_tokenizer

TEXTS = ["hello world\n", "  tabs\there,  déjà vu!\r\n", "emoji 🦙 and 中文"]


def test_vocabulary_is_specials_then_sorted_characters() -> None:
    tokenizer = build_char_tokenizer(TEXTS)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    chars = sorted(set("".join(TEXTS)))
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(chars)
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert tokenizer.convert_tokens_to_ids(chars) == list(range(4, 4 + len(chars)))
    # the same characters in another order give the same ids
    assert build_char_tokenizer(list(reversed(TEXTS))).get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize("text", [*TEXTS, "", " ", "\n\n", "  hello there  ", "a\th\r\nd 🦙"])
def test_round_trip_is_exact(text: str) -> None:
    tokenizer = build_char_tokenizer(TEXTS)
    assert set(text) <= set(tokenizer.get_vocab())
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text
    with_specials = tokenizer(text)["input_ids"]
    assert with_specials == [tokenizer.bos_token_id, *ids]
    assert tokenizer.decode(with_specials, skip_special_tokens=True) == text


def test_unknown_characters_become_unk() -> None:
    tokenizer = build_char_tokenizer(["abc"])
    assert tokenizer.encode("axc", add_special_tokens=False) == [4, 3, 6]
    assert tokenizer.decode([4, 3, 6], skip_special_tokens=True) == "ac"


def test_save_and_load_with_auto_tokenizer(tmp_path: Path) -> None:
    tokenizer = build_char_tokenizer(TEXTS)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert loaded.pad_token == "<pad>"
    assert loaded.eos_token == "<eos>"


@pytest.mark.parametrize("texts", [[], [""], "a string", ["ok", 3]])
def test_bad_texts_are_refused(texts: object) -> None:
    with pytest.raises(InvalidInputError) as info:
        build_char_tokenizer(texts)  # type: ignore[arg-type]
    assert info.value.param == "texts"
