"""The Ray helpers that need no cluster: the loopback environment, address checks, error transport, batching."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from llmos.distributed.cluster import LocalCluster, connect, is_local_address, ray_environment
from llmos.distributed.serving import _BatchingStream, _portable
from llmos.engine.request import GenerationOutput
from llmos.errors import ContextLengthExceededError, EngineStoppedError, InvalidInputError
from llmos.runtime.channel import rebuild_error as _rebuild_error


def test_ray_environment_keeps_ray_on_loopback_and_quiet(tmp_path: Path) -> None:
    env = ray_environment(tmp_path / "ray-home")
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert env["RAY_AUTH_MODE"] == "disabled"
    assert env["RAY_USAGE_STATS_REPORT_URL"].startswith("http://127.0.0.1:")
    assert (Path(env["HOME"]) / "ray_bootstrap_config.yaml").read_text().strip() == "{}"


def test_a_multi_node_environment_lets_ray_take_the_node_address_and_stays_quiet(tmp_path: Path) -> None:
    env = ray_environment(tmp_path / "ray-home", multi_node=True)
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["RAY_AUTH_MODE"] == "disabled"
    assert env["RAY_USAGE_STATS_REPORT_URL"].startswith("http://127.0.0.1:")


def test_local_addresses_are_loopback_or_this_machines_own() -> None:
    assert is_local_address("127.0.0.1:6379") and is_local_address("localhost:1") and is_local_address("[::1]:1")
    for address in ("10.0.0.5:6379", "ray.example.com:6379", "169.254.169.254:80", "0.0.0.0:6379", "224.0.0.1:1"):
        assert not is_local_address(address), address


def test_a_node_address_that_is_not_this_machines_is_refused_before_anything_starts(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path)
    for node_ip in ("10.0.0.5", "not-an-ip"):
        with pytest.raises(InvalidInputError, match="not an IP address of this machine"):
            cluster.start(node_ip=node_ip)
    assert not cluster.state_path.exists()


def test_a_cluster_record_of_an_older_release_still_reads(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path)
    cluster.root.mkdir(parents=True)
    record = {"address": "127.0.0.1:1", "pid": os.getpid(), "cpus": 2, "temp_dir": str(tmp_path / "t")}
    cluster.state_path.write_text(json.dumps(record))
    info = cluster.info()
    assert info is not None and info.role == "head" and info.node_ip == "127.0.0.1"


@pytest.mark.parametrize("address", ["10.0.0.5:6379", "ray.example.com:6379", "169.254.169.254:80"])
def test_a_remote_ray_address_is_refused_unless_allowed(address: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not on this machine"):
        connect(address, tmp_path)


def test_a_stale_cluster_record_is_dropped(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path)
    cluster.root.mkdir(parents=True)
    record = {"address": "127.0.0.1:1", "pid": 2**22 + 12345, "cpus": 2, "temp_dir": str(tmp_path / "t")}
    cluster.state_path.write_text(json.dumps(record))
    assert cluster.info() is None and not cluster.state_path.exists()
    assert cluster.stop() is False


def test_errors_cross_the_process_boundary_as_name_message_and_param() -> None:
    output = GenerationOutput("r1", finished=True, error=ContextLengthExceededError("too long"))
    sent = _portable(output)
    assert sent.error is None and sent.state_error == ("ContextLengthExceededError", "too long", None)  # type: ignore[attr-defined]
    rebuilt = _rebuild_error(*sent.state_error)  # type: ignore[attr-defined]
    assert isinstance(rebuilt, ContextLengthExceededError) and rebuilt.message == "too long"
    assert isinstance(_rebuild_error("NoSuchError", "x"), EngineStoppedError)


def test_stream_batches_what_is_available_and_ends_after_the_last_event() -> None:
    stream = _BatchingStream()
    for i in range(3):
        stream.push(GenerationOutput("r", text=str(i)))
    batches = stream.batches()
    assert [o.text for o in next(batches)] == ["0", "1", "2"]
    threading.Timer(0.05, lambda: stream.push(GenerationOutput("r", text="end", finished=True))).start()
    assert [o.text for o in next(batches)] == ["end"]
    assert next(batches, None) is None
