"""Dataset processing: pure functions over rows.

Contract: a dataset is a ``list[dict]`` of rows that all share exactly one of three shapes (see :mod:`llmos.data.rows`):
text ``{"text": str}``, completion ``{"prompt": str, "completion": str}`` or chat
``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``. Extra fields are allowed and
preserved by every function. Functions never mutate their input rows: they return new rows plus a JSON-serializable
report dict. Bad input raises :class:`llmos.errors.InvalidInputError` with a message that says what was found and what
is accepted. This package knows nothing of the registry, the runtime, jobs, HTTP or the CLI; models enter only as
plain callables (``encode``, ``generate``).

Modules: ``rows`` (shapes), ``readers`` (files in, canonical JSONL out), ``cleaning`` (normalize, filter, dedup,
redact), ``split`` (deterministic train/validation/test), ``tokenize`` (token counts), ``augment`` (templates, rules
and model paraphrases), ``shipped`` (the original evaluation data bundled with llmos).
"""
