"""Request models of ``/v1/messages`` and ``/v1/messages/count_tokens``, validated strictly.

Contract: shapes follow Anthropic's Messages API reference: ``max_tokens`` is required; ``content`` is a string
or a list of blocks told apart by ``type`` (``text``, ``tool_use``, ``tool_result``; ``image`` and ``document``
are parsed so they can be refused by name, ``thinking`` blocks of earlier turns are accepted and dropped); a block
of another type, or a block missing a field, is a 400. Types are strict and numbers finite; unknown top-level
fields are ignored, as Anthropic's API does. ``keep_alive`` and ``priority`` are llmos extensions.
:func:`validated` reports the most specific error of a body with the path of the field as the client wrote it
(``messages.0.content.1.text``), never pydantic's union members or discriminator tags.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from llmos.errors import InvalidInputError

MAX_STOP_SEQUENCES = 16
T = TypeVar("T", bound=BaseModel)


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class TextBlock(Strict):
    type: Literal["text"]
    text: str


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=128)
    name: str = Field(min_length=1, max_length=200)
    input: dict[str, Any]


class MediaBlock(Strict):
    """An image or document: parsed only to be refused with a message naming it."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["image", "document"]


ResultPart = Annotated[TextBlock | MediaBlock, Field(discriminator="type")]


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=128)
    content: str | list[ResultPart] | None = None
    is_error: bool = False

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(block.text for block in self.content if isinstance(block, TextBlock))

    def media(self) -> str | None:
        """The type of the first image or document in the result, if any (llmos refuses them)."""
        if isinstance(self.content, list):
            return next((block.type for block in self.content if isinstance(block, MediaBlock)), None)
        return None


class ThinkingBlock(Strict):
    """A reasoning block of an earlier assistant turn: accepted and left out of the prompt."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["thinking", "redacted_thinking"]


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | MediaBlock | ThinkingBlock, Field(discriminator="type")]


class MessageIn(Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolIn(Strict):
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=100_000)
    input_schema: dict[str, Any] | None = None
    """Required of a client tool; Anthropic's server tools (``type`` ``web_search_...``, ...) have none and are
    refused by name."""
    type: str | None = None


class ToolChoiceIn(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(default=None, max_length=200)
    disable_parallel_tool_use: bool = False


class CountTokensRequest(Strict):
    model: str = Field(min_length=1, max_length=300)
    messages: list[MessageIn] = Field(min_length=1, max_length=10_000)
    system: str | list[TextBlock] | None = None
    tools: list[ToolIn] | None = Field(default=None, max_length=10_000)
    """Checked further (at most 128, names, schemas) by llmos.engine.tool_calls.check_tools."""
    tool_choice: ToolChoiceIn | None = None
    keep_alive: str | int | float | None = None

    def system_text(self) -> str | None:
        if self.system is None or isinstance(self.system, str):
            return self.system
        return "".join(block.text for block in self.system)


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    priority: int = Field(default=0, ge=-100, le=100)


def _client_path(data: Any, error: ErrorDetails) -> tuple[int | str, ...]:
    """The error's location without the parts that are not in ``data`` (union members, discriminator tags)."""
    loc = tuple(error["loc"])
    path: list[int | str] = []
    for position, part in enumerate(loc):
        key_in = isinstance(data, dict) and isinstance(part, str) and part in data
        if key_in or (isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)):
            data = data[part]
        elif error["type"] == "missing" and position == len(loc) - 1:
            pass  # the missing field itself: named, though the body lacks it
        else:
            continue
        path.append(part)
    return tuple(path)


def _message(error: ErrorDetails) -> str:
    if error["type"] == "union_tag_invalid":
        context = error.get("ctx", {})
        return f"unknown type {context.get('tag')!r}; expected one of {context.get('expected_tags')}"
    if error["type"] == "union_tag_not_found":
        return "the block has no 'type'"
    return error["msg"]


def validated(model: type[T], data: dict[str, Any]) -> T:
    """``data`` as a ``model``; else a 400 naming the most specific field at fault (see the module contract)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [(_client_path(data, error), error) for error in exc.errors()]
        path, error = max(errors, key=lambda item: len(item[0]))  # the deepest: the member the value was meant for
        location = ".".join(str(part) for part in path)
        raise InvalidInputError(f"invalid value for '{location}': {_message(error)}", param=location or None) from exc
