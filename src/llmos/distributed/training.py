"""Data-parallel fine-tuning on Ray Train: PyTorch DDP over N workers, checkpoints in the job's llmos directory.

Contract: :func:`ray_finetune` trains like :func:`llmos.training.finetune.finetune` (same arguments, same
:class:`~llmos.training.finetune.FinetuneResult`, same output directory and checkpoint format), but on a Ray
cluster joined through :func:`llmos.distributed.cluster.connect`: a ``TorchTrainer`` with ``workers`` workers of one
CPU each (one GPU each when the cluster has enough and ``device`` is not ``cpu``, as
:func:`llmos.engine.torch_device.ray_use_gpu` decides; backend ``gloo`` on CPU, ``nccl`` on GPU).

* **Same steps as one process**: every worker builds the run with :func:`llmos.training.finetune.prepare` (same
  model, rows and batch order) and runs the one training loop, :class:`~llmos.training.loop.TrainingLoop`, with a
  :class:`RayCollective`: rank ``r`` computes the loss of rows ``r, r+N, ...`` of each global batch, scaled so that
  DDP's gradient average equals the single-process gradient, and validation is sharded and summed with an
  all-reduce (the loop's docstring has the details).
* **Checkpoints**: rank 0 writes them with :class:`~llmos.training.checkpoints.Checkpoints` (``checkpoints``: the
  job's llmos checkpoints, the source of truth, private and encrypted when they hold a cipher; they travel to the
  workers by pickling, which rebuilds the cipher there through their ``reopen``; Ray's own storage under ``work_dir``
  holds nothing llmos needs). When a worker dies, Ray Train (``FailureConfig(max_failures)``) restarts the worker
  group and every rank continues from the newest checkpoint that loads, so the run ends where an uninterrupted one
  would. The checkpoint format is the local trainer's (trainable weights by parameter name, optimizer, schedule,
  step).
* **Reporting**: ``on_step`` and ``log`` run in the rank-0 worker, so they must be picklable (the jobs layer passes
  an object that opens its own job service there). ``on_step`` returning True (cancellation) is broadcast to all
  ranks: a checkpoint is written and :class:`~llmos.training.finetune.TrainingStopped` is raised in the caller.
* **Files** under ``work_dir``: ``workers/rank-N.json`` (the PID of each rank's current worker process, for
  operators and tests), ``starts`` (one line per worker-group start, by rank 0), ``result.json`` (rank 0, at the
  end) and ``storage/`` (Ray Train's run directory).
  Paths are shared by the driver and the workers, which holds on one machine (the only kind of cluster
  :class:`~llmos.distributed.cluster.LocalCluster` makes) or a shared file system.
* Ray and torch are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmos.errors import BackendUnavailableError, InvalidInputError, JobFailedError
from llmos.training.checkpoints import Checkpoints
from llmos.training.finetune import FinetuneConfig, FinetuneResult, prepare
from llmos.training.loop import Collective, StepCallback, TrainingStopped

MAX_WORKERS = 64
RESULT_FILE = "result.json"


def resolve_address(home: Path, address: str, *, allow_remote: bool = False) -> str:
    """``auto`` -> the address of the cluster ``llmos cluster start`` runs for this home; anything else as given,
    once it passes the loopback rule of :func:`~llmos.distributed.cluster.connect` (checked here, before queueing)."""
    from llmos.distributed.cluster import LocalCluster, _is_loopback_address

    if address != "auto":
        if not allow_remote and not _is_loopback_address(address):
            raise InvalidInputError(
                f"Ray address {address!r} is not on this machine; llmos joins remote clusters only when asked"
                " (LLMOS_RAY_ALLOW_REMOTE=1)",
                param="ray",
            )
        return address
    info = LocalCluster(home).info()
    if info is None:
        raise BackendUnavailableError("no Ray cluster runs for this home; start one with `llmos cluster start`")
    return info.address


def check_workers(workers: object) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise InvalidInputError(f"workers must be an integer from 1 to {MAX_WORKERS}, got {workers!r}", param="workers")
    return workers


def ray_finetune(
    base_dir: Path,
    train_rows: Sequence[dict[str, Any]],
    validation_rows: Sequence[dict[str, Any]],
    output_dir: Path,
    checkpoints: Checkpoints | Path,
    config: FinetuneConfig,
    *,
    address: str,
    ray_home: Path,
    work_dir: Path,
    workers: int = 2,
    allow_remote: bool = False,
    max_failures: int = 3,
    chat_template: str | None = None,
    on_step: StepCallback | None = None,
    log: Callable[[str], None] = print,
    name: str = "llmos-train",
    device: str = "auto",
) -> FinetuneResult:
    """Fine-tune on ``workers`` Ray Train workers; see the module docstring."""
    config.validate()
    check_workers(workers)
    from llmos.distributed.cluster import connect

    in_main = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if in_main else None
    ray = connect(address, ray_home, allow_remote=allow_remote)
    if on_term is not None:  # ray.init replaced it with an exit: a job's SIGTERM means "stop at the next step"
        signal.signal(signal.SIGTERM, on_term)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = ray.cluster_resources()
    from llmos.engine.torch_device import ray_use_gpu

    use_gpu = ray_use_gpu(device, float(resources.get("GPU", 0)), workers)
    if float(resources.get("CPU", 0)) < workers:
        raise InvalidInputError(
            f"--workers {workers} needs {workers} CPUs; the Ray cluster at {address} has {resources.get('CPU', 0):g}",
            param="workers",
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    result_path = work_dir / RESULT_FILE
    result_path.unlink(missing_ok=True)
    loop_config = {
        "base_dir": str(base_dir),
        "train": list(train_rows),
        "validation": list(validation_rows),
        "output_dir": str(output_dir),
        "checkpoints": Checkpoints.of(checkpoints),
        "work_dir": str(work_dir),
        "config": config,
        "chat_template": chat_template,
        "on_step": on_step,
        "log": log,
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(work_dir / "storage"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    log(f"training on Ray at {address}: {workers} DDP workers ({'GPU' if use_gpu else 'CPU'})")
    try:
        trainer.fit()
    except Exception as exc:  # Ray's TrainingFailedError and friends: one line for the job, details in Ray's logs
        raise JobFailedError(f"Ray training failed after {max_failures} restarts: {_first_line(exc)}") from exc
    try:
        outcome = json.loads(result_path.read_text())
    except (OSError, ValueError) as exc:
        raise JobFailedError(f"Ray training ended without a result ({result_path}: {exc})") from exc
    if outcome.get("stopped"):
        raise TrainingStopped(f"stopped at step {outcome['steps']}")
    outcome.pop("stopped", None)
    return FinetuneResult(**outcome)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# --- the worker side (runs in each Ray Train worker process) -------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class RayCollective(Collective):
    """The loop's cross-rank operations over torch.distributed (gloo or nccl), as Ray Train set it up."""

    def __init__(self, rank: int, world: int, device: Any) -> None:
        super().__init__(device)
        self.rank, self.world = rank, world

    def sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def gather(self, value: Any) -> list[Any]:
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def wrap(self, module: Any) -> Any:
        if self.world == 1:
            return module
        import ray.train.torch

        return ray.train.torch.prepare_model(module, move_to_device=False)

    def no_sync(self, wrapped: Any) -> contextlib.AbstractContextManager[Any]:
        return wrapped.no_sync() if self.world > 1 else contextlib.nullcontext()


def _worker_loop(loop: dict[str, Any]) -> None:
    import ray.train
    import torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config: FinetuneConfig = loop["config"]
    work_dir = Path(loop["work_dir"])
    log: Callable[[str], None] = loop["log"] if rank == 0 else (lambda _message: None)
    starts = 0
    if rank == 0:
        with (work_dir / "starts").open("a") as handle:
            handle.write(f"{time.time():.3f}\n")
        starts = len((work_dir / "starts").read_text().splitlines())
    _write_json(work_dir / "workers" / f"rank-{rank}.json", {"pid": os.getpid(), "rank": rank})

    torch.set_num_threads(config.threads or 1)
    device = ray.train.torch.get_device()
    setup = prepare(
        Path(loop["base_dir"]), loop["train"], loop["validation"], config, chat_template=loop["chat_template"],
        device=device,
    )  # fmt: skip
    log(f"{setup.describe()}; {world} workers, global batch {config.batch_size}")

    def log_start(message: str) -> None:
        log(f"{message} (worker group start {starts})" if message.startswith("resumed from") else message)

    outcome = setup.run(
        loop["checkpoints"], collective=RayCollective(rank, world, device), on_step=loop["on_step"], log=log_start
    )
    if rank != 0:
        return
    if outcome.stopped:
        _write_json(work_dir / RESULT_FILE, {"stopped": True, "steps": outcome.steps})
        return
    setup.save(Path(loop["output_dir"]))
    _write_json(work_dir / RESULT_FILE, asdict(setup.result(outcome)))
