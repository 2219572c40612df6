"""The ``train`` job: fine-tune a registered model on a registered dataset and register the result.

Contract: ``params`` hold ``base`` (a registry name), ``data`` (a dataset name), optional ``validation`` (a dataset
name; default: the dataset's ``validation`` split when its rows carry splits, else a deterministic 10% held out),
``name`` (the output name), ``method`` and the :class:`~llmos.training.finetune.FinetuneConfig` fields. A GGUF base
is first given a Hugging Face copy (``llmos convert``; reused when it exists). The job checkpoints into its own
directory (private, encrypted with the store's key when one is set; removed on success unless ``keep_checkpoints``),
so ``llmos jobs resume`` continues where it stopped. The result is registered with lineage to the base
and the dataset (digests, hyperparameters, metrics, job id): a LoRA adapter bound to its base, or a full model.

With ``ray`` (a Ray address, or ``auto`` for this home's ``llmos cluster``) the same training runs data-parallel on
``workers`` Ray Train workers (:func:`llmos.distributed.training.ray_finetune`), checkpointing into the same
directory through the run's :class:`~llmos.distributed.trainhub.TrainingHub` on this node (the ranks fetch the base
from it and need no path of this machine); progress and log lines reach the job through a :class:`RemoteJobReporter`
that the hub calls.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmos.errors import InvalidInputError, ModelNotFoundError
from llmos.registry.convert import convert
from llmos.registry.datasets import training_rows
from llmos.registry.derive import register_derived
from llmos.registry.service import ParentRef, Registry
from llmos.registry.views import VersionView
from llmos.training.finetune import FinetuneConfig, FinetuneResult, finetune
from llmos.training.loop import TrainingStopped
from llmos.training.optim import OptimizerConfig

if TYPE_CHECKING:
    from llmos.config import Settings
    from llmos.jobs.context import JobContext

CONFIG_FIELDS = (
    "batch_size", "grad_accum", "epochs", "max_steps", "warmup_steps", "schedule", "seed", "max_length", "lora_r",
    "lora_alpha", "lora_dropout", "eval_every", "checkpoint_every", "patience", "precision", "threads",
)  # fmt: skip
OPTIMIZER_FIELDS = ("lr", "weight_decay", "momentum", "beta1", "beta2", "eps")


def config_from_params(params: dict[str, Any]) -> FinetuneConfig:
    """The training configuration a job's parameters describe (validated)."""
    values = {k: float(params[k]) for k in OPTIMIZER_FIELDS if params.get(k) is not None}
    values.setdefault("lr", 2e-4 if params.get("method") != "full" else 5e-5)  # LoRA trains fewer, freer weights
    optimizer = OptimizerConfig(name=str(params.get("optimizer", "adamw")), **values)
    config = FinetuneConfig(
        method=str(params.get("method", "lora")),
        optimizer=optimizer,
        **{k: params[k] for k in CONFIG_FIELDS if params.get(k) is not None},
    )
    config.validate()
    return config


def check_inputs(registry: Registry, params: dict[str, Any], may_see: Any = None) -> None:
    """Refuse, before anything is queued, a base that is not a trainable model or data that is not a dataset.

    ``may_see(tenant_id) -> bool`` hides other tenants' objects (reported as not found).
    """
    from llmos.errors import NotFoundError
    from llmos.registry.datasets import show_dataset

    base = registry.show(str(params["base"]))
    if may_see is not None and not may_see(base.tenant_id):
        raise ModelNotFoundError(f"model {params['base']!r} not found")
    if base.format not in ("gguf", "hf"):
        kind = "a dataset" if base.format == "dataset" else f"a {base.format} model"
        message = f"--base {base.name} is {kind}; training needs a GGUF or Hugging Face model"
        raise InvalidInputError(message, param="base")
    for key in ("data", "validation"):
        if params.get(key):
            view = show_dataset(registry, str(params[key]))
            if may_see is not None and not may_see(view.tenant_id):
                raise NotFoundError(f"dataset {params[key]!r} not found")


def hf_base(registry: Registry, name: str, log: Any) -> VersionView:
    """The Hugging Face version to train: the base itself, or its converted copy for a GGUF base."""
    try:
        view = registry.show(name)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"base model {name!r} not found; `llmos list` shows the models") from exc
    if view.format == "hf":
        return view
    if view.format != "gguf":
        raise InvalidInputError(
            f"{view.name} is {view.format}; training needs a GGUF or Hugging Face model", param="base"
        )
    target = f"{view.repository}:safetensors"
    try:
        converted = registry.show(target)
        if any(item.parent_digest == view.digest for item in converted.lineage):
            return converted
    except ModelNotFoundError:
        pass
    log(f"converting {view.name} to safetensors for training (once)")
    return convert(registry, view.name, target=target)


class RemoteJobReporter:
    """A job's progress and log lines from another process on this machine (the Ray training hub): picklable; opens
    its own job service."""

    def __init__(self, settings: Settings, job_id: str) -> None:
        self.settings, self.job_id = settings, job_id
        self._context: JobContext | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "job_id": self.job_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.settings, self.job_id, self._context = state["settings"], state["job_id"], None

    def _job(self) -> JobContext:
        if self._context is None:
            from llmos.jobs.context import JobContext
            from llmos.jobs.service import JobService

            reporter = self

            class Context(JobContext):
                def log(self, message: str) -> None:
                    reporter.log(message)

            jobs = JobService(self.settings)
            self._context = Context(jobs, jobs.get(self.job_id), self.settings)
        return self._context

    def progress(self, step: int, total: int, metrics: dict[str, float]) -> bool:
        return self._job().progress(step, total, metrics)

    def log(self, message: str) -> None:
        """Append a line to the job's log (opened for appending, as the worker's own output is)."""
        with self._job().jobs.log_path(self.job_id).open("a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def run_train(context: JobContext) -> dict[str, Any]:
    params = context.params
    config = config_from_params(params)
    registry = Registry(context.settings, maintain=False)
    try:
        base = hf_base(registry, str(params["base"]), context.log)
        train, validation, parents, data_view = training_rows(
            registry, str(params["data"]), params.get("validation"), config.seed
        )
        output = context.directory / "output"
        shutil.rmtree(output, ignore_errors=True)
        resolved = registry.resolve(base.name, verify=True)
        try:
            if params.get("ray"):  # the ranks fetch the base's blobs from this store themselves
                result = _train_on_ray(context, resolved.view, train, validation, output, config, base.chat_template)
            else:
                with registry.loadable_dir(resolved) as base_dir:
                    result = finetune(
                        base_dir,
                        train,
                        validation,
                        output,
                        context.checkpoints,
                        config,
                        chat_template=base.chat_template,
                        on_step=context.progress,
                        log=context.log,
                        device=context.settings.torch_device,
                    )
        except TrainingStopped as exc:
            from llmos.jobs.context import JobCancelled

            raise JobCancelled(str(exc)) from exc
        metrics = result.to_dict()
        lineage_params = {
            "job": context.id,
            "method": config.method,
            "hyperparameters": config.to_dict(),
            "dataset": data_view.name,
            "dataset_digest": data_view.digest,
            "metrics": {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))},
        }
        if params.get("ray"):
            lineage_params["distributed"] = {"backend": "ray", "workers": int(params.get("workers") or 2)}
        lora = config.method == "lora"
        view = register_derived(  # the base's and the data's tenant and encryption carry over
            registry,
            [base],
            output,
            str(params["name"]),
            operation="fine-tune",
            params=lineage_params,
            lineage=parents if lora else [ParentRef(base.digest, base.name), *parents],  # an adapter: base first
            tenant_id=context.job.tenant_id,
            chat_template=None if lora else base.chat_template,  # talk the way it was trained
            base=base.name if lora else None,
        )
        shutil.rmtree(output, ignore_errors=True)
        return {"model": view.name, "digest": view.digest, "metrics": lineage_params["metrics"]}
    finally:
        registry.close()


def _train_on_ray(
    context: JobContext,
    base: VersionView,
    train: list[dict[str, Any]],
    validation: list[dict[str, Any]],
    output: Path,
    config: FinetuneConfig,
    chat_template: str | None,
) -> FinetuneResult:
    from llmos.distributed.training import check_workers, ray_finetune, resolve_address

    settings = context.settings
    reporter = RemoteJobReporter(settings, context.id)
    return ray_finetune(
        base,
        train,
        validation,
        output,
        context.checkpoints,
        config,
        settings=settings,
        address=resolve_address(settings.home, str(context.params["ray"]), allow_remote=settings.ray_allow_remote),
        ray_home=settings.home / "ray" / "home",
        work_dir=context.directory / "ray",
        workers=check_workers(context.params.get("workers") or 2),
        allow_remote=settings.ray_allow_remote,
        chat_template=chat_template,
        on_step=reporter.progress,
        log=reporter.log,
        name=f"llmos-{context.id}",
        device=settings.torch_device,
    )
