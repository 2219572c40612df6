"""One embedding call, whichever API asked for it.

Contract: every embedding surface (OpenAI's ``/v1/embeddings``, Ollama's ``/api/embed`` and ``/api/embeddings``)
turns its body into a list of inputs and calls :func:`embed_texts`. It parses the keep-alive, refuses more than
:data:`MAX_INPUTS` inputs, resolves and authorises the model name once (404 for one the caller may not see), leases
that version from the residency manager by digest, refuses a model that is not an embedding model and a
``dimensions`` it cannot produce (400, before anything is charged), optionally cuts each input to the model's token
limit (else a longer input is a 400, never silent truncation), reserves the caller's quota for the input tokens,
embeds in a worker thread and records usage under ``endpoint`` (a failure records its status) and the embedding
metrics. Inputs may be texts or token-id lists, which are decoded with the model's tokenizer. No inputs: the model
is only loaded (nothing is charged or recorded). So authentication, quotas, usage accounting and metrics behave the
same on every surface; only the shapes of bodies differ.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
from anyio import to_thread
from fastapi import Request

from llmos.api.generation import Metering, authorised_view, meter
from llmos.api.state import AppState
from llmos.errors import InvalidInputError, LlmosError
from llmos.runtime.embedding import Embedder
from llmos.runtime.residency import parse_keep_alive
from llmos.security.principal import Principal

MAX_INPUTS = 2048
"""The most inputs one request may embed."""


@dataclass
class Embedded:
    """The outcome of :func:`embed_texts`."""

    model: str
    """The version's name as resolved (``minilm:latest``)."""
    vectors: np.ndarray
    """float32, ``[inputs, dimension]`` (``[0, dimension]`` when there were no inputs)."""
    tokens: int
    """Input tokens embedded (and charged)."""
    loaded: float
    """``time.monotonic()`` once the model was resident."""


def _texts(model: Embedder, inputs: Sequence[str | list[int]], truncate: bool) -> list[str]:
    texts = [item if isinstance(item, str) else model.decode(item) for item in inputs]
    return model.truncate(texts) if truncate else texts


async def embed_texts(
    state: AppState,
    request: Request,
    caller: Principal,
    model: str,
    inputs: Sequence[str | list[int]],
    *,
    endpoint: str,
    keep_alive: str | int | float | None = None,
    truncate: bool = False,
    dimensions: int | None = None,
    arrived: float | None = None,
) -> Embedded:
    """Embed ``inputs`` with the embedding model ``model`` for ``caller``, metered as ``endpoint`` (see the module
    contract); ``arrived`` is when the request came in (``time.monotonic()``), for the usage record's latency."""
    arrived = time.monotonic() if arrived is None else arrived
    seconds = parse_keep_alive(keep_alive)
    if len(inputs) > MAX_INPUTS:
        raise InvalidInputError(f"at most {MAX_INPUTS} inputs per request, got {len(inputs)}", param="input")
    view = await authorised_view(state, caller, model)
    lease = await to_thread.run_sync(state.residency.lease, view, seconds)
    loaded = time.monotonic()
    metering: Metering | None = None
    try:
        instance = lease.instance
        if getattr(instance, "kind", None) != "embed":
            raise InvalidInputError(f"{view.name} is not an embedding model", param="model")
        instance = cast(Embedder, instance)
        if dimensions is not None and dimensions != instance.dimension:
            raise InvalidInputError(
                f"{view.name} produces {instance.dimension} dimensions; it cannot shorten them", param="dimensions"
            )
        if not inputs:
            return Embedded(view.name, np.zeros((0, instance.dimension), dtype=np.float32), 0, loaded)
        texts = await to_thread.run_sync(_texts, instance, inputs, truncate)
        counts = await to_thread.run_sync(instance.count_tokens, texts)
        metering = await meter(state, request, caller, sum(counts), endpoint, arrived)
        vectors, tokens = await to_thread.run_sync(instance.embed, texts)
        metering.finish(view.name, tokens, 0)
    except BaseException as exc:
        if metering is not None:
            metering.finish(view.name, 0, 0, exc.status if isinstance(exc, LlmosError) else 500)
        raise
    finally:
        lease.release(seconds)
    state.metrics.embedding_inputs.labels(view.name).inc(len(texts))
    state.metrics.count_tokens(view.name, caller.tenant, prompt=tokens)
    return Embedded(view.name, vectors, tokens, loaded)
