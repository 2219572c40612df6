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
* **Nothing shared but the front end**: the driver (the job, on the front end's machine) starts a
  :class:`~llmos.distributed.trainhub.TrainingHub` actor pinned to its own Ray node, and the ranks reach the job only
  through it: no rank opens a path of the driver's machine, so the ranks may run on other machines without a shared
  file system. The training rows travel with the trainer's arguments; each rank fetches the base model's blobs from
  the hub (a :class:`~llmos.distributed.blobs.BlobServer`) into its own node's store
  (:func:`~llmos.distributed.blobs.fetch_version`, digest-checked).
* **Checkpoints**: rank 0 uploads them to the hub, which writes them with the job's
  :class:`~llmos.training.checkpoints.Checkpoints` (``checkpoints``: the source of truth, private and encrypted when
  it holds a cipher; the local trainer's format: trainable weights by parameter name, optimizer, schedule, step).
  When a worker (or its whole node) dies, Ray Train (``FailureConfig(max_failures)``) restarts the worker group, on
  whatever nodes have room, and every rank continues from the newest checkpoint that loads, streamed by the hub, so
  the run ends where an uninterrupted one would. Ray's own storage (``storage/`` under ``work_dir``, written by Ray
  Train's controller on the driver's node) holds nothing llmos needs.
* **Reporting**: ``on_step`` and ``log`` run in the hub (on the driver's node), so they must be picklable (the jobs
  layer passes an object that opens its own job service there); rank 0 calls them through the hub. ``on_step``
  returning True (cancellation) is broadcast to all ranks: a checkpoint is written and
  :class:`~llmos.training.finetune.TrainingStopped` is raised in the caller.
* **Output**: rank 0 saves the trained adapter or model in a temporary directory of its node and uploads it file by
  file; the hub writes it into ``output_dir``.
* **Files** under ``work_dir``, written by the hub: ``workers/rank-N.json`` (each rank's current worker PID, Ray node
  id and node address, for operators and tests), ``starts`` (one line per worker-group start), ``result.json``
  (at the end).
* **Collectives** go over the network interface of each rank's Ray node address (:func:`pin_collective_interface`,
  run by the trainer's backend setup), so ranks on different machines reach each other whatever their host names
  resolve to.
* Placement: one CPU per rank (``SPREAD``: ranks go to different nodes where they fit); the driver's node needs no
  CPU for the run (the hub and Ray Train's controller take none).
* Ray and torch are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmos.config import Settings
from llmos.distributed.blobs import fetch_version
from llmos.distributed.trainhub import RESULT_FILE, HubCheckpoints, TrainingHub, send_directory
from llmos.errors import BackendUnavailableError, InvalidInputError, JobFailedError
from llmos.registry.views import VersionView
from llmos.training.checkpoints import Checkpoints
from llmos.training.finetune import FinetuneConfig, FinetuneResult, prepare
from llmos.training.loop import Collective, StepCallback, TrainingStopped

MAX_WORKERS = 64


def resolve_address(home: Path, address: str, *, allow_remote: bool = False) -> str:
    """``auto`` -> the address of the cluster ``llmos cluster start`` runs for this home; anything else as given,
    once on this machine by the rule of :func:`~llmos.distributed.cluster.connect` (checked here, before queueing)."""
    from llmos.distributed.cluster import LocalCluster, is_local_address

    if address != "auto":
        if not allow_remote and not is_local_address(address):
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
    base: VersionView,
    train_rows: Sequence[dict[str, Any]],
    validation_rows: Sequence[dict[str, Any]],
    output_dir: Path,
    checkpoints: Checkpoints | Path,
    config: FinetuneConfig,
    *,
    settings: Settings,
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
    """Fine-tune ``base`` (a version of ``settings``' registry) on ``workers`` Ray Train workers; see the module
    docstring."""
    config.validate()
    check_workers(workers)
    from llmos.distributed.cluster import connect

    in_main = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if in_main else None
    ray = connect(address, ray_home, allow_remote=allow_remote)
    if on_term is not None:  # ray.init replaced it with an exit: a job's SIGTERM means "stop at the next step"
        signal.signal(signal.SIGTERM, on_term)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    hub = (
        ray.remote(TrainingHub)
        .options(num_cpus=0, max_concurrency=8, max_restarts=0, scheduling_strategy=here)
        .remote(settings, Checkpoints.of(checkpoints), str(work_dir), str(output_dir), on_step, log)
    )
    loop_config = {  # nothing here names a path of this machine: the ranks reach the job through the hub
        "hub": hub,
        "base": base,
        "train": list(train_rows),
        "validation": list(validation_rows),
        "config": config,
        "chat_template": chat_template,
        "report": on_step is not None,
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}, placement_strategy="SPREAD"
        ),
        torch_config=pinned_torch_config("nccl" if use_gpu else "gloo"),
        run_config=RunConfig(  # Ray Train's own records, written by its controller on this node
            name=name,
            storage_path=str(work_dir / "storage"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    log(f"training on Ray at {address}: {workers} DDP workers ({'GPU' if use_gpu else 'CPU'})")
    try:
        ray.get(hub.node.remote())
        trainer.fit()
    except Exception as exc:  # Ray's TrainingFailedError and friends: one line for the job, details in Ray's logs
        raise JobFailedError(f"Ray training failed after {max_failures} restarts: {_first_line(exc)}") from exc
    finally:
        ray.kill(hub, no_restart=True)
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


def pin_collective_interface() -> None:
    """In a rank, before its process group starts: gloo (and NCCL) use the network interface of this node's Ray
    address, not the one the host name resolves to (loopback in many containers and network namespaces, which peers
    on other machines cannot reach). A ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` already set wins."""
    import psutil  # type: ignore[import-untyped]
    import ray

    address = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    for interface, addresses in psutil.net_if_addrs().items():
        if any(entry.address == address for entry in addresses):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
            return


def pinned_torch_config(backend: str) -> Any:
    """Ray Train's ``TorchConfig`` for ``backend``, whose setup runs :func:`pin_collective_interface` on every rank
    before the process group is created."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class PinnedBackend(_TorchBackend):
        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            worker_group.execute(pin_collective_interface)
            super().on_start(worker_group, backend_config)

    class PinnedTorchConfig(TorchConfig):
        @property
        def backend_cls(self) -> Any:
            return PinnedBackend

    return PinnedTorchConfig(backend=backend)


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
    import ray
    import ray.train
    import torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config: FinetuneConfig = loop["config"]
    hub = loop["hub"]

    def log(message: str) -> None:
        if rank == 0:
            ray.get(hub.log.remote(message))

    starts = ray.get(hub.start.remote()) if rank == 0 else 0
    node = ray.get_runtime_context().get_node_id()
    record = {"pid": os.getpid(), "node_id": node, "address": ray.util.get_node_ip_address()}  # type: ignore[no-untyped-call]
    ray.get(hub.worker.remote(rank, record))

    torch.set_num_threads(config.threads or 1)
    device = ray.train.torch.get_device()
    _, base_dir, fetched = fetch_version(hub, loop["base"])
    setup = prepare(
        base_dir, loop["train"], loop["validation"], config, chat_template=loop["chat_template"], device=device
    )
    log(f"{setup.describe()}; {world} workers, global batch {config.batch_size}")
    if fetched:
        log(f"rank {rank} fetched {fetched} base model files from the front end to node {node[:8]}")

    def log_start(message: str) -> None:
        log(f"{message} (worker group start {starts})" if message.startswith("resumed from") else message)

    def on_step(step: int, total: int, metrics: dict[str, float]) -> bool:
        return bool(ray.get(hub.on_step.remote(step, total, metrics)))

    outcome = setup.run(
        HubCheckpoints(hub),
        collective=RayCollective(rank, world, device),
        on_step=on_step if loop["report"] else None,
        log=log_start,
    )
    if rank != 0:
        return
    if outcome.stopped:
        ray.get(hub.finish.remote({"stopped": True, "steps": outcome.steps}))
        return
    with tempfile.TemporaryDirectory(prefix="llmos-train-output-") as scratch:
        setup.save(Path(scratch) / "output")
        send_directory(hub, Path(scratch) / "output")
    ray.get(hub.finish.remote(asdict(setup.result(outcome))))
