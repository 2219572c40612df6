from __future__ import annotations

import pytest

from llmos.errors import InvalidInputError
from llmos.formats.chat_template import CHATML_TEMPLATE, render_chat
from llmos.types import ChatMessage


def test_chatml_fallback() -> None:
    text = render_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")], None)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat([ChatMessage("user", "Hi")], CHATML_TEMPLATE) == render_chat([ChatMessage("user", "Hi")], None)


def test_hugging_face_conventions() -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}[{{ m['role'] }}]{{ m['content'] | tojson }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    text = render_chat([ChatMessage("user", "é")], template, bos_token="<s>")
    assert text == '<s>[user]"é">'
    with pytest.raises(InvalidInputError, match="no tools"):
        render_chat([ChatMessage("tool", "x")], template)


def test_sandbox_blocks_python_internals() -> None:
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InvalidInputError):
        render_chat([ChatMessage("user", "x")], evil)


def test_empty_conversation_and_bad_roles_are_refused() -> None:
    with pytest.raises(InvalidInputError):
        render_chat([], None)
    with pytest.raises(InvalidInputError):
        ChatMessage("wizard", "x")  # type: ignore[arg-type]
