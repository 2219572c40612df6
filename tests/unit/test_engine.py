"""The engine core and scheduler against the deterministic FakeBackend: batching, chunking, order, cancellation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llmos.engine.backends.fake import EOS, FakeBackend
from llmos.engine.core import EngineConfig, EngineCore
from llmos.engine.request import GenerationOutput, GenerationRequest
from llmos.engine.streams import SyncOutputStream
from llmos.errors import ContextLengthExceededError, EngineStoppedError, ModelLoadError, OverloadedError
from llmos.types import SamplingParams


def greedy(max_tokens: int = 8, stop: tuple[str, ...] = ()) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(n_seq_max=4, n_ctx_seq=256, n_batch=64)


@pytest.fixture
def engine(backend: FakeBackend) -> Iterator[EngineCore]:
    core = EngineCore(backend, EngineConfig(max_waiting=8, max_prefill_tokens=16))
    yield core
    core.shutdown()


def submit(engine: EngineCore, prompt: str, params: SamplingParams, **kw: object) -> SyncOutputStream:
    stream = SyncOutputStream()
    engine.submit(GenerationRequest(list(prompt.encode()), params, **kw), stream)  # type: ignore[arg-type]
    return stream


def collect(stream: SyncOutputStream) -> tuple[str, GenerationOutput]:
    outputs = list(stream)
    return "".join(o.text for o in outputs), outputs[-1]


def stepped(backend: FakeBackend, **config: object) -> EngineCore:
    """An engine without its thread: the test decides when each step runs (no sleeps, no races)."""
    return EngineCore(backend, EngineConfig(**config), background=False)  # type: ignore[arg-type]


def drain(engine: EngineCore) -> list[GenerationOutput]:
    """Step until nothing is waiting or running; the events of every step, in order."""
    events: list[GenerationOutput] = []
    while engine.has_work():
        events.extend(engine.step())
    return events


def test_one_request_generates_and_reports_usage(engine: EngineCore) -> None:
    text, last = collect(submit(engine, "A", greedy(5)))
    assert text == "BCDEF"
    assert (last.finished, last.finish_reason, last.prompt_tokens, last.completion_tokens) == (True, "length", 1, 5)


def test_sequences_join_and_leave_the_batch_every_step(engine: EngineCore, backend: FakeBackend) -> None:
    backend.step_delay = 0.002
    streams = [submit(engine, chr(65 + i), greedy(3 + 2 * i)) for i in range(7)]
    results = [collect(s) for s in streams]
    assert [len(text) for text, _ in results] == [3 + 2 * i for i in range(7)]
    assert max(len(batch) for batch in backend.batches) == 4  # never more than the slots
    sizes = [len(batch) for batch in backend.batches]
    assert 4 in sizes and sizes[-1] < 4  # full while there was work, shrinking as sequences finished
    first_seen = {}
    for step, batch in enumerate(backend.batches):
        for seq_id, _ in batch:
            first_seen.setdefault(seq_id, step)
    assert backend.kv == {}  # every KV stream released


def test_long_prompts_are_prefilled_in_chunks_while_decodes_continue(backend: FakeBackend) -> None:
    engine = stepped(backend, max_waiting=8, max_prefill_tokens=16)
    short = submit(engine, "A", greedy(40))
    engine.step()
    engine.step()  # prefilled, and decoding
    long_prompt = "x" * 150
    long = submit(engine, long_prompt, greedy(2))
    drain(engine)
    collect(long)
    collect(short)
    chunk_steps = [batch for batch in backend.batches if any(n > 1 for _, n in batch)]
    assert len(chunk_steps) >= 150 // 16
    for batch in chunk_steps:
        prompt_tokens = sum(n for _, n in batch if n > 1)
        decodes = [n for _, n in batch if n == 1]
        assert prompt_tokens <= 16 or not decodes  # capped only while something decodes
        assert sum(n for _, n in batch) <= backend.n_batch


def test_priority_then_arrival_order(backend: FakeBackend) -> None:
    backend.n_seq_max = 1
    engine = stepped(backend, max_waiting=8)
    names: dict[str, str] = {}

    def queue(name: str, priority: int, tokens: int = 3) -> None:
        request = GenerationRequest(list(name.encode()), greedy(tokens), priority=priority)
        engine.submit(request, SyncOutputStream())
        names[request.request_id] = name

    queue("A", 0, tokens=30)
    engine.step()  # A holds the only slot while the others queue
    queue("B", 5)
    queue("C", 5)
    queue("D", 0)
    finished = [names[event.request_id] for event in drain(engine) if event.finished]
    assert finished == ["A", "D", "B", "C"]


def test_queue_bound_refuses_with_retry_hint(backend: FakeBackend) -> None:
    backend.n_seq_max = 1
    engine = stepped(backend, max_waiting=2)
    streams = [submit(engine, "A", greedy(50))]
    engine.step()  # A runs; the queue is empty
    streams += [submit(engine, "B", greedy(2)), submit(engine, "C", greedy(2))]
    with pytest.raises(OverloadedError) as info:
        submit(engine, "D", greedy(2))
    assert info.value.retry_after > 0 and info.value.status == 503
    drain(engine)
    for stream in streams:
        collect(stream)
    served = submit(engine, "E", greedy(2))  # serves normally afterwards
    drain(engine)
    assert collect(served)[1].finish_reason == "length"


def test_abort_frees_kv_within_one_step(engine: EngineCore, backend: FakeBackend) -> None:
    backend.step_delay = 0.005
    stream = submit(engine, "A", greedy(200))
    other = submit(engine, "B", greedy(30))
    events = iter(stream)
    next(events)
    next(events)
    request_id = next(events).request_id
    steps_before = len(backend.batches)
    engine.abort(request_id)
    last = list(events)[-1]
    assert last.finish_reason == "cancelled"
    assert len(backend.batches) - steps_before <= 2
    text, _ = collect(other)
    assert len(text) == 30  # the other stream went on
    assert backend.kv == {}


def test_abort_of_a_waiting_request(backend: FakeBackend) -> None:
    backend.n_seq_max = 1
    backend.step_delay = 0.005
    engine = EngineCore(backend)
    try:
        busy = submit(engine, "A", greedy(20))
        stream = SyncOutputStream()
        request = GenerationRequest([66], greedy(5))
        engine.submit(request, stream)
        engine.abort(request.request_id)
        (only,) = list(stream)
        assert only.finish_reason == "cancelled" and only.completion_tokens == 0
        collect(busy)
    finally:
        engine.shutdown()


def test_stop_strings_and_end_of_generation(engine: EngineCore, backend: FakeBackend) -> None:
    text, last = collect(submit(engine, "A", greedy(20, stop=("EF",))))
    assert text == "BCD" and last.finish_reason == "stop"
    backend.script = lambda tokens: EOS if len(tokens) >= 4 else 88
    text, last = collect(submit(engine, "AB", greedy(20)))
    assert text == "XX" and last.finish_reason == "stop" and last.completion_tokens == 2


def test_a_failing_step_fails_only_its_sequences(engine: EngineCore, backend: FakeBackend) -> None:
    backend.fail_next_decode = ModelLoadError("boom")
    with pytest.raises(ModelLoadError, match="boom"):
        collect(submit(engine, "A", greedy(3)))
    text, _ = collect(submit(engine, "A", greedy(3)))
    assert text == "BCD"


def test_prompt_scoring_without_generation(engine: EngineCore) -> None:
    stream = submit(engine, "ABCE", greedy(0), logprobs=1, prompt_logprobs=True)
    outputs = list(stream)
    scored = [lp for o in outputs for lp in (o.prompt_logprobs or [])]
    assert [lp.token for lp in scored] == list(b"ABCE")
    assert scored[0].logprob is None
    assert [lp.logprob for lp in scored[1:]] == [0.0, 0.0, float("-inf")]  # the fake predicts B, C, D
    assert outputs[-1].completion_tokens == 0 and outputs[-1].finish_reason == "length"


def test_generated_logprobs(engine: EngineCore) -> None:
    outputs = list(submit(engine, "A", greedy(3), logprobs=2))
    logprobs = [lp for o in outputs for lp in (o.logprobs or [])]
    assert [lp.text for lp in logprobs] == [b"B", b"C", b"D"]
    assert all(lp.logprob == 0.0 and lp.top[0][0] == lp.token for lp in logprobs)


def test_context_window_is_enforced(engine: EngineCore) -> None:
    with pytest.raises(ContextLengthExceededError, match="maximum context length is 256"):
        submit(engine, "x" * 300, greedy(2))
    _text, last = collect(submit(engine, "x" * 250, greedy(100)))
    assert last.completion_tokens == 6 and last.finish_reason == "length"  # capped by the window


def test_shutdown_fails_what_is_pending(backend: FakeBackend) -> None:
    engine = stepped(backend)
    stream = submit(engine, "A", greedy(1000))
    engine.step()
    engine.step()
    engine.shutdown()
    with pytest.raises(EngineStoppedError):
        collect(stream)
    assert backend.closed
    with pytest.raises(EngineStoppedError):
        submit(engine, "A", greedy(2))


def test_a_flooding_tenant_cannot_starve_another(backend: FakeBackend) -> None:
    engine = stepped(backend, max_waiting=32)
    try:
        flood = [submit(engine, chr(65 + i), greedy(60), fairness_key="a") for i in range(10)]
        for _ in range(3):
            engine.step()  # tenant a holds every slot and has more waiting
        steps_before = len(backend.batches)
        quiet = SyncOutputStream()
        request = GenerationRequest(list(b"ZZZZZ"), greedy(5), fairness_key="b")
        engine.submit(request, quiet)
        steps_to_first_token = None
        for step in range(1, 4):  # b gets a slot at once, by preempting one of a's sequences
            if any(event.request_id == request.request_id and event.token_ids for event in engine.step()):
                steps_to_first_token = step
                break
        assert steps_to_first_token is not None and len(backend.batches) - steps_before == steps_to_first_token
        drain(engine)
        events = iter(quiet)
        assert next(events).token_ids
        b_prefill = next(batch for batch in backend.batches[steps_before:] if any(n == 5 for _, n in batch))
        assert len(b_prefill) == 1  # b's prompt ran in a step of its own: a's decodes did not slow it down
        assert engine.scheduler.preemptions >= 1
        list(events)
        texts = ["".join(o.text for o in stream) for stream in flood]
        reference = FakeBackend(n_seq_max=4)
        expected = []
        for i in range(10):  # what each flood request produces without any preemption
            solo = stepped(reference)
            alone = submit(solo, chr(65 + i), greedy(60))
            drain(solo)
            expected.append(collect(alone)[0])
            solo.shutdown()
            reference = FakeBackend(n_seq_max=4)
        assert texts == expected  # a preempted stream pauses, then continues exactly where it was
        assert backend.kv == {}
    finally:
        engine.shutdown()


def test_no_preemption_without_a_fairness_reason(backend: FakeBackend) -> None:
    backend.step_delay = 0.002
    engine = EngineCore(backend, EngineConfig(max_waiting=32))
    try:
        streams = [submit(engine, "A", greedy(20), fairness_key="a") for _ in range(8)]
        for stream in streams:
            collect(stream)
        assert engine.scheduler.preemptions == 0
    finally:
        engine.shutdown()
