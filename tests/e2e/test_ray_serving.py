"""`llmos serve --ray`: two replicas as Ray actors in separate worker processes; one is killed while requests run.

Requests that had not started streaming when the replica died must all succeed (resubmitted to the survivor);
requests that were mid-stream on it may end with an error, which the client sees. The dead replica is replaced.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from openai import OpenAI

from llmos.config import Settings
from tests.helpers import ServerProcess, StreamsUnderFailure
from tests.multinode import covered_by_multinode

pytestmark = pytest.mark.timeout(600)


def _runtime(base: str) -> dict[str, Any]:
    return httpx.get(f"{base}/admin/runtime", timeout=10).json()["models"][0]


def _kill_and_wait(pid: int) -> None:
    """SIGKILL the replica's process and return once it is gone."""
    process = psutil.Process(pid)
    os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)


@covered_by_multinode("test_multinode_serving.py (a whole worker node killed under 16 streams)")
def test_two_replicas_survive_a_killed_worker(pulled_settings: Settings, ray_cluster: Any, tmp_path: Path) -> None:
    server = ServerProcess(
        pulled_settings.home,
        "--model",
        "smollm2",
        "--ray",
        ray_cluster.address,
        "--ray-replicas",
        "2",
        env={"LLMOS_MAX_RUNNING": "2", "LLMOS_KEEP_ALIVE": "-1"},
    )
    try:
        model = _runtime(server.base)
        assert model["replicas"] == 2 and model["backend"] == "llama.cpp"
        placements = model["per_replica"]
        pids = {p["pid"] for p in placements}
        assert len(pids) == 2 and os.getpid() not in pids  # two separate Ray worker processes
        for pid in [server.process.pid, *pids]:  # the front end (a Ray driver) and the replicas listen on loopback
            listening = [c.laddr.ip for c in psutil.Process(pid).net_connections("inet") if c.status == "LISTEN"]
            assert all(ipaddress.ip_address(ip).is_loopback or ip == "::ffff:127.0.0.1" for ip in listening), listening

        client = OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=300)
        answer = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=16,
        )
        assert "Paris" in (answer.choices[0].message.content or "")

        streams = StreamsUnderFailure(client, 12, max_tokens=48)  # 4 slots in all: 8 queue
        streams.wait_started(2)
        victim = placements[0]["pid"]
        streams.kill(lambda: _kill_and_wait(victim))
        streams.finish()

        deadline = time.monotonic() + 120  # the dead replica is replaced in the background
        while time.monotonic() < deadline:
            model = _runtime(server.base)
            if model["replicas_alive"] == 2 and victim not in {p["pid"] for p in model["per_replica"]}:
                break
            client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
            )  # a pick notices the dead replica and starts its replacement
            time.sleep(1)
        assert model["replicas_alive"] == 2 and model["restarts"] >= 1
        assert "resubmitted to another replica" in server.read_log()
    finally:
        server.stop()


def test_replicas_scale_with_queue_depth_between_min_and_max(pulled_settings: Settings, ray_cluster: Any) -> None:
    server = ServerProcess(
        pulled_settings.home,
        "--model",
        "smollm2",
        "--ray",
        ray_cluster.address,
        "--ray-replicas",
        "1:2",
        env={
            "LLMOS_MAX_RUNNING": "1",
            "LLMOS_KEEP_ALIVE": "-1",
            "LLMOS_RAY_SCALE_DOWN_SECONDS": "4",
            "LLMOS_RAY_SCALE_CHECK_SECONDS": "0.5",  # decide within a second: the queue drains in about five
        },
    )
    try:
        assert _runtime(server.base)["replicas"] == 1
        client = OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=300)

        def one(index: int) -> None:
            client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": f"Write a poem about the sea, number {index}."}],
                temperature=0,
                max_tokens=60,
            )

        threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]  # 1 slot: 9 queue
        for thread in threads:
            thread.start()
        peak = 1
        deadline = time.monotonic() + 90
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            peak = max(peak, _runtime(server.base)["replicas"])
            time.sleep(0.5)
        for thread in threads:
            thread.join(120)
        assert peak == 2  # scaled up while requests queued, never past the maximum
        deadline = time.monotonic() + 60
        while _runtime(server.base)["replicas"] > 1 and time.monotonic() < deadline:
            time.sleep(1)
        assert _runtime(server.base)["replicas"] == 1  # and back down to the minimum when idle
        assert "scaled up to 2 replicas" in server.read_log() and "scaled down to 1 replicas" in server.read_log()
    finally:
        server.stop()
