from __future__ import annotations

import pytest

from llmos.errors import InvalidNameError
from llmos.registry.names import ModelRef, parse_ref

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("smollm2", ModelRef("library", "smollm2", "latest")),
        ("smollm2:q4", ModelRef("library", "smollm2", "q4")),
        ("team/model-1.5b:v2", ModelRef("team", "model-1.5b", "v2")),
        ("SmolLM2:Q4_K_M", ModelRef("library", "smollm2", "q4_k_m")),
        (f"smollm2@{DIGEST}", ModelRef("library", "smollm2", None, DIGEST)),
        ("a" * 64, ModelRef("library", "a" * 64, "latest")),
    ],
)
def test_valid_references(text: str, expected: ModelRef) -> None:
    assert parse_ref(text) == expected


def test_display_omits_default_namespace() -> None:
    assert str(parse_ref("smollm2")) == "smollm2:latest"
    assert str(parse_ref("team/x:y")) == "team/x:y"
    assert str(parse_ref(f"x@{DIGEST}")) == f"x@{DIGEST}"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("../../x", "at most one '/'"),
        ("a/../../b", "at most one '/'"),
        ("../x", "must not contain '..'"),
        ("x:", "tag after ':' is empty"),
        (":tag", "name is empty"),
        ("a" * 300, "300 characters"),
        ("a" * 65, "1-64 characters"),
        ("x@sha256:" + "a" * 63, "exactly 64 hex digits"),
        ("x@sha256:" + "a" * 65, "exactly 64 hex digits"),
        ("x@md5:" + "a" * 32, "exactly 64 hex digits"),
        (f"x:tag@{DIGEST}", "either a tag or a digest"),
        ("", "empty"),
        (" x", "whitespace"),
        ("-x", "starting with a letter or digit"),
        ("x/y/z", "at most one '/'"),
        ("x:ta/g", "the tag 'ta/g'"),
        ("x y", "1-64 characters"),
        ("name:.tag", "tag"),
        ("ünïcode", "1-64 characters"),
        ("x\x00y", "1-64 characters"),
    ],
)
def test_invalid_references_are_rejected_with_a_reason(text: str, fragment: str) -> None:
    with pytest.raises(InvalidNameError) as info:
        parse_ref(text)
    assert fragment in info.value.message
    assert "[namespace/]name[:tag]" in info.value.message


def test_long_names_are_shortened_in_messages() -> None:
    with pytest.raises(InvalidNameError) as info:
        parse_ref("b" * 300)
    assert len(info.value.message) < 300
