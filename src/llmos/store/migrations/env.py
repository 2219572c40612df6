"""Alembic environment: runs migrations on the connection llmos hands over (see ``llmos.store.db.upgrade``)."""

from __future__ import annotations

from alembic import context

from llmos.store.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - llmos always passes a connection
    raise RuntimeError("llmos migrations must be run through llmos.store.db.upgrade()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
