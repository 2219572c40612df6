"""Database connection and schema migrations.

Contract: :func:`open_database` returns a SQLAlchemy engine whose schema is at the newest migration. For SQLite it
turns on WAL, a busy timeout, foreign keys and ``synchronous=FULL`` on every connection, so a kill -9 at any moment
leaves either the old or the new state of a transaction. PostgreSQL (``postgresql://`` or ``postgres://``) goes
through psycopg 3 (the ``postgres`` extra) with the session time zone set to UTC. Migrations are applied
automatically and skipped cheaply when the database is already current; they are serialised between processes by a
file lock on SQLite and, on PostgreSQL, by a transaction-scoped advisory lock, which also holds between machines.
Error messages never contain the URL (it may hold a password).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from llmos.errors import BackendUnavailableError, StorageError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SCHEMA_HEAD = "0007"
"""Newest migration revision; a test asserts it equals Alembic's head."""
POSTGRES_EXTRA = "pip install 'llmos[postgres]'"
MIGRATION_LOCK_KEY = 0x6C6C6D6F73  # "llmos": the pg_advisory_xact_lock key every llmos process migrates under


def _sqlite_pragmas(busy_timeout_ms: int) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    return on_connect


def sqlalchemy_url(url: str) -> str:
    """``url`` with PostgreSQL spelled the way SQLAlchemy and psycopg 3 need it (``postgresql+psycopg://``)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def create_db_engine(url: str, busy_timeout_ms: int = 30_000) -> Engine:
    """An engine for ``url`` (SQLite or PostgreSQL); a bad URL or a missing driver is one clear error."""
    try:
        parsed = make_url(sqlalchemy_url(url))
    except (ArgumentError, ValueError):
        raise StorageError("the database URL does not parse (expected sqlite:///PATH or postgresql://...)") from None
    backend = parsed.get_backend_name()
    try:
        if backend == "sqlite":
            engine = create_engine(parsed, connect_args={"timeout": busy_timeout_ms / 1000})
            event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_ms))
            return engine
        if backend == "postgresql":
            return create_engine(
                parsed, pool_pre_ping=True, connect_args={"options": "-c timezone=UTC", "connect_timeout": 10}
            )
        return create_engine(parsed, pool_pre_ping=True)
    except ImportError as exc:
        extra = f": {POSTGRES_EXTRA}" if backend == "postgresql" else ""
        raise BackendUnavailableError(f"the {backend} database driver is not installed ({exc.name}){extra}") from None
    except NoSuchModuleError:
        raise StorageError(f"unsupported database kind {parsed.drivername!r} (use sqlite or postgresql)") from None


def _revision_on(conn: Connection) -> str | None:
    if not inspect(conn).has_table("alembic_version"):
        return None
    row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    return str(row[0]) if row else None


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return _revision_on(conn)


def _upgrade_on(connection: Connection, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply Alembic migrations up to ``revision`` on ``engine`` (unserialised: see :func:`open_database`)."""
    with engine.begin() as connection:
        _upgrade_on(connection, revision)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def open_database(url: str, lock_dir: Path, busy_timeout_ms: int = 30_000) -> Engine:
    """Connect and make sure the schema is current."""
    engine = create_db_engine(url, busy_timeout_ms)
    try:
        if current_revision(engine) != SCHEMA_HEAD:
            if engine.dialect.name == "postgresql":
                # PostgreSQL runs DDL in the transaction: the lock and the whole upgrade commit (or vanish) together
                with engine.begin() as conn:
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                    if _revision_on(conn) != SCHEMA_HEAD:
                        _upgrade_on(conn, "head")
            else:
                with _file_lock(lock_dir / "migrate.lock"):
                    if current_revision(engine) != SCHEMA_HEAD:
                        upgrade(engine)
    except OperationalError as exc:
        engine.dispose()
        reason = " ".join(str(exc.orig).split())
        raise StorageError(f"cannot open the registry database: {reason}") from exc
    return engine


def rows_matched(result: Any) -> int:
    """How many rows an ``UPDATE``/``DELETE`` executed through a session matched (a CursorResult at run time)."""
    return int(cast(CursorResult[Any], result).rowcount)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
