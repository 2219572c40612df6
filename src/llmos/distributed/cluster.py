"""The one way llmos starts, joins and stops Ray: no telemetry, no cloud-metadata probes, loopback unless told.

Contract:

* :func:`ray_environment` is the environment every Ray process of llmos runs with (the verified recipe in the
  project's shared notes): usage stats off and pointed at a dead loopback port, token auth off, and a private
  ``HOME`` holding ``ray_bootstrap_config.yaml`` = ``{}`` so Ray skips its cloud-metadata probe. For a node on
  127.0.0.1 (the default) ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` pins Ray's addresses to loopback (and makes Ray
  refuse a second *node*: one head node, its worker processes host the actors). For a node bound to another address
  of this machine (``multi_node``) it is ``1``: Ray then takes the node's address from ``--node-ip-address`` and
  accepts worker nodes. Ray's C++ servers (GCS, raylet, workers) can bind only 127.0.0.1 or every address, so such a
  node listens on all of the machine's addresses: give it a machine (or network namespace) whose only addresses are
  the cluster's network and loopback, or a firewall.
* :class:`LocalCluster` starts a Ray node owned by an llmos home with ``ray start --block`` in its own process group
  under ``<home>/ray``: a head (``--head``) or a worker joining a head (``head_address``), on ``node_ip`` (default
  127.0.0.1; another address must be one of this machine's own). Its state file records the PID, address and role;
  Ray's session files go to a short directory under the system temp dir, as its socket paths must stay under 108
  bytes. The node's processes get ``LLMOS_HOME`` = that home, which is where replicas on the node keep the blobs
  they fetch. It waits until the head answers (a worker: until the head lists it alive) and stops the node by
  that process group only (never ``ray stop``, which would stop every Ray on the machine).
  ``llmos cluster start|join|stop|status`` and the test fixtures use it.
* :func:`connect` applies the environment to this process (before ``ray`` is imported) and joins a cluster by
  address; it refuses an address that is not on this machine (loopback or one of this machine's own interface
  addresses, see :func:`is_local_address`) unless ``allow_remote`` is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.errors import BackendUnavailableError, InvalidInputError

STATE_FILE = "cluster.json"
QUIET = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
}
"""No usage reports (and their URL a dead loopback port), no token auth (see the README for a real cluster)."""


def ray_environment(ray_home: Path, *, multi_node: bool = False) -> dict[str, str]:
    """Variables that keep Ray quiet and (unless ``multi_node``) on loopback; merged over the caller's environment
    by the callers."""
    ray_home.mkdir(parents=True, exist_ok=True)
    bootstrap = ray_home / "ray_bootstrap_config.yaml"
    if not bootstrap.exists():
        bootstrap.write_text("{}\n")
    return {**QUIET, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if multi_node else "0", "HOME": str(ray_home)}


def _ray_executable() -> str:
    candidate = Path(sys.executable).with_name("ray")
    if candidate.exists():
        return str(candidate)
    raise BackendUnavailableError("Ray is not installed; install the extra: pip install 'llmos[ray]'")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0].strip("[]")


def is_local_address(address: str) -> bool:
    """Whether ``address`` (``host[:port]``) is loopback or one of this machine's own interface addresses (in this
    network namespace): a socket can be bound to it. Names other than ``localhost`` are not resolved."""
    host = _host(address)
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    if ip.is_unspecified or ip.is_multicast:
        return False
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((host, 0))
    except OSError:
        return False
    return True


@dataclass
class ClusterInfo:
    address: str
    """The cluster's (the head's GCS) address, for a worker node too."""
    pid: int
    cpus: int
    temp_dir: str
    node_ip: str = "127.0.0.1"
    role: str = "head"
    """``head`` or ``worker``."""

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


def cluster_nodes(address: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The nodes the head at ``address`` knows: ``node_id``, ``address`` (the node's IP), ``alive``, ``resources``.

    Asks the GCS directly (no Ray driver is started, nothing listens); sets the quiet variables of :data:`QUIET` in
    this process where they are unset."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    try:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]
    except ImportError as exc:
        raise BackendUnavailableError("Ray is not installed; install the extra: pip install 'llmos[ray]'") from exc
    nodes = GcsClient(address=address).get_all_node_info(timeout=timeout)
    return [
        {
            "node_id": node_id.hex(),
            "address": info.node_manager_address,
            "alive": info.state == 0,  # GcsNodeInfo.ALIVE
            "resources": dict(info.resources_total),
        }
        for node_id, info in nodes.items()
    ]


class LocalCluster:
    """A Ray node (a head, or a worker joining one) on an address of this machine, owned by an llmos home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.root = home / "ray"
        self.state_path = self.root / STATE_FILE

    def info(self) -> ClusterInfo | None:
        """The running cluster recorded under this home, or None (a stale record is removed)."""
        try:
            info = ClusterInfo(**json.loads(self.state_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if not _alive(info.pid):
            self.state_path.unlink(missing_ok=True)
            return None
        return info

    def start(
        self,
        *,
        port: int | None = None,
        cpus: int = 2,
        object_store_bytes: int = 200_000_000,
        timeout: float = 60.0,
        node_ip: str = "127.0.0.1",
        head_address: str | None = None,
    ) -> ClusterInfo:
        """Start this home's node (a head, or with ``head_address`` a worker joining that head) and wait until it
        serves; returns the running one if it already runs."""
        existing = self.info()
        if existing is not None:
            return existing
        if not _is_ip(node_ip) or not is_local_address(node_ip):
            raise InvalidInputError(f"{node_ip!r} is not an IP address of this machine", param="node_ip")
        multi_node = head_address is not None or not ipaddress.ip_address(node_ip).is_loopback
        # Ray's socket paths must fit in 107 bytes: its session files live in a short directory of their own
        temp_dir = Path(tempfile.gettempdir()) / f"llmos-ray-{hashlib.sha256(str(self.root).encode()).hexdigest()[:10]}"
        shutil.rmtree(temp_dir, ignore_errors=True)  # a node killed before left its sockets there
        temp_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **ray_environment(self.root / "home", multi_node=multi_node), "LLMOS_HOME": str(self.home)}
        command = [_ray_executable(), "start", f"--node-ip-address={node_ip}"]
        if head_address is None:
            port = port or _free_port()
            command += ["--head", f"--port={port}", "--include-dashboard=false"]
            address, role, log_name = f"{node_ip}:{port}", "head", "head.log"
        else:
            command += [f"--address={head_address}"]
            address, role, log_name = head_address, "worker", "worker.log"
        command += [
            f"--num-cpus={cpus}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            f"--object-store-memory={object_store_bytes}",
            "--block",
        ]
        log = (self.root / log_name).open("ab")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        info = ClusterInfo(address, process.pid, cpus, str(temp_dir), node_ip, role)
        deadline = time.monotonic() + timeout
        while not self._serves(info):
            if process.poll() is not None or time.monotonic() > deadline:
                _kill_group(process.pid)
                raise BackendUnavailableError(f"the Ray {role} did not start; see {self.root / log_name}")
            time.sleep(0.2)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info.__dict__))
        os.replace(tmp, self.state_path)
        return info

    @staticmethod
    def _serves(info: ClusterInfo) -> bool:
        if info.role == "head":
            return _answers(info.node_ip, info.port)
        try:  # a worker serves once the head lists it alive
            return any(node["alive"] and node["address"] == info.node_ip for node in cluster_nodes(info.address))
        except Exception:  # the head does not answer (yet)
            return False

    def stop(self, grace: float = 5.0) -> bool:
        """Stop this home's node and everything in its process group; False if none was running."""
        info = self.info()
        if info is None:
            return False
        _kill_group(info.pid, grace)
        self.state_path.unlink(missing_ok=True)
        shutil.rmtree(info.temp_dir, ignore_errors=True)
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie child counts as gone
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True


def _kill_group(pid: int, grace: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(_host(text))
    except ValueError:
        return False
    return True


def _is_loopback_address(address: str) -> bool:
    host = _host(address)
    return host in ("127.0.0.1", "localhost", "::1")


def connect(address: str, ray_home: Path, *, allow_remote: bool = False) -> Any:
    """Join the Ray cluster at ``address`` from this process (idempotent); returns the ``ray`` module.

    An address of this machine's own interfaces (a head started with ``llmos cluster start --node-ip``) needs no
    ``allow_remote``; Ray then finds this process's node by the address it reaches the head from."""
    if not allow_remote and not is_local_address(address):
        raise InvalidInputError(
            f"Ray address {address!r} is not on this machine; llmos joins remote clusters only when asked"
            " (LLMOS_RAY_ALLOW_REMOTE=1)"
        )
    for key, value in ray_environment(ray_home, multi_node=not _is_loopback_address(address)).items():
        if key != "HOME":  # this process keeps its own HOME; Ray's probe runs in the processes the head started
            os.environ[key] = value
    os.environ["RAY_ADDRESS"] = address  # Ray's own helpers (Ray Train's) find this cluster, not another one
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailableError("Ray is not installed; install the extra: pip install 'llmos[ray]'") from exc
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    return ray
