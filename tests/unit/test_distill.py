"""Distillation: the loss formula, the shared-tokenizer check, new students, and a tiny run with stop and resume."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos.errors import InvalidInputError
from llmos.training import distill as D
from llmos.training.loop import TrainingStopped
from llmos.training.optim import OptimizerConfig
from tests.helpers import make_tiny_base, toy_qa_rows

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread (no thread hand-offs on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_loss_is_zero_kl_when_student_equals_teacher_and_follows_the_formula() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(10, 17) * 3
    targets = torch.tensor([3, -100, 5, 1, -100, 0, 2, 16, 4, -100])
    assert float(D.distillation_loss(teacher.clone(), teacher, targets, temperature=2.0, alpha=1.0)) == pytest.approx(
        0.0, abs=1e-6
    )
    student = torch.randn(10, 17)
    T, alpha = 2.5, 0.3
    p_teacher = torch.softmax(teacher / T, dim=-1)
    kl = (p_teacher * (torch.log_softmax(teacher / T, -1) - torch.log_softmax(student / T, -1))).sum(-1).mean()
    keep = targets != -100
    ce = torch.nn.functional.cross_entropy(student[keep], targets[keep])
    got = D.distillation_loss(student, teacher, targets, temperature=T, alpha=alpha)
    assert float(got) == pytest.approx(float(alpha * T**2 * kl + (1 - alpha) * ce), rel=1e-5)
    assert float(D.distillation_loss(student, teacher, targets, temperature=T, alpha=0.0)) == pytest.approx(float(ce))
    assert float(kl) > 0


def test_minimising_the_kl_moves_the_student_to_the_teacher() -> None:
    torch.manual_seed(1)
    teacher = torch.randn(6, 11)
    student = torch.zeros(6, 11, requires_grad=True)
    optimizer = torch.optim.Adam([student], lr=0.1)
    targets = torch.full((6,), -100)
    losses = []
    for _ in range(150):
        optimizer.zero_grad()
        loss = D.distillation_loss(student, teacher, targets, temperature=1.0, alpha=1.0)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.01 * losses[0]
    assert torch.allclose(torch.softmax(student, -1), torch.softmax(teacher, -1), atol=1e-2)


def test_teacher_and_student_with_different_tokenizers_are_refused(tmp_path: Path) -> None:
    from llmos.training.scratch import create_model

    teacher = make_tiny_base(tmp_path / "teacher")
    D.check_same_tokenizer(teacher, make_tiny_base(tmp_path / "same", seed=1))  # same vocabulary: fine
    other = create_model("gpt", layers=1, d_model=16, heads=2, context=32, texts=["abcdefgh xyz"], seed=0)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(InvalidInputError, match="teacher and student use different tokenizers"):
        D.check_same_tokenizer(teacher, tmp_path / "other")


def test_new_student_shape_keeps_the_head_size_and_refuses_bad_widths() -> None:
    smollm2 = {
        "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536,
    }  # fmt: skip
    shape = D.student_shape(smollm2, 6, 256)
    assert shape == {
        "num_hidden_layers": 6, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 64, "intermediate_size": 704,
    }  # fmt: skip
    assert D.student_shape(smollm2, 4, None)["hidden_size"] == 576
    for layers, hidden in [(6, 100), (6, 32), (0, 256)]:
        with pytest.raises(InvalidInputError, match="--student-"):
            D.student_shape(smollm2, layers, hidden)


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 0.0), ("temperature", -1.0), ("alpha", 1.5), ("alpha", -0.1), ("batch_size", 0)],
)
def test_bad_config_is_refused(field: str, value: float) -> None:
    with pytest.raises(InvalidInputError, match=field):
        D.DistillConfig(**{field: value}).validate()  # type: ignore[arg-type]


def _config(**overrides: object) -> D.DistillConfig:
    values: dict[str, object] = {
        "optimizer": OptimizerConfig(name="adamw", lr=1e-2), "batch_size": 8, "max_steps": 16, "warmup_steps": 2,
        "max_length": 32, "checkpoint_every": 100, "precision": "fp32", "seed": 3,
    }  # fmt: skip
    values.update(overrides)
    return D.DistillConfig(**values)  # type: ignore[arg-type]


def sharp_teacher(directory: Path) -> Path:
    """A tiny random teacher whose (tied) output layer is scaled up: peaked, informative soft targets."""
    from transformers import AutoModelForCausalLM

    make_tiny_base(directory, seed=0)
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(30.0)
    model.save_pretrained(directory)
    return directory


def test_distilling_a_tiny_student_lowers_validation_kl_and_resumes_after_a_stop(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    teacher = sharp_teacher(tmp_path / "teacher")
    student = D.build_student(teacher, tmp_path / "student", layers=1, hidden=None, seed=2)
    rows = [{"text": f"{row['prompt']} {row['completion']}"} for row in toy_qa_rows(40)]
    train, validation = rows[:32], rows[32:]

    result = D.distill(
        teacher, student, train, validation, tmp_path / "out", tmp_path / "ckpt-a", _config(), log=lambda _m: None
    )
    assert result.steps == 16 and result.initial_validation is not None and result.validation is not None
    assert result.validation["kl"] < 0.7 * result.initial_validation["kl"]
    assert result.validation["loss"] < result.initial_validation["loss"]
    assert result.student_parameters < result.teacher_parameters
    assert math.isfinite(result.train_kl)

    seen: list[dict[str, float]] = []

    def stop(step: int, _total: int, metrics: dict[str, float]) -> bool:
        seen.append(metrics)
        return step == 5

    with pytest.raises(TrainingStopped):
        D.distill(teacher, student, train, validation, tmp_path / "o2", tmp_path / "ckpt-b", _config(), on_step=stop)
    assert {"loss", "kl", "ce", "lr"} <= set(seen[0]) and len(seen) == 5
    resumed = D.distill(
        teacher, student, train, validation, tmp_path / "o2", tmp_path / "ckpt-b", _config(), log=lambda _m: None
    )
    assert resumed.resumed_from == 5 and resumed.steps == 16
    straight, again = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(tmp_path / "o2" / "model.safetensors"),
    )
    assert straight.keys() == again.keys()
    assert all(torch.allclose(straight[k], again[k], atol=1e-5) for k in straight)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
