"""Pipelines: data → train → evaluate → gate → (quantize) → promote an alias, as one ``pipeline`` job.

Contract: a recipe (YAML or JSON; :func:`parse_recipe` validates every field before anything runs, naming the bad
one) says which base model to fine-tune on which dataset, how to evaluate the result against a baseline, the gate the
candidate must pass, and the alias to move when it does::

    name: support-bot              # the pipeline; also the model the candidates are registered under
    base: smollm2                  # the model to fine-tune
    data: support-qa               # a registered dataset (or `import: path/to/file.jsonl` to register one first)
    train: {method: lora, epochs: 1, lr: 0.001}
    evaluate: {task: perplexity, split: validation}   # default data: the training dataset
    gate: candidate.perplexity <= baseline.perplexity * 0.95
    promote: prod                  # alias moved to the candidate when the gate passes

:func:`run_pipeline` (the job handler) trains ``<output>:candidate`` through the ``train`` job's code, evaluates the
candidate and the baseline (the version the alias names now, else the base) on the same data, checks the gate, and
only when it passes moves ``<output>:<promote>``, with the job id and the gate in the alias history. A failed gate
fails the job (its message and result give both sets of metrics) and leaves the alias where it was. Recipes can be
stored by name (:func:`save_pipeline`) so a run can be started later by name, e.g. by a request for a model that does
not exist yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from llmos.config import Settings
from llmos.errors import ConflictError, InvalidInputError, LlmosError, ModelNotFoundError, NotFoundError
from llmos.evaluation.gate import parse_gate
from llmos.jobs.service import JobService, JobView
from llmos.jobs.train import CONFIG_FIELDS, OPTIMIZER_FIELDS, check_inputs, config_from_params, hf_base, run_train
from llmos.registry import aliases
from llmos.registry.names import parse_ref
from llmos.registry.service import Registry
from llmos.store.schema import Pipeline, as_utc, utcnow

if TYPE_CHECKING:
    from llmos.jobs.context import JobContext

FIELDS = ("name", "base", "output", "data", "import", "validation", "train", "evaluate", "gate", "quantize", "promote")
EVALUATE_FIELDS = ("task", "data", "split", "window", "stride", "limit")
DEFAULT_GATE = "candidate.perplexity < baseline.perplexity"


class GateFailed(LlmosError):
    """The candidate did not pass the gate; ``result`` holds both sets of metrics."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Recipe:
    name: str
    base: str
    data: str
    output: str
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    gate: str = DEFAULT_GATE
    promote: str | None = "prod"
    validation: str | None = None
    import_path: str | None = None
    quantize: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _text(recipe: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = recipe.get(key)
    if value is None:
        if required:
            raise InvalidInputError(f"the pipeline recipe needs a {key!r} field", param=key)
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"pipeline field {key!r} must be a non-empty string", param=key)
    return value.strip()


def load_recipe_text(text: str) -> dict[str, Any]:
    """A recipe mapping from YAML or JSON text."""
    import yaml  # type: ignore[import-untyped]

    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"the pipeline recipe is not valid YAML/JSON: {exc}".splitlines()[0]) from exc
    if not isinstance(loaded, dict):
        raise InvalidInputError("the pipeline recipe must be a mapping of fields (name, base, data, ...)")
    return loaded


def parse_recipe(raw: dict[str, Any]) -> Recipe:
    """Validate a recipe mapping (fields, names, training configuration, gate, quantization type)."""
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise InvalidInputError(
            f"unknown pipeline field(s) {', '.join(map(repr, unknown))}; fields: {', '.join(FIELDS)}", param=unknown[0]
        )
    name = _text(raw, "name", required=True)
    base = _text(raw, "base", required=True)
    assert name is not None and base is not None
    output = _text(raw, "output") or name
    for key, value in (("name", name), ("base", base), ("output", output)):
        try:
            ref = parse_ref(value)
        except InvalidInputError as exc:
            raise InvalidInputError(f"pipeline field {key!r}: {exc}", param=key) from exc
        if key == "output" and (ref.digest or ":" in value.rsplit("/", 1)[-1]):
            raise InvalidInputError("pipeline field 'output' is a model name without a tag or digest", param="output")
    import_path = _text(raw, "import")
    data = _text(raw, "data") or (f"{output}-data" if import_path else None)
    if data is None:
        raise InvalidInputError("the pipeline recipe needs a 'data' dataset (or 'import': a file)", param="data")
    train = raw.get("train") or {}
    if not isinstance(train, dict):
        raise InvalidInputError("pipeline field 'train' must be a mapping of training options", param="train")
    allowed = {*CONFIG_FIELDS, *OPTIMIZER_FIELDS, "method", "optimizer"}
    if set(train) - allowed:
        bad_keys = ", ".join(sorted(map(str, set(train) - allowed)))
        raise InvalidInputError(
            f"unknown train field(s) {bad_keys}; fields: {', '.join(sorted(allowed))}", param="train"
        )
    try:
        config_from_params(train)  # refuses bad hyperparameters now, not after the queue
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"pipeline field 'train' has an invalid value: {exc}", param="train") from exc
    evaluate = raw.get("evaluate") or {}
    if not isinstance(evaluate, dict):
        raise InvalidInputError("pipeline field 'evaluate' must be a mapping", param="evaluate")
    bad = sorted(set(evaluate) - set(EVALUATE_FIELDS))
    if bad:
        raise InvalidInputError(
            f"unknown evaluate field(s) {', '.join(map(repr, bad))}; fields: {', '.join(EVALUATE_FIELDS)}",
            param="evaluate",
        )
    for key in ("window", "stride", "limit"):
        if key in evaluate and (
            not isinstance(evaluate[key], int) or isinstance(evaluate[key], bool) or evaluate[key] < 1
        ):
            raise InvalidInputError(f"evaluate field {key!r} must be a positive integer", param="evaluate")
    for key in ("task", "data", "split"):
        if key in evaluate and not isinstance(evaluate[key], str):
            raise InvalidInputError(f"evaluate field {key!r} must be a string", param="evaluate")
    gate = raw.get("gate", DEFAULT_GATE)
    if not isinstance(gate, str):
        raise InvalidInputError("pipeline field 'gate' must be an expression string", param="gate")
    parsed = parse_gate(gate)
    task = str(evaluate.get("task", "perplexity"))
    if task == "perplexity" and parsed.metric_names - {"perplexity", "nll", "tokens"}:
        raise InvalidInputError(
            f"gate {gate!r} reads {', '.join(sorted(parsed.metric_names))}, but a perplexity evaluation reports"
            " perplexity, nll and tokens",
            param="gate",
        )
    quantize = _text(raw, "quantize")
    if quantize is not None:
        from llmos.compression.quantize import check_type

        check_type(quantize)
    promote = raw.get("promote", "prod")
    if promote is not None:
        if not isinstance(promote, str) or not promote:
            raise InvalidInputError("pipeline field 'promote' must be an alias (a tag name) or null", param="promote")
        parse_ref(f"{output}:{promote}")
    return Recipe(
        name=name, base=base, data=data, output=output, train=dict(train), evaluate=dict(evaluate),
        gate=parsed.expression, promote=promote, validation=_text(raw, "validation"), import_path=import_path,
        quantize=quantize,
    )  # fmt: skip


def check_recipe(registry: Registry, recipe: Recipe, may_see: Any = None) -> None:
    """Refuse, before queueing, a base or dataset that does not exist (a dataset to import must be a file)."""
    params: dict[str, Any] = {"base": recipe.base, "validation": recipe.validation}
    if recipe.import_path is not None:
        if not Path(recipe.import_path).is_file():
            raise InvalidInputError(f"pipeline 'import': {recipe.import_path} is not a file", param="import")
    else:
        params["data"] = recipe.data
    check_inputs(registry, params, may_see)
    scored = recipe.evaluate.get("data")
    if scored and scored != recipe.data:  # the evaluation reads it too: hidden like the others
        from llmos.registry.datasets import show_dataset

        view = show_dataset(registry, str(scored))
        if may_see is not None and not may_see(view.tenant_id):
            raise NotFoundError(f"dataset {scored!r} not found")


# --- stored recipes ---------------------------------------------------------------------------------------------


@dataclass
class StoredPipeline:
    name: str
    tenant_id: int | None
    recipe: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "object": "pipeline",
            "tenant_id": self.tenant_id,
            "recipe": self.recipe,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


def _stored(row: Pipeline) -> StoredPipeline:
    return StoredPipeline(row.name, row.tenant_id, dict(row.recipe), as_utc(row.created_at), as_utc(row.updated_at))


def save_pipeline(registry: Registry, recipe: Recipe, tenant_id: int | None = None) -> StoredPipeline:
    """Store (or replace) the recipe under its name; another tenant's pipeline of that name is a conflict."""
    with registry.session() as session, session.begin():
        row = session.scalar(select(Pipeline).where(Pipeline.name == recipe.name))
        if row is None:
            row = Pipeline(name=recipe.name, tenant_id=tenant_id, recipe=recipe.to_dict())
            session.add(row)
        elif row.tenant_id != tenant_id and tenant_id is not None:
            raise ConflictError(f"pipeline {recipe.name!r} belongs to another tenant; choose another name")
        else:
            row.recipe = recipe.to_dict()
            row.updated_at = utcnow()
        session.flush()
        return _stored(row)


def list_pipelines(registry: Registry, tenant_id: int | None = None) -> list[StoredPipeline]:
    """Stored pipelines (a tenant sees its own and public ones; ``None`` = all)."""
    with registry.session() as session:
        rows = session.scalars(select(Pipeline).order_by(Pipeline.name)).all()
        return [_stored(r) for r in rows if tenant_id is None or r.tenant_id in (None, tenant_id)]


def get_pipeline(registry: Registry, name: str, tenant_id: int | None = None) -> StoredPipeline:
    for stored in list_pipelines(registry, tenant_id):
        if stored.name == name:
            return stored
    raise NotFoundError(f"pipeline {name!r} not found; `llmos pipeline list` shows the stored ones")


def find_for_model(registry: Registry, model: str, tenant_id: int | None = None) -> StoredPipeline | None:
    """The stored pipeline whose promoted alias is ``model`` (``output:promote``), if any."""
    ref = parse_ref(model)
    for stored in list_pipelines(registry, tenant_id):
        recipe = stored.recipe
        if recipe.get("output") == ref.repository and recipe.get("promote") == (ref.tag or "latest"):
            return stored
    return None


def start(jobs: JobService, recipe: Recipe, *, tenant_id: int | None = None, created_by: str = "local") -> JobView:
    """Queue a run of ``recipe`` (one ``pipeline`` job) and dispatch the queue."""
    view = jobs.create("pipeline", recipe.to_dict(), tenant_id=tenant_id, created_by=created_by, resource="train")
    jobs.dispatch()
    return view


# --- the job ----------------------------------------------------------------------------------------------------


def _metrics(report: Any) -> dict[str, Any]:
    return {k: v for k, v in report.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def run_pipeline(context: JobContext) -> dict[str, Any]:
    from llmos.evaluation.reports import evaluate

    recipe = recipe_from_stored(context.params)
    gate = parse_gate(recipe.gate)
    settings: Settings = context.settings
    registry = Registry(settings, maintain=False)
    try:
        if recipe.import_path is not None:
            from llmos.registry.datasets import import_dataset

            context.log(f"[data] importing {recipe.import_path} as {recipe.data}")
            dataset = import_dataset(registry, Path(recipe.import_path), recipe.data, tenant_id=context.job.tenant_id)
            context.log(f"[data] {dataset.name} {dataset.digest[:19]} ({dataset.details.get('rows')} rows)")
        candidate_tag = f"{recipe.output}:candidate"
        train_params = {**recipe.train, "base": recipe.base, "data": recipe.data, "name": candidate_tag}
        if recipe.validation:
            train_params["validation"] = recipe.validation
        context.log(f"[train] {recipe.base} on {recipe.data} -> {candidate_tag}")
        step_job = dataclasses.replace(context.job, params=train_params)
        trained = run_train(dataclasses.replace(context, job=step_job))
        candidate = f"{recipe.output}@{trained['digest']}"
        alias = f"{recipe.output}:{recipe.promote}" if recipe.promote else None
        baseline: str | None = None
        if alias is not None:
            with contextlib.suppress(ModelNotFoundError):  # pinned by digest: the alias may move while this runs
                baseline = f"{recipe.output}@{registry.show(alias).digest}"
        if baseline is None:
            baseline = hf_base(registry, recipe.base, context.log).name  # the weights training started from
        options: dict[str, Any] = {
            k: recipe.evaluate[k] for k in ("task", "split", "window", "stride") if k in recipe.evaluate
        }
        options["data"] = recipe.evaluate.get("data", recipe.data)
        if "split" not in options and options["data"] == recipe.data and _has_split(registry, recipe.data):
            options["split"] = "validation"
        measured: dict[str, dict[str, Any]] = {}
        for side, model in (("baseline", baseline), ("candidate", candidate)):
            context.log(f"[evaluate] {side} {model} ({', '.join(f'{k}={v}' for k, v in options.items())})")
            report = evaluate(settings, model, job_id=context.id, **options)
            measured[side] = _metrics(report)
            context.log(f"[evaluate] {side}: {json.dumps(measured[side])}")
        passed = gate.check(measured["candidate"], measured["baseline"])
        result: dict[str, Any] = {
            "candidate": candidate,
            "digest": trained["digest"],
            "baseline": baseline,
            "metrics": measured,
            "gate": {"expression": gate.expression, "passed": passed},
            "training": trained.get("metrics", {}),
            "promoted": None,
        }
        context.log(f"[gate] {gate.expression}: {'passed' if passed else 'FAILED'}")
        if not passed:
            shown = ", ".join(
                f"{s} {k}={measured[s].get(k)}" for s in ("candidate", "baseline") for k in sorted(gate.metric_names)
            )
            raise GateFailed(f"gate failed: {gate.expression} ({shown}); {alias or 'no alias'} not moved", result)
        if recipe.quantize is not None:
            result["quantized"] = _quantize(registry, candidate, recipe, context)
        if alias is not None:
            promoted = result.get("quantized") or candidate
            view = aliases.move(
                registry, promoted, alias, reason=f"pipeline {recipe.name} job {context.id}: gate passed"
            )
            result["promoted"] = view.name
            context.log(f"[promote] {alias} -> {view.digest[:19]}")
        return result
    finally:
        registry.close()


def recipe_from_stored(stored: dict[str, Any]) -> Recipe:
    """A stored recipe (``Recipe.to_dict``: a job's parameters, a stored pipeline) validated again."""
    raw = {k: v for k, v in stored.items() if v is not None}
    if "import_path" in raw:
        raw["import"] = raw.pop("import_path")
    return parse_recipe(raw)


def _has_split(registry: Registry, dataset: str) -> bool:
    from llmos.registry.datasets import show_dataset

    splits = show_dataset(registry, dataset).details.get("splits") or {}
    return isinstance(splits, dict) and "validation" in splits


def _quantize(registry: Registry, candidate: str, recipe: Recipe, context: JobContext) -> str:
    """The candidate as a GGUF quantized to ``recipe.quantize`` (a LoRA adapter is merged into its base first)."""
    from llmos.registry.convert import convert, quantize

    assert recipe.quantize is not None
    context.log(f"[quantize] {candidate} -> GGUF {recipe.quantize}")
    tag = f"candidate-{recipe.quantize}"
    gguf = convert(registry, candidate, to="gguf", target=f"{recipe.output}:candidate-gguf-f16")
    quantized = quantize(
        registry, f"{recipe.output}@{gguf.digest}", kind=recipe.quantize, target=f"{recipe.output}:{tag}"
    )
    context.log(f"[quantize] {quantized.name} {quantized.digest[:19]} ({quantized.size} bytes)")
    return f"{recipe.output}@{quantized.digest}"
