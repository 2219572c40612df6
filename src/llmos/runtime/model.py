"""A registry version loaded for generation: backend + engine + the model's prompt format.

Contract: a :class:`LoadedModel` owns a running :class:`~llmos.engine.core.EngineCore` over some
:class:`~llmos.engine.backends.base.Backend` (llama.cpp or PyTorch). It builds prompts exactly once for everyone
(SDK, CLI, HTTP API): chat messages are rendered with the version's chat template (or the architecture's known
template, or ChatML) and tokenized with special tokens parsed (:meth:`LoadedModel.raw_tokens` does that for a prompt
already in the model's format); plain text is tokenized as plain text (:meth:`LoadedModel.text_tokens`); texts far
longer than the context window are refused before tokenizing. :meth:`LoadedModel.close` stops the engine and frees the
backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmos.engine.backends.base import Backend
from llmos.engine.core import EngineCore
from llmos.engine.tool_calls import Tool, prompt_messages
from llmos.errors import ContextLengthExceededError
from llmos.formats.chat_template import render_chat, supports_tools, template_for
from llmos.registry.views import VersionView
from llmos.types import ChatMessage

MAX_BYTES_PER_TOKEN = 64
"""No tokenizer llmos runs packs more bytes than this into one token; longer texts are refused before tokenizing."""


@dataclass
class LoadedModel:
    view: VersionView
    backend: Backend
    engine: EngineCore
    chat_template: str | None = None

    kind = "generate"

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def backend_name(self) -> str:
        return self.backend.backend_name

    @property
    def alive(self) -> bool:
        """False once its engine died (its thread crashed, or its model process ended): it must be loaded again."""
        return self.engine.alive

    @property
    def resident_bytes(self) -> int:
        """Memory the model holds outside this process (in its model process), as measured when it loaded."""
        return int(getattr(self.engine, "resident_bytes", 0))

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Tool] = (),
        tool_required: bool = False,
    ) -> str:
        """Render with the model's template; tools and tool turns go through it when it renders tools, else they
        are written as plain turns in llmos's generic format (:func:`~llmos.engine.tool_calls.prompt_messages`)."""
        template = template_for(self.chat_template or self.view.chat_template, self.view.architecture)
        has_tool_turns = any(m.tool_calls or m.role == "tool" for m in messages)
        native = supports_tools(template)
        if (tools or has_tool_turns) and not native:
            messages = prompt_messages(messages, tools, required=tool_required)
        return render_chat(
            messages,
            template,
            bos_token=self.view.tokenizer.get("bos_token"),
            eos_token=self.view.tokenizer.get("eos_token"),
            add_generation_prompt=add_generation_prompt,
            tools=[tool.signature() for tool in tools] if native and tools else None,
        )

    def _guard_length(self, text: str) -> None:
        if len(text.encode("utf-8", errors="surrogatepass")) > self.engine.max_context * MAX_BYTES_PER_TOKEN:
            raise ContextLengthExceededError(
                f"the prompt is far longer than this model's maximum context length of {self.engine.max_context}"
                " tokens",
                param="messages",
            )

    def chat_tokens(
        self, messages: Sequence[ChatMessage], *, tools: Sequence[Tool] = (), tool_required: bool = False
    ) -> list[int]:
        """The prompt of a chat: the messages (and tools) rendered with the model's template, as :meth:`raw_tokens`."""
        return self.raw_tokens(self.render(messages, tools=tools, tool_required=tool_required))

    def raw_tokens(self, text: str) -> list[int]:
        """``text`` as the model reads a prompt already in its own format (a rendered chat, or Ollama's ``raw``
        generate): special tokens such as ``<|im_start|>`` parsed, BOS added unless the text starts with it.
        A text far longer than the context window is refused (:class:`~llmos.errors.ContextLengthExceededError`)
        before tokenizing."""
        self._guard_length(text)
        bos = self.view.tokenizer.get("bos_token")
        starts_with_bos = bool(bos) and text.startswith(str(bos))
        return self.backend.tokenize(text, add_special=not starts_with_bos, parse_special=True)

    def text_tokens(self, text: str) -> list[int]:
        """``text`` as plain text (special-token strings in it stay text), BOS added; refused like
        :meth:`raw_tokens` when far longer than the context window."""
        self._guard_length(text)
        return self.backend.tokenize(text, add_special=True, parse_special=False)

    def close(self) -> None:
        self.engine.shutdown()
