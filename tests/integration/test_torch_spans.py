"""The PyTorch backend's KV-span interface (the prefix cache's side) and speculative verification, on SmolLM2.

A prefix saved from one slot and loaded into another must give the same logits as computing the whole prompt
fresh (also after the span is split in two); a several-token ``logits="all"`` decode at an offset followed by
``forget_sequence(seq, from_pos)`` must give what one-token decodes give. Misuse of the interface (engine bugs)
raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from llmos.config import Settings
from llmos.engine.backends.base import BatchItem

torch = pytest.importorskip("torch")

ATOL = 5e-4  # float32 logits of magnitude ~16; the paths differ only by GEMM shapes and attention kernels (~3e-5)
PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is of Germany."
OTHER = " Meanwhile, in Rome, the weather stayed sunny and warm for the whole week."


@pytest.fixture(scope="module")
def backend(converted_settings: Settings) -> Iterator[Any]:
    from llmos.engine.backends.torch import TorchBackend
    from llmos.registry.service import Registry

    registry = Registry(converted_settings)
    model_dir = registry.model_dir(registry.resolve("smollm2:safetensors"))
    registry.close()
    loaded = TorchBackend(model_dir, n_seq_max=4, n_ctx_seq=256, n_batch=256, prefix_holders=4)
    yield loaded
    loaded.close()


@pytest.fixture
def fresh(backend: Any) -> Any:
    """The shared backend with every slot forgotten and every holder empty."""
    for slot in range(backend.n_seq_max):
        backend.forget_sequence(slot)
    for holder in range(backend.prefix_holders):
        if holder in backend._spans:
            backend.drop_span(holder)
    assert backend.held_tokens == 0
    return backend


def last_logits(backend: Any, seq: int, tokens: list[int], start: int) -> Any:
    rows = backend.decode([BatchItem(seq, tokens, start)])
    return backend._row_logits(rows[seq][-1]).clone()


def test_a_loaded_prefix_gives_the_logits_of_a_full_prefill(fresh: Any) -> None:
    backend = fresh
    assert backend.kv_shared_pool is False and backend.kv_pool_tokens == 8192
    prompt = backend.tokenize(PROMPT)
    prefix = 20
    other = prompt[:prefix] + backend.tokenize(OTHER, add_special=False)  # shares 20 tokens, then differs
    assert other[prefix] != prompt[prefix]

    last_logits(backend, 0, prompt, 0)
    backend.save_span(0, 0, 0, len(prompt))
    assert backend.held_tokens == len(prompt)
    backend.forget_sequence(0)  # the holder is a copy: the slot's own cache may be reused
    last_logits(backend, 0, backend.tokenize(OTHER + OTHER), 0)

    backend.load_span(0, 1, 0, prefix)
    loaded = last_logits(backend, 1, other[prefix:], prefix)
    reference = last_logits(backend, 2, other, 0)
    assert torch.allclose(loaded, reference, rtol=0, atol=ATOL), float((loaded - reference).abs().max())
    assert int(loaded.argmax()) == int(reference.argmax())

    # the comparison can fail: the KV of a different prefix gives different logits
    backend.forget_sequence(1)
    backend.save_span(1, 0, 0, prefix)
    backend.load_span(1, 1, 0, prefix)
    wrong = last_logits(backend, 1, other[prefix:], prefix)
    assert float((wrong - reference).abs().max()) > 0.5


def test_the_two_halves_of_a_split_span_give_the_same_logits(fresh: Any) -> None:
    backend = fresh
    prompt = backend.tokenize(PROMPT)
    prefix, at = 20, 8
    other = prompt[:prefix] + backend.tokenize(OTHER, add_special=False)
    last_logits(backend, 0, prompt, 0)
    backend.save_span(2, 0, 0, len(prompt))
    backend.split_span(2, 3, at)
    assert backend.held_tokens == len(prompt)  # two exact-size copies, nothing counted twice
    assert backend._spans[2].kv.shape[3] == at and backend._spans[3].start == at
    with pytest.raises(ValueError, match=r"keeps \[0, 8\), not \[0, 20\)"):
        backend.load_span(2, 1, 0, prefix)  # the head keeps [0, at) only

    backend.load_span(2, 1, 0, at)
    backend.load_span(3, 1, at, prefix)  # a sub-range of the tail [at, len(prompt))
    loaded = last_logits(backend, 1, other[prefix:], prefix)
    reference = last_logits(backend, 2, other, 0)
    assert torch.allclose(loaded, reference, rtol=0, atol=ATOL), float((loaded - reference).abs().max())

    backend.drop_span(3)
    assert backend.held_tokens == at


def test_speculative_verification_then_forget_matches_one_token_decodes(fresh: Any) -> None:
    backend = fresh
    prompt = backend.tokenize(PROMPT)
    n = len(prompt)
    draft = backend.tokenize(" London is big and old", add_special=False)[:4]
    assert len(draft) == 4
    last_logits(backend, 0, prompt, 0)
    last_logits(backend, 2, prompt, 0)

    rows = backend.decode([BatchItem(0, draft, n, "all")])
    assert len(rows[0]) == 4
    verified = torch.stack([backend._row_logits(r).clone() for r in rows[0]])
    plain = torch.stack([last_logits(backend, 2, [token], n + i) for i, token in enumerate(draft[:2])])
    backend.decode([BatchItem(3, prompt + draft, 0, "all")])  # the rows of one causal prefill, for all four
    fresh_rows = torch.stack([backend._row_logits(n - 1 + i) for i in range(1, 5)])
    assert torch.allclose(verified[:2], plain, rtol=0, atol=ATOL)
    assert torch.allclose(verified, fresh_rows, rtol=0, atol=ATOL), float((verified - fresh_rows).abs().max())

    # two drafts accepted: drop the rejected positions and go on from n + 2, next to the plain path in one step
    backend.forget_sequence(0, n + 2)
    with pytest.raises(ValueError, match="cannot append at"):
        backend.decode([BatchItem(0, [draft[2]], n + 3)])  # a gap: positions n + 2.. are gone
    token = 1234
    rows = backend.decode([BatchItem(0, [token], n + 2), BatchItem(2, [token], n + 2)])  # the batched decode path
    after_forget, reference = backend._row_logits(rows[0][0]), backend._row_logits(rows[2][0])
    assert torch.allclose(after_forget, reference, rtol=0, atol=ATOL), float((after_forget - reference).abs().max())
    single = last_logits(backend, 0, [token], n + 2)  # again, alone (the per-sequence path)
    assert torch.allclose(single, reference, rtol=0, atol=ATOL)


def test_misuse_of_spans_is_refused(fresh: Any) -> None:
    backend = fresh
    prompt = backend.tokenize(PROMPT)[:10]
    last_logits(backend, 0, prompt, 0)
    for bad, reason in (
        (lambda: backend.save_span(4, 0, 0, 5), "outside the 4 holders"),
        (lambda: backend.save_span(0, 0, 5, 5), "cannot save"),  # empty range
        (lambda: backend.save_span(0, 0, 0, 11), "which holds 10"),  # beyond what the slot holds
        (lambda: backend.save_span(0, 9, 0, 5), "outside the 4 slots"),
        (lambda: backend.load_span(0, 1, 0, 5), "is empty"),
        (lambda: backend.drop_span(0), "is empty"),
        (lambda: backend.forget_sequence(0, -1), "from position -1"),
    ):
        with pytest.raises(ValueError, match=reason):
            bad()
    backend.save_span(0, 0, 0, 10)
    for bad, reason in (
        (lambda: backend.save_span(0, 0, 0, 5), "not empty"),
        (lambda: backend.load_span(0, 0, 0, 5), "holds 10 positions"),  # slot 0 is not empty
        (lambda: backend.load_span(0, 1, 2, 5), "holds 0 positions"),  # slot 1 does not hold [0, 2)
        (lambda: backend.load_span(0, 1, 0, 11), "not \\[0, 11\\)"),  # not a sub-range
        (lambda: backend.split_span(0, 1, 10), "cannot split"),  # not inside
        (lambda: backend.split_span(0, 0, 5), "not empty"),  # the new holder
    ):
        with pytest.raises(ValueError, match=reason):
            bad()
    backend.forget_sequence(0, 4)
    with pytest.raises(ValueError, match="which holds 4"):
        backend.save_span(1, 0, 0, 5)  # position 4 was forgotten
    backend.load_span(0, 1, 0, 4)
    backend.load_span(0, 1, 4, 10)  # a second span continues where the first ended
    assert backend.held_tokens == 10
