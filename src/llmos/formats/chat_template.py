"""Render a conversation with a model's own chat template.

Contract: :func:`render_chat` evaluates the Jinja template stored in the model's metadata in a sandbox (no attribute
access to Python internals, no file or network access), with the variables Hugging Face templates expect
(``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception``, ``strftime_now``).
A model without a template falls back to ChatML, the most common format. Template errors become
:class:`~llmos.errors.InvalidInputError` (the template rejected these messages) rather than crashes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmos.errors import InvalidInputError
from llmos.types import ChatMessage

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML turns with no implicit system prompt; used when a model carries no template of its own."""


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
"""Gemma 1-3 turns (``<start_of_turn>user`` / ``model``); a system message is folded into the first user turn."""

_BY_ARCHITECTURE = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}


def template_for(own_template: str | None, architecture: str | None) -> str:
    """The template to use: the model's own, else a known one for its architecture, else ChatML."""
    if own_template:
        return own_template
    return _BY_ARCHITECTURE.get((architecture or "").lower(), CHATML_TEMPLATE)


def _raise(message: str) -> NoReturn:
    raise InvalidInputError(f"the model's chat template rejected the messages: {message}", param="messages")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise InvalidInputError(f"the model's chat template does not compile: {exc}") from exc


def supports_tools(template: str | None) -> bool:
    """Whether a template renders the ``tools`` variable itself (Hugging Face tool-use templates do)."""
    return bool(template) and "tools" in str(template)


def _message(message: ChatMessage) -> dict[str, Any]:
    item: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:  # as Hugging Face templates expect them: arguments as an object
        item["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        item["tool_call_id"] = message.tool_call_id
    return item


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def render_chat(
    messages: Sequence[ChatMessage],
    template: str | None,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    add_generation_prompt: bool = True,
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    """``tools`` (OpenAI tool objects) are passed to a template that renders them (see :func:`supports_tools`)."""
    if not messages:
        raise InvalidInputError("messages must contain at least one message", param="messages")
    compiled = _compile(template or CHATML_TEMPLATE)
    try:
        return compiled.render(
            messages=[_message(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            tools=list(tools) if tools else None,
        )
    except InvalidInputError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise InvalidInputError(f"the model's chat template failed on these messages: {exc}") from exc
