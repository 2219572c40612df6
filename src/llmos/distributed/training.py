"""Data-parallel fine-tuning on Ray Train: PyTorch DDP over N workers, checkpoints in the job's llmos directory.

Contract: :func:`ray_finetune` trains like :func:`llmos.training.finetune.finetune` (same arguments, same
:class:`~llmos.training.finetune.FinetuneResult`, same output directory and checkpoint format), but on a Ray
cluster joined through :func:`llmos.distributed.cluster.connect`: a ``TorchTrainer`` with ``workers`` workers of one
CPU each (one GPU each when the cluster has enough; backend ``gloo`` on CPU, ``nccl`` on GPU).

* **Same steps as one process**: every worker builds the same model and encodes the same rows; each step takes the
  global batch the local trainer would take (:func:`~llmos.training.finetune.batch_order`, seed and epoch), and
  rank ``r`` computes the summed token loss of rows ``r, r+N, ...`` of it. The loss is scaled by
  ``N / global loss tokens`` so that DDP's gradient average equals the single-process gradient; clipping, the
  optimizer and the schedule then run identically on every rank. A rank whose share of a batch is empty runs one
  row at weight 0 (DDP needs every rank in every backward). Validation loss is sharded the same way and summed
  with an all-reduce.
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
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmos.errors import BackendUnavailableError, InvalidInputError, JobFailedError
from llmos.training.checkpoints import Checkpoints, make_private_dir
from llmos.training.finetune import (
    Example,
    FinetuneConfig,
    FinetuneResult,
    StepCallback,
    TrainingStopped,
    batch_order,
    bf16_is_fast,
    collate,
    encode_rows,
    load_base,
    token_loss,
)
from llmos.training.optim import build_optimizer, build_schedule

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
    use_gpu = float(resources.get("GPU", 0)) >= workers
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


class _Collective:
    """The all-reduces the loop needs, as float64 sums (no-ops with one worker)."""

    def __init__(self, world: int, device: Any) -> None:
        self.world, self.device = world, device

    def sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]


def _on(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


def _sharded_loss(
    model: Any, examples: Sequence[Example], batch_size: int, pad_id: int, rank: int, comm: _Collective
) -> float:
    """Mean token loss over ``examples``, each rank scoring every ``world``-th row of the length-sorted list."""
    import torch

    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    ordered = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))[rank :: comm.world]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ordered), batch_size):
            batch = collate([examples[i] for i in ordered[start : start + batch_size]], pad_id)
            loss, tokens = token_loss(model, _on(batch, comm.device))
            total += float(loss)
            count += tokens
    model.train(was_training)
    total, all_tokens = comm.sum(total, float(count))
    return total / max(all_tokens, 1.0)


def _loss_module(model: Any) -> Any:
    """The model wrapped so that DDP's forward runs the summed token loss (DDP hooks see every forward)."""
    from torch import nn

    class TokenLoss(nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, labels: Any) -> Any:
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
            return token_loss(self.inner, batch)[0]

    return TokenLoss(model)


def _worker_loop(loop: dict[str, Any]) -> None:
    import ray.train
    import torch
    from transformers import AutoTokenizer

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config: FinetuneConfig = loop["config"]
    work_dir = Path(loop["work_dir"])
    store: Checkpoints = loop["checkpoints"]
    log: Callable[[str], None] = loop["log"] if rank == 0 else (lambda _message: None)
    on_step: StepCallback | None = loop["on_step"] if rank == 0 else None
    starts = 0
    if rank == 0:
        with (work_dir / "starts").open("a") as handle:
            handle.write(f"{time.time():.3f}\n")
        starts = len((work_dir / "starts").read_text().splitlines())
    _write_json(work_dir / "workers" / f"rank-{rank}.json", {"pid": os.getpid(), "rank": rank})

    torch.set_num_threads(config.threads or 1)
    device = ray.train.torch.get_device()
    comm = _Collective(world, device)
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if bf16_is_fast() else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(config.seed)

    base_dir = Path(loop["base_dir"])
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train = encode_rows(loop["train"], tokenizer, loop["chat_template"], config.max_length)
    validation = encode_rows(loop["validation"], tokenizer, loop["chat_template"], config.max_length)
    if not train:
        raise InvalidInputError("no training example has any token to learn from (empty answers?)", param="data")
    lengths = [len(e.input_ids) for e in train]
    loss_tokens = [sum(1 for label in e.labels[1:] if label != -100) for e in train]
    steps_per_epoch = max(1, math.ceil(len(train) / config.batch_size) // config.grad_accum)
    total = config.max_steps or steps_per_epoch * config.epochs
    eval_every = config.eval_every or steps_per_epoch
    log(
        f"{len(train)} training and {len(validation)} validation examples; {steps_per_epoch} steps per epoch;"
        f" {total} steps; {config.method}; {precision}; {world} workers, global batch {config.batch_size}"
    )

    model = load_base(base_dir, config, dtype).to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, config.optimizer)
    schedule = build_schedule(
        optimizer, warmup_steps=min(config.warmup_steps, total), total_steps=total, kind=config.schedule
    )
    step, best, bad_evals, tokens_done = 0, math.inf, 0, 0
    initial: float | None = None
    resumed_from: int | None = None
    state = store.load_latest()
    if state is not None:
        model.load_state_dict(state["weights"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, best, bad_evals = int(state["step"]), float(state["best"]), int(state["bad_evals"])
        tokens_done, initial, resumed_from = int(state["tokens"]), state.get("initial"), step
    if comm.sum(float(step))[0] != step * world:  # every rank must start from the same checkpoint
        raise RuntimeError(f"ranks loaded different checkpoints (rank {rank}: step {step})")
    if resumed_from is not None:
        log(f"resumed from the checkpoint of step {step} (worker group start {starts})")
    elif validation:
        initial = _sharded_loss(model, validation, config.batch_size, pad_id, rank, comm)
        log(f"validation loss before training: {initial:.4f} (perplexity {math.exp(initial):.2f})")

    ddp: Any = ray.train.torch.prepare_model(_loss_module(model), move_to_device=False) if world > 1 else None
    forward = ddp if ddp is not None else _loss_module(model)
    tokens_this_run = 0
    last_loss = float("nan")
    validation_loss: float | None = None
    stopped_early = stop = False

    def checkpoint() -> None:
        if rank == 0:
            store.save(
                step,
                {
                    "weights": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "step": step,
                    "best": best,
                    "bad_evals": bad_evals,
                    "tokens": tokens_done + tokens_this_run,
                    "initial": initial,
                },
            )

    started = time.perf_counter()
    while step < total and not stopped_early and not stop:
        epoch, position = divmod(step, steps_per_epoch)
        batches = batch_order(lengths, config.batch_size, config.seed, epoch)
        for index in range(position, steps_per_epoch):
            if step >= total:
                break
            optimizer.zero_grad(set_to_none=True)
            micro = batches[index * config.grad_accum : (index + 1) * config.grad_accum]
            step_tokens = sum(loss_tokens[i] for b in micro for i in b)
            loss_sum, seen = 0.0, 0
            for number, batch_indices in enumerate(micro):
                mine = batch_indices[rank::world]
                weight = world / max(step_tokens, 1)
                if not mine:  # this rank has no row of this batch: take part in the all-reduce with weight 0
                    mine, weight = batch_indices[:1], 0.0
                batch = _on(collate([train[i] for i in mine], pad_id), device)
                last = number == len(micro) - 1
                sync = contextlib.nullcontext() if ddp is None or last else ddp.no_sync()
                with sync:
                    loss = forward(**batch)
                    (loss * weight).backward()
                if weight:
                    loss_sum += float(loss.detach())
                    seen += int(batch["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            loss_sum, seen_all = comm.sum(loss_sum, float(seen))
            tokens_this_run += int(seen_all)
            last_loss = loss_sum / max(step_tokens, 1)
            metrics = {"loss": last_loss, "lr": float(schedule.get_last_lr()[0]), "epoch": step / steps_per_epoch}
            if validation and (step % eval_every == 0 or step == total):
                validation_loss = _sharded_loss(model, validation, config.batch_size, pad_id, rank, comm)
                metrics.update(val_loss=validation_loss, val_perplexity=math.exp(validation_loss))
                if validation_loss < best - 1e-4:
                    best, bad_evals = validation_loss, 0
                else:
                    bad_evals += 1
                    stopped_early = config.patience is not None and bad_evals >= config.patience
            elapsed = time.perf_counter() - started
            metrics["tokens_per_second"] = tokens_this_run / elapsed if elapsed > 0 else 0.0
            asked = bool(on_step(step, total, metrics)) if on_step is not None else False
            stop = comm.sum(float(asked))[0] > 0
            if step % config.checkpoint_every == 0 or stop or stopped_early:
                checkpoint()
            if stop:
                break
            if stopped_early:
                log(f"early stop at step {step}: no validation improvement in {config.patience} evaluations")
                break
    elapsed = time.perf_counter() - started
    if stop:
        if rank == 0:
            _write_json(work_dir / RESULT_FILE, {"stopped": True, "steps": step})
        return
    if validation and validation_loss is None:
        validation_loss = _sharded_loss(model, validation, config.batch_size, pad_id, rank, comm)
    if rank == 0:
        output_dir = make_private_dir(Path(loop["output_dir"]))
        if config.method == "lora":
            model.save_pretrained(output_dir)
        else:
            model.save_pretrained(output_dir, safe_serialization=True)
            tokenizer.save_pretrained(output_dir)
        result = FinetuneResult(
            steps=step,
            epochs_done=step / steps_per_epoch,
            train_loss=last_loss,
            validation_loss=validation_loss,
            validation_perplexity=math.exp(validation_loss) if validation_loss is not None else None,
            initial_validation_loss=initial,
            best_validation_loss=best if best < math.inf else None,
            tokens=tokens_done + tokens_this_run,
            tokens_per_second=tokens_this_run / elapsed if elapsed > 0 else 0.0,
            resumed_from=resumed_from,
            stopped_early=stopped_early,
            precision=precision,
        )
        _write_json(work_dir / RESULT_FILE, asdict(result))
