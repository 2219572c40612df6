"""Database connection and schema migrations.

Contract: :func:`open_database` returns a SQLAlchemy engine whose schema is at the newest migration. For SQLite it
turns on WAL, a busy timeout, foreign keys and ``synchronous=FULL`` on every connection, so a kill -9 at any moment
leaves either the old or the new state of a transaction. Migrations are applied automatically, serialised between
processes by a file lock, and skipped cheaply when the database is already current.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from llmos.errors import StorageError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SCHEMA_HEAD = "0006"
"""Newest migration revision; a test asserts it equals Alembic's head."""


def _sqlite_pragmas(busy_timeout_ms: int) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    return on_connect


def create_db_engine(url: str, busy_timeout_ms: int = 30_000) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000})
        event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_ms))
        return engine
    return create_engine(url, pool_pre_ping=True)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
        return str(row[0]) if row else None


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply Alembic migrations up to ``revision`` on ``engine``."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


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
            with _file_lock(lock_dir / "migrate.lock"):
                if current_revision(engine) != SCHEMA_HEAD:
                    upgrade(engine)
    except OperationalError as exc:
        raise StorageError(f"cannot open the registry database: {exc.orig}") from exc
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
