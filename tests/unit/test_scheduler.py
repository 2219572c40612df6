"""The scheduler's step-time target and fair share, planned step by step (no engine, no model)."""

from __future__ import annotations

from llmos.engine.request import GenerationRequest
from llmos.engine.scheduler import Scheduler, SchedulerConfig, Sequence, StepPlan
from llmos.engine.step_cost import StepBudget
from llmos.types import SamplingParams


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(target: float = 0.1, clock: Clock | None = None) -> Scheduler:
    config = SchedulerConfig(max_running=16, max_batch_tokens=512, max_prefill_tokens=256, step_target_seconds=target)
    return Scheduler(config, clock=clock or Clock())


def add(scheduler: Scheduler, tenant: str | None, prompt_len: int = 4) -> Sequence:
    seq = Sequence(
        GenerationRequest(list(range(1, prompt_len + 1)), SamplingParams(max_tokens=50), fairness_key=tenant)
    )
    scheduler.add(seq)
    return seq


def apply(scheduler: Scheduler, plan: StepPlan) -> None:
    """What the engine does with a plan: prompt chunks enter the cache, each sampling chunk yields a pending token."""
    for chunk in plan.chunks:
        scheduler.update(chunk, [7] if chunk.samples else [])


def decoding(scheduler: Scheduler, tenant: str | None, count: int) -> list[Sequence]:
    sequences = [add(scheduler, tenant) for _ in range(count)]
    apply(scheduler, scheduler.schedule())
    assert all(s.pending is not None for s in sequences)
    return sequences


def test_step_budget_converges_to_the_target_despite_a_fixed_cost_per_step() -> None:
    budget = StepBudget(target_seconds=0.1)
    assert budget.capacity() is None  # never throttle on a guess

    def cost(tokens: int) -> float:
        return 0.005 + 0.005 * tokens  # the tokens that fit 0.1 s: 19

    budget.observe(1, cost(1))  # a lone decode step: pessimistic (10 tokens)
    for _ in range(40):
        capacity = budget.capacity()
        assert capacity is not None
        budget.observe(capacity, cost(capacity))
    assert budget.capacity() in (18, 19)
    assert StepBudget(target_seconds=0).capacity() is None


def test_prompt_chunks_are_capped_to_the_step_target_beside_running_decodes() -> None:
    scheduler = make()
    decoding(scheduler, "a", 3)
    decoding(scheduler, "b", 1)
    long_prompt = add(scheduler, "a", prompt_len=300)
    scheduler.record_step(20, 0.1)  # 20 tokens fit the 0.1 s target
    plan = scheduler.schedule()
    assert [len(c.tokens) for c in plan.chunks if c.seq is long_prompt] == [16]  # 20 - 4 decodes
    assert sum(1 for c in plan.chunks if c.seq is not long_prompt) == 4
    for _ in range(20):  # slower now: 4 tokens per target, no more than the decodes
        scheduler.record_step(4, 0.1)
    plan = scheduler.schedule()
    assert [len(c.tokens) for c in plan.chunks if c.seq is long_prompt] == [8]  # the minimum chunk still goes in


def test_one_tenant_a_lone_request_and_a_zero_target_are_never_capped() -> None:
    scheduler = make()
    (gone,) = decoding(scheduler, "b", 1)
    scheduler.finish(gone)  # b was here a moment ago: the engine is shared, but a's prompt is alone in it
    lone = add(scheduler, "a", prompt_len=300)
    scheduler.record_step(10, 0.1)
    assert [len(c.tokens) for c in scheduler.schedule().chunks if c.seq is lone] == [300]

    for tenants, target in ((["a"], 0.1), (["a", "b"], 0.0)):  # one tenant; two tenants but no target
        engine = make(target=target)
        for tenant in tenants:
            decoding(engine, tenant, 2)
        prompt = add(engine, "a", prompt_len=300)
        engine.record_step(10, 0.1)
        assert [len(c.tokens) for c in engine.schedule().chunks if c.seq is prompt] == [256]  # max_prefill_tokens


def test_a_shared_engine_splits_decodes_minority_first_then_round_robin() -> None:
    clock = Clock()
    scheduler = make(clock=clock)
    flood = decoding(scheduler, "a", 8)
    (single,) = decoding(scheduler, "b", 1)
    scheduler.record_step(5, 0.1)  # 5 tokens per target: decodes must be split
    seen: list[set[Sequence]] = []
    for _ in range(4):
        plan = scheduler.schedule()
        assert len(plan.chunks) == 5 and all(len(c.tokens) == 1 for c in plan.chunks)
        picked = {c.seq for c in plan.chunks}
        assert single in picked  # the tenant holding one slot decodes every step
        seen.append(picked - {single})
        apply(scheduler, plan)
        scheduler.record_step(5, 0.1)
    assert seen[0] | seen[1] == set(flood) and not seen[0] & seen[1]  # round robin: each of a's in two steps

    clock.now += 60  # b has been quiet for a minute: a's engine is no longer shared, every decode goes in
    add(scheduler, "a", prompt_len=4)  # a arrives again; b is now out of the window
    plan = scheduler.schedule()
    assert {c.seq for c in plan.chunks if len(c.tokens) == 1} == set(flood) | {single}


def test_an_outnumbered_prompt_runs_alone_and_a_long_one_alternates_with_normal_steps() -> None:
    scheduler = make()
    flood = decoding(scheduler, "a", 8)
    newcomer = add(scheduler, "b", prompt_len=600)
    scheduler.record_step(20, 0.1)
    kinds = []
    for _ in range(5):
        plan = scheduler.schedule()
        alone = [c.seq for c in plan.chunks] == [newcomer]
        kinds.append("alone" if alone else "normal")
        if not alone:
            assert {c.seq for c in plan.chunks} >= set(flood)  # the others' streams keep flowing
        apply(scheduler, plan)
    assert kinds == ["alone", "normal", "alone", "normal", "alone"]
    assert newcomer.prompt_done == 600 and newcomer.pending is not None
