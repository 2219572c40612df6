"""Optimizers and learning-rate schedules for llmos training.

Contract: :class:`OptimizerConfig` names one of :data:`OPTIMIZERS` with its hyper-parameters and ``validate()``
raises :class:`~llmos.errors.InvalidInputError` (with ``param`` naming the field) for anything out of range.
:func:`build_optimizer` turns a config into a ``torch.optim.Optimizer`` over the parameters that require gradients:
``adamw`` (decoupled weight decay), ``adam`` (weight decay as L2 in the gradient), ``sgd`` (heavy-ball momentum) and
``rmsprop`` (with momentum; smoothing constant 0.99). :func:`build_schedule` returns a ``LambdaLR`` whose factor
ramps linearly from ``1/warmup_steps`` to 1 over the warmup, then decays (``cosine`` or ``linear``) to ``min_ratio``
at ``total_steps`` and stays there, or holds at 1 (``constant``). Nothing here touches global state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmos.errors import InvalidInputError

if TYPE_CHECKING:  # torch is imported where an optimizer is built: configs validate without it
    import torch

OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")
SCHEDULES = ("cosine", "linear", "constant")

RMSPROP_ALPHA = 0.99


def _check_real(value: object, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInputError(f"{param} must be a finite number, got {value!r}", param=param)
    return float(value)


def _check_int(value: object, param: str, *, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInputError(f"{param} must be an integer, got {value!r}", param=param)
    if value < minimum:
        raise InvalidInputError(f"{param} must be at least {minimum}, got {value}", param=param)
    return value


@dataclass(frozen=True)
class OptimizerConfig:
    """Which optimizer to use and its hyper-parameters (fields that an optimizer does not use are ignored)."""

    name: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def validate(self) -> None:
        """Raise InvalidInputError naming the first field that is out of range."""
        if self.name not in OPTIMIZERS:
            raise InvalidInputError(
                f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}", param="optimizer"
            )
        if _check_real(self.lr, "lr") <= 0:
            raise InvalidInputError(f"lr must be greater than 0, got {self.lr}", param="lr")
        if _check_real(self.weight_decay, "weight_decay") < 0:
            raise InvalidInputError(f"weight_decay must not be negative, got {self.weight_decay}", param="weight_decay")
        for field in ("momentum", "beta1", "beta2"):
            value = _check_real(getattr(self, field), field)
            if not 0.0 <= value < 1.0:
                raise InvalidInputError(f"{field} must be in [0, 1), got {value}", param=field)
        if _check_real(self.eps, "eps") <= 0:
            raise InvalidInputError(f"eps must be greater than 0, got {self.eps}", param="eps")


def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over the parameters in ``params`` that require gradients (each once)."""
    import torch

    config.validate()
    seen: set[int] = set()
    trainable: list[torch.nn.Parameter] = []
    for param in params:
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            trainable.append(param)
    if not trainable:
        raise InvalidInputError("there are no trainable parameters (none requires a gradient)", param="params")
    if config.name in ("adamw", "adam"):
        kind = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
        return kind(
            trainable,
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
    if config.name == "sgd":
        return torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.RMSprop(
        trainable,
        lr=config.lr,
        alpha=RMSPROP_ALPHA,
        eps=config.eps,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def schedule_factor(step: int, *, warmup_steps: int, total_steps: int, kind: str, min_ratio: float) -> float:
    """The learning-rate multiplier after ``step`` scheduler steps (the value :func:`build_schedule` uses)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress)


def build_schedule(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    kind: str = "cosine",
    min_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A warmup-then-decay schedule over ``total_steps`` optimizer steps; call ``step()`` after each optimizer step."""
    if kind not in SCHEDULES:
        raise InvalidInputError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}", param="schedule")
    total = _check_int(total_steps, "total_steps", minimum=1)
    warmup = _check_int(warmup_steps, "warmup_steps", minimum=0)
    if warmup > total:
        raise InvalidInputError(
            f"warmup_steps ({warmup}) must not exceed the total number of steps ({total})", param="warmup_steps"
        )
    ratio = _check_real(min_ratio, "min_ratio")
    if not 0.0 <= ratio <= 1.0:
        raise InvalidInputError(f"min_ratio must be in [0, 1], got {ratio}", param="min_ratio")

    def factor(step: int) -> float:
        return schedule_factor(step, warmup_steps=warmup, total_steps=total, kind=kind, min_ratio=ratio)

    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, factor)
