"""Optimizers and schedules: every optimizer really trains a tiny model; schedules have the documented shape."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch

from llmos.errors import InvalidInputError
from llmos.training.optim import (
    OPTIMIZERS,
    SCHEDULES,
    OptimizerConfig,
    build_optimizer,
    build_schedule,
)
from llmos.training.scratch import create_model

TEXT = ["the cat sat on the mat. " * 3] * 8
# a learning rate that suits each optimizer on this toy problem
LRS = {"adamw": 1e-2, "adam": 1e-2, "sgd": 0.3, "rmsprop": 1e-3}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_optimizer_has_a_tuned_learning_rate() -> None:
    assert set(LRS) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_reduces_training_loss(name: str) -> None:
    model = create_model("gpt", layers=1, d_model=32, heads=2, context=64, texts=TEXT, seed=0)
    history = model.fit(
        TEXT, epochs=100, batch_size=8, optimizer=OptimizerConfig(name=name, lr=LRS[name]), max_steps=40
    )
    losses = history["loss"]
    assert len(losses) == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first * 0.7, (name, first, last)


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]


def test_build_optimizer_kinds_and_hyper_parameters() -> None:
    adamw = build_optimizer(_params(), OptimizerConfig(name="adamw", lr=0.01, weight_decay=0.1, beta2=0.95))
    assert type(adamw) is torch.optim.AdamW
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95)
    assert adamw.param_groups[0]["weight_decay"] == 0.1
    assert type(build_optimizer(_params(), OptimizerConfig(name="adam"))) is torch.optim.Adam
    sgd = build_optimizer(_params(), OptimizerConfig(name="sgd", lr=0.5, momentum=0.8))
    assert type(sgd) is torch.optim.SGD
    assert sgd.param_groups[0]["momentum"] == 0.8
    assert sgd.param_groups[0]["lr"] == 0.5
    rmsprop = build_optimizer(_params(), OptimizerConfig(name="rmsprop", momentum=0.5))
    assert type(rmsprop) is torch.optim.RMSprop
    assert rmsprop.param_groups[0]["momentum"] == 0.5


def test_only_trainable_parameters_are_optimized_once() -> None:
    frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    shared = torch.nn.Parameter(torch.ones(2))
    optimizer = build_optimizer([frozen, shared, shared], OptimizerConfig())
    params = optimizer.param_groups[0]["params"]
    assert len(params) == 1
    assert params[0] is shared


def test_adamw_decays_weights_decoupled_while_adam_adds_l2_to_the_gradient() -> None:
    results = {}
    for name in ("adamw", "adam"):
        weight = torch.nn.Parameter(torch.ones(1))
        optimizer = build_optimizer([weight], OptimizerConfig(name=name, lr=0.1, weight_decay=0.5))
        weight.grad = torch.zeros(1)  # no loss gradient: only weight decay moves the weight
        optimizer.step()
        results[name] = float(weight.item())
    assert results["adamw"] == pytest.approx(1 - 0.1 * 0.5)  # p -= lr * wd * p
    assert results["adam"] == pytest.approx(1 - 0.1, abs=1e-6)  # normalised step of size lr


def _lrs(steps: int, **kwargs: object) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    schedule = build_schedule(optimizer, **kwargs)  # type: ignore[arg-type]
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    values.append(optimizer.param_groups[0]["lr"])
    return values


def test_warmup_ramps_linearly_then_cosine_decays_to_min_ratio() -> None:
    lrs = _lrs(20, warmup_steps=4, total_steps=20, kind="cosine", min_ratio=0.1)
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lrs[4 + 8] == pytest.approx(0.55)  # halfway through the decay: (1 + min_ratio) / 2
    assert lrs[20] == pytest.approx(0.1)
    decay = lrs[4:]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert _lrs(25, warmup_steps=4, total_steps=20, kind="cosine", min_ratio=0.1)[-1] == pytest.approx(0.1)


def test_linear_and_constant_schedules() -> None:
    linear = _lrs(10, warmup_steps=0, total_steps=10, kind="linear", min_ratio=0.0)
    assert linear == pytest.approx([1 - i / 10 for i in range(11)])
    constant = _lrs(10, warmup_steps=2, total_steps=10, kind="constant")
    assert constant == pytest.approx([0.5, 1.0] + [1.0] * 9)
    assert set(SCHEDULES) == {"cosine", "linear", "constant"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "adagrad"),
        ("lr", -1e-3),
        ("lr", 0.0),
        ("lr", math.inf),
        ("lr", math.nan),
        ("weight_decay", -0.1),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("beta1", 1.0),
        ("beta2", 1.5),
        ("eps", 0.0),
        ("eps", -1e-8),
    ],
)
def test_invalid_optimizer_config_names_the_field(field: str, value: object) -> None:
    config = OptimizerConfig(**{field: value})  # type: ignore[arg-type]
    expected = "optimizer" if field == "name" else field
    with pytest.raises(InvalidInputError) as info:
        config.validate()
    assert info.value.param == expected
    with pytest.raises(InvalidInputError):
        build_optimizer(_params(), config)


def test_valid_config_passes_and_no_trainable_parameters_is_refused() -> None:
    OptimizerConfig().validate()
    with pytest.raises(InvalidInputError) as info:
        build_optimizer([torch.nn.Parameter(torch.ones(1), requires_grad=False)], OptimizerConfig())
    assert info.value.param == "params"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"warmup_steps": 0, "total_steps": 10, "kind": "step"}, "schedule"),
        ({"warmup_steps": -1, "total_steps": 10}, "warmup_steps"),
        ({"warmup_steps": 11, "total_steps": 10}, "warmup_steps"),
        ({"warmup_steps": 0, "total_steps": 0}, "total_steps"),
        ({"warmup_steps": 0, "total_steps": 10, "min_ratio": 1.5}, "min_ratio"),
        ({"warmup_steps": 0, "total_steps": 10, "min_ratio": -0.1}, "min_ratio"),
        ({"warmup_steps": 1.5, "total_steps": 10}, "warmup_steps"),
    ],
)
def test_invalid_schedule_arguments(kwargs: dict[str, object], param: str) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    with pytest.raises(InvalidInputError) as info:
        build_schedule(optimizer, **kwargs)  # type: ignore[arg-type]
    assert info.value.param == param
