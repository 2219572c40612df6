"""Constrained decoding formats: JSON mode and JSON Schema, compiled to llama.cpp grammars (GBNF).

Contract: :func:`json_object_grammar` accepts any JSON object; :func:`json_schema_grammar` accepts exactly the
documents a schema allows (as far as llama.cpp's converter supports the schema; unsupported keywords raise).
:func:`compile_schema` is that converter, which tool calls use too.
An invalid schema raises :class:`~llmos.errors.InvalidInputError` naming the problem. Grammars are cached by schema.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from llmos.engine.backends.llamacpp import load_library
from llmos.errors import InvalidInputError


def json_object_grammar() -> str:
    load_library()  # the CPU path is decided before llama_cpp's library is loaded
    from llama_cpp.llama_grammar import JSON_GBNF

    return str(JSON_GBNF)


@lru_cache(maxsize=128)
def compile_schema(schema_json: str, param: str = "response_format") -> str:
    """GBNF whose ``root`` rule accepts the documents of the JSON schema ``schema_json`` (properties in its order)."""
    load_library()
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(schema_json))
    except Exception as exc:  # the converter raises plain exceptions for unsupported schemas
        raise InvalidInputError(f"the JSON schema cannot be used for constrained decoding: {exc}", param=param) from exc


def json_schema_grammar(schema: Any) -> str:
    import jsonschema

    if not isinstance(schema, dict):
        raise InvalidInputError("response_format.json_schema.schema must be a JSON object", param="response_format")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidInputError(f"invalid JSON schema: {exc.message}", param="response_format") from exc
    return compile_schema(json.dumps(schema, sort_keys=True))
