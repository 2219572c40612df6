"""The one way llmos starts, joins and stops Ray: loopback only, no telemetry, no cloud-metadata probes.

Contract:

* :func:`ray_environment` is the environment every Ray process of llmos runs with (the verified recipe in the
  project's shared notes): usage stats off and pointed at a dead loopback port, the node address pinned to
  127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which also makes Ray refuse to add a second *node* on this
  machine: one head node, its worker processes host the actors), token auth off, and a private ``HOME`` holding
  ``ray_bootstrap_config.yaml`` = ``{}`` so Ray skips its cloud-metadata probe.
* :class:`LocalCluster` starts a head with ``ray start --head --block`` in its own process group under
  ``<home>/ray`` (its state file records the PID and address; Ray's session files go to a short directory under
  the system temp dir, as its socket paths must stay under 108 bytes), waits until it answers, and stops it by that
  process group only (never ``ray stop``, which would stop every Ray on the machine). `llmos cluster start|stop|status`
  and the test fixture both use it.
* :func:`connect` applies the environment to this process (before ``ray`` is imported) and joins a cluster by
  address; it refuses a non-loopback address unless ``allow_remote`` is set.
"""

from __future__ import annotations

import contextlib
import hashlib
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


def ray_environment(ray_home: Path) -> dict[str, str]:
    """Variables that keep Ray on loopback and quiet (merged over the caller's environment by the callers)."""
    ray_home.mkdir(parents=True, exist_ok=True)
    bootstrap = ray_home / "ray_bootstrap_config.yaml"
    if not bootstrap.exists():
        bootstrap.write_text("{}\n")
    return {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
        "HOME": str(ray_home),
    }


def _ray_executable() -> str:
    candidate = Path(sys.executable).with_name("ray")
    if candidate.exists():
        return str(candidate)
    raise BackendUnavailableError("Ray is not installed; install the extra: pip install 'llmos[ray]'")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


@dataclass
class ClusterInfo:
    address: str
    pid: int
    cpus: int
    temp_dir: str

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


class LocalCluster:
    """A single-machine Ray head on 127.0.0.1, owned by an llmos home."""

    def __init__(self, home: Path) -> None:
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
    ) -> ClusterInfo:
        existing = self.info()
        if existing is not None:
            return existing
        port = port or _free_port()
        # Ray's socket paths must fit in 107 bytes: its session files live in a short directory of their own
        temp_dir = Path(tempfile.gettempdir()) / f"llmos-ray-{hashlib.sha256(str(self.root).encode()).hexdigest()[:10]}"
        temp_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **ray_environment(self.root / "home")}
        command = [
            _ray_executable(),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--include-dashboard=false",
            f"--num-cpus={cpus}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            f"--object-store-memory={object_store_bytes}",
            "--block",
        ]
        log = (self.root / "head.log").open("ab")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        info = ClusterInfo(f"127.0.0.1:{port}", process.pid, cpus, str(temp_dir))
        deadline = time.monotonic() + timeout
        while not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                _kill_group(process.pid)
                raise BackendUnavailableError(f"the Ray head did not start; see {self.root / 'head.log'}")
            time.sleep(0.2)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info.__dict__))
        os.replace(tmp, self.state_path)
        return info

    def stop(self, grace: float = 5.0) -> bool:
        """Stop this home's head and everything in its process group; False if none was running."""
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


def _is_loopback_address(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def connect(address: str, ray_home: Path, *, allow_remote: bool = False) -> Any:
    """Join the Ray cluster at ``address`` from this process (idempotent); returns the ``ray`` module."""
    if not allow_remote and not _is_loopback_address(address):
        raise InvalidInputError(
            f"Ray address {address!r} is not on this machine; llmos joins remote clusters only when asked"
            " (LLMOS_RAY_ALLOW_REMOTE=1)"
        )
    for key, value in ray_environment(ray_home).items():
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
