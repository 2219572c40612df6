"""Compression reports: what a compressed child costs and saves against its parent, measured on this machine.

Contract: :func:`measure_speed` loads a registered model (or a LoRA adapter on its base) through the engine and
measures resident memory added by the load, prompt tok/s (a 128-token prompt cut from the shipped held-out text),
greedy decode tok/s (64 tokens continuing it) and the greedy answer to "What is the capital of France?".
:func:`compression_report` measures the child and its parent in one run (so the ratios compare like with like), adds
size on disk and perplexity on the held-out text (each through :func:`~llmos.evaluation.reports.evaluate`, so the
perplexities are stored reports too) and stores the whole as a ``compression`` report of the child, which
``llmos show`` displays. The parent defaults to the child's first lineage parent that is still in the store.
:func:`embedding_report` is the report for embedding models: embeddings per second and cosine to the parent.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from llmos.config import Settings
from llmos.data.shipped import heldout_text_path
from llmos.engine.request import GenerationRequest
from llmos.engine.streams import SyncOutputStream
from llmos.errors import InvalidInputError, LlmosError, ModelNotFoundError
from llmos.evaluation.target import open_generator
from llmos.registry.service import Registry
from llmos.registry.views import VersionView
from llmos.runtime.memory import process_rss
from llmos.store.schema import Evaluation
from llmos.types import ChatMessage, SamplingParams

PROMPT_TOKENS = 128
DECODE_TOKENS = 64
QUESTION = "What is the capital of France?"


@dataclass
class SpeedResult:
    resident_bytes: int
    prompt_tokens: int
    prompt_tokens_per_second: float
    decode_tokens: int
    decode_tokens_per_second: float
    answer: str
    backend: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run(model: Any, tokens: list[int], max_tokens: int, adapter: str | None) -> tuple[list[int], float, float]:
    """Generated token ids, seconds to the first token, seconds for the rest."""
    stream = SyncOutputStream()
    request = GenerationRequest(tokens, SamplingParams(max_tokens=max_tokens, temperature=0.0), adapter=adapter)
    started = time.perf_counter()
    model.engine.submit(request, stream)
    first: float | None = None
    generated: list[int] = []
    for output in stream:
        if output.error is not None:
            raise output.error if isinstance(output.error, LlmosError) else LlmosError(str(output.error))
        if output.token_ids and first is None:
            first = time.perf_counter()
        generated.extend(output.token_ids)
    ended = time.perf_counter()
    first = first or ended
    return generated, first - started, ended - first


def measure_speed(settings: Settings, registry: Registry, name: str, backend: str | None = None) -> SpeedResult:
    resolved = registry.resolve(name, verify=True)
    before = process_rss()
    with open_generator(settings, registry, resolved, backend) as (model, adapter):
        resident = max(0, process_rss() - before)
        text = heldout_text_path().read_text(encoding="utf-8")
        tokens = model.backend.tokenize(text, add_special=True, parse_special=False)[:PROMPT_TOKENS]
        _run(model, tokens[:16], 4, adapter)  # warm-up (first-call allocations)
        messages = [ChatMessage("user", QUESTION)]
        question = model.chat_tokens(messages) if model.view.chat_template or model.chat_template else None
        if question is None:
            question = model.backend.tokenize(QUESTION, add_special=True, parse_special=False)
        answer_ids, _, _ = _run(model, question, 24, adapter)
        generated, prompt_s, decode_s = _run(model, tokens, DECODE_TOKENS, adapter)
        return SpeedResult(
            resident_bytes=resident,
            prompt_tokens=len(tokens),
            prompt_tokens_per_second=len(tokens) / prompt_s if prompt_s > 0 else 0.0,
            decode_tokens=len(generated),
            decode_tokens_per_second=(len(generated) - 1) / decode_s if decode_s > 0 and len(generated) > 1 else 0.0,
            answer=model.backend.detokenize(answer_ids).strip(),
            backend=model.backend_name,
        )


EMBED_SENTENCES = tuple(
    f"{who} {what} {where}."
    for who in ("The engineer", "A small cat", "Our server", "The committee")
    for what in ("reads the logs", "sleeps soundly", "answers questions", "measures latency")
    for where in ("at night", "in the kitchen", "on the cluster", "before lunch")
)
"""64 sentences the report embeds with parent and child (speed, and cosine of the child's vectors to the parent's)."""


def embedding_report(settings: Settings, parent: str, child: str) -> list[dict[str, Any]]:
    """For embedding models: embeddings per second of each side and the mean and lowest cosine of the child's vectors
    to the parent's, over :data:`EMBED_SENTENCES`, measured in one run."""
    import numpy as np

    from llmos.runtime.loader import Loader

    registry = Registry(settings, maintain=False)
    loader = Loader(settings, registry)
    rows: list[dict[str, Any]] = []
    vectors = []
    try:
        for name in (parent, child):
            resolved = registry.resolve(name, verify=True)
            model = loader(resolved, loader.backend_for(resolved.view))
            try:
                model.embed(list(EMBED_SENTENCES[:4]))  # warm-up
                started = time.perf_counter()
                embedded, _tokens = model.embed(list(EMBED_SENTENCES))
                seconds = time.perf_counter() - started
            finally:
                model.close()
            vectors.append(embedded / np.linalg.norm(embedded, axis=1, keepdims=True))
            rows.append({"model": name, "embeddings_per_second": len(EMBED_SENTENCES) / seconds})
    finally:
        registry.close()
    cosine = np.sum(vectors[0] * vectors[1], axis=1)
    rows[1].update(cosine_mean=float(cosine.mean()), cosine_min=float(cosine.min()))
    return rows


def parent_of(registry: Registry, child: VersionView) -> VersionView:
    """The first lineage parent of ``child`` that is a model still in the store."""
    for item in child.lineage:
        if item.parent_digest and item.parent_name:
            repository = item.parent_name.split("@")[0].rsplit(":", 1)[0]
            try:
                view = registry.show(f"{repository}@{item.parent_digest}")
            except (ModelNotFoundError, InvalidInputError):
                continue
            if view.format != "dataset":
                return view
    raise InvalidInputError(f"{child.name} has no parent model in the store to compare with; pass one", param="parent")


def compression_report(settings: Settings, child: str, parent: str | None = None, *, log: Any = None) -> dict[str, Any]:
    """Measure ``child`` against ``parent`` (default: its lineage parent) and store it as a ``compression`` report."""
    from llmos.evaluation.reports import evaluate

    say = log or (lambda _message: None)
    registry = Registry(settings, maintain=False)
    try:
        child_view = registry.show(child)
        parent_view = registry.show(parent) if parent else parent_of(registry, child_view)
        sides: dict[str, dict[str, Any]] = {}
        for side, view in (("parent", parent_view), ("child", child_view)):
            pinned = f"{view.repository}@{view.digest}"
            say(f"measuring {side} {view.name}")
            speed = measure_speed(settings, registry, pinned)
            quality = evaluate(settings, pinned, window=512, stride=256)
            sides[side] = {
                "name": view.name,
                "digest": view.digest,
                "format": view.format,
                "quantization": view.quantization,
                "parameters": view.parameter_count,
                "size_bytes": view.size,
                **speed.to_dict(),
                "perplexity": quality.metrics["perplexity"],
            }
        child_side, parent_side = sides["child"], sides["parent"]

        def ratio(key: str) -> float | None:
            a, b = child_side.get(key), parent_side.get(key)
            return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None

        metrics = {
            "size_ratio": ratio("size_bytes"),
            "resident_ratio": ratio("resident_bytes"),
            "prompt_speedup": ratio("prompt_tokens_per_second"),
            "decode_speedup": ratio("decode_tokens_per_second"),
            "perplexity_delta_pct": (ppl_ratio - 1) * 100 if (ppl_ratio := ratio("perplexity")) else None,
            "size_bytes": child_side["size_bytes"],
            "decode_tokens_per_second": child_side["decode_tokens_per_second"],
            "perplexity": child_side["perplexity"],
        }
        row = Evaluation(
            model_name=child_view.name,
            model_digest=child_view.digest,
            task="compression",
            dataset_name="llmos:heldout_text",
            dataset_digest=None,
            metrics=metrics,
            params={"parent": parent_side, "child": child_side},
        )
        with registry.session() as session, session.begin():
            session.add(row)
        return {"metrics": metrics, "parent": parent_side, "child": child_side}
    finally:
        registry.close()


def latest_report(registry: Registry, digest: str) -> dict[str, Any] | None:
    """The newest stored compression report of a version, if any."""
    from sqlalchemy import select

    with registry.session() as session:
        row = session.scalars(
            select(Evaluation)
            .where(Evaluation.model_digest == digest, Evaluation.task == "compression")
            .order_by(Evaluation.id.desc())
            .limit(1)
        ).first()
        if row is None:
            return None
        return {"metrics": dict(row.metrics or {}), **dict(row.params or {}), "created_at": row.created_at.isoformat()}
