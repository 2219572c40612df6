"""A throwaway PostgreSQL server for the tests, from Debian's ``postgresql`` package (``make test-tools``).

Contract: :func:`start_test_server` runs ``initdb`` and ``postgres`` as an unprivileged user (the package's
``postgres`` user, else ``nobody``: the tests run as root and initdb refuses root) in a fresh directory, listening on
127.0.0.1 only, on a free port, with its unix socket inside that directory and trust authentication for 127.0.0.1
only. :meth:`PostgresServer.create_database` gives every test its own empty database. :meth:`PostgresServer.stop`
shuts it down at once (an immediate shutdown: nothing in it is kept) and removes the directory.

The directory is made with :func:`tempfile.mkdtemp`, not under pytest's temporary tree: that tree is private to
root (0700), and every pytest session that starts re-tightens it, so the server's user could lose its way in while
another session starts on the same machine.
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import free_port

DATABASES = ["sqlite", "postgresql"]
"""The ``database`` fixture's parameters: what the store-backed test modules run on."""


def database_env(request: pytest.FixtureRequest, kind: str, patch: pytest.MonkeyPatch) -> str:
    """Put a test's store on ``kind``: for ``postgresql`` a fresh database of the session's server (the
    ``postgres_server`` fixture) exported as LLMOS_DATABASE_URL, so ``Settings`` and every subprocess (CLI, server,
    job workers) use it; for ``sqlite`` no such variable (the store's own file). ``patch`` undoes it: the test's
    ``monkeypatch`` (so a test that changes the variable again undoes in order) or a module's own MonkeyPatch."""
    if kind == "postgresql":
        patch.setenv("LLMOS_DATABASE_URL", request.getfixturevalue("postgres_server").create_database())
    else:
        patch.delenv("LLMOS_DATABASE_URL", raising=False)
    return kind


class PostgresUnavailable(Exception):
    """No PostgreSQL binaries on this machine (install the Debian package ``postgresql``)."""


def find_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb``, ``pg_ctl`` and ``postgres``."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
    )
    for candidate in reversed(candidates):
        path = Path(candidate)
        if all((path / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return path
    raise PostgresUnavailable(
        "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (apt-get install postgresql)"
    )


def _server_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable("neither a postgres nor a nobody user exists to run the test server as")


@dataclass
class PostgresServer:
    root: Path
    bin_dir: Path
    port: int
    user: str
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://llmos@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE) as the server's superuser."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=llmos dbname=postgres", autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self) -> str:
        """A new, empty database; returns its URL (no password: trust authentication on 127.0.0.1)."""
        name = f"test_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Immediate shutdown (SIGQUIT to the postmaster, which is what ``pg_ctl stop -m immediate`` sends), then
        remove the directory. Done as root by pid, so it works even when the directory is no longer reachable."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = 0
        if pid > 0:
            try:
                os.kill(pid, signal.SIGQUIT)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and _alive(pid):
                    time.sleep(0.02)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie nobody reaps, as under a container's init, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _as_user(user: pwd.struct_passwd, *argv: str | Path) -> list[str]:
    return ["runuser", "-u", user.pw_name, "--", *map(str, argv)]


def start_test_server() -> PostgresServer:
    """initdb + start; raises :class:`PostgresUnavailable` when the binaries are missing, RuntimeError when a step
    fails (with that step's output)."""
    if importlib.util.find_spec("psycopg") is None:
        raise PostgresUnavailable("the psycopg driver is not installed (pip install 'llmos[postgres]')")
    bin_dir = find_bin_dir()
    user = _server_user() if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
    root = Path(tempfile.mkdtemp(prefix="pytest-postgres-"))
    os.chown(root, user.pw_uid, user.pw_gid)

    def run(*argv: str | Path) -> None:
        cmd = _as_user(user, *argv) if os.geteuid() == 0 else [str(a) for a in argv]
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    data = root / "data"
    try:
        # --no-sync: the files of a throwaway cluster need not reach the disk before it starts
        run(bin_dir / "initdb", "-D", data, "-U", "llmos", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync",
            "--no-instructions")  # fmt: skip
        (data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )  # root writes, the file stays the user's (it existed)
        for attempt in range(3):
            port = free_port()
            conf = (
                f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{root}'\n"
                "max_connections = 300\nshared_buffers = 32MB\nlog_min_messages = warning\n"
            )
            (data / "postgresql.auto.conf").write_text(conf)
            try:
                run(bin_dir / "pg_ctl", "start", "-w", "-t", "60", "-D", data, "-l", root / "server.log")
                return PostgresServer(root=root, bin_dir=bin_dir, port=port, user=user.pw_name)
            except RuntimeError:
                log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
                if "could not bind" not in log or attempt == 2:
                    raise RuntimeError(f"PostgreSQL did not start:\n{log[-3000:]}") from None
        raise AssertionError("unreachable")
    except BaseException:
        PostgresServer(root=root, bin_dir=bin_dir, port=0, user=user.pw_name).stop()
        raise


COPY_SKIPS = ("llmos.db*", "*.lock", "runner-id", "usage-pending.jsonl", "jobs", "tmp", "logs", "ray", "transfers")


def copy_store(source: Path, target: Path, url: str | None = None) -> None:
    """A copy of the SQLite store at ``source`` as a store at ``target``: on SQLite (``url`` None, a consistent
    backup of its database file) or on the PostgreSQL database ``url``.

    Files are hard links (the blob store writes by rename and never in place, so neither copy can change the
    other's), per-process state is left behind, and for PostgreSQL every row of every table is copied through
    SQLAlchemy into the freshly migrated database, whose id sequences are then moved past the copied ids. This lets
    a test change an expensive session store (a pulled or converted model) on either database without building it
    again and without changing the shared one.
    """
    import sqlite3

    from sqlalchemy import func, insert, select, text

    from llmos.store.db import create_db_engine, open_database
    from llmos.store.schema import Base

    shutil.copytree(source, target, copy_function=os.link, ignore=shutil.ignore_patterns(*COPY_SKIPS))
    if url is None:
        with sqlite3.connect(source / "llmos.db") as reading, sqlite3.connect(target / "llmos.db") as writing:
            reading.backup(writing)
        return
    old = create_db_engine(f"sqlite:///{source / 'llmos.db'}")
    new = open_database(url, target)
    try:
        with old.connect() as reading, new.begin() as writing:
            for table in Base.metadata.sorted_tables:
                rows = [dict(row._mapping) for row in reading.execute(select(table))]
                if rows:
                    writing.execute(insert(table), rows)
                key = table.c.get("id")
                top = writing.execute(select(func.max(key))).scalar() if key is not None else None
                if key is not None and key.type.python_type is int and top is not None:
                    sequence = f"pg_get_serial_sequence('{table.name}', 'id')"
                    writing.execute(text(f"SELECT setval({sequence}, {int(top)})"))
    finally:
        old.dispose()
        new.dispose()
