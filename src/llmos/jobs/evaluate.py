"""The ``eval`` job: evaluate one registered model on one task in the background and store the report.

Contract: ``params`` hold ``model``, ``task`` (a built-in task name, or the name of a custom task whose fields are
in ``spec``: the parsed YAML, so the job does not depend on the file still being there), and optionally ``data``,
``split``, ``limit``, ``window``, ``stride``, ``backend`` and ``max_tokens`` (see
:func:`llmos.evaluation.reports.evaluate`). :func:`eval_params` validates them (the task, the model, the dataset,
the metric's library) before anything is queued. The job logs what it loads and measures, reports progress as
requests finish (``step`` / ``total``), stops at the next finished request when cancelled, and returns the report:
``{"model", "task", "report", "metrics"}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmos.errors import InvalidInputError, ModelNotFoundError, NotFoundError
from llmos.evaluation.reports import check_request, evaluate
from llmos.evaluation.tasks import TaskSpec, parse_task, resolve_task
from llmos.registry.datasets import show_dataset
from llmos.registry.service import Registry

if TYPE_CHECKING:
    from llmos.jobs.context import JobContext

OPTIONS = ("data", "split", "limit", "window", "stride", "backend", "max_tokens")


def _spec(params: dict[str, Any]) -> TaskSpec | None:
    if params.get("spec"):
        return parse_task(params["spec"], "the job's task")
    return resolve_task(str(params.get("task") or "perplexity"), max_tokens=params.get("max_tokens"))


def eval_params(registry: Registry, raw: dict[str, Any], may_see: Any = None) -> dict[str, Any]:
    """Validated job parameters: a task file is read into ``spec``; the model and dataset must exist (and be visible).

    ``may_see(tenant_id) -> bool`` hides other tenants' objects (reported as not found).
    """
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidInputError("an eval job needs a model", param="model")
    params: dict[str, Any] = {"model": model, **{k: raw.get(k) for k in OPTIONS}}
    spec = _spec({**raw, "task": raw.get("task") or "perplexity"})
    params["task"] = spec.name if spec is not None else "perplexity"
    params["spec"] = spec.fields() if spec is not None and spec.custom else None
    check_request(spec, params["data"], params["limit"])
    if params["backend"] not in (None, "llama.cpp", "torch"):
        raise InvalidInputError("backend must be llama.cpp or torch", param="backend")
    view = registry.show(model)
    if may_see is not None and not may_see(view.tenant_id):
        raise ModelNotFoundError(f"model {model!r} not found")
    if view.format == "dataset":
        raise InvalidInputError(f"{view.name} is a dataset, not a model", param="model")
    if params["data"]:
        dataset = show_dataset(registry, str(params["data"]))
        if may_see is not None and not may_see(dataset.tenant_id):
            raise NotFoundError(f"dataset {params['data']!r} not found")
    return params


def run_eval(context: JobContext) -> dict[str, Any]:
    from llmos.jobs.context import JobCancelled

    params = context.params
    spec = _spec(params)

    def progress(done: int, total: int) -> None:
        if context.progress(done, total, {}):
            raise JobCancelled("cancelled")

    report = evaluate(
        context.settings,
        str(params["model"]),
        task=str(params.get("task") or "perplexity"),
        spec=spec,
        job_id=context.id,
        progress=progress,
        log=context.log,
        **{k: params.get(k) for k in OPTIONS if k != "max_tokens"},
    )
    shown = " ".join(f"{k}={v:.4g}" for k, v in report.metrics.items() if isinstance(v, float))
    context.log(f"report {report.id}: {report.task} of {report.model} on {report.dataset}: {shown}")
    return {"model": report.model, "task": report.task, "report": report.id, "metrics": report.metrics}
