"""The Python SDK: load a registered model and generate text in-process, no server needed.

Contract::

    import llmos
    model = llmos.load_model("smollm2")            # pulls bundled models on first use
    model.generate_text("What is the capital of France?", max_length=32)
    model.chat([{"role": "user", "content": "Hi"}])
    for delta in model.stream_chat(messages): ...

* ``generate_text`` sends the prompt as one user turn through the model's chat template (like Ollama's generate);
  ``raw=True`` completes the prompt text exactly as given, which is the default for models without a template.
* Decoding is greedy unless ``temperature`` is given (as in transformers' ``generate``). ``max_length`` is the most
  tokens to generate (``max_tokens`` is accepted as an alias).
* Errors are :mod:`llmos.errors` exceptions. A ``Model`` holds native memory until :meth:`Model.close` (or the end
  of a ``with`` block).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from llmos.config import Settings
from llmos.engine.backends.llamacpp import LlamaCppModel
from llmos.engine.chat_template import render_chat, template_for
from llmos.engine.generate import Generation, GenerationStats
from llmos.errors import BackendUnavailableError, ModelNotFoundError
from llmos.registry import sources
from llmos.registry.names import parse_ref
from llmos.registry.service import Registry
from llmos.registry.views import VersionView
from llmos.types import ChatMessage, SamplingParams

MessageLike = ChatMessage | Mapping[str, Any]


def _as_messages(messages: Iterable[MessageLike]) -> list[ChatMessage]:
    result = []
    for message in messages:
        if isinstance(message, ChatMessage):
            result.append(message)
        else:
            result.append(ChatMessage(role=message.get("role"), content=message.get("content")))  # type: ignore[arg-type]
    return result


class Model:
    """A model loaded for generation. Not thread-safe: use one Model per thread (or the server)."""

    def __init__(self, view: VersionView, backend: LlamaCppModel) -> None:
        self.info = view
        self.name = view.name
        self._backend = backend
        self.last_stats: GenerationStats | None = None

    # --- lifecycle --------------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<llmos.Model {self.name} {self.info.short_digest}>"

    # --- tokens -----------------------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self._backend.tokenize(text, add_special=False, parse_special=False)

    def detokenize(self, tokens: list[int]) -> str:
        return self._backend.detokenize(tokens)

    def render(self, messages: Iterable[MessageLike], *, add_generation_prompt: bool = True) -> str:
        """The exact prompt text the model sees for ``messages``."""
        return render_chat(
            _as_messages(messages),
            template_for(self.info.chat_template, self.info.architecture),
            bos_token=self.info.tokenizer.get("bos_token"),
            eos_token=self.info.tokenizer.get("eos_token"),
            add_generation_prompt=add_generation_prompt,
        )

    def _prompt_tokens(self, text: str) -> list[int]:
        bos = self.info.tokenizer.get("bos_token")
        starts_with_bos = bool(bos) and text.startswith(str(bos))
        return self._backend.tokenize(text, add_special=not starts_with_bos, parse_special=True)

    # --- generation -------------------------------------------------------------------------------------------------

    def _stream(self, prompt_text: str, params: SamplingParams, *, template_rendered: bool) -> Iterator[str]:
        tokens = (
            self._prompt_tokens(prompt_text)
            if template_rendered
            else self._backend.tokenize(prompt_text, add_special=True, parse_special=False)
        )
        generation = Generation(self._backend, tokens, params)
        try:
            yield from generation
        finally:
            self.last_stats = generation.stats

    def stream_text(
        self, prompt: str, *, raw: bool | None = None, system: str | None = None, **sampling: Any
    ) -> Iterator[str]:
        """Stream the answer to ``prompt`` (or, with ``raw=True``, its continuation) as text deltas.

        ``raw=None`` (the default) means raw only for models without a chat template of their own (base models),
        as Ollama does.
        """
        params = sampling_params(**sampling)
        if raw is None:
            raw = self.info.chat_template is None
        if raw:
            return self._stream(prompt, params, template_rendered=False)
        messages = [ChatMessage("system", system)] if system is not None else []
        messages.append(ChatMessage("user", prompt))
        return self._stream(self.render(messages), params, template_rendered=True)

    def generate_text(self, prompt: str, *, raw: bool | None = None, system: str | None = None, **sampling: Any) -> str:
        return "".join(self.stream_text(prompt, raw=raw, system=system, **sampling))

    def stream_chat(self, messages: Iterable[MessageLike], **sampling: Any) -> Iterator[str]:
        return self._stream(self.render(messages), sampling_params(**sampling), template_rendered=True)

    def chat(self, messages: Iterable[MessageLike], **sampling: Any) -> str:
        return "".join(self.stream_chat(messages, **sampling))


def sampling_params(
    *,
    max_length: int | None = None,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    stop: str | Iterable[str] | None = None,
    **rest: Any,
) -> SamplingParams:
    """SDK keyword arguments -> SamplingParams (greedy by default; ``max_length`` = new tokens)."""
    limit = max_length if max_length is not None else max_tokens
    stops: tuple[str, ...] = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return SamplingParams(max_tokens=256 if limit is None else limit, temperature=temperature, stop=stops, **rest)


def load_model(name: str = "smollm2", *, settings: Settings | None = None, pull: bool = True) -> Model:
    """Load a registered model by name (``name[:tag]`` or ``name@sha256:...``).

    With ``pull=True``, a bundled model (see ``llmos pull --help``) that is not registered yet is pulled first.
    """
    settings = settings or Settings()
    registry = Registry(settings)
    try:
        try:
            resolved = registry.resolve(name)
        except ModelNotFoundError:
            ref = parse_ref(name)
            if not (pull and ref.namespace == "library" and ref.name in sources.BUNDLED and not ref.digest):
                raise
            sources.pull(registry, name)
            resolved = registry.resolve(name)
    finally:
        registry.close()
    if resolved.view.format != "gguf":
        raise BackendUnavailableError(
            f"{resolved.view.name} is a {resolved.view.format} model; only GGUF models can be run so far"
        )
    backend = LlamaCppModel(
        resolved.primary_path,
        n_ctx=settings.context_length,
        n_batch=settings.batch_size,
        threads=settings.threads,
        extra_buffers=settings.llamacpp_extra_buffers,
    )
    return Model(resolved.view, backend)
