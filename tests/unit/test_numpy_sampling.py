"""The numpy sampler (ONNX backend) chooses tokens by the same rules as the PyTorch sampler on the same logits."""

from __future__ import annotations

import numpy as np
import pytest

from llmos.engine.backends.numpy_sampling import NumpySampler
from llmos.types import SamplingParams

torch = pytest.importorskip("torch")
TorchSampler = pytest.importorskip("llmos.engine.backends.torch_sampling").TorchSampler


def _logits(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, size).astype(np.float32)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logit_bias=((5, 100.0),)),
        SamplingParams(temperature=0.0, repeat_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.7),
        SamplingParams(temperature=0.7, top_k=1),
    ],
    ids=["greedy", "bias", "penalties", "top-k-1"],
)
def test_deterministic_choices_match_the_torch_sampler(params: SamplingParams) -> None:
    history = [3, 3, 7, 11]
    for seed in range(20):
        row = _logits(seed)
        # make the penalised tokens the front runners, so the penalties decide
        row[[3, 7, 11]] = row.max() + np.array([0.2, 0.1, 0.05], dtype=np.float32)
        ours = NumpySampler(params, lambda _r, row=row: row, list(history)).sample(0)
        theirs = TorchSampler(params, lambda _r, row=row: torch.from_numpy(row.copy()), list(history)).sample(0)
        assert ours == theirs


def test_greedy_takes_the_first_of_equal_maxima_and_leaves_the_row_alone() -> None:
    row = np.array([0.0, 2.0, 2.0, 1.0], dtype=np.float32)
    before = row.copy()
    sampler = NumpySampler(SamplingParams(temperature=0.0, logit_bias=((0, 1.0),)), lambda _r: row, [])
    assert sampler.sample(0) == 1
    np.testing.assert_array_equal(row, before)


def test_draws_are_reproducible_with_a_seed_and_follow_the_distribution() -> None:
    row = np.log(np.array([0.5, 0.3, 0.2, 1e-9], dtype=np.float32))
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    first = [NumpySampler(params, lambda _r: row, []).sample(0) for _ in range(5)]
    assert len(set(first)) == 1  # same seed, same first draw
    sampler = NumpySampler(params, lambda _r: row, [])
    counts = np.bincount([sampler.sample(0) for _ in range(4000)], minlength=4)
    np.testing.assert_allclose(counts / 4000, [0.5, 0.3, 0.2, 0.0], atol=0.03)


def test_top_p_and_min_p_cut_the_tail() -> None:
    row = np.log(np.array([0.6, 0.25, 0.1, 0.05], dtype=np.float32))
    top_p = NumpySampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0, seed=1), lambda _r: row, [])
    assert {top_p.sample(0) for _ in range(300)} == {0, 1}
    min_p = NumpySampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3, seed=1), lambda _r: row, [])
    assert {min_p.sample(0) for _ in range(300)} == {0, 1}
