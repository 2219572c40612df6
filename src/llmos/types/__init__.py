"""Plain data shared by the API, SDK, CLI and engine.

Contract: these types carry no behaviour beyond validation. ``SamplingParams`` is what the engine needs to pick the
next token and decide when to stop; ``ChatMessage`` is one turn of a conversation before it is rendered with the
model's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmos.errors import InvalidInputError

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class FunctionCall:
    """A function call a model made: ``arguments`` is the JSON text of an object."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    """One turn; an assistant turn may carry the calls it made, a ``tool`` turn answers the call ``tool_call_id``."""

    role: Role
    content: str
    tool_calls: tuple[FunctionCall, ...] = ()
    tool_call_id: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ("system", "user", "assistant", "tool"):
            raise InvalidInputError(f"invalid message role {self.role!r}", param="messages")
        if not isinstance(self.content, str):
            raise InvalidInputError("message content must be a string", param="messages")


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens and when to stop. ``temperature == 0`` means greedy decoding."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 0, "max_tokens", "must be >= 0"),
            (0.0 <= self.temperature <= 100.0, "temperature", "must be between 0 and 100"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 disables)"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (self.repeat_penalty > 0.0, "repeat_penalty", "must be > 0"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be between -2 and 2"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be between -2 and 2"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidInputError(f"{param} {message}", param=param)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
