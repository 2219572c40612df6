"""Model process plumbing without a model: the channel's framing and errors, and the crash back-off."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from llmos.errors import ContextLengthExceededError, EngineStoppedError, LlmosError, OverloadedError
from llmos.runtime import failures as failures_module
from llmos.runtime.channel import Channel, portable_error, rebuild_error
from llmos.runtime.failures import FailureLog, ModelFailure
from llmos.runtime.launcher import describe_exit


def test_messages_cross_in_order_large_and_small_and_the_end_is_seen() -> None:
    left, right = socket.socketpair()
    sender, receiver = Channel(left), Channel(right)
    big = list(range(300_000))
    threading.Thread(target=lambda: [sender.send(m) for m in ("a", big, {"k": (1, 2)})] and sender.close()).start()
    assert receiver.recv() == "a"
    assert receiver.recv() == big
    assert receiver.recv() == {"k": (1, 2)}
    assert receiver.recv() is None  # closed: the peer is gone


def test_silence_is_a_timeout() -> None:
    left, right = socket.socketpair()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        Channel(right).recv(timeout=0.2)
    assert time.monotonic() - started >= 0.2
    left.close()


def test_errors_come_back_as_the_same_class_with_message_and_param() -> None:
    error = rebuild_error(*portable_error(ContextLengthExceededError("too long", param="max_tokens")))
    assert isinstance(error, ContextLengthExceededError) and error.message == "too long" and error.param == "max_tokens"
    overloaded = rebuild_error(*portable_error(OverloadedError("busy", retry_after=3)))
    assert isinstance(overloaded, OverloadedError) and overloaded.message == "busy"
    unknown = rebuild_error("NoSuchError", "odd", None)
    assert isinstance(unknown, EngineStoppedError) and isinstance(unknown, LlmosError)


def test_exit_statuses_in_words() -> None:
    assert describe_exit(11)[:2] == ("killed by SIGSEGV", "SIGSEGV")  # os.waitpid status of a SIGSEGV death
    assert describe_exit(1 << 8) == ("exited with code 1", None, 1)
    assert describe_exit(None)[0] == "ended (exit status unknown)"


def failure(lived: float, model: str = "m") -> ModelFailure:
    return ModelFailure(model, 1, "killed by SIGKILL", "SIGKILL", None, [], lived)


def test_back_off_starts_after_the_free_restarts_doubles_and_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    log = FailureLog()
    for _ in range(failures_module.FREE_RESTARTS):
        log.record(failure(1.0))
        assert log.backoff("m") == 0
    waits = []
    for _ in range(9):
        log.record(failure(1.0))
        waits.append(round(log.backoff("m")))
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert log.backoff("other") == 0
    log.record(failure(failures_module.STABLE_SECONDS + 1))  # it had run fine for a while: the count starts again
    assert log.backoff("m") == 0
    assert [f.lived_seconds for f in log.recent()][-1] > failures_module.STABLE_SECONDS
    assert len([f for f in log.recent() if f.model == "m"]) == failures_module.KEPT_PER_MODEL


def test_a_recovered_failure_is_kept_but_does_not_count_toward_the_back_off() -> None:
    seen: list[str] = []
    log = FailureLog(lambda f: seen.append(f.reason))
    for _ in range(10):
        recovered = failure(0.1)
        recovered.recovered = "restarted on the safe path"
        log.record(recovered)
    assert log.backoff("m") == 0 and len(seen) == 10
    assert log.last("m") is not None and "safe path" in (log.last("m").recovered or "")  # type: ignore[union-attr]
    assert "log_tail" not in log.recent()[0].public() and log.recent()[0].to_json()["log_tail"] == []
