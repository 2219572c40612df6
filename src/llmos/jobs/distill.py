"""The ``distill`` job: train a student on a teacher's soft targets and register it with lineage to both.

Contract: ``params`` hold ``teacher`` (a registry name), ``student`` (a registry name, or ``"new"`` with
``student_layers`` / ``student_hidden`` for a randomly initialised smaller model of the teacher's architecture and
tokenizer), ``data`` (a dataset name), optional ``validation`` (a dataset name; default: the data's ``validation``
split when its rows carry splits, else a deterministic 10% held out), ``name`` (the output name) and the
:class:`~llmos.training.distill.DistillConfig` fields (``temperature``, ``alpha``, ``lr``, ``epochs``,
``max_steps``, ...). A GGUF teacher or student is first given a Hugging Face copy (``llmos convert``; reused when
it exists). Teacher and student must share a tokenizer. The job checkpoints into its own directory (private,
encrypted with the store's key when one is set; removed on success unless ``keep_checkpoints``), so
``llmos jobs resume`` continues where it stopped; every step's loss, KL and CE go to the job's loss curve. The
result is registered with a ``distill`` lineage record per parent: the teacher, the student (when it was a
registered model) and the dataset(s).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmos.errors import InvalidInputError, ModelNotFoundError, NotFoundError
from llmos.jobs.train import hf_base
from llmos.registry.datasets import show_dataset, training_rows
from llmos.registry.derive import register_derived
from llmos.registry.service import ParentRef, Registry
from llmos.registry.views import VersionView
from llmos.training.distill import DistillConfig, DistillResult, build_student, check_same_tokenizer, distill
from llmos.training.loop import TrainingStopped
from llmos.training.optim import OptimizerConfig

if TYPE_CHECKING:
    from llmos.jobs.context import JobContext

NEW_STUDENT = "new"
CONFIG_FIELDS = (
    "temperature", "alpha", "batch_size", "grad_accum", "epochs", "max_steps", "warmup_steps", "schedule", "seed",
    "max_length", "eval_every", "checkpoint_every", "precision", "threads",
)  # fmt: skip
OPTIMIZER_FIELDS = ("lr", "weight_decay", "beta1", "beta2", "eps")


def config_from_params(params: dict[str, Any]) -> DistillConfig:
    """The distillation configuration a job's parameters describe (validated)."""
    values = {k: float(params[k]) for k in OPTIMIZER_FIELDS if params.get(k) is not None}
    values.setdefault("lr", 1e-4)
    config = DistillConfig(
        optimizer=OptimizerConfig(name="adamw", **values),
        **{k: params[k] for k in CONFIG_FIELDS if params.get(k) is not None},
    )
    config.validate()
    return config


def _model(registry: Registry, name: str, role: str, may_see: Any) -> VersionView:
    try:
        view = registry.show(name)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"{role} model {name!r} not found; `llmos list` shows the models") from exc
    if may_see is not None and not may_see(view.tenant_id):
        raise ModelNotFoundError(f"{role} model {name!r} not found; `llmos list` shows the models")
    if view.format not in ("gguf", "hf"):
        kind = "a dataset" if view.format == "dataset" else f"a {view.format} model"
        raise InvalidInputError(f"--{role} {view.name} is {kind}; distillation needs full models", param=role)
    return view


def check_inputs(registry: Registry, params: dict[str, Any], may_see: Any = None) -> None:
    """Refuse, before anything is queued, missing models or datasets and teacher/student tokenizers that differ.

    The full vocabulary comparison runs here when both are Hugging Face models (else inside the job, after the
    GGUF copies exist). ``may_see(tenant_id) -> bool`` hides other tenants' objects (reported as not found).
    """
    teacher = _model(registry, str(params["teacher"]), "teacher", may_see)
    student = None
    if str(params["student"]) != NEW_STUDENT:
        student = _model(registry, str(params["student"]), "student", may_see)
    elif params.get("student_layers") is None and params.get("student_hidden") is None:
        raise InvalidInputError("--student new needs --student-layers and/or --student-hidden", param="student")
    for key in ("data", "validation"):
        if params.get(key):
            view = show_dataset(registry, str(params[key]))
            if may_see is not None and not may_see(view.tenant_id):
                raise NotFoundError(f"dataset {params[key]!r} not found")
    if student is None:
        return
    sizes = (teacher.tokenizer.get("vocab_size"), student.tokenizer.get("vocab_size"))
    if None not in sizes and sizes[0] != sizes[1]:
        raise InvalidInputError(
            f"teacher and student use different tokenizers ({teacher.name} has {sizes[0]} tokens,"
            f" {student.name} {sizes[1]}); logit distillation needs a shared vocabulary",
            param="student",
        )
    if teacher.format == "hf" and student.format == "hf":
        with (
            registry.loadable_dir(registry.resolve(teacher.name, verify=True)) as teacher_dir,
            registry.loadable_dir(registry.resolve(student.name, verify=True)) as student_dir,
        ):
            check_same_tokenizer(teacher_dir, student_dir)


def run_distill(context: JobContext) -> dict[str, Any]:
    from llmos.jobs.context import JobCancelled

    params = context.params
    config = config_from_params(params)
    registry = Registry(context.settings, maintain=False)
    try:
        teacher = hf_base(registry, str(params["teacher"]), context.log)
        student: VersionView | None = None
        if str(params["student"]) != NEW_STUDENT:
            student = hf_base(registry, str(params["student"]), context.log)
        train, validation, data_parents, data_view = training_rows(
            registry, str(params["data"]), params.get("validation"), config.seed
        )
        output = context.directory / "output"
        shutil.rmtree(output, ignore_errors=True)
        with registry.loadable_dir(registry.resolve(teacher.name, verify=True)) as teacher_dir:
            if student is None:
                student_dir = build_student(
                    teacher_dir,
                    context.directory / "student-init",
                    layers=params.get("student_layers"),
                    hidden=params.get("student_hidden"),
                    seed=config.seed,
                )
                context.log(
                    f"new student: {params.get('student_layers')} layers, hidden {params.get('student_hidden')}"
                )
                result = _distill(context, teacher_dir, student_dir, train, validation, output, config, teacher)
            else:
                with registry.loadable_dir(registry.resolve(student.name, verify=True)) as student_dir:
                    result = _distill(context, teacher_dir, student_dir, train, validation, output, config, student)
        metrics = {
            k: v for k, v in result.to_dict().items() if not (isinstance(v, float) and (math.isnan(v) or math.isinf(v)))
        }
        lineage_params = {
            "job": context.id,
            "teacher": teacher.name,
            "teacher_digest": teacher.digest,
            "student": student.name if student else NEW_STUDENT,
            "student_shape": None if student else {k: params.get(k) for k in ("student_layers", "student_hidden")},
            "dataset": data_view.name,
            "dataset_digest": data_view.digest,
            "hyperparameters": config.to_dict(),
            "metrics": metrics,
        }
        models = [teacher] if student is None else [teacher, student]
        view = register_derived(  # the teacher's, student's and data's tenant and encryption carry over
            registry,
            models,
            output,
            str(params["name"]),
            operation="distill",
            params=lineage_params,
            lineage=[*(ParentRef(m.digest, m.name) for m in models), *data_parents],
            tenant_id=context.job.tenant_id,
            chat_template=(student.chat_template if student else None) or teacher.chat_template,
        )
        shutil.rmtree(output, ignore_errors=True)
        shutil.rmtree(context.directory / "student-init", ignore_errors=True)
        return {"model": view.name, "digest": view.digest, "metrics": metrics}
    except TrainingStopped as exc:
        raise JobCancelled(str(exc)) from exc
    finally:
        registry.close()


def _distill(
    context: JobContext,
    teacher_dir: Path,
    student_dir: Path,
    train: list[dict[str, Any]],
    validation: list[dict[str, Any]],
    output: Path,
    config: DistillConfig,
    template_source: VersionView,
) -> DistillResult:
    return distill(
        teacher_dir,
        student_dir,
        train,
        validation,
        output,
        context.checkpoints,
        config,
        chat_template=template_source.chat_template,
        on_step=context.progress,
        log=context.log,
    )
