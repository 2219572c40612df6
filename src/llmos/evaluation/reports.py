"""Running an evaluation on a registered model and storing its report with the versions it measured.

Contract: :func:`evaluate` loads the model (its registry backend: llama.cpp for GGUF, PyTorch for Hugging Face),
measures one task and stores an :class:`~llmos.store.schema.Evaluation` row naming the model digest and the dataset
digest, with the metrics, the parameters (backend, split, limit, seconds, tokens per second, for generation tasks a
few examples) and the job id when a job ran it. Tasks (:mod:`llmos.evaluation.tasks`): ``perplexity`` on a
dataset's text, or without one on the held-out text shipped with llmos; the generation tasks ``bleu``, ``chrf``,
``rouge`` and ``exact_match``, ``multiple_choice``, and custom tasks from a YAML file (stored under the task's
``name``). ``limit`` keeps the first N rows. Everything the task reads is checked before the model loads.

:func:`reports` lists reports; :func:`compare` gives the latest report of a task for each model, and
:func:`comparison` the same as table rows with one column per metric of the task (CLI and API).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from llmos.config import Settings
from llmos.data.rows import row_text
from llmos.data.shipped import heldout_text_path
from llmos.errors import InvalidInputError
from llmos.evaluation.metrics import METRIC_KEYS, require
from llmos.evaluation.perplexity import DEFAULT_WINDOW, PerplexityResult, perplexity
from llmos.evaluation.runner import Progress
from llmos.evaluation.scoring import run_generate, run_multiple_choice
from llmos.evaluation.target import open_generator
from llmos.evaluation.tasks import BUILTIN_TASKS, ChoiceItem, GenerateItem, TaskSpec, make_items, resolve_task
from llmos.registry.datasets import load_rows, rows_of_split
from llmos.registry.service import Registry, ResolvedModel
from llmos.store.schema import Evaluation, as_utc

TASKS = BUILTIN_TASKS
HELDOUT_NAME = "llmos:heldout_text"
PerplexityRunner = Callable[
    [Settings, str, str, int | None, int | None, str | None, Progress | None], tuple[PerplexityResult, str]
]


@dataclass
class Report:
    id: int
    model: str
    model_digest: str
    task: str
    dataset: str | None
    dataset_digest: str | None
    metrics: dict[str, Any]
    params: dict[str, Any]
    created_at: datetime
    job_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "created_at": self.created_at.isoformat()}


def _report(row: Evaluation) -> Report:
    created = as_utc(row.created_at)
    return Report(
        row.id, row.model_name, row.model_digest, row.task, row.dataset_name, row.dataset_digest,
        dict(row.metrics or {}), dict(row.params or {}), created, row.job_id,
    )  # fmt: skip


def perplexity_settings(settings: Settings, window: int | None) -> Settings:
    """Room for a whole window: in the torch backend's preallocated KV cache (so the default window is the same on
    every backend) and in one forward pass (a fresh window attends with the causal kernel). llama.cpp scores with a
    full-precision cache of one stream per sequence, so a window's score does not depend on which windows share its
    batch: measured with a unified f16 cache, the same text scored whole and in two shards differed by 0.2%; with
    f32 per-sequence streams they agree to 1e-14."""
    size = window or DEFAULT_WINDOW
    updates: dict[str, Any] = {"kv_cache_type": "f32"}
    if settings.torch_context_length <= size:
        updates["torch_context_length"] = size + 1
    if settings.batch_size < size:
        updates["batch_size"] = size
    return settings.model_copy(update=updates) if updates else settings


def check_request(spec: TaskSpec | None, data: str | None, limit: int | None) -> None:
    """Refuse combinations that cannot run, before anything loads."""
    if limit is not None and limit < 1:
        raise InvalidInputError("limit must be at least 1", param="limit")
    if spec is None:
        if limit is not None and data is None:
            raise InvalidInputError("limit counts dataset rows; give --data with it", param="limit")
        return
    if data is None:
        raise InvalidInputError(f"task {spec.name!r} needs a dataset (--data DATASET)", param="data")
    require(spec.metric)


def evaluate(
    settings: Settings,
    model: str,
    *,
    task: str = "perplexity",
    data: str | None = None,
    split: str | None = None,
    window: int | None = None,
    stride: int | None = None,
    backend: str | None = None,
    job_id: str | None = None,
    limit: int | None = None,
    max_tokens: int | None = None,
    spec: TaskSpec | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    perplexity_runner: PerplexityRunner | None = None,
) -> Report:
    """Measure ``task`` (a built-in name or a task YAML path; or ``spec``, already parsed) and store the report.

    ``perplexity_runner(settings, "repository@digest", text, window, stride, backend, progress) -> (result, backend)``
    measures the perplexity task instead of a model loaded here (data-parallel evaluation on Ray).
    """
    if spec is None:
        spec = resolve_task(task, max_tokens=max_tokens)
    check_request(spec, data, limit)
    say = log or (lambda _message: None)
    registry = Registry(settings)
    try:
        resolved = registry.resolve(model, verify=True)
        if resolved.view.format == "dataset":
            raise InvalidInputError(f"{resolved.view.name} is a dataset, not a model", param="model")
        dataset_name = dataset_digest = None
        rows: list[dict[str, Any]] = []
        if data is not None:
            dataset_view, all_rows = load_rows(registry, data)
            rows = rows_of_split(all_rows, split)[:limit] if limit else rows_of_split(all_rows, split)
            dataset_name, dataset_digest = dataset_view.name, dataset_view.digest
        items = make_items(spec, rows) if spec is not None else []
        text = ""
        if spec is None:
            if data is None:
                text, dataset_name = heldout_text_path().read_text(encoding="utf-8"), HELDOUT_NAME
            else:
                text = "\n\n".join(row_text(row) for row in rows)
            settings = perplexity_settings(settings, window)
        if spec is None and perplexity_runner is not None:  # sharded elsewhere (Ray): the model loads there
            say(f"evaluating {resolved.view.name}: perplexity on {dataset_name}, sharded")
            ref = f"{resolved.view.repository}@{resolved.view.digest}"
            sharded, backend_name = perplexity_runner(settings, ref, text, window, stride, backend, progress)
            measured = {"perplexity": sharded.perplexity, "nll": sharded.nll, "tokens": sharded.tokens}
            details = {
                "window": sharded.window, "stride": sharded.stride, "seconds": sharded.seconds,
                "tokens_per_second": sharded.tokens_per_second, "limit": limit, "windows": sharded.windows,
                "backend": backend_name, "split": split,
            }  # fmt: skip
            return _store(registry, resolved, "perplexity", (dataset_name, dataset_digest), measured, details, job_id)
        max_running = 4 if spec is None else 8
        say(f"loading {resolved.view.name}")
        with open_generator(settings, registry, resolved, backend, max_running=max_running) as (instance, adapter):
            say(f"evaluating {resolved.view.name}: {spec.name if spec else 'perplexity'} on {dataset_name}")
            if spec is None:
                result = perplexity(instance, text, window=window, stride=stride, progress=progress, adapter=adapter)
                metrics: dict[str, Any] = {
                    "perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens,
                }  # fmt: skip
                params: dict[str, Any] = {
                    "window": result.window, "stride": result.stride, "seconds": result.seconds,
                    "tokens_per_second": result.tokens_per_second, "limit": limit,
                }  # fmt: skip
                task_name = "perplexity"
            else:
                if spec.type == "generate":
                    generate_items = [i for i in items if isinstance(i, GenerateItem)]
                    outcome = run_generate(instance, spec, generate_items, progress, adapter)
                else:
                    choices = [i for i in items if isinstance(i, ChoiceItem)]
                    outcome = run_multiple_choice(instance, spec, choices, progress, adapter)
                metrics = {**outcome.metrics, "samples": outcome.samples}
                params = {
                    "task_type": spec.type, "metric": spec.metric, "chat": outcome.chat, "limit": limit,
                    "seconds": outcome.seconds, "tokens": outcome.tokens,
                    "tokens_per_second": outcome.tokens_per_second, "examples": outcome.examples,
                }  # fmt: skip
                if spec.type == "generate":
                    params.update(max_tokens=spec.max_tokens, stop=list(spec.stop))
                if spec.custom:
                    params["spec"] = spec.fields()
                task_name = spec.name
        params.update(backend=instance.backend_name, split=split)
        return _store(registry, resolved, task_name, (dataset_name, dataset_digest), metrics, params, job_id)
    finally:
        registry.close()


def _store(
    registry: Registry,
    resolved: ResolvedModel,
    task: str,
    dataset: tuple[str | None, str | None],
    metrics: dict[str, Any],
    params: dict[str, Any],
    job_id: str | None,
) -> Report:
    row = Evaluation(
        model_name=resolved.view.name,
        model_digest=resolved.view.digest,
        task=task,
        dataset_name=dataset[0],
        dataset_digest=dataset[1],
        metrics=metrics,
        params=params,
        job_id=job_id,
    )
    with registry.session() as session, session.begin():
        session.add(row)
        session.flush()
        return _report(row)


def reports(
    settings: Settings, model: str | None = None, *, task: str | None = None, digests: set[str] | None = None
) -> list[Report]:
    """Reports, oldest first: of one model version (by name), of one task, of the given model digests."""
    registry = Registry(settings, maintain=False)
    try:
        query = select(Evaluation).order_by(Evaluation.created_at, Evaluation.id)
        if model is not None:
            query = query.where(Evaluation.model_digest == registry.show(model).digest)
        if task is not None:
            query = query.where(Evaluation.task == task)
        if digests is not None:
            query = query.where(Evaluation.model_digest.in_(sorted(digests)))
        with registry.session() as session:
            return [_report(row) for row in session.scalars(query)]
    finally:
        registry.close()


def compare(settings: Settings, models: list[str], task: str = "perplexity") -> list[Report | None]:
    """The latest report of ``task`` for each model (None where it was never evaluated)."""
    latest: list[Report | None] = []
    for name in models:
        found = reports(settings, name, task=task)
        latest.append(found[-1] if found else None)
    return latest


def metric_columns(task: str, found: list[Report | None]) -> list[str]:
    """The metric names of a task's reports, in a stable order (the metric's own keys first)."""
    columns: list[str] = []
    spec_metric = next((r.params.get("metric") for r in found if r is not None and r.params.get("metric")), None)
    for key in (*METRIC_KEYS.get(task, ()), *METRIC_KEYS.get(str(spec_metric), ())):
        if key not in columns:
            columns.append(key)
    for report in found:
        for key, value in (report.metrics if report else {}).items():
            if key not in columns and isinstance(value, int | float) and not isinstance(value, bool):
                columns.append(key)
    return columns


def comparison(settings: Settings, models: list[str], task: str = "perplexity") -> dict[str, Any]:
    """``{"task", "metrics": [column names], "rows": [{"model", <metric>..., "dataset", ...}]}``."""
    if not models:
        raise InvalidInputError("compare needs at least one model", param="model")
    found = compare(settings, models, task)
    columns = metric_columns(task, found)
    rows = []
    for name, report in zip(models, found, strict=True):
        row: dict[str, Any] = {"model": name}
        if report is not None:
            row.update({key: report.metrics.get(key) for key in columns})
            row.update(
                model_digest=report.model_digest, dataset=report.dataset, dataset_digest=report.dataset_digest,
                backend=report.params.get("backend"), report=report.id,
                when=report.created_at.isoformat(timespec="seconds"),
            )  # fmt: skip
        rows.append(row)
    return {"task": task, "metrics": columns, "rows": rows}
