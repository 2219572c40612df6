"""Running an evaluation on a registered model and storing its report with the versions it measured.

Contract: :func:`evaluate` loads the model (its registry backend: llama.cpp for GGUF, PyTorch for Hugging Face),
measures the task (``perplexity`` so far: on a dataset's text, or without one on the held-out text shipped with
llmos) and stores an :class:`~llmos.store.schema.Evaluation` row naming the model digest and the dataset digest.
:func:`reports` lists them; :func:`compare` gives the latest metrics of each model for a task, side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from llmos.config import Settings
from llmos.data.rows import row_text
from llmos.data.shipped import heldout_text_path
from llmos.errors import InvalidInputError
from llmos.evaluation.perplexity import perplexity
from llmos.registry.datasets import load_rows, rows_of_split
from llmos.registry.service import Registry
from llmos.runtime.loader import Loader
from llmos.runtime.model import LoadedModel
from llmos.store.schema import Evaluation

TASKS = ("perplexity",)


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

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "created_at": self.created_at.isoformat()}


def _report(row: Evaluation) -> Report:
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
    return Report(
        row.id, row.model_name, row.model_digest, row.task, row.dataset_name, row.dataset_digest,
        dict(row.metrics or {}), dict(row.params or {}), created,
    )  # fmt: skip


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
) -> Report:
    if task not in TASKS:
        raise InvalidInputError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}", param="task")
    registry = Registry(settings)
    try:
        resolved = registry.resolve(model, verify=True)
        if resolved.view.format == "dataset":
            raise InvalidInputError(f"{resolved.view.name} is a dataset, not a model", param="model")
        dataset_name = dataset_digest = None
        if data is not None:
            dataset_view, rows = load_rows(registry, data)
            text = "\n\n".join(row_text(row) for row in rows_of_split(rows, split))
            dataset_name, dataset_digest = dataset_view.name, dataset_view.digest
        else:
            text = heldout_text_path().read_text(encoding="utf-8")
            dataset_name = "llmos:heldout_text"
        overrides = {resolved.view.repository: backend} if backend else {}
        loader = Loader(settings, registry, max_running=4, overrides=overrides)
        instance = loader(resolved, loader.backend_for(resolved.view))
        if not isinstance(instance, LoadedModel):
            instance.close()
            raise InvalidInputError(f"{resolved.view.name} is an embedding model; perplexity needs a generator")
        try:
            result = perplexity(instance, text, window=window, stride=stride)
        finally:
            instance.close()
        row = Evaluation(
            model_name=resolved.view.name,
            model_digest=resolved.view.digest,
            task=task,
            dataset_name=dataset_name,
            dataset_digest=dataset_digest,
            metrics={"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens},
            params={
                "window": result.window,
                "stride": result.stride,
                "backend": instance.backend_name,
                "split": split,
                "seconds": result.seconds,
                "tokens_per_second": result.tokens_per_second,
            },
            job_id=job_id,
        )
        with registry.session() as session, session.begin():
            session.add(row)
            session.flush()
            return _report(row)
    finally:
        registry.close()


def reports(settings: Settings, model: str | None = None) -> list[Report]:
    registry = Registry(settings, maintain=False)
    try:
        query = select(Evaluation).order_by(Evaluation.created_at)
        if model is not None:
            query = query.where(Evaluation.model_digest == registry.show(model).digest)
        with registry.session() as session:
            return [_report(row) for row in session.scalars(query)]
    finally:
        registry.close()


def compare(settings: Settings, models: list[str], task: str = "perplexity") -> list[Report | None]:
    """The latest report of ``task`` for each model (None where it was never evaluated)."""
    latest: list[Report | None] = []
    for name in models:
        found = [r for r in reports(settings, name) if r.task == task]
        latest.append(found[-1] if found else None)
    return latest
