"""``POST /v1/embeddings``: sentence embeddings in the OpenAI shape.

Contract: ``input`` is a string, a list of strings, or token ids (a list, or a list of lists) as the OpenAI API
allows (an empty list is a 400); at most :data:`~llmos.api.embedding.MAX_INPUTS` inputs, each within the model's
token limit (400 otherwise, never silent truncation). ``encoding_format`` ``float`` gives lists of floats,
``base64`` the little-endian float32 bytes. Authorisation, leasing by digest, quotas, usage (under ``embeddings``)
and metrics are :func:`llmos.api.embedding.embed_texts`'s, shared with Ollama's embedding routes; the response
names the model as resolved; usage counts the input tokens.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from llmos.api.auth import principal
from llmos.api.body import parse_body
from llmos.api.embedding import embed_texts
from llmos.api.openai.schemas import Strict
from llmos.api.state import AppState
from llmos.errors import InvalidInputError

router = APIRouter()


class EmbeddingRequest(Strict):
    model: str = Field(min_length=1, max_length=300)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=256)
    keep_alive: str | int | float | None = None


def _inputs(body: EmbeddingRequest) -> Sequence[str | list[int]]:
    """The inputs as a list: texts, or token-id lists (a flat list of ids is one input)."""
    value = body.input
    if isinstance(value, str):
        return [value]
    if not value:
        raise InvalidInputError("input must not be empty", param="input")
    if isinstance(value[0], int):
        return [value]
    return value


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> dict[str, Any]:
    arrived = time.monotonic()
    state: AppState = request.app.state.llmos
    body = await parse_body(request, EmbeddingRequest, state.settings.max_request_bytes)
    result = await embed_texts(
        state,
        request,
        principal(request),
        body.model,
        _inputs(body),
        endpoint="embeddings",
        keep_alive=body.keep_alive,
        dimensions=body.dimensions,
        arrived=arrived,
    )
    data = []
    for index, vector in enumerate(result.vectors):
        encoded: Any = (
            base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            if body.encoding_format == "base64"
            else vector.tolist()
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": result.model,
        "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
    }
