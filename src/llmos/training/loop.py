"""The one training loop of llmos: fine-tuning (full and LoRA), distillation, from-scratch models and Ray DDP.

Contract: :class:`TrainingLoop` runs optimizer steps on a model with a loss hook (:class:`Objective`:
:class:`CrossEntropy`, or distillation's KL + CE) and a :class:`Collective` (the identity in one process; DDP's
all-reduces under Ray, :mod:`llmos.distributed.training`). Callers set up the model, optimizer, schedule, examples
and batch order; the loop owns everything between the first step and the last:

* **A step** takes ``grad_accum`` consecutive batches of ``order(epoch)`` (row indices per batch over the whole
  data; a resumed run re-derives the order from the epoch). Every loss term is a position-weighted mean over the
  whole step (all micro-batches, all ranks): micro-batch sums are divided by the step's position counts, so gradient
  accumulation and data parallelism give the gradient of one big batch. Under a collective of ``world`` ranks, rank
  ``r`` takes rows ``r, r+world, ...`` of each batch and scales its loss by ``world`` so that DDP's gradient average
  equals the single-process gradient; a rank with no row of a batch runs one row at weight 0 (DDP needs every rank
  in every backward).
* Gradients are clipped to norm ``clip``. A step whose loss is not finite raises
  :class:`~llmos.errors.InvalidInputError` ("training diverged") before the optimizer touches the weights.
* **Validation** every ``eval_every`` steps (0: only at the end) and at the last step, sharded over ranks; with
  ``patience``, training stops early after that many validations without improving ``loss`` by 1e-4.
* **Checkpoints** (when a :class:`~llmos.training.checkpoints.Checkpoints` store is given) every
  ``checkpoint_every`` steps, on a stop and on an early stop, written by rank 0: trainable weights by name,
  optimizer, schedule, counters, the validation before training, and every rank's torch RNG state, so a resumed run
  (dropout included) is identical to an uninterrupted one. A run resumes from the newest checkpoint that loads; all
  ranks must resume from the same step.
* ``on_step(step, total, metrics)`` runs on rank 0 after every step with ``loss`` (and each term when there are
  several), the step's ``lr``, ``epoch`` (fractional), ``tokens_per_second`` (training time only, validation
  excluded) and, after a validation, ``val_loss``, ``val_<term>`` and ``val_perplexity``. Returning True stops the run
  on every rank after a checkpoint (:attr:`LoopOutcome.stopped`); an exception it raises propagates.

torch is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmos.errors import InvalidInputError
from llmos.training.batches import IGNORE, Example, collate
from llmos.training.checkpoints import CheckpointStore

StepCallback = Callable[[int, int, dict[str, float]], bool]
PRECISIONS = ("auto", "fp32", "bf16")


class TrainingStopped(Exception):
    """Raised by a trainer when ``on_step`` asked to stop; the last checkpoint holds the progress."""


def bf16_is_fast() -> bool:
    """bf16 matmuls beat fp32 on CPUs with native bf16 instructions (AVX512-BF16 / AMX); elsewhere they are slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: Any = None) -> tuple[str, Any]:
    """``(name, torch dtype)`` for a precision setting on ``device`` (None: the CPU); ``auto`` is bf16 where it is
    fast (a CPU with native bf16 instructions, a GPU with native bf16: :func:`~llmos.engine.torch_device.
    training_precision`), else fp32."""
    import torch

    from llmos.engine.torch_device import training_precision

    if precision == "auto":
        precision = training_precision(device) or ("bf16" if bf16_is_fast() else "fp32")
    return precision, torch.bfloat16 if precision == "bf16" else torch.float32


def count_parameters(model: Any) -> int:
    """Distinct parameters (``parameters()`` yields a tied embedding once)."""
    return sum(p.numel() for p in model.parameters())


# --- the loss hook ---------------------------------------------------------------------------------------------------


class Objective(Protocol):
    """A loss made of position-weighted means of named terms (``ce``; distillation adds ``kl``)."""

    terms: tuple[str, ...]

    def counts(self, examples: Sequence[Example]) -> dict[str, int]:
        """How many positions each term averages over in these examples."""

    def sums(self, model: Any, batch: dict[str, Any]) -> tuple[Any, ...]:
        """Differentiable sums of each term over a collated batch, in :attr:`terms` order."""

    def combine(self, means: dict[str, Any]) -> Any:
        """The loss from the per-term means (tensors while training, floats for reports)."""


def position_logits(model: Any, batch: dict[str, Any], keep: Any) -> Any:
    """Logits ``[N, V]`` at the positions ``keep`` (``[B, T-1]``) only: the vocabulary projection is the largest
    matrix multiply of a step, and positions without a target need none."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return head(hidden[:, :-1, :][keep])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1, :][keep]


LogitsAt = Callable[[Any, dict[str, Any], Any], Any]


class CrossEntropy:
    """Next-token cross-entropy over the labelled positions; ``logits_at(model, batch, keep)`` runs the model."""

    terms: tuple[str, ...] = ("ce",)

    def __init__(self, logits_at: LogitsAt = position_logits) -> None:
        self.logits_at = logits_at

    def counts(self, examples: Sequence[Example]) -> dict[str, int]:
        return {"ce": sum(e.loss_tokens for e in examples)}

    def sums(self, model: Any, batch: dict[str, Any]) -> tuple[Any, ...]:
        import torch

        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        logits = self.logits_at(model, batch, keep).float()
        return (torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum"),)

    def combine(self, means: dict[str, Any]) -> Any:
        return means["ce"]


def report(objective: Objective, means: dict[str, float]) -> dict[str, float]:
    """``loss`` and, when the objective has several terms, each term's mean."""
    values = {"loss": float(objective.combine(means))}
    if len(objective.terms) > 1:
        values.update(means)
    return values


# --- the collective ---------------------------------------------------------------------------------------------------


class Collective:
    """The cross-rank operations the loop needs; this one is a single process, where each is the identity."""

    world = 1
    rank = 0

    def __init__(self, device: Any = None) -> None:
        self.device = device

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks."""
        return list(values)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, by rank."""
        return [value]

    def wrap(self, module: Any) -> Any:
        """The module that synchronises gradients in backward (DDP under several ranks)."""
        return module

    def no_sync(self, wrapped: Any) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient all-reduce for a backward that is not the step's last."""
        return contextlib.nullcontext()


def _loss_module(model: Any, objective: Objective) -> Any:
    """The model as a module whose forward returns the objective's sums (so DDP's hooks see that forward)."""
    from torch import nn

    class ObjectiveSums(nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, labels: Any) -> Any:
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
            return objective.sums(self.inner, batch)

    return ObjectiveSums(model)


# --- the loop ---------------------------------------------------------------------------------------------------------


@dataclass
class LoopPlan:
    total_steps: int
    steps_per_epoch: int
    grad_accum: int = 1
    eval_every: int = 0
    """Steps between validations; 0: only after the last step."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0: only on a stop."""
    patience: int | None = None
    clip: float = 1.0
    eval_batch_size: int = 8
    validate_first: bool = True
    """Measure the validation loss before the first step too (:attr:`LoopOutcome.initial`)."""


@dataclass
class LoopOutcome:
    steps: int
    epochs_done: float
    train: dict[str, float]
    """The last step's ``loss`` (and terms)."""
    initial: dict[str, float] | None
    validation: dict[str, float] | None
    best_loss: float | None
    tokens: int
    tokens_per_second: float
    resumed_from: int | None
    stopped_early: bool
    stopped: bool


@dataclass
class _Progress:
    step: int = 0
    best: float = math.inf
    bad_evals: int = 0
    tokens_before: int = 0
    tokens: int = 0
    initial: dict[str, float] | None = None
    resumed_from: int | None = None


def _rng_state(device: Any) -> dict[str, Any]:
    import torch

    state = {"cpu": torch.get_rng_state()}
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: Any) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device is not None and getattr(device, "type", "cpu") == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def evaluate(
    model: Any,
    objective: Objective,
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int,
    collective: Collective | None = None,
) -> dict[str, float] | None:
    """``loss``, the terms and ``perplexity`` (of ``ce``) of ``model`` over ``examples`` in eval mode, without
    gradients, each rank of ``collective`` scoring every ``world``-th of the length-sorted examples; None without
    examples."""
    import torch

    if not examples:
        return None
    comm = collective or Collective()
    terms = objective.terms
    was_training = model.training
    model.eval()
    ordered = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))[comm.rank :: comm.world]
    sums = dict.fromkeys(terms, 0.0)
    counts = dict.fromkeys(terms, 0)
    try:
        with torch.no_grad():
            for start in range(0, len(ordered), batch_size):
                chunk = [examples[i] for i in ordered[start : start + batch_size]]
                batch = collate(chunk, pad_id)
                if comm.device is not None:
                    batch = {k: v.to(comm.device) for k, v in batch.items()}
                for term, value in zip(terms, objective.sums(model, batch), strict=True):
                    sums[term] += float(value)
                for term, count in objective.counts(chunk).items():
                    counts[term] += count
    finally:
        model.train(was_training)
    totals = comm.sum(*(sums[t] for t in terms), *(float(counts[t]) for t in terms))
    means = {t: totals[i] / max(totals[len(terms) + i], 1.0) for i, t in enumerate(terms)}
    values = report(objective, means)
    return {**values, "perplexity": math.exp(min(means.get("ce", values["loss"]), 700.0))}


class TrainingLoop:
    """Optimizer steps over examples; see the module docstring."""

    def __init__(
        self,
        model: Any,
        optimizer: Any,
        schedule: Any,
        objective: Objective,
        plan: LoopPlan,
        *,
        collective: Collective | None = None,
        checkpoints: CheckpointStore | None = None,
        on_step: StepCallback | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.objective, self.plan = objective, plan
        self.collective = collective or Collective()
        self.checkpoints = checkpoints
        self.on_step = on_step if self.collective.rank == 0 else None
        self.log = log if self.collective.rank == 0 else (lambda _message: None)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.progress = _Progress()

    # --- pieces ---------------------------------------------------------------------------------------------------

    def _on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        device = self.collective.device
        return batch if device is None else {k: v.to(device) for k, v in batch.items()}

    def evaluate(self, examples: Sequence[Example], pad_id: int) -> dict[str, float] | None:
        """``loss``, the terms and ``perplexity`` over ``examples`` (sharded over the ranks); None without any."""
        return evaluate(self.model, self.objective, examples, pad_id, self.plan.eval_batch_size, self.collective)

    def _resume(self) -> None:
        state = self.checkpoints.load_latest() if self.checkpoints is not None else None
        progress = self.progress
        if state is not None:
            self.model.load_state_dict(state["weights"], strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            progress.step = int(state["step"])
            progress.best = float(state.get("best", math.inf))
            progress.bad_evals = int(state.get("bad_evals", 0))
            progress.tokens_before = int(state["tokens"])
            initial = state.get("initial")
            if isinstance(initial, int | float):  # written by earlier versions: the loss alone
                initial = {"loss": float(initial), "perplexity": math.exp(min(float(initial), 700.0))}
            progress.initial = initial
            progress.resumed_from = progress.step
            rng = state.get("rng")
            if isinstance(rng, list) and len(rng) == self.collective.world:
                _set_rng_state(rng[self.collective.rank], self.collective.device)
        step = progress.step
        if self.collective.sum(float(step))[0] != step * self.collective.world:
            raise RuntimeError(f"ranks loaded different checkpoints (rank {self.collective.rank}: step {step})")

    def _checkpoint(self) -> None:
        if self.checkpoints is None:
            return
        rng = self.collective.gather(_rng_state(self.collective.device))  # every rank takes part
        if self.collective.rank != 0:
            return
        progress = self.progress
        self.checkpoints.save(
            progress.step,
            {
                "weights": {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad},
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "step": progress.step,
                "best": progress.best,
                "bad_evals": progress.bad_evals,
                "tokens": progress.tokens_before + progress.tokens,
                "initial": progress.initial,
                "rng": rng,
            },
        )

    def _step(
        self, train: Sequence[Example], micro: Sequence[Sequence[int]], pad_id: int, forward: Any
    ) -> dict[str, float]:
        """One optimizer step over the micro-batches; returns the step's per-term means."""
        import torch

        comm, terms = self.collective, self.objective.terms
        self.optimizer.zero_grad(set_to_none=True)
        denominators = self.objective.counts([train[i] for rows in micro for i in rows])
        sums = dict.fromkeys(terms, 0.0)
        seen = 0
        for number, rows in enumerate(micro):
            mine, weight = list(rows[comm.rank :: comm.world]), float(comm.world)
            if not mine:  # this rank has no row of this batch: take part in the all-reduce with weight 0
                mine, weight = list(rows[:1]), 0.0
            batch = self._on_device(collate([train[i] for i in mine], pad_id))
            last = number == len(micro) - 1
            with contextlib.nullcontext() if last else comm.no_sync(forward):
                parts = forward(**batch)
                means = {t: part / max(denominators[t], 1) for t, part in zip(terms, parts, strict=True)}
                (self.objective.combine(means) * weight).backward()
            if weight:
                for term, part in zip(terms, parts, strict=True):
                    sums[term] += float(part.detach())
                seen += int(batch["attention_mask"].sum())
        totals = comm.sum(*(sums[t] for t in terms), float(seen))
        step_means = {t: totals[i] / max(denominators[t], 1) for i, t in enumerate(terms)}
        loss = float(self.objective.combine(step_means))
        if not math.isfinite(loss):
            raise InvalidInputError(
                f"training diverged: the loss became {loss} at step {self.progress.step + 1}; try a lower lr",
                param="lr",
            )
        torch.nn.utils.clip_grad_norm_(self.trainable, self.plan.clip)
        self.optimizer.step()
        self.schedule.step()
        self.progress.step += 1
        self.progress.tokens += int(totals[-1])
        return step_means

    def _batches(self, order: Callable[[int], list[list[int]]]) -> Iterator[list[list[int]]]:
        """The micro-batches of every remaining step, from the current step on."""
        plan = self.plan
        while self.progress.step < plan.total_steps:
            epoch, position = divmod(self.progress.step, plan.steps_per_epoch)
            batches = order(epoch)
            for index in range(position, plan.steps_per_epoch):
                if self.progress.step >= plan.total_steps:
                    return
                yield batches[index * plan.grad_accum : (index + 1) * plan.grad_accum]

    # --- the run ----------------------------------------------------------------------------------------------------

    def run(
        self,
        train: Sequence[Example],
        validation: Sequence[Example],
        order: Callable[[int], list[list[int]]],
        pad_id: int,
    ) -> LoopOutcome:
        """Train from the newest checkpoint (or the start) to ``plan.total_steps``, an early stop or a stop."""
        plan, progress, comm = self.plan, self.progress, self.collective
        self._resume()
        if progress.resumed_from is not None:
            self.log(f"resumed from the checkpoint of step {progress.step}")
        elif validation and plan.validate_first:
            progress.initial = self.evaluate(validation, pad_id)
            self.log(f"validation before training: {shown(progress.initial or {})}")
        eval_every = plan.eval_every or plan.total_steps
        forward = comm.wrap(_loss_module(self.model, self.objective))
        self.model.train()
        started = time.perf_counter()
        evaluating = 0.0
        last: dict[str, float] = {"loss": float("nan")}
        measured: dict[str, float] | None = None
        stopped_early = stopped = False
        for micro in self._batches(order):
            lr = float(self.optimizer.param_groups[0]["lr"])
            last = report(self.objective, self._step(train, micro, pad_id, forward))
            step = progress.step
            metrics = {**last, "lr": lr, "epoch": step / plan.steps_per_epoch}
            if validation and (step % eval_every == 0 or step == plan.total_steps):
                began = time.perf_counter()
                measured = self.evaluate(validation, pad_id)
                evaluating += time.perf_counter() - began
                assert measured is not None
                metrics.update({f"val_{key}": value for key, value in measured.items()})
                if measured["loss"] < progress.best - 1e-4:
                    progress.best, progress.bad_evals = measured["loss"], 0
                else:
                    progress.bad_evals += 1
                    stopped_early = plan.patience is not None and progress.bad_evals >= plan.patience
            elapsed = time.perf_counter() - started - evaluating
            metrics["tokens_per_second"] = progress.tokens / elapsed if elapsed > 0 else 0.0
            asked = bool(self.on_step(step, plan.total_steps, metrics)) if self.on_step is not None else False
            stopped = comm.sum(float(asked))[0] > 0
            if (plan.checkpoint_every and step % plan.checkpoint_every == 0) or stopped or stopped_early:
                self._checkpoint()
            if stopped:
                break
            if stopped_early:
                self.log(f"early stop at step {step}: no validation improvement in {plan.patience} evaluations")
                break
        elapsed = time.perf_counter() - started - evaluating
        if validation and measured is None and not stopped:
            measured = self.evaluate(validation, pad_id)
        return LoopOutcome(
            steps=progress.step,
            epochs_done=progress.step / plan.steps_per_epoch,
            train=last,
            initial=progress.initial,
            validation=measured,
            best_loss=progress.best if progress.best < math.inf else None,
            tokens=progress.tokens_before + progress.tokens,
            tokens_per_second=progress.tokens / elapsed if elapsed > 0 else 0.0,
            resumed_from=progress.resumed_from,
            stopped_early=stopped_early,
            stopped=stopped,
        )


def shown(values: dict[str, float]) -> str:
    """``key=value`` pairs for a log line."""
    return " ".join(f"{key}={value:.4f}" for key, value in values.items())
