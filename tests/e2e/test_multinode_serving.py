"""`llmos serve --ray` on a real three-node Ray cluster (one network namespace per node, see ``tests/multinode.py``).

The front end runs in the head's namespace on its address; the two replicas must land on the two worker nodes, each
fetching the model's blobs from the front end into its own node's llmos home. Then a whole worker node dies while
16 requests run: every request that had not started streaming must succeed on the other node, and the lost replica
must come back only when its node does (the head offers no CPUs and the survivor's node has none spare). At the end
every listener of the cluster is on a namespace's own test address or loopback.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from openai import OpenAI

from llmos.config import Settings
from tests.helpers import ServerProcess, StreamsUnderFailure
from tests.multinode import MultiNodeCluster, Node, _free_port_in

pytestmark = pytest.mark.timeout(300)

REQUESTS = 16


class NamespacedServer(ServerProcess):
    """`llmos serve` inside a node's namespace, bound to the node's address, called with an API key."""

    def __init__(self, node: Node, key: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = _free_port_in(node.namespace)
        self.base = f"http://{node.address}:{self.port}"
        self.key = key
        self.http = httpx.Client(trust_env=False, timeout=10, headers={"Authorization": f"Bearer {key}"})
        self.log = (node.home.parent / f"server-{self.port}.log").open("wb")
        argv = [sys.executable, "-m", "llmos", "serve", "--host", node.address, "--port", str(self.port), *args]
        self.process = node.popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready(self.http.get, 180)

    def runtime(self) -> dict[str, Any]:
        return dict(self.http.get(f"{self.base}/admin/runtime", timeout=30).json()["models"][0])

    def stop(self) -> None:
        super().stop()
        self.http.close()


@pytest.fixture(scope="module")
def head_store(multinode_cluster: MultiNodeCluster) -> tuple[Settings, str]:
    """smollm2 pulled (from the bundled file) into the head node's home, where the front end runs, and an admin
    key of that home (a server on a non-loopback address refuses to run without one)."""
    from llmos.registry import sources
    from llmos.registry.service import Registry
    from llmos.security.service import SecurityService

    settings = Settings(home=multinode_cluster.head.home)
    registry = Registry(settings)
    sources.pull(registry, "smollm2")
    registry.close()
    security = SecurityService(settings)
    security.create_tenant("ops")
    key, _ = security.create_key("ops", "admin")
    security.close()
    return settings, key


@pytest.fixture
def server(multinode_cluster: MultiNodeCluster, head_store: tuple[Settings, str]) -> Iterator[NamespacedServer]:
    running = NamespacedServer(
        multinode_cluster.head,
        head_store[1],
        "--model",
        "smollm2",
        "--ray",
        multinode_cluster.ray_address,
        "--ray-replicas",
        "2",
        env={"LLMOS_MAX_RUNNING": "2", "LLMOS_KEEP_ALIVE": "-1"},
    )
    try:
        yield running
    finally:
        running.stop()
        multinode_cluster.heal()  # a failed test may have left a node dead: the next user gets all three


def _model_digests(settings: Settings) -> list[str]:
    from llmos.registry.service import Registry

    registry = Registry(settings, maintain=False)
    try:
        return [file.digest for file in registry.resolve("smollm2").view.files]
    finally:
        registry.close()


def _blob_ok(home: Path, digest: str) -> bool:
    algorithm, hexdigest = digest.split(":", 1)
    matches = list((home / "ray" / "node" / "blobs").rglob(hexdigest))
    if len(matches) != 1:
        return False
    sha = hashlib.sha256()
    with matches[0].open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return algorithm == "sha256" and sha.hexdigest() == hexdigest


def _files_of(pid: int) -> list[str]:
    process = psutil.Process(pid)
    return [m.path for m in process.memory_maps()] + [f.path for f in process.open_files()]


def test_replicas_spread_over_worker_nodes_and_survive_a_node_death(
    multinode_cluster: MultiNodeCluster, head_store: tuple[Settings, str], server: NamespacedServer
) -> None:
    cluster = multinode_cluster
    head, workers = cluster.head, cluster.workers
    by_ip = {node.address: node for node in workers}

    # placement: one replica on each worker node, none on the head
    model = server.runtime()
    assert model["replicas"] == 2 and model["replicas_alive"] == 2, model
    placements = model["per_replica"]
    assert sorted(p["node_ip"] for p in placements) == sorted(by_ip), placements
    alive_ids = {n["address"]: n["node_id"] for n in cluster.node_table() if n["alive"]}
    assert {p["node"] for p in placements} == {alive_ids[ip] for ip in by_ip}

    # blobs: each worker fetched the model into its own home, digests intact; the replica reads only that copy
    digests = _model_digests(head_store[0])
    for placement in placements:
        node = by_ip[placement["node_ip"]]
        assert node.home != head.home
        assert placement["fetched_blobs"] == len(digests)
        assert all(_blob_ok(node.home, digest) for digest in digests), node.home
        assert psutil.Process(placement["pid"]).environ()["LLMOS_HOME"] == str(node.home)
        files = _files_of(placement["pid"])
        assert any(path.startswith(str(node.home)) for path in files), files  # the model is mapped from there
        assert not any(path.startswith(str(head.home)) for path in files)
    assert not (head.home / "ray" / "node").exists()  # the head hosted no replica

    client = OpenAI(
        base_url=f"{server.base}/v1",
        api_key=server.key,
        max_retries=0,
        timeout=120,
        http_client=httpx.Client(trust_env=False, timeout=120),
    )
    answer = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=16,
    )
    assert "Paris" in (answer.choices[0].message.content or "")

    # a whole worker node dies while 16 requests run (4 slots in all: 12 queue)
    streams = StreamsUnderFailure(client, REQUESTS, max_tokens=40)
    streams.wait_started(2, timeout=60)
    victim = by_ip[placements[0]["node_ip"]]
    survivor_ip = placements[1]["node_ip"]
    streams.kill(victim.kill_all)
    streams.finish(timeout=120)
    log = server.read_log()
    assert "resubmitted to another replica" in log

    # the lost replica cannot come back while its node is gone: the head has no CPU, the survivor's node none spare
    cluster.wait_alive(len(cluster.nodes) - 1, timeout=30)
    client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    time.sleep(3)
    model = server.runtime()
    live = [p for p in model["per_replica"] if p["alive"]]
    assert [p["node_ip"] for p in live] == [survivor_ip], model

    # the node returns: the replacement lands there, on the blobs its home kept
    victim.start_ray()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        model = server.runtime()
        if model["replicas_alive"] == 2:
            break
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        time.sleep(1)
    assert model["replicas_alive"] == 2 and model["restarts"] >= 1, model
    assert sorted(p["node_ip"] for p in model["per_replica"]) == sorted(by_ip)
    replacement = next(p for p in model["per_replica"] if p["node_ip"] == victim.address)
    assert replacement["fetched_blobs"] == 0  # the node's own store still held the model
    answer = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=16,
    )
    assert "Paris" in (answer.choices[0].message.content or "")

    # sockets: every listener in a namespace is on its own address or loopback; none new in the root namespace
    listeners = cluster.listeners()
    assert (head.namespace, f"{head.address}:{server.port}") in listeners
    assert cluster.audit_sockets() == []
