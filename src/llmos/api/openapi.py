"""The OpenAPI document of the server: request bodies and response shapes that the routes enforce by hand.

Contract: the routes parse bodies themselves (see :mod:`llmos.api.body`), so FastAPI cannot infer their schemas;
:func:`install` publishes them: each JSON request body from its pydantic model, for every error status the error
body of the route's API family (Anthropic's under ``/v1/messages``, Ollama's ``{"error"}`` under ``/api/``,
OpenAI's elsewhere: see :func:`llmos.api.errors.shaped`), and the success shapes (JSON, and server-sent events or
NDJSON lines where a route streams). Schema fuzzers
(schemathesis, in the test suite) use this document to generate requests and check responses.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ANTHROPIC_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
OLLAMA_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
ERROR_STATUSES = ("400", "401", "403", "404", "405", "408", "409", "413", "429", "431", "500", "503", "507")


def _object(*required: str) -> dict[str, Any]:
    return {"type": "object", "required": list(required)}


def _error_schema(path: str) -> str:
    """The component name of the error body that routes under ``path`` send."""
    if path.startswith("/v1/messages"):
        return "AnthropicError"
    if path.startswith("/api/"):
        return "OllamaError"
    return "Error"


def install(
    app: FastAPI,
    bodies: dict[tuple[str, str], type[BaseModel]],
    successes: dict[tuple[str, str], dict[str, Any]],
    streaming: set[tuple[str, str]],
    text: frozenset[tuple[str, str]] = frozenset(),
    ndjson: frozenset[tuple[str, str]] = frozenset(),
) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Error"] = ERROR_SCHEMA
        components["AnthropicError"] = ANTHROPIC_ERROR_SCHEMA
        components["OllamaError"] = OLLAMA_ERROR_SCHEMA
        for path, methods in schema.get("paths", {}).items():
            for method, operation in methods.items():
                key = (method.upper(), path)
                model = bodies.get(key)
                if model is not None:
                    body = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
                    components.update(body.pop("$defs", {}))
                    components[model.__name__] = body
                    operation["requestBody"] = {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
                    }
                responses: dict[str, Any] = {}
                content: dict[str, Any] = {"application/json": {"schema": successes.get(key, {"type": "object"})}}
                if key in text:
                    content = {"text/plain": {"schema": {"type": "string"}}}
                if key in streaming:
                    content["text/event-stream"] = {"schema": {"type": "string"}}
                if key in ndjson:
                    content["application/x-ndjson"] = {"schema": {"type": "string"}}
                responses["200"] = {"description": "OK", "content": content}
                error = {"$ref": f"#/components/schemas/{_error_schema(path)}"}
                for status in ERROR_STATUSES:
                    responses[status] = {"description": "error", "content": {"application/json": {"schema": error}}}
                operation["responses"] = responses
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def standard(app: FastAPI) -> None:
    """The request and response shapes of llmos's own routes."""
    from llmos.api.admin import KeyRequest, TenantRequest, UnloadRequest
    from llmos.api.anthropic.schemas import CountTokensRequest, MessagesRequest
    from llmos.api.datasets import DatasetRequest
    from llmos.api.jobs import EvalRequest, JobRequest
    from llmos.api.models import TagRequest
    from llmos.api.ollama import schemas as ollama
    from llmos.api.openai.embeddings import EmbeddingRequest
    from llmos.api.openai.schemas import ChatCompletionRequest, CompletionRequest
    from llmos.api.pipelines import PipelineRequest, RollbackRequest
    from llmos.api.responses.schemas import ResponsesRequest

    response = _object("id", "object", "created_at", "status", "model", "output")

    install(
        app,
        bodies={
            ("POST", "/v1/chat/completions"): ChatCompletionRequest,
            ("POST", "/v1/completions"): CompletionRequest,
            ("POST", "/v1/embeddings"): EmbeddingRequest,
            ("POST", "/v1/responses"): ResponsesRequest,
            ("POST", "/v1/messages"): MessagesRequest,
            ("POST", "/v1/messages/count_tokens"): CountTokensRequest,
            ("POST", "/api/chat"): ollama.ChatRequest,
            ("POST", "/api/generate"): ollama.GenerateRequest,
            ("POST", "/api/embed"): ollama.EmbedRequest,
            ("POST", "/api/embeddings"): ollama.EmbeddingsRequest,
            ("POST", "/api/show"): ollama.ModelRequest,
            ("POST", "/api/pull"): ollama.ModelRequest,
            ("DELETE", "/api/delete"): ollama.ModelRequest,
            ("POST", "/api/copy"): ollama.CopyRequest,
            ("POST", "/admin/runtime/unload"): UnloadRequest,
            ("POST", "/admin/tenants"): TenantRequest,
            ("POST", "/admin/keys"): KeyRequest,
            ("POST", "/admin/datasets"): DatasetRequest,
            ("POST", "/admin/jobs"): JobRequest,
            ("POST", "/admin/evaluations"): EvalRequest,
            ("POST", "/admin/models/tag"): TagRequest,
            ("POST", "/admin/pipelines"): PipelineRequest,
            ("POST", "/admin/rollback"): RollbackRequest,
        },
        successes={
            ("POST", "/v1/chat/completions"): _object("id", "object", "created", "model", "choices", "usage"),
            ("POST", "/v1/completions"): _object("id", "object", "created", "model", "choices"),
            ("POST", "/v1/embeddings"): _object("object", "data", "model", "usage"),
            ("GET", "/v1/models"): _object("object", "data"),
            ("GET", "/v1/models/{model}"): _object("id", "object", "created", "owned_by"),
            ("DELETE", "/v1/models/{model}"): _object("id", "object", "deleted"),
            ("POST", "/v1/responses"): response,
            ("GET", "/v1/responses/{response_id}"): response,
            ("GET", "/v1/responses/{response_id}/input_items"): _object("object", "data", "has_more"),
            ("DELETE", "/v1/responses/{response_id}"): _object("id", "object", "deleted"),
            ("POST", "/v1/messages"): _object("id", "type", "role", "model", "content", "stop_reason", "usage"),
            ("POST", "/v1/messages/count_tokens"): _object("input_tokens"),
            ("GET", "/api/version"): _object("version"),
            ("GET", "/api/tags"): _object("models"),
            ("GET", "/api/ps"): _object("models"),
            ("POST", "/api/chat"): _object("model", "created_at", "message", "done"),
            ("POST", "/api/generate"): _object("model", "created_at", "response", "done"),
            ("POST", "/api/embed"): _object("model", "embeddings"),
            ("POST", "/api/embeddings"): _object("embedding"),
            ("POST", "/api/pull"): _object("status"),
        },
        streaming={
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/responses"),
            ("POST", "/v1/messages"),
        },
        text=frozenset({("GET", "/metrics"), ("GET", "/admin/jobs/{job_id}/logs")}),
        ndjson=frozenset({("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/pull")}),
    )
