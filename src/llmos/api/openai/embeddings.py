"""``POST /v1/embeddings``: sentence embeddings in the OpenAI shape.

Contract: ``input`` is a string, a list of strings, or token ids (a list, or a list of lists) as the OpenAI API
allows; at most :data:`MAX_INPUTS` inputs, each within the model's token limit (400 otherwise, never silent
truncation). ``encoding_format`` ``float`` gives lists of floats, ``base64`` the little-endian float32 bytes.
The model name is resolved and authorised once and that version is leased from the residency manager by digest,
like any other; the response names the model as the caller did; usage counts the input tokens.
"""

from __future__ import annotations

import base64
import time
from typing import Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Request
from pydantic import Field

from llmos.api.auth import principal
from llmos.api.body import parse_body
from llmos.api.generation import authorised_view, meter
from llmos.api.openai.schemas import Strict
from llmos.api.state import AppState
from llmos.errors import InvalidInputError, LlmosError
from llmos.runtime.embedding import EmbeddingModel
from llmos.runtime.residency import parse_keep_alive

router = APIRouter()
MAX_INPUTS = 2048


class EmbeddingRequest(Strict):
    model: str = Field(min_length=1, max_length=300)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=256)
    keep_alive: str | int | float | None = None


def _texts(body: EmbeddingRequest, model: EmbeddingModel) -> list[str]:
    value = body.input
    if isinstance(value, str):
        return [value]
    if not value:
        raise InvalidInputError("input must not be empty", param="input")
    if len(value) > MAX_INPUTS:
        raise InvalidInputError(f"at most {MAX_INPUTS} inputs per request, got {len(value)}", param="input")
    if isinstance(value[0], int):
        return [model.model.tokenizer.decode(value)]
    if isinstance(value[0], list):
        return [model.model.tokenizer.decode(ids) for ids in value]
    return list(value)


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> dict[str, Any]:
    arrived = time.monotonic()
    state: AppState = request.app.state.llmos
    body = await parse_body(request, EmbeddingRequest, state.settings.max_request_bytes)
    keep_alive = parse_keep_alive(body.keep_alive)
    if isinstance(body.input, list) and len(body.input) > MAX_INPUTS:
        raise InvalidInputError(f"at most {MAX_INPUTS} inputs per request, got {len(body.input)}", param="input")
    caller = principal(request)
    view = await authorised_view(state, caller, body.model)
    lease = await to_thread.run_sync(state.residency.lease, view, keep_alive)
    metering = None
    try:
        model = lease.instance
        if not isinstance(model, EmbeddingModel):
            raise InvalidInputError(f"{view.name} is not an embedding model", param="model")
        if body.dimensions is not None and body.dimensions != model.dimension:
            raise InvalidInputError(
                f"{view.name} produces {model.dimension} dimensions; it cannot shorten them", param="dimensions"
            )
        texts = _texts(body, model)
        counts = await to_thread.run_sync(model.count_tokens, texts)
        metering = meter(state, request, caller, sum(counts), "embeddings", arrived)
        vectors, tokens = await to_thread.run_sync(model.embed, texts)
        metering.finish(view.name, tokens, 0)
    except BaseException as exc:
        if metering is not None:
            metering.finish(view.name, 0, 0, exc.status if isinstance(exc, LlmosError) else 500)
        raise
    finally:
        lease.release(keep_alive)
    state.metrics.embedding_inputs.labels(view.name).inc(len(texts))
    state.metrics.count_tokens(view.name, caller.tenant, prompt=tokens)
    data = []
    for index, vector in enumerate(vectors):
        encoded: Any = (
            base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            if body.encoding_format == "base64"
            else vector.tolist()
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": view.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
