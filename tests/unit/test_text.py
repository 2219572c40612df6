from __future__ import annotations

import pytest

from llmos.engine.text import IncrementalDecoder, StopMatcher


def test_multibyte_characters_split_across_tokens_are_held_back() -> None:
    decoder = IncrementalDecoder()
    euro = "€".encode()
    assert decoder.feed(euro[:1]) == ""
    assert decoder.feed(euro[1:2]) == ""
    assert decoder.feed(euro[2:] + b"x") == "€x"
    assert decoder.flush() == ""


def test_invalid_bytes_become_replacement_characters() -> None:
    decoder = IncrementalDecoder()
    assert decoder.feed(b"a\xff") == "a\ufffd"
    assert decoder.feed(b"\xe2\x82") == ""
    assert decoder.flush() == "\ufffd"


def run(matcher: StopMatcher, deltas: list[str]) -> list[str]:
    emitted = [matcher.feed(d) for d in deltas]
    emitted.append(matcher.flush())
    return [e for e in emitted if e]


def test_without_stops_text_passes_through() -> None:
    assert run(StopMatcher([]), ["a", "b"]) == ["a", "b"]


def test_stop_string_is_never_emitted_nor_split() -> None:
    matcher = StopMatcher(["END"])
    assert run(matcher, ["hello E", "N", "D and more"]) == ["hello "]
    assert matcher.stopped and matcher.matched == "END"


def test_false_partial_match_is_released() -> None:
    assert "".join(run(StopMatcher(["END"]), ["hello E", "nough"])) == "hello Enough"


def test_partial_match_at_the_end_is_released_by_flush() -> None:
    assert run(StopMatcher(["###"]), ["a#", "#"]) == ["a", "##"]


def test_earliest_of_several_stops_wins() -> None:
    matcher = StopMatcher(["bb", "a"])
    assert run(matcher, ["xxbba"]) == ["xx"]
    assert matcher.matched == "bb"


@pytest.mark.parametrize("split", range(1, 12))
def test_result_does_not_depend_on_chunking(split: int) -> None:
    text = "The answer: Paris.\nUser: next"
    chunks = [text[i : i + split] for i in range(0, len(text), split)]
    assert "".join(run(StopMatcher(["\nUser:"]), chunks)) == "The answer: Paris."
