"""Prefix cache, KV pool and speculative decoding, stepped directly on the FakeBackend (no threads, no sleeps).

The fake's KV cells remember the token and adapter they were computed from and are shared exactly as llama.cpp's
unified cache shares them, so a wrong cached prefix, another adapter's KV or a pool overflow fails these tests.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmos.engine.backends.base import BatchItem
from llmos.engine.backends.fake import FakeBackend
from llmos.engine.core import EngineConfig, EngineCore
from llmos.engine.kv_cache import CacheLease, PrefixCache
from llmos.engine.request import GenerationOutput, GenerationRequest
from llmos.engine.streams import SyncOutputStream
from llmos.types import SamplingParams


def copying(tokens: Sequence[int]) -> int:
    """Mostly repeats what followed the previous occurrence of the last two tokens (so drafts get accepted), and
    depends on the whole history (so a wrong KV prefix changes the output)."""
    n = len(tokens)
    for i in range(n - 3, 0, -1):
        if tokens[i] == tokens[-1] and tokens[i - 1] == tokens[-2]:
            return tokens[i + 1] if n % 7 else 33 + tokens[i + 1] % 90
    return 33 + (sum(tokens) * 7 + n) % 90


def engine(**config: object) -> tuple[EngineCore, FakeBackend]:
    pool = int(config.pop("pool", 4096))  # type: ignore[call-overload]
    slots = int(config.pop("slots", 16))  # type: ignore[call-overload]
    backend = FakeBackend(n_seq_max=slots, n_ctx_seq=8192, n_batch=256, script=copying, kv_pool_tokens=pool)
    return EngineCore(backend, EngineConfig(**config), background=False), backend  # type: ignore[arg-type]


def run(core: EngineCore, prompts: list[bytes], max_tokens: int = 40, **kw: object) -> list[list[GenerationOutput]]:
    """Submit all prompts at once (a batch), step until done, return each request's events."""
    streams = []
    for prompt in prompts:
        stream = SyncOutputStream()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        core.submit(GenerationRequest(list(prompt), params, **kw), stream)  # type: ignore[arg-type]
        streams.append(stream)
    while core.has_work():
        core.step()
    return [list(stream) for stream in streams]


def tokens(events: list[GenerationOutput]) -> list[int]:
    return [t for e in events for t in e.token_ids]


SYSTEM = b"You are a support agent for a small bakery. Answer briefly. " * 4
PROMPTS = [SYSTEM + f"Question {i}: what is on the menu for day {i}?".encode() for i in range(16)]


def test_greedy_output_is_identical_with_and_without_prefix_cache_and_speculation_alone_and_in_a_batch() -> None:
    reference_core, _ = engine(prefix_cache=False, speculative=False)
    reference = [tokens(run(reference_core, [p])[0]) for p in PROMPTS]
    for prefix_cache in (False, True):
        for speculative in (False, True):
            alone_core, _ = engine(prefix_cache=prefix_cache, speculative=speculative)
            alone = [tokens(run(alone_core, [p])[0]) for p in PROMPTS]
            batch_core, _backend = engine(prefix_cache=prefix_cache, speculative=speculative)
            batch = [tokens(events) for events in run(batch_core, PROMPTS)]
            assert alone == reference, (prefix_cache, speculative)
            assert batch == reference, (prefix_cache, speculative)
            if speculative:
                assert alone_core.stats().accepted_draft_tokens > 0  # drafting really happened


def test_a_repeated_prefix_is_served_from_the_cache_and_reported() -> None:
    core, _ = engine()
    first = run(core, [PROMPTS[0]])[0][-1]
    second = run(core, [PROMPTS[1]])[0][-1]
    assert first.cached_tokens == 0
    assert second.cached_tokens >= len(SYSTEM)  # the shared system prompt
    answer = tokens(run(core, [PROMPTS[0]])[0])
    again = run(core, [PROMPTS[0] + bytes(answer) + b" and tomorrow?"])[0][-1]
    assert again.cached_tokens >= len(PROMPTS[0]) + len(answer) - 1  # the finished answer is part of the cache


def test_prefixes_are_never_shared_across_adapters_or_scopes() -> None:
    core, _backend = engine()
    run(core, [PROMPTS[0]], prefix_scope="tenant-a")
    other_tenant = run(core, [PROMPTS[0]], prefix_scope="tenant-b")[0][-1]
    same_tenant = run(core, [PROMPTS[0]], prefix_scope="tenant-a")[0][-1]
    assert other_tenant.cached_tokens == 0
    assert same_tenant.cached_tokens > 0
    adapter_a = run(core, [PROMPTS[0]], adapter="a")[0]  # the fake asserts no sequence attends to another adapter
    base = run(core, [PROMPTS[0]])[0][-1]
    adapter_b = run(core, [PROMPTS[0]], adapter="b")[0][-1]
    assert adapter_a[-1].cached_tokens == 0 and adapter_b.cached_tokens == 0
    assert base.cached_tokens == 0  # scope None, no adapter: nothing of that namespace was cached yet
    assert run(core, [PROMPTS[0]], cache_prompt=False)[0][-1].cached_tokens == 0


def test_a_long_sequence_runs_beside_fifteen_short_ones_in_one_pool() -> None:
    core, backend = engine(pool=8192, prefix_cache=False)
    long_prompt = bytes(33 + i % 90 for i in range(6000))
    results = run(core, [long_prompt, *PROMPTS[:15]], max_tokens=64)
    assert all(events[-1].error is None for events in results)
    assert [len(tokens(events)) for events in results] == [64] * 16
    assert backend.peak_cells > 6000


def test_a_full_pool_preempts_and_resumes_with_the_same_output() -> None:
    reference_core, _ = engine(prefix_cache=False)
    reference = [tokens(run(reference_core, [p], max_tokens=120)[0]) for p in PROMPTS[:8]]
    core, backend = engine(pool=1400, prefix_cache=True)  # 8 x (~300 prompt + 120 answer) cells do not fit
    results = run(core, PROMPTS[:8], max_tokens=120)
    assert all(events[-1].error is None for events in results)
    assert [tokens(events) for events in results] == reference
    assert core.scheduler.preemptions > 0
    assert backend.peak_cells <= 1400


def test_eviction_frees_least_recently_used_leaves_and_spares_locked_paths() -> None:
    backend = FakeBackend(n_seq_max=2, kv_pool_tokens=1000, prefix_holders=8)
    cache = PrefixCache(backend, capacity_tokens=100)
    for seq_id, text in enumerate([b"aaaa-first", b"aaaa-second"]):
        backend.decode([BatchItem(seq_id, list(text), 0)])
    first, second = CacheLease((None, None)), CacheLease((None, None))
    cache.insert(first, 0, list(b"aaaa-first"))
    cache.insert(second, 1, list(b"aaaa-second"))
    assert cache.tokens == len(b"aaaa-first") + len(b"second")  # the shared "aaaa-" is kept once
    cache.release(first)
    assert cache.evict_one() == len(b"first")  # the unlocked leaf goes; the locked path stays
    assert cache.evict_one() == 0
    cache.release(second)
    assert cache.evict_one() == len(b"second") and cache.evict_one() == len(b"aaaa-")
    assert backend.holders == {}
