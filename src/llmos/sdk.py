"""The Python SDK: load a registered model and generate text in-process, no server needed.

Contract::

    import llmos
    model = llmos.load_model("smollm2")            # pulls bundled models on first use
    model.generate_text("What is the capital of France?", max_length=32)
    model.chat([{"role": "user", "content": "Hi"}])
    for delta in model.stream_chat(messages): ...

* Generation runs on the same engine as the server (continuous batching on a dedicated decode thread), so a
  ``Model`` may be used from several threads at once and their requests are batched together.
* ``generate_text`` sends the prompt as one user turn through the model's chat template (like Ollama's generate);
  ``raw=True`` completes the prompt text exactly as given, which is the default for models without a template.
* Decoding is greedy unless ``temperature`` is given (as in transformers' ``generate``). ``max_length`` is the most
  tokens to generate (``max_tokens`` is accepted as an alias).
* The engine reuses the KV of prompt prefixes it computed before (a conversation's earlier turns, a shared system
  prompt) and decodes speculatively where that pays, as the settings allow (``prefix_cache``, ``speculative``);
  ``cache_prompt=False`` / ``speculative=False`` turn either off for one call. ``Model.last_stats.cached_tokens``
  says how many prompt tokens the last finished generation took from the cache.
* Errors are :mod:`llmos.errors` exceptions. Every load re-hashes the model's files first: a damaged file raises
  :class:`~llmos.errors.ModelUnavailableError` naming it, and nothing is generated. A ``Model`` holds native memory
  and a thread until :meth:`Model.close` (or the end of a ``with`` block). Abandoning a stream cancels its request.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.config import Settings
from llmos.engine.request import GenerationRequest
from llmos.engine.streams import SyncOutputStream
from llmos.errors import InvalidInputError, ModelNotFoundError
from llmos.registry import sources
from llmos.registry.names import parse_ref
from llmos.registry.service import Registry
from llmos.runtime.loader import Loader
from llmos.runtime.model import LoadedModel
from llmos.types import ChatMessage, FinishReason, SamplingParams

MessageLike = ChatMessage | Mapping[str, Any]
SDK_SLOTS = 4
"""Sequences an SDK model decodes together (threads sharing one Model are batched)."""


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int
    prompt_seconds: float
    decode_seconds: float
    finish_reason: FinishReason
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (not computed, so not in ``prompt_seconds``)."""

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first, over the time spent producing them (the first comes with the prompt pass)."""
        if self.completion_tokens <= 1 or self.decode_seconds <= 0:
            return 0.0
        return (self.completion_tokens - 1) / self.decode_seconds


def _as_messages(messages: Iterable[MessageLike]) -> list[ChatMessage]:
    result = []
    for message in messages:
        if isinstance(message, ChatMessage):
            result.append(message)
        else:
            result.append(ChatMessage(role=message.get("role"), content=message.get("content")))  # type: ignore[arg-type]
    return result


class Model:
    """A model loaded for generation."""

    def __init__(self, loaded: LoadedModel) -> None:
        self._loaded = loaded
        self.info = loaded.view
        self.name = loaded.view.name
        self.last_stats: GenerationStats | None = None

    # --- lifecycle --------------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._loaded.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<llmos.Model {self.name} {self.info.short_digest}>"

    # --- tokens -----------------------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self._loaded.backend.tokenize(text, add_special=False, parse_special=False)

    def detokenize(self, tokens: list[int]) -> str:
        return self._loaded.backend.detokenize(tokens)

    def render(self, messages: Iterable[MessageLike], *, add_generation_prompt: bool = True) -> str:
        """The exact prompt text the model sees for ``messages``."""
        return self._loaded.render(_as_messages(messages), add_generation_prompt=add_generation_prompt)

    # --- generation -------------------------------------------------------------------------------------------------

    def _stream(
        self, prompt_tokens: list[int], params: SamplingParams, *, cache_prompt: bool, speculative: bool
    ) -> Iterator[str]:
        engine = self._loaded.engine
        stream = SyncOutputStream()
        request = GenerationRequest(prompt_tokens, params, cache_prompt=cache_prompt, speculative=speculative)
        started = time.monotonic()
        engine.submit(request, stream)
        first: float | None = None
        finished = False
        try:
            for output in stream:
                if first is None and (output.token_ids or output.finished):
                    first = output.time
                if output.text:
                    yield output.text
                if output.finished:
                    finished = True
                    first = first or output.time
                    self.last_stats = GenerationStats(
                        prompt_tokens=output.prompt_tokens,
                        completion_tokens=output.completion_tokens,
                        prompt_seconds=first - started,
                        decode_seconds=output.time - first,
                        finish_reason=output.finish_reason or "stop",
                        cached_tokens=output.cached_tokens,
                    )
        finally:
            if not finished:
                engine.abort(request.request_id)

    def stream_text(
        self,
        prompt: str,
        *,
        raw: bool | None = None,
        system: str | None = None,
        cache_prompt: bool = True,
        speculative: bool = True,
        **sampling: Any,
    ) -> Iterator[str]:
        """Stream the answer to ``prompt`` (or, with ``raw=True``, its continuation) as text deltas.

        ``raw=None`` (the default) means raw only for models without a chat template of their own (base models),
        as Ollama does.
        """
        params = sampling_params(**sampling)
        if raw is None:
            raw = self.info.chat_template is None
        if raw:
            tokens = self._loaded.text_tokens(prompt)
        else:
            messages = [ChatMessage("system", system)] if system is not None else []
            messages.append(ChatMessage("user", prompt))
            tokens = self._loaded.chat_tokens(messages)
        return self._stream(tokens, params, cache_prompt=cache_prompt, speculative=speculative)

    def generate_text(
        self,
        prompt: str,
        *,
        raw: bool | None = None,
        system: str | None = None,
        cache_prompt: bool = True,
        speculative: bool = True,
        **sampling: Any,
    ) -> str:
        chunks = self.stream_text(
            prompt, raw=raw, system=system, cache_prompt=cache_prompt, speculative=speculative, **sampling
        )
        return "".join(chunks)

    def generate_many(self, prompts: Iterable[str], *, system: str | None = None, **sampling: Any) -> list[str]:
        """Answers to many prompts at once: all are submitted together, so the engine batches them."""
        from concurrent.futures import ThreadPoolExecutor

        items = list(prompts)
        if not items:
            return []
        workers = max(1, min(len(items), self._loaded.engine.scheduler.config.max_running))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda p: self.generate_text(p, system=system, **sampling), items))

    def stream_chat(
        self, messages: Iterable[MessageLike], *, cache_prompt: bool = True, speculative: bool = True, **sampling: Any
    ) -> Iterator[str]:
        tokens = self._loaded.chat_tokens(_as_messages(messages))
        return self._stream(tokens, sampling_params(**sampling), cache_prompt=cache_prompt, speculative=speculative)

    def chat(
        self, messages: Iterable[MessageLike], *, cache_prompt: bool = True, speculative: bool = True, **sampling: Any
    ) -> str:
        return "".join(self.stream_chat(messages, cache_prompt=cache_prompt, speculative=speculative, **sampling))


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


def load_model(
    name: str = "smollm2", *, settings: Settings | None = None, pull: bool = True, backend: str | None = None
) -> Model:
    """Load a registered model by name (``name[:tag]`` or ``name@sha256:...``) for generation.

    With ``pull=True``, a bundled model (see ``llmos pull --help``) that is not registered yet is pulled first.
    ``backend`` ("llama.cpp" or "torch") overrides the choice made from the model's format.
    """
    settings = settings or Settings()
    registry = Registry(settings)
    try:
        try:
            resolved = registry.resolve(name, verify=True)  # re-hashed: a damaged file is refused, not run
        except ModelNotFoundError:
            ref = parse_ref(name)
            if not (pull and ref.namespace == "library" and ref.name in sources.BUNDLED and not ref.digest):
                raise
            sources.pull(registry, name)
            resolved = registry.resolve(name, verify=True)
        overrides = {resolved.view.repository: backend} if backend else {}
        loader = Loader(settings, registry, max_running=SDK_SLOTS, overrides=overrides)
        instance = loader(resolved, loader.backend_for(resolved.view))
    finally:
        registry.close()
    if not isinstance(instance, LoadedModel):
        instance.close()
        raise InvalidInputError(f"{resolved.view.name} is an embedding model, not a text generator")
    return Model(instance)


class TrainableModel:
    """A small model trained from scratch (Keras style): ``fit``, ``evaluate``, ``predict``, ``generate_text``,
    and ``save("name:tag")`` into the registry. Everything but ``save`` is :class:`llmos.training.scratch.ScratchModel`.
    """

    def __init__(self, inner: Any, settings: Settings | None = None) -> None:
        self._inner = inner
        self._settings = settings
        self.history: dict[str, list[float]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"<llmos.TrainableModel {self._inner.arch} {self._inner.parameter_count:,} parameters>"

    def fit(self, data: Any, **kwargs: Any) -> dict[str, list[float]]:
        self.history = self._inner.fit(data, **kwargs)
        return self.history

    def save(self, name: str, *, dataset: str | None = None) -> str:
        """Register the model as a new version of ``name``; returns ``name:tag``. A ``gpt`` model is a Hugging Face
        checkpoint that `llmos serve` can serve at once."""
        import tempfile

        settings = self._settings or Settings()
        registry = Registry(settings)
        try:
            parse_ref(name)
            scratch = settings.home / "tmp"
            scratch.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="scratch-", dir=scratch) as tmp:
                directory = Path(tmp) / "model"
                directory.mkdir()
                self._inner.save_pretrained(directory)
                params = {"arch": self._inner.arch, "parameters": self._inner.parameter_count}
                if self.history.get("loss"):
                    params["final_loss"] = self.history["loss"][-1]
                if dataset:
                    params["dataset"] = dataset
                view = registry.import_path(directory, name, operation="train", params=params)
            return view.name
        finally:
            registry.close()


def create_model(arch: str = "gpt", *, settings: Settings | None = None, **kwargs: Any) -> TrainableModel:
    """A new small language model to train from scratch: ``arch`` ``gpt`` (a Llama-style transformer) or ``lstm``;
    sizes (``layers``, ``d_model``, ``heads``, ``context``, ...) and ``texts`` to build a character tokenizer from.
    See :func:`llmos.training.scratch.create_model`."""
    from llmos.training.scratch import create_model as create

    return TrainableModel(create(arch, **kwargs), settings)
