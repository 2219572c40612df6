"""Replica sets: least-outstanding routing, and surviving the death of one replica."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from llmos.engine.backends.fake import FakeBackend
from llmos.engine.core import EngineCore
from llmos.engine.request import GenerationRequest
from llmos.engine.streams import SyncOutputStream
from llmos.errors import EngineStoppedError
from llmos.registry.views import VersionView
from llmos.runtime.model import LoadedModel
from llmos.runtime.replicas import ReplicaSet
from llmos.types import SamplingParams

VIEW = VersionView(
    name="fake:latest", repository="fake", tag="latest", tags=["latest"], digest="sha256:" + "0" * 64,
    format="gguf", architecture="fake", parameter_count=1, quantization=None, context_length=256, size=1,
    created_at=datetime.now(UTC), files=[],
)  # fmt: skip


def factory(backends: list[FakeBackend]) -> LoadedModel:
    backend = FakeBackend(n_seq_max=2, step_delay=0.01)
    backends.append(backend)
    return LoadedModel(VIEW, backend, EngineCore(backend))


def submit(model: LoadedModel, tokens: int) -> SyncOutputStream:
    stream = SyncOutputStream()
    model.engine.submit(GenerationRequest([65], SamplingParams(max_tokens=tokens, temperature=0)), stream)
    return stream


def test_requests_go_to_the_least_busy_replica() -> None:
    backends: list[FakeBackend] = []
    replicas = ReplicaSet(VIEW, lambda: factory(backends), 3)
    try:
        streams = []
        chosen = []
        for _ in range(6):
            model = replicas.pick()
            chosen.append(model)
            streams.append(submit(model, 30))
        assert {id(m) for m in chosen} == {id(r) for r in replicas.replicas}
        assert all(chosen.count(r) == 2 for r in replicas.replicas)
        for stream in streams:
            list(stream)
    finally:
        replicas.close()


def test_a_dead_replica_fails_its_requests_cleanly_and_is_restarted() -> None:
    backends: list[FakeBackend] = []
    replicas = ReplicaSet(VIEW, lambda: factory(backends), 2)
    try:
        victim, survivor = replicas.replicas
        doomed = submit(victim, 500)
        healthy = submit(survivor, 20)
        time.sleep(0.05)
        backends[0].fail_next_decode = RuntimeError("segfault-like crash in the backend")
        with pytest.raises(EngineStoppedError, match="failed"):
            list(doomed)
        assert not victim.engine.alive and victim.engine.crashed
        assert len("".join(o.text for o in healthy)) == 20  # the other replica went on
        for _ in range(3):
            assert replicas.pick() is survivor  # new requests avoid the dead one
        deadline = time.monotonic() + 10
        while replicas.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert replicas.restarts == 1
        assert all(r.engine.alive for r in replicas.replicas)
        assert "".join(o.text for o in submit(replicas.replicas[0], 5)) == "BCDEF"
    finally:
        replicas.close()
