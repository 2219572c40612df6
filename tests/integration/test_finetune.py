"""Fine-tuning below the job system: resume equivalence, checkpoint failures, validation, methods."""

from __future__ import annotations

import errno
import math
from pathlib import Path
from typing import Any

import pytest

from llmos.errors import InvalidInputError, StorageError
from llmos.store.crypto import MAGIC, BlobCipher
from llmos.training import checkpoints as checkpoints_module
from llmos.training import finetune as finetune_module
from llmos.training.checkpoints import Checkpoints, load_latest_checkpoint
from llmos.training.finetune import FinetuneConfig, finetune
from llmos.training.loop import TrainingStopped
from llmos.training.optim import OptimizerConfig
from tests.helpers import make_tiny_base, toy_qa_rows


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


def config(**overrides: Any) -> FinetuneConfig:
    values: dict[str, Any] = {
        "method": "lora", "optimizer": OptimizerConfig(lr=3e-3), "batch_size": 8, "max_steps": 16,
        "warmup_steps": 2, "checkpoint_every": 4, "eval_every": 8, "seed": 3, "threads": 1, "lora_r": 8,
    }  # fmt: skip
    values.update(overrides)
    return FinetuneConfig(**values)


def run(
    base: Path, work: Path, cfg: FinetuneConfig, checkpoints: Checkpoints | None = None, **kwargs: Any
) -> finetune_module.FinetuneResult:
    rows = toy_qa_rows()
    store = checkpoints or work / "checkpoints"
    return finetune(base, rows[:40], rows[40:], work / "out", store, cfg, log=lambda _: None, **kwargs)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_lowers_validation_loss(base: Path, tmp_path: Path, method: str) -> None:
    lr = 2e-2 if method == "lora" else 3e-3
    result = run(base, tmp_path, config(method=method, optimizer=OptimizerConfig(lr=lr), max_steps=60))
    assert result.initial_validation_loss is not None and result.validation_loss is not None
    # a rank-8 adapter on a random 32-wide model moves less than full training does
    assert result.validation_loss < result.initial_validation_loss * (0.92 if method == "lora" else 0.8)
    assert result.steps == 60 and result.tokens > 0 and result.tokens_per_second > 0
    expected = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (tmp_path / "out" / expected).is_file()


def test_stopped_run_resumes_from_its_encrypted_checkpoint_and_ends_like_an_uninterrupted_one(
    base: Path, tmp_path: Path
) -> None:
    straight = run(base, tmp_path / "straight", config())

    def stop_at_ten(step: int, total: int, metrics: dict[str, float]) -> bool:
        return step == 10

    directory = tmp_path / "resumed" / "checkpoints"
    key = bytes(range(32))
    with pytest.raises(TrainingStopped):
        run(base, tmp_path / "resumed", config(), Checkpoints(directory, BlobCipher(key)), on_step=stop_at_ten)
    state_files = sorted(directory.glob("step-*/state.pt"))
    assert state_files and all(path.read_bytes().startswith(MAGIC) for path in state_files)  # ciphertext only
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in state_files)
    assert directory.stat().st_mode & 0o777 == 0o700
    assert Checkpoints(directory, BlobCipher(key)).load_latest()["step"] == 10  # type: ignore[index]
    resumed = run(base, tmp_path / "resumed", config(), Checkpoints(directory, BlobCipher(key)))
    assert resumed.resumed_from == 10 and resumed.steps == 16
    assert straight.validation_loss is not None and resumed.validation_loss is not None
    assert abs(resumed.validation_loss - straight.validation_loss) <= 0.02 * straight.validation_loss


def test_a_resumed_run_with_dropout_is_identical_to_an_uninterrupted_one(base: Path, tmp_path: Path) -> None:
    """Checkpoints hold every rank's RNG state: the dropout masks after a resume are the ones the run would have
    drawn, so the result is bit for bit the uninterrupted one."""
    from safetensors.torch import load_file

    cfg = config(lora_dropout=0.3, max_steps=8, eval_every=8)
    straight = run(base, tmp_path / "straight", cfg)
    with pytest.raises(TrainingStopped):
        run(base, tmp_path / "resumed", cfg, on_step=lambda step, _total, _metrics: step == 5)
    resumed = run(base, tmp_path / "resumed", cfg)
    assert resumed.resumed_from == 5
    assert (resumed.train_loss, resumed.validation_loss) == (straight.train_loss, straight.validation_loss)
    weights = [
        load_file(str(work / "out" / "adapter_model.safetensors"))
        for work in (tmp_path / "straight", tmp_path / "resumed")
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(bool((weights[0][key] == weights[1][key]).all()) for key in weights[0])


def test_a_full_disk_during_a_checkpoint_fails_cleanly_and_keeps_the_earlier_one(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = checkpoints_module.write_private
    calls = {"n": 0}

    def write(path: Path, chunks: Any) -> None:
        calls["n"] += 1
        if calls["n"] >= 2:
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, chunks)

    monkeypatch.setattr(checkpoints_module, "write_private", write)
    with pytest.raises(StorageError, match="No space left"):
        run(base, tmp_path, config())
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step-0000004"]  # the partial second one is gone, the first intact
    state = load_latest_checkpoint(tmp_path / "checkpoints")
    assert state is not None and state["step"] == 4


def test_early_stopping_stops_when_validation_stops_improving(base: Path, tmp_path: Path) -> None:
    cfg = config(optimizer=OptimizerConfig(lr=1e-9), max_steps=40, eval_every=2, patience=2, schedule="constant")
    result = run(base, tmp_path, cfg)
    assert result.stopped_early and result.steps < 40


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"optimizer": OptimizerConfig(lr=-1.0)}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"method": "qlora"}, "method"),
        ({"max_steps": 0}, "max_steps"),
        ({"precision": "fp8"}, "precision"),
    ],
)
def test_bad_hyperparameters_are_refused_before_training(
    base: Path, tmp_path: Path, overrides: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidInputError) as info:
        run(base, tmp_path, config(**overrides))
    assert info.value.param == param
    assert not (tmp_path / "checkpoints").exists()


def test_rows_without_answers_are_refused(base: Path, tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(InvalidInputError, match="assistant"):
        finetune(base, rows, [], tmp_path / "o", tmp_path / "c", config(), log=lambda _: None)


def test_validation_perplexity_is_exp_of_loss(base: Path, tmp_path: Path) -> None:
    result = run(base, tmp_path, config(max_steps=4))
    assert result.validation_loss is not None and result.validation_perplexity is not None
    assert math.isclose(result.validation_perplexity, math.exp(result.validation_loss))
