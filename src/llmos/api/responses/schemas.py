"""Request model of ``POST /v1/responses``, validated strictly.

Contract: shapes follow the OpenAI Responses API reference. ``input`` is a string (one user message) or a list of
items told apart by ``type``: ``message`` (the default when an item has a ``role``; content a string or parts
``input_text`` / ``output_text``, with ``input_image`` / ``input_file`` parsed so they can be refused by name),
``function_call``, ``function_call_output``, and ``reasoning`` (accepted and dropped). Tools are the flat
``{"type": "function", "name", "parameters"}`` form; the hosted tools (``web_search``, ``file_search``, ...) are
parsed to be refused by name. Types are strict and numbers finite; unknown fields are ignored, as OpenAI's API
does. ``keep_alive`` and ``priority`` are llmos extensions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_ITEMS = 10_000


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class TextPart(Strict):
    type: Literal["input_text", "output_text"]
    text: str


class MediaPart(Strict):
    """An image, file or audio part: parsed only to be refused with a message naming it."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["input_image", "input_file", "input_audio", "refusal"]


Part = Annotated[TextPart | MediaPart, Field(discriminator="type")]


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    id: str | None = Field(default=None, max_length=128)


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=128)
    name: str = Field(min_length=1, max_length=200)
    arguments: str = Field(max_length=1_000_000)
    id: str | None = Field(default=None, max_length=128)


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=128)
    output: str | list[TextPart]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(part.text for part in self.output)


class ReasoningItem(Strict):
    """Reasoning of an earlier turn: accepted and left out of the prompt."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["reasoning"]


class UnsupportedItem(Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal[
        "item_reference",
        "file_search_call",
        "web_search_call",
        "computer_call",
        "computer_call_output",
        "image_generation_call",
        "code_interpreter_call",
        "local_shell_call",
        "local_shell_call_output",
        "mcp_call",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
        "custom_tool_call",
        "custom_tool_call_output",
    ]


InputItem = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem | UnsupportedItem,
    Field(discriminator="type"),
]


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=100_000)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class HostedTool(Strict):
    """A tool OpenAI runs on its side: parsed only to be refused with a message naming it."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str

    @model_validator(mode="after")
    def _not_function(self) -> HostedTool:
        if self.type == "function":
            raise ValueError("a function tool needs a 'name'")
        return self


class NamedFunction(Strict):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=200)


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextOptions(Strict):
    format: TextFormat | None = None


class ResponsesRequest(Strict):
    model: str = Field(min_length=1, max_length=300)
    input: str | list[InputItem] = Field(default="")
    instructions: str | None = None
    tools: list[FunctionTool | HostedTool] | None = Field(default=None, max_length=MAX_ITEMS)
    """Checked further (at most 128, names, schemas) by llmos.engine.tool_calls.check_tools."""
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    text: TextOptions | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(default=None, max_length=128)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    user: str | None = Field(default=None, max_length=256)
    background: bool = False
    priority: int = Field(default=0, ge=-100, le=100)
    keep_alive: str | int | float | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _messages_may_omit_type(cls, value: Any) -> Any:
        """An item with a ``role`` and no ``type`` is a message, as OpenAI's API reads it."""
        if isinstance(value, list):
            untyped = [isinstance(item, dict) and "type" not in item and "role" in item for item in value]
            return [{**item, "type": "message"} if bare else item for item, bare in zip(value, untyped, strict=True)]
        return value

    def items(self) -> list[Any]:
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)] if self.input else []
        return list(self.input)
