"""Database tables of the registry (SQLAlchemy 2 declarative models).

Contract: these classes describe the *current* schema. Every change to them comes with an Alembic migration in
``llmos/store/migrations/versions``; a test checks that the migrations produce exactly these tables. Rows never hold
file paths, only digests: bytes live in the blob store.

* ``models``: a name (``namespace/name``).
* ``model_versions``: an immutable version of a model, identified by the digest of its manifest.
* ``version_files``: the blobs a version is made of (a GGUF has one; a Hugging Face directory several).
* ``tags``: movable names pointing at a version of the same model.
* ``lineage``: how a version was produced: operation, parameters, and parent versions (kept as digests and names so
  history survives the deletion of a parent).
* ``responses``: answers of the Responses API stored per tenant for ``previous_response_id``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def as_utc(moment: datetime) -> datetime: ...
@overload
def as_utc(moment: None) -> None: ...
def as_utc(moment: datetime | None) -> datetime | None:
    """A time read back from the database, made timezone-aware: SQLite returns the naive UTC time it stored,
    PostgreSQL an aware one; comparisons between the two kinds would raise."""
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("namespace", "name", name="uq_models_namespace_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="SET NULL"), index=True)
    """Owning tenant; None = public (visible to every tenant)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", cascade="all, delete-orphan", passive_deletes=True
    )
    tags: Mapped[list[Tag]] = relationship(back_populates="model", cascade="all, delete-orphan", passive_deletes=True)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "digest", name="uq_model_versions_model_digest"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    digest: Mapped[str] = mapped_column(String(71), index=True)
    manifest: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(32))
    architecture: Mapped[str | None] = mapped_column(String(128))
    parameter_count: Mapped[int | None] = mapped_column(BigInteger)
    quantization: Mapped[str | None] = mapped_column(String(64))
    context_length: Mapped[int | None] = mapped_column(Integer)
    chat_template: Mapped[str | None] = mapped_column(Text)
    tokenizer: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    details: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    model: Mapped[Model] = relationship(back_populates="versions")
    files: Mapped[list[VersionFile]] = relationship(
        back_populates="version", cascade="all, delete-orphan", passive_deletes=True, order_by="VersionFile.path"
    )
    lineage: Mapped[list[Lineage]] = relationship(
        back_populates="version", cascade="all, delete-orphan", passive_deletes=True
    )


class VersionFile(Base):
    __tablename__ = "version_files"
    __table_args__ = (
        UniqueConstraint("version_id", "path", name="uq_version_files_version_path"),
        Index("ix_version_files_blob_digest", "blob_digest"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(255))
    blob_digest: Mapped[str] = mapped_column(String(71))
    size: Mapped[int] = mapped_column(BigInteger)

    version: Mapped[ModelVersion] = relationship(back_populates="files")


class Tag(Base):
    __tablename__ = "tags"
    __table_args__ = (UniqueConstraint("model_id", "tag", name="uq_tags_model_tag"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    tag: Mapped[str] = mapped_column(String(128))
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    model: Mapped[Model] = relationship(back_populates="tags")
    version: Mapped[ModelVersion] = relationship()


class Lineage(Base):
    __tablename__ = "lineage"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    operation: Mapped[str] = mapped_column(String(32))
    parent_digest: Mapped[str | None] = mapped_column(String(71))
    parent_name: Mapped[str | None] = mapped_column(String(255))
    params: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    version: Mapped[ModelVersion] = relationship(back_populates="lineage")


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer)
    token_budget: Mapped[int | None] = mapped_column(BigInteger)
    budget_period: Mapped[str] = mapped_column(String(16), default="month")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key, stored as the SHA-256 of the secret; only the prefix is ever shown again."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    models: Mapped[list[str] | None] = mapped_column(JSON)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer)
    token_budget: Mapped[int | None] = mapped_column(BigInteger)
    budget_period: Mapped[str] = mapped_column(String(16), default="month")
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    tenant: Mapped[Tenant] = relationship()


class UsageRecord(Base):
    __tablename__ = "usage"
    __table_args__ = (Index("ix_usage_tenant_time", "tenant", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    request_id: Mapped[str] = mapped_column(String(128))
    tenant: Mapped[str] = mapped_column(String(64))
    key_prefix: Mapped[str | None] = mapped_column(String(32), index=True)
    model: Mapped[str] = mapped_column(String(300))
    endpoint: Mapped[str] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[int] = mapped_column(Integer)
    status: Mapped[int] = mapped_column(Integer)


class AuditEvent(Base):
    """Append-only: the database refuses UPDATE and DELETE on this table (see migration 0002)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    tenant: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(300))
    outcome: Mapped[str] = mapped_column(String(16))
    details: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)


class Job(Base):
    """A unit of long work (training, dataset processing, evaluation) run in its own subprocess.

    ``state``: queued -> running -> succeeded | failed | cancelled | interrupted (a running job whose process is gone);
    an interrupted or failed resumable job can be queued again and continues from its last checkpoint. ``pid`` and
    ``pid_started`` (the process start time in clock ticks) identify the worker process even across PID reuse.
    """

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="SET NULL"), index=True)
    created_by: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    resource: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    progress: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    resumable: Mapped[bool] = mapped_column(default=True)
    auto_resume: Mapped[bool] = mapped_column(default=False)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    pid: Mapped[int | None] = mapped_column(Integer)
    pid_started: Mapped[int | None] = mapped_column(BigInteger)
    runner: Mapped[str | None] = mapped_column(String(32))
    """The llmos home (its runner id) whose machine runs the worker; PIDs mean something only there."""
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """Refreshed by the worker while it runs; another runner takes the job over when it is older than the lease."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Evaluation(Base):
    """One measured report: a task's metrics for a model version on a dataset version (or the shipped text)."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(300))
    model_digest: Mapped[str] = mapped_column(String(71), index=True)
    task: Mapped[str] = mapped_column(String(64))
    dataset_name: Mapped[str | None] = mapped_column(String(300))
    dataset_digest: Mapped[str | None] = mapped_column(String(71))
    metrics: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    params: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    job_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TagHistory(Base):
    """Every move of a tag (alias): which version it pointed at from when, and why. Append-only in normal use.

    A version a tag's recent history names is kept even when no tag points at it any more, so ``llmos rollback``
    can move the tag back; history beyond the newest entries per tag is trimmed (see the registry).
    """

    __tablename__ = "tag_history"
    __table_args__ = (Index("ix_tag_history_model_tag", "model_id", "tag"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    tag: Mapped[str] = mapped_column(String(128))
    digest: Mapped[str] = mapped_column(String(71))
    previous_digest: Mapped[str | None] = mapped_column(String(71))
    reason: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Pipeline(Base):
    """A named pipeline recipe (train -> evaluate -> gate -> promote), stored so runs can be started by name."""

    __tablename__ = "pipelines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="SET NULL"), index=True)
    recipe: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StoredResponse(Base):
    """One answer of the Responses API kept for ``previous_response_id`` and ``GET /v1/responses/{id}``.

    ``payload`` is the JSON of the response and of the conversation it continued (its input items, earlier turns
    included), encrypted with the store's key when one is configured. Rows expire after the retention period.
    """

    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    """Owning tenant; None = the local (auth off) caller."""
    model: Mapped[str] = mapped_column(String(300))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    encrypted: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class BudgetLedger(Base):
    """Tokens counted against one scope's budget in one period (``tenant:NAME`` / ``key:PREFIX``, ``2026-12``).

    ``committed`` = tokens used by settled requests + the worst case of requests still running, on every front end of
    this database. A reservation is one conditional ``UPDATE`` (``committed + n <= budget``), so concurrent front ends
    can never spend beyond a budget together.
    """

    __tablename__ = "budget_ledger"

    scope: Mapped[str] = mapped_column(String(160), primary_key=True)
    period: Mapped[str] = mapped_column(String(32), primary_key=True)
    committed: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BudgetHold(Base):
    """The worst cases that one front end's running requests hold in a ledger row: what to give back if it dies."""

    __tablename__ = "budget_holds"

    holder: Mapped[str] = mapped_column(String(32), primary_key=True)
    scope: Mapped[str] = mapped_column(String(160), primary_key=True)
    period: Mapped[str] = mapped_column(String(32), primary_key=True)
    tokens: Mapped[int] = mapped_column(BigInteger)


class FrontEnd(Base):
    """A running ``llmos serve`` on this database: where to reach it (blobs it holds) and whether it is alive."""

    __tablename__ = "front_ends"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    url: Mapped[str | None] = mapped_column(String(300))
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    token_hash: Mapped[str] = mapped_column(String(64))
    """SHA-256 of the secret this front end presents when it fetches blobs from another one."""
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
