"""The settings every trainer shares, and what every trainer does before its first step.

Contract: :class:`TrainingConfig` holds the optimizer, batch, schedule, length, validation, checkpoint, precision
and thread settings of fine-tuning (:class:`~llmos.training.finetune.FinetuneConfig`) and distillation
(:class:`~llmos.training.distill.DistillConfig`), which add their own fields. ``validate()`` raises
:class:`~llmos.errors.InvalidInputError` naming the field; :meth:`TrainingConfig.plan` turns the settings and the
number of training examples into the :class:`~llmos.training.loop.LoopPlan` (steps per epoch =
``ceil(examples / batch_size) // grad_accum``, at least 1; ``max_steps`` or that times ``epochs``; validation once per
epoch unless ``eval_every``). :func:`begin` applies the thread count, resolves the precision for the run's device
and seeds torch; :func:`encode_examples` turns the rows into examples with the model's tokenizer and refuses data
with nothing to learn from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from llmos.errors import InvalidInputError
from llmos.training.batches import Example, encode_rows
from llmos.training.loop import PRECISIONS, LoopPlan, resolve_precision
from llmos.training.optim import OptimizerConfig, build_optimizer, build_schedule

POSITIVE_FIELDS = ("batch_size", "grad_accum", "epochs", "max_length", "checkpoint_every")


@dataclass
class TrainingConfig:
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adamw", lr=2e-4))
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 3
    max_steps: int | None = None
    warmup_steps: int = 10
    schedule: str = "cosine"
    seed: int = 0
    max_length: int = 256
    eval_every: int = 0
    """Steps between validation runs; 0 = once per epoch."""
    checkpoint_every: int = 20
    patience: int | None = None
    """Stop after this many validations without improvement (None: never)."""
    precision: str = "auto"
    threads: int | None = None

    def validate(self) -> None:
        self.optimizer.validate()
        for name in POSITIVE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}", param=name)
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidInputError(f"max_steps must be positive, got {self.max_steps}", param="max_steps")
        if self.warmup_steps < 0 or self.eval_every < 0:
            raise InvalidInputError("warmup_steps and eval_every must not be negative", param="warmup_steps")
        if self.patience is not None and self.patience < 1:
            raise InvalidInputError("patience must be positive", param="patience")
        if self.precision not in PRECISIONS:
            raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)}", param="precision")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def optimizer_and_schedule(self, parameters: Any, total_steps: int) -> tuple[Any, Any]:
        """The optimizer over ``parameters`` and its warm-up + decay schedule spanning ``total_steps``."""
        optimizer = build_optimizer(parameters, self.optimizer)
        warmup = min(self.warmup_steps, total_steps)
        return optimizer, build_schedule(optimizer, warmup_steps=warmup, total_steps=total_steps, kind=self.schedule)

    def plan(self, examples: int) -> LoopPlan:
        steps_per_epoch = max(1, math.ceil(examples / self.batch_size) // self.grad_accum)
        return LoopPlan(
            total_steps=self.max_steps or steps_per_epoch * self.epochs,
            steps_per_epoch=steps_per_epoch,
            grad_accum=self.grad_accum,
            eval_every=self.eval_every or steps_per_epoch,
            checkpoint_every=self.checkpoint_every,
            patience=self.patience,
            eval_batch_size=self.batch_size,
        )


def begin(config: TrainingConfig, device: Any = None) -> tuple[str, Any]:
    """Threads, precision (on ``device``; None: the CPU) and seed for a run: returns ``(precision name, torch
    dtype)``."""
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    precision, dtype = resolve_precision(config.precision, device)
    torch.manual_seed(config.seed)
    return precision, dtype


@dataclass
class Encoded:
    pad_id: int
    train: list[Example]
    validation: list[Example]

    def order(self, batch_size: int, seed: int) -> Any:
        """The batch order of an epoch (:func:`~llmos.training.batches.batch_order` of these examples)."""
        from llmos.training.batches import batch_order

        lengths = [len(e.input_ids) for e in self.train]
        return lambda epoch: batch_order(lengths, batch_size, seed, epoch)


def encode_examples(
    tokenizer: Any,
    train_rows: Sequence[dict[str, Any]],
    validation_rows: Sequence[dict[str, Any]],
    chat_template: str | None,
    max_length: int,
) -> Encoded:
    """Training and validation examples and the padding id; data with no token to learn from is refused."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train = encode_rows(train_rows, tokenizer, chat_template, max_length)
    validation = encode_rows(validation_rows, tokenizer, chat_template, max_length) if validation_rows else []
    if not train:
        raise InvalidInputError("no training example has any token to learn from (empty answers?)", param="data")
    return Encoded(pad_id, train, validation)
