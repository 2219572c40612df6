"""A real multi-node Ray cluster on one machine: one network namespace per node, joined by a private bridge.

Contract (shared test infrastructure: multi-node serving and multi-node training tests use it):

* :func:`start_cluster` makes network namespaces ``llmos-head-<id>``, ``llmos-w1-<id>``, ``llmos-w2-<id>``, each with
  loopback up and one veth into a bridge in the root namespace, on :data:`SUBNET` (head .1, w1 .2, w2 .3, the bridge
  .254 so this process reaches servers in the namespaces). No default route, no forwarding, no NAT, IPv6 off on
  every new interface: nothing can leave the machine, and a namespace's only addresses are its test address and
  loopback. The subnet must not collide with anything this machine already routes (checked).
* Each namespace runs one Ray node started the product's way (``llmos cluster start --node-ip`` for the head,
  ``llmos cluster join HEAD --node-ip`` for a worker), each with its own llmos home (``LLMOS_HOME``, its blob
  store), its own Ray temp dir and private ``HOME``; no node shares llmos files with another. The head offers no
  CPUs (it hosts no replicas: the front end's ``BlobServer`` needs none), each worker ``worker_cpus`` (1: exactly
  one model replica, so SPREAD placement is visible and a replacement waits for a returning node). Object stores
  are 80 MB. The head's GCS declares a dead node within about 2 s (health checks every 0.5 s, 3 misses).
* :meth:`Node.popen` runs a command inside a node's namespace (with that node's ``LLMOS_HOME``);
  :meth:`Node.kill_all` SIGKILLs every process in the namespace (a dead machine) and waits until none is left;
  :meth:`Node.start_ray` (re)starts the node's Ray and waits until the head lists it alive;
  :meth:`MultiNodeCluster.heal` restarts whatever node a test left dead (the fixture is shared by the session).
* :meth:`MultiNodeCluster.audit_sockets` lists listening sockets that break the network rule: in a namespace, only
  its test address or loopback (Ray's C++ servers bind 0.0.0.0, which in these namespaces means exactly those two,
  checked from the namespace's addresses); in the root namespace, no new non-loopback listener of a Ray or llmos
  process.
* :meth:`MultiNodeCluster.close` kills every process of the namespaces and deletes the namespaces, veths and bridge;
  a crashed earlier run's leftovers are removed at start (under a machine-wide lock: one such cluster at a time).
* :func:`multinode_cluster` is the session fixture (re-exported by ``tests/conftest.py``): it skips when not root,
  or where ``ip netns`` or Ray is missing, and fails instead when the ``CI`` variable is set and the user is root.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pytest

SUBNET = ipaddress.ip_network("10.231.23.0/24")
BRIDGE_IP = "10.231.23.254"
NODE_NAMES = ("head", "w1", "w2")
LOCK_PATH = Path("/run/lock/llmos-multinode.lock")
NS_PREFIX = "llmos-"
LINK_PREFIXES = ("llbr", "llv")
HEAD_ENV = {  # the GCS notices a dead node within about 2 s instead of 15 s
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "500",
}
WILDCARDS = {"0.0.0.0", "*", "::", "[::]"}  # noqa: S104 (names of listeners we check, nothing binds them)


class MultiNodeUnavailable(RuntimeError):
    """This machine cannot host the namespaced cluster (not root, no ``ip netns``, no Ray)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _in_ns(namespace: str, *argv: str, check: bool = True) -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, *argv], capture_output=True, text=True, check=False, timeout=60
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {namespace} failed: {result.stderr.strip()}")
    return result.stdout


def check_available() -> None:
    """Raise :class:`MultiNodeUnavailable` unless namespaces, veths, bridges and Ray can be used here."""
    if os.geteuid() != 0:
        raise MultiNodeUnavailable("network namespaces need root")
    if shutil.which("ip") is None or shutil.which("ss") is None:
        raise MultiNodeUnavailable("the ip and ss tools (iproute2) are missing")
    if _ip("netns", "list", check=False).returncode != 0:
        raise MultiNodeUnavailable("ip netns does not work here")
    if not Path(sys.executable).with_name("ray").exists():
        raise MultiNodeUnavailable("Ray is not installed (pip install 'llmos[ray]')")


def available() -> bool:
    """Whether the multi-node cluster can run here (then the multi-node tests run, and fail rather than skip)."""
    try:
        check_available()
    except MultiNodeUnavailable:
        return False
    return True


def covered_by_multinode(test: str) -> pytest.MarkDecorator:
    """Skip a single-node Ray test where the multi-node ``test`` runs: it checks the same promise, harder (a whole
    node instead of one process); the single-node one stays for machines without root or ``ip netns``."""
    return pytest.mark.skipif(available(), reason=f"{test} checks this across nodes on this machine")


def _check_subnet_free(own_bridge: str | None = None) -> None:
    """Nothing this machine has (addresses, routes) overlaps :data:`SUBNET`."""
    for line in _ip("-o", "-4", "addr", "show").stdout.splitlines():
        parts = line.split()
        if own_bridge is not None and parts[1] == own_bridge:
            continue
        network = ipaddress.ip_interface(parts[parts.index("inet") + 1]).network
        if network.overlaps(SUBNET):
            raise MultiNodeUnavailable(f"{SUBNET} collides with {network} on {parts[1]}")
    for line in _ip("-4", "route", "show").stdout.splitlines():
        target = line.split()[0]
        if target == "default" or (own_bridge is not None and f"dev {own_bridge}" in line):
            continue
        if ipaddress.ip_network(target, strict=False).overlaps(SUBNET):
            raise MultiNodeUnavailable(f"{SUBNET} collides with the route {line!r}")


def _namespace_pids(namespace: str) -> list[int]:
    result = _ip("netns", "pids", namespace, check=False)
    return [int(pid) for pid in result.stdout.split() if pid.isdigit()]


def _kill_namespace(namespace: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pids = _namespace_pids(namespace)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:  # reap the ones that are our own children
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in {namespace} do not die")
        time.sleep(0.1)


def remove_leftovers() -> list[str]:
    """Delete every namespace, veth and bridge an earlier (crashed) run of this module left behind; call it only
    while holding the machine-wide lock. Returns what was removed."""
    removed = []
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(NS_PREFIX) and name.split("-")[1] in NODE_NAMES:
            _kill_namespace(name)
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(LINK_PREFIXES):
            _ip("link", "delete", name, check=False)
            removed.append(name)
    return removed


def listening_sockets(namespace: str | None = None) -> list[tuple[str, int, str]]:
    """(address, pid, process name) of every TCP and UDP listening socket in a namespace (None: the root one)."""
    argv = ["ss", "-H", "-l", "-t", "-u", "-n", "-p"]
    output = (
        _in_ns(namespace, *argv)
        if namespace
        else subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    )
    found = []
    for line in output.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        local = parts[4]
        users = line.split("users:((", 1)[1] if "users:((" in line else ""
        name = users.split('"')[1] if users.count('"') >= 2 else ""
        pid = int(users.split("pid=", 1)[1].split(",", 1)[0]) if "pid=" in users else -1
        found.append((local, pid, name))
    return found


def _host_of(local: str) -> str:
    host = local.rsplit(":", 1)[0]
    host = host.split("%", 1)[0]  # 127.0.0.53%lo
    return host.strip("[]").removeprefix("::ffff:")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Node:
    """One Ray node in its own network namespace, with its own llmos home."""

    name: str
    namespace: str
    address: str
    home: Path
    """This node's ``LLMOS_HOME``."""
    head_address: str | None = None
    """None for the head; the head's Ray address for a worker."""
    cpus: int = 1
    port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    _children: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def env(self, env: Mapping[str, str | None] | None = None) -> dict[str, str]:
        """This process's environment with the node's ``LLMOS_HOME``; ``env`` sets (or, None, removes)."""
        merged = {**os.environ, "LLMOS_HOME": str(self.home), **self.extra_env}
        for key, value in (env or {}).items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        return merged

    def popen(self, argv: list[str], env: Mapping[str, str | None] | None = None, **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this node's namespace (see :meth:`env` for the environment)."""
        process = subprocess.Popen(["ip", "netns", "exec", self.namespace, *argv], env=self.env(env), **kw)
        self._children.append(process)
        return process

    def run(self, argv: list[str], timeout: float = 120, env: Mapping[str, str | None] | None = None) -> str:
        """Run ``argv`` inside the namespace to its end; its stdout (an error with its output if it fails)."""
        process = self.popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output, _ = process.communicate(timeout=timeout)
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} on {self.name} exited {process.returncode}: {output}")
        return str(output)

    def pids(self) -> list[int]:
        return _namespace_pids(self.namespace)

    def kill_all(self, timeout: float = 30.0) -> None:
        """SIGKILL every process in the namespace (the machine died) and wait until none is left."""
        _kill_namespace(self.namespace, timeout)
        for child in self._children:
            with contextlib.suppress(Exception):
                child.wait(timeout=5)
        self._children = [c for c in self._children if c.poll() is None]

    def start_ray(self, timeout: float = 90.0) -> dict[str, Any]:
        """(Re)start this node's Ray with the llmos CLI; returns once the head lists the node alive (the CLI waits
        for that). Returns the node's cluster record."""
        llmos = [sys.executable, "-m", "llmos", "cluster"]
        common = ["--node-ip", self.address, f"--cpus={self.cpus}", "--object-store-mb=80", "--json"]
        if self.head_address is None:
            argv = [*llmos, "start", f"--port={self.port}", *common]
        else:
            argv = [*llmos, "join", self.head_address, *common]
        output = self.run(argv, timeout=timeout)
        return dict(json.loads(output[output.index("{") :]))


@dataclass
class MultiNodeCluster:
    head: Node
    workers: list[Node]
    ray_address: str
    """``10.231.23.1:PORT``"""
    suffix: str
    root: Path
    bridge: str
    root_listeners_before: set[str] = field(default_factory=set)
    _lock: TextIO | None = field(default=None, repr=False)

    @property
    def nodes(self) -> list[Node]:
        return [self.head, *self.workers]

    def node_table(self) -> list[dict[str, Any]]:
        """Every node the head knows (``node_id``, ``address``, ``alive``, ``resources``)."""
        from llmos.distributed.cluster import cluster_nodes

        return cluster_nodes(self.ray_address)

    def alive_nodes(self) -> int:
        return sum(node["alive"] for node in self.node_table())

    def wait_alive(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while (alive := self.alive_nodes()) != count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{alive} Ray nodes alive, expected {count}: {self.node_table()}")
            time.sleep(0.25)

    def heal(self) -> None:
        """Restart the Ray of every node the head does not list alive (after a test killed one), and wait."""
        alive = {node["address"] for node in self.node_table() if node["alive"]}
        for node in self.nodes:
            if node.address not in alive:
                node.kill_all()
                node.start_ray()
        self.wait_alive(len(self.nodes))

    def listeners(self) -> list[tuple[str, str]]:
        """(namespace, ip:port) of every listening socket in the cluster's namespaces."""
        return [(node.namespace, local) for node in self.nodes for local, _, _ in listening_sockets(node.namespace)]

    def audit_sockets(self) -> list[str]:
        """Listening sockets that break the network rule (see the module docstring); empty when all is well."""
        problems = []
        for node in self.nodes:
            addresses = set()
            for line in _in_ns(node.namespace, "ip", "-o", "addr", "show").splitlines():
                parts = line.split()
                kind = parts[2]
                if kind in ("inet", "inet6"):
                    addresses.add(str(ipaddress.ip_interface(parts[3]).ip))
            if addresses != {node.address, "127.0.0.1"}:
                problems.append(f"{node.namespace} has the addresses {sorted(addresses)}")
            for local, pid, name in listening_sockets(node.namespace):
                host = _host_of(local)
                if host not in {node.address, "127.0.0.1", *WILDCARDS}:
                    problems.append(f"{node.namespace}: {name} (pid {pid}) listens on {local}")
        for local, pid, name in listening_sockets(None):
            host = _host_of(local)
            if local in self.root_listeners_before or (_is_ip(host) and ipaddress.ip_address(host).is_loopback):
                continue
            if self._ours(pid):
                problems.append(f"root namespace: {name} (pid {pid}) listens on {local}: {_cmdline(pid)[:200]}")
        return problems

    def _ours(self, pid: int) -> bool:
        """A process this test started (a descendant of this process) or one running with a node's environment."""
        import psutil

        try:
            process = psutil.Process(pid)
            if pid == os.getpid() or any(parent.pid == os.getpid() for parent in process.parents()):
                return True
            return str(self.root) in process.environ().get("LLMOS_HOME", "")
        except psutil.Error:
            return False

    def close(self) -> None:
        """Kill every process in the namespaces, delete namespaces, veths and bridge, release the lock."""
        try:
            for node in self.nodes:
                with contextlib.suppress(Exception):
                    node.kill_all()
                _ip("netns", "delete", node.namespace, check=False)
            for name in [self.bridge, *(f"llv{node.name}{self.suffix}" for node in self.nodes)]:
                _ip("link", "delete", name, check=False)
            for node in self.nodes:  # Ray's session files of this node
                from llmos.distributed.cluster import LocalCluster

                record = LocalCluster(node.home).state_path
                with contextlib.suppress(OSError, ValueError, KeyError):
                    shutil.rmtree(json.loads(record.read_text())["temp_dir"], ignore_errors=True)
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _free_port_in(namespace: str) -> int:
    code = "import socket; s = socket.socket(); s.bind(('10.231.23.1', 0)); print(s.getsockname()[1])"
    return int(_in_ns(namespace, sys.executable, "-c", code).strip())


def _lock(timeout: float) -> TextIO:
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    handle = LOCK_PATH.open("a")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise MultiNodeUnavailable(f"another multi-node cluster holds {LOCK_PATH}") from None
            time.sleep(1)


def build_network(root: Path, *, worker_cpus: int = 1, lock_timeout: float = 600.0) -> MultiNodeCluster:
    """Namespaces, veths and bridge, no Ray yet (see :func:`start_cluster`)."""
    check_available()
    lock = _lock(lock_timeout)
    cluster: MultiNodeCluster | None = None
    try:
        remove_leftovers()
        _check_subnet_free()
        suffix = uuid.uuid4().hex[:6]
        bridge = f"llbr{suffix}"
        hosts = list(SUBNET.hosts())
        nodes = [
            Node(name, f"{NS_PREFIX}{name}-{suffix}", str(hosts[index]), root / name / "llmos-home")
            for index, name in enumerate(NODE_NAMES)
        ]
        cluster = MultiNodeCluster(nodes[0], nodes[1:], "", suffix, root, bridge, _lock=lock)
        cluster.root_listeners_before = {local for local, _, _ in listening_sockets(None)}
        _ip("link", "add", bridge, "type", "bridge")
        Path(f"/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6").write_text("1")
        _ip("addr", "add", f"{BRIDGE_IP}/{SUBNET.prefixlen}", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for node in nodes:
            outer = f"llv{node.name}{suffix}"
            _ip("netns", "add", node.namespace)
            for key in ("all", "default"):
                _in_ns(node.namespace, "sh", "-c", f"echo 1 > /proc/sys/net/ipv6/conf/{key}/disable_ipv6")
            _ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", node.namespace)
            Path(f"/proc/sys/net/ipv6/conf/{outer}/disable_ipv6").write_text("1")
            _ip("link", "set", outer, "master", bridge, "up")
            _in_ns(node.namespace, "ip", "addr", "add", f"{node.address}/{SUBNET.prefixlen}", "dev", "eth0")
            _in_ns(node.namespace, "ip", "link", "set", "eth0", "up")
            _in_ns(node.namespace, "ip", "link", "set", "lo", "up")
            node.home.mkdir(parents=True)
        _check_subnet_free(own_bridge=bridge)
        head = nodes[0]
        head.cpus, head.port, head.extra_env = 0, _free_port_in(head.namespace), dict(HEAD_ENV)
        cluster.ray_address = f"{head.address}:{head.port}"
        for worker in nodes[1:]:
            worker.cpus, worker.head_address = worker_cpus, cluster.ray_address
        return cluster
    except BaseException:
        if cluster is not None:
            cluster.close()
        else:
            lock.close()
        raise


def start_cluster(root: Path, *, worker_cpus: int = 1, lock_timeout: float = 600.0) -> MultiNodeCluster:
    """The namespaced network and a Ray node in each namespace (head first), all alive."""
    cluster = build_network(root, worker_cpus=worker_cpus, lock_timeout=lock_timeout)
    try:
        cluster.head.start_ray()
        with ThreadPoolExecutor(len(cluster.workers)) as pool:  # the workers join at the same time
            list(pool.map(lambda worker: worker.start_ray(), cluster.workers))
        cluster.wait_alive(len(cluster.nodes))
        return cluster
    except BaseException:
        cluster.close()
        raise


@pytest.fixture(scope="session")
def multinode_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNodeCluster]:
    """Three Ray nodes in three network namespaces (see :func:`start_cluster`), torn down at the end even on
    failure; at the end the socket audit must pass."""
    try:
        check_available()
    except MultiNodeUnavailable as exc:
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail(f"CI runs as root and needs the multi-node cluster: {exc}")
        pytest.skip(str(exc))
    cluster = start_cluster(tmp_path_factory.mktemp("multinode"))
    try:
        yield cluster
        problems = cluster.audit_sockets()
        assert problems == [], problems
    finally:
        cluster.close()
