"""Request models of ``/v1/messages`` and ``/v1/messages/count_tokens``, validated strictly.

Contract: shapes follow Anthropic's Messages API reference: ``max_tokens`` is required; ``content`` is a string
or a list of blocks told apart by ``type`` (``text``, ``tool_use``, ``tool_result``; ``image`` and ``document``
are parsed so they can be refused by name, ``thinking`` blocks of earlier turns are accepted and dropped); a block
of another type, or a block missing a field, is a 400. Types are strict and numbers finite; unknown top-level
fields are ignored, as Anthropic's API does. ``keep_alive`` and ``priority`` are llmos extensions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_SEQUENCES = 16


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


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=128)
    content: str | list[TextBlock] | None = None
    is_error: bool = False

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(block.text for block in self.content)


class MediaBlock(Strict):
    """An image or document: parsed only to be refused with a message naming it."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["image", "document"]


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
    input_schema: dict[str, Any]
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
