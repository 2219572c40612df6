"""The Alembic migrations build exactly the schema the code declares, on SQLite and on PostgreSQL, and are applied
automatically once (serialised between processes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import insert, text
from sqlalchemy.exc import DBAPIError

from llmos.errors import BackendUnavailableError, StorageError
from llmos.store.db import MIGRATIONS_DIR, SCHEMA_HEAD, create_db_engine, current_revision, open_database
from llmos.store.schema import AuditEvent, Base, utcnow
from tests.postgres import DATABASES, PostgresServer


def test_schema_head_constant_matches_alembic() -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_HEAD


def test_migrated_database_matches_the_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = open_database(url, tmp_path)
    assert current_revision(engine) == SCHEMA_HEAD
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_reopening_does_not_migrate_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    open_database(url, tmp_path)
    engine = create_db_engine(url)
    assert current_revision(engine) == SCHEMA_HEAD
    open_database(url, tmp_path)  # idempotent
    assert current_revision(engine) == SCHEMA_HEAD


def fresh_url(database: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if database == "postgresql":
        return str(request.getfixturevalue("postgres_server").create_database())
    return f"sqlite:///{tmp_path / 'db.sqlite'}"


@pytest.mark.parametrize("database", DATABASES)
def test_migrations_build_the_models_on_each_database(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = fresh_url(database, tmp_path, request)
    engine = open_database(url, tmp_path)
    assert engine.dialect.name == database
    assert current_revision(engine) == SCHEMA_HEAD
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    open_database(url, tmp_path)  # current: nothing to do
    assert current_revision(engine) == SCHEMA_HEAD


@pytest.mark.parametrize("database", DATABASES)
def test_the_audit_log_is_append_only_on_each_database(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    engine = open_database(fresh_url(database, tmp_path, request), tmp_path)
    with engine.begin() as conn:
        conn.execute(insert(AuditEvent).values(actor="a", action="x", outcome="ok", details={}, created_at=utcnow()))
    for statement in ("UPDATE audit_log SET actor = 'b'", "DELETE FROM audit_log"):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT actor FROM audit_log")).scalars().all() == ["a"]


def test_front_ends_starting_together_migrate_a_postgresql_database_once(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """Several processes open one fresh database at the same moment: the advisory lock lets one migrate, the others
    wait and find it current (without it, two would create the same tables and one would fail)."""
    url = postgres_server.create_database()
    code = (
        "import sys, time; from pathlib import Path; from llmos.store.db import open_database, current_revision;"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()));"
        "print(current_revision(open_database(sys.argv[1], Path('.'))))"
    )
    start = time.time() + 3  # every process imports first, then they open the database together
    argv = [sys.executable, "-c", code, url, str(start)]
    pipe = subprocess.PIPE
    procs = [subprocess.Popen(argv, stdout=pipe, stderr=pipe, text=True, cwd=tmp_path) for _ in range(4)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, outputs
    assert [out.strip() for out, _ in outputs] == [SCHEMA_HEAD] * 4
    with create_db_engine(url).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_postgres_urls_and_errors_never_show_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = create_db_engine("postgres://me:hunter2@127.0.0.1:1/llmos")
    assert engine.url.drivername == "postgresql+psycopg" and "hunter2" not in repr(engine)
    with pytest.raises(StorageError) as refused:
        open_database("postgresql://me:hunter2@127.0.0.1:1/llmos", Path("."))
    assert "hunter2" not in str(refused.value) and "cannot open the registry database" in str(refused.value)
    with pytest.raises(StorageError) as unparsable:
        create_db_engine("postgresql://me:hunter2@127.0.0.1:port/llmos")
    assert "hunter2" not in str(unparsable.value)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the postgres extra were not installed
    with pytest.raises(BackendUnavailableError) as missing:
        create_db_engine("postgresql://me:hunter2@127.0.0.1:1/llmos")
    assert "llmos[postgres]" in str(missing.value) and "hunter2" not in str(missing.value)
