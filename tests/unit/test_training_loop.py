"""The one training loop: step-wide token means (gradient accumulation = one big batch), divergence, stop, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from llmos.errors import InvalidInputError
from llmos.training.batches import Example
from llmos.training.checkpoints import Checkpoints
from llmos.training.loop import CrossEntropy, LoopPlan, TrainingLoop, evaluate


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, width: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.embed(input_ids)))


def logits_at(model: Any, batch: dict[str, Any], keep: Any) -> Any:
    return model(batch["input_ids"])[:, :-1, :][keep]


def examples(count: int = 8) -> list[Example]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(count):
        ids = torch.randint(1, 11, (3 + i % 4,), generator=generator).tolist()
        labels = [-100, *ids[1:]] if i % 2 else list(ids)  # some rows carry no loss on their first token
        rows.append(Example(ids, labels))
    return rows


def train(model: nn.Module, plan: LoopPlan, order: Any, store: Checkpoints | None = None, **kwargs: Any) -> Any:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    loop = TrainingLoop(
        model, optimizer, schedule, CrossEntropy(logits_at), plan, checkpoints=store, log=lambda _m: None, **kwargs
    )
    return loop.run(examples(), [], order, pad_id=0)


def test_gradient_accumulation_gives_the_step_of_one_big_batch() -> None:
    torch.manual_seed(1)
    one, two = TinyLM(), TinyLM()
    two.load_state_dict(one.state_dict())
    train(one, LoopPlan(total_steps=1, steps_per_epoch=1), lambda _epoch: [list(range(8))])
    train(two, LoopPlan(total_steps=1, steps_per_epoch=1, grad_accum=2), lambda _epoch: [[0, 1, 2], [3, 4, 5, 6, 7]])
    for name, weight in one.state_dict().items():
        assert torch.allclose(weight, two.state_dict()[name], atol=1e-6), name


def test_a_diverging_loss_raises_before_the_weights_change() -> None:
    model = TinyLM()
    with torch.no_grad():
        model.head.bias[3] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidInputError, match=r"training diverged.*step 1"):
        train(model, LoopPlan(total_steps=2, steps_per_epoch=1), lambda _epoch: [list(range(8))])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_stop_checkpoints_and_resume_with_dropout_matches_the_straight_run(tmp_path: Path) -> None:
    def order(epoch: int) -> list[list[int]]:
        return [[(epoch + i) % 8, (epoch + i + 3) % 8] for i in range(4)]

    def fresh() -> TinyLM:
        torch.manual_seed(7)
        return TinyLM(dropout=0.5)

    plan = LoopPlan(total_steps=10, steps_per_epoch=4, checkpoint_every=3)
    straight = fresh()
    torch.manual_seed(11)
    outcome = train(straight, plan, order, Checkpoints(tmp_path / "a"))
    assert (outcome.steps, outcome.stopped, outcome.resumed_from) == (10, False, None)

    resumed = fresh()
    torch.manual_seed(11)
    stopped = train(resumed, plan, order, Checkpoints(tmp_path / "b"), on_step=lambda step, _t, _m: step == 6)
    assert stopped.stopped and stopped.steps == 6
    again = fresh()  # a new process: fresh weights and RNG, everything else from the checkpoint
    torch.manual_seed(99)
    outcome_b = train(again, plan, order, Checkpoints(tmp_path / "b"))
    assert outcome_b.resumed_from == 6 and outcome_b.steps == 10
    assert outcome_b.train == outcome.train
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in straight.state_dict().items())


def test_evaluate_is_the_token_weighted_mean_and_perplexity_is_its_exp() -> None:
    model = TinyLM()
    rows = examples()
    measured = evaluate(model, CrossEntropy(logits_at), rows, pad_id=0, batch_size=3)
    assert measured is not None
    total = count = 0.0
    with torch.no_grad():
        for row in rows:
            logits = model(torch.tensor([row.input_ids]))[0, :-1]
            targets = torch.tensor(row.labels[1:])
            keep = targets != -100
            total += float(nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
    assert measured["loss"] == pytest.approx(total / count, rel=1e-5)
    assert measured["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)
    assert evaluate(model, CrossEntropy(logits_at), [], pad_id=0, batch_size=3) is None
