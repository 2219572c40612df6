"""Request bodies of Ollama's native API (``/api/...``), validated strictly, and their translation to llmos's terms.

Contract: shapes follow Ollama's API (what the official ``ollama`` Python client 0.6 sends). Types are strict
(``"temperature": "hot"`` is a 400 naming ``options.temperature``) and numbers finite; unknown fields, and unknown
``options``, are ignored, as Ollama does. Every option Ollama documents is type-checked; those llmos applies are
``num_predict``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``, ``repeat_penalty``,
``repeat_last_n``, ``presence_penalty`` and ``frequency_penalty``, with Ollama's defaults (temperature 0.8, top-p
0.9, top-k 40, min-p 0, repeat penalty 1.1 over the last 64 tokens, a random seed); ``repeat_last_n: -1`` (the
whole context) and windows longer than :data:`PENALTY_WINDOW` tokens look back that far. ``num_predict`` absent,
``-1``, ``-2`` or ``0`` means the rest of the context window. ``num_ctx`` is type-checked and ignored: a model runs
with the context window it was loaded with (``/api/ps`` reports it), so a smaller or larger ``num_ctx`` changes
nothing. The load-time and llama.cpp-only options (``num_gpu``, ``mirostat``, ``typical_p``, ...) are ignored
likewise.

:func:`chat_messages` turns Ollama's messages into llmos's: an assistant's ``tool_calls`` (arguments as an object)
get ids, and each ``tool`` message answers the earliest unanswered call of its ``tool_name`` (or its
``tool_call_id``, or else the earliest unanswered call). :func:`tool_plan` offers the body's tools with choice
``auto`` (Ollama has no ``tool_choice``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from llmos.api.openai.schemas import Strict
from llmos.api.tool_plan import EMPTY_OBJECT, ToolPlan, plan
from llmos.engine.tool_calls import Tool, check_history
from llmos.errors import InvalidInputError
from llmos.types import ChatMessage, FunctionCall, SamplingParams

MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
PENALTY_WINDOW = 32_768
"""The longest ``repeat_last_n`` applied; ``-1`` (Ollama: the whole context) and longer windows look back this far
(the samplers keep a window's tokens in memory, so a client cannot make it unbounded)."""
DEFAULTS = SamplingParams(
    max_tokens=0, temperature=0.8, top_p=0.9, top_k=40, min_p=0.0, repeat_penalty=1.1, penalty_last_n=64
)
"""Ollama's default sampling (``max_tokens`` is set per request)."""


class Options(Strict):
    """Ollama's ``options``: the runtime options llmos applies, then those it checks and ignores."""

    num_predict: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=100.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # accepted and ignored (see the module contract)
    num_ctx: int | None = None
    num_keep: int | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    penalize_newline: bool | None = None
    numa: bool | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None
    num_thread: int | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        return value


class ToolCallFunction(Strict):
    name: str = Field(min_length=1, max_length=200)
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCallIn(Strict):
    id: str | None = Field(default=None, max_length=128)
    function: ToolCallFunction


class MessageIn(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=128)
    tool_name: str | None = Field(default=None, max_length=200)
    tool_call_id: str | None = Field(default=None, max_length=128)
    thinking: str | None = None
    """Accepted (clients send earlier turns back as they got them) and dropped."""


class FunctionIn(Strict):
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=100_000)
    parameters: dict[str, Any] | None = None


class ToolIn(Strict):
    type: Literal["function"] = "function"
    function: FunctionIn


class GenerationFields(Strict):
    """What ``/api/chat`` and ``/api/generate`` share."""

    model: str = Field(min_length=1, max_length=300)
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options | None = None
    stream: bool = True
    keep_alive: str | int | float | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def formatted(self) -> bool:
        return self.format is not None and self.format != ""

    def check_unsupported(self) -> None:
        if self.think not in (None, False):
            raise InvalidInputError(f"{self.model!r} does not support thinking", param="think")

    def logprob_count(self) -> int | None:
        """The engine's ``logprobs``: None for none, else how many alternatives to report per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatRequest(GenerationFields):
    messages: list[MessageIn] = Field(default_factory=list, max_length=10_000)
    tools: list[ToolIn] | None = Field(default=None, max_length=10_000)


class GenerateRequest(GenerationFields):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    images: list[str] | None = None
    context: list[int] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise InvalidInputError("suffix (fill-in-the-middle) is not supported by llmos", param="suffix")
        if self.template:
            raise InvalidInputError(
                "a custom template is not supported by llmos; use raw with a formatted prompt", param="template"
            )
        if self.context:
            raise InvalidInputError(
                "context (token history) is not supported by llmos; send the conversation to /api/chat",
                param="context",
            )
        if self.images:
            raise InvalidInputError("images are not supported by llmos (no vision models)", param="images")


class EmbedRequest(Strict):
    model: str = Field(min_length=1, max_length=300)
    input: str | list[str]
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1)
    options: Options | None = None
    keep_alive: str | int | float | None = None


class EmbeddingsRequest(Strict):
    model: str = Field(min_length=1, max_length=300)
    prompt: str = ""
    options: Options | None = None
    keep_alive: str | int | float | None = None


class ModelRequest(Strict):
    """``/api/show``, ``/api/delete`` and ``/api/pull``: the model as ``model`` (or, as older clients send it,
    ``name``)."""

    model: str = Field(min_length=1, max_length=300)
    stream: bool = True
    """``/api/pull`` only: NDJSON status lines (the default) or one final status."""
    insecure: bool | None = None
    verbose: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "model" not in data and "name" in data:
            return {**data, "model": data["name"]}
        return data


class CopyRequest(Strict):
    source: str = Field(min_length=1, max_length=300)
    destination: str = Field(min_length=1, max_length=300)


# --- translation ----------------------------------------------------------------------------------------------------


def sampling(options: Options | None) -> SamplingParams:
    """The options' sampling parameters over Ollama's defaults (``max_tokens`` is set per request)."""
    if options is None:
        return DEFAULTS
    last_n = options.repeat_last_n
    stop = options.stop
    return replace(
        DEFAULTS,
        temperature=DEFAULTS.temperature if options.temperature is None else options.temperature,
        top_p=DEFAULTS.top_p if options.top_p is None else options.top_p,
        top_k=DEFAULTS.top_k if options.top_k is None else options.top_k,
        min_p=DEFAULTS.min_p if options.min_p is None else options.min_p,
        repeat_penalty=DEFAULTS.repeat_penalty if options.repeat_penalty is None else options.repeat_penalty,
        penalty_last_n=DEFAULTS.penalty_last_n if last_n is None else _penalty_window(last_n),
        presence_penalty=options.presence_penalty or 0.0,
        frequency_penalty=options.frequency_penalty or 0.0,
        seed=None if options.seed is None or options.seed < 0 else options.seed,
        stop=() if stop is None else (stop,) if isinstance(stop, str) else tuple(stop),
    )


def _penalty_window(last_n: int) -> int:
    return PENALTY_WINDOW if last_n < 0 else min(last_n, PENALTY_WINDOW)


def max_tokens(options: Options | None) -> int | None:
    """``num_predict`` as the engine's limit: None (the rest of the context) unless it is positive."""
    if options is None or options.num_predict is None or options.num_predict <= 0:
        return None
    return options.num_predict


def chat_messages(messages: list[MessageIn]) -> list[ChatMessage]:
    """Ollama's messages as llmos's (see the module contract); images are refused by name."""
    result: list[ChatMessage] = []
    unanswered: list[FunctionCall] = []
    for index, message in enumerate(messages):
        if message.images:
            raise InvalidInputError(
                "images are not supported by llmos (no vision models)", param=f"messages.{index}.images"
            )
        if message.tool_calls and message.role != "assistant":
            raise InvalidInputError("only assistant messages may carry tool_calls", param=f"messages.{index}")
        calls = tuple(
            FunctionCall(
                call.id or f"call_{index}_{number}",
                call.function.name,
                json.dumps(call.function.arguments, ensure_ascii=False),
            )
            for number, call in enumerate(message.tool_calls or ())
        )
        unanswered.extend(calls)
        answers: str | None = None
        if message.role == "tool":
            answered = _answered(unanswered, message)
            if answered is None:
                raise InvalidInputError(
                    f"messages[{index}] is a tool result, but no earlier assistant message has an unanswered"
                    " tool call for it",
                    param=f"messages.{index}",
                )
            unanswered.remove(answered)
            answers = answered.id
        result.append(ChatMessage(message.role, message.content or "", tool_calls=calls, tool_call_id=answers))
    check_history(result)
    return result


def _answered(unanswered: list[FunctionCall], message: MessageIn) -> FunctionCall | None:
    if message.tool_call_id is not None:
        return next((call for call in unanswered if call.id == message.tool_call_id), None)
    if message.tool_name:
        named = next((call for call in unanswered if call.name == message.tool_name), None)
        if named is not None:
            return named
    return unanswered[0] if unanswered else None


def tool_plan(body: ChatRequest) -> ToolPlan:
    """The body's tools, offered with choice ``auto``; a JSON ``format`` cannot be combined with them."""
    tools = [
        Tool(tool.function.name, tool.function.description or "", tool.function.parameters or EMPTY_OBJECT)
        for tool in body.tools or []
    ]
    if tools and body.formatted:
        raise InvalidInputError("a JSON format cannot be combined with tools; send one or the other", param="format")
    return plan(tools, "auto" if tools else None)
