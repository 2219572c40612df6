"""Tenants, API keys, authentication, the audit log and usage records.

Contract:

* Keys look like ``llmos_<12 hex prefix>_<43 url-safe secret>``. Only ``sha256(key)`` and the prefix are stored; the
  full key is returned once, by :meth:`SecurityService.create_key`. :meth:`SecurityService.authenticate` compares
  hashes with :func:`hmac.compare_digest` (constant time, also for unknown prefixes) and refuses malformed, unknown,
  revoked and expired keys alike with :class:`~llmos.errors.AuthenticationError`, whose message never contains the
  key.
* Authentication is required as soon as one key exists (or when forced by ``Settings.auth``).
* The audit log fails closed (the database refuses updates and deletes of it). A security-relevant change (tenant
  creation, key creation and revocation) commits in one transaction with its audit event: if the event cannot be
  written, the change is rolled back and :class:`~llmos.errors.AuditUnavailableError` (503) raised.
  :meth:`SecurityService.check_audit` (a trial insert, rolled back) lets the HTTP layer refuse any other
  state-changing request before it runs; :meth:`SecurityService.audit` appends an event describing what already
  happened or was refused, counting (never raising) a failure. Failures are counted (``audit_failures``) and, until
  a write succeeds again, reported by :meth:`SecurityService.records_health`.
* :meth:`SecurityService.record_usage` hands usage records to :class:`~llmos.security.usage.UsageLog`: group
  commits before the response completes, nothing dropped, callers with unwritten records refused
  (:meth:`SecurityService.unrecorded`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from llmos.config import Settings
from llmos.errors import (
    AuditUnavailableError,
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)
from llmos.security.principal import RANK, ROLES, Limits, Principal, can_create_role
from llmos.security.usage import UsageLog
from llmos.store.db import open_database, session_factory
from llmos.store.schema import ApiKey, AuditEvent, Tenant, UsageRecord, as_utc

log = logging.getLogger("llmos.security")
KEY_RE = re.compile(r"^llmos_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
PERIODS = {"day": timedelta(days=1), "week": timedelta(weeks=1), "month": timedelta(days=30)}
_DUMMY_HASH = hashlib.sha256(b"llmos-no-such-key").hexdigest()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def period_start(period: str, now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    if period == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "week":
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return day - timedelta(days=day.weekday())
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class KeyInfo:
    prefix: str
    tenant: str
    role: str
    models: list[str] | None
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    created_by: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "tenant": self.tenant,
            "role": self.role,
            "models": self.models,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "active": self.revoked_at is None and (self.expires_at is None or self.expires_at > datetime.now(UTC)),
        }


def _limits(row: Tenant | ApiKey) -> Limits:
    return Limits(row.requests_per_minute, row.tokens_per_minute, row.token_budget, row.budget_period or "month")


class SecurityService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.home.mkdir(parents=True, exist_ok=True)
        self.engine = open_database(settings.effective_database_url(), settings.home, settings.db_busy_timeout_ms)
        self._sessions = session_factory(self.engine)
        self.usage = UsageLog(self._sessions, settings.home)
        self.peer_authenticator: Callable[[str], str | None] | None = None
        """Set by a server: the id of the live front end of this database presenting a peer token, or None
        (:meth:`llmos.registry.peers.FrontEnds.authenticate`); such a caller acts as an admin."""
        self.audit_failures = 0
        self._audit_lock = threading.Lock()
        self._audit_error: str | None = None
        """Set when an audit write failed, cleared when one succeeds again."""

    def session(self) -> Session:
        return self._sessions()

    # --- tenants ----------------------------------------------------------------------------------------------------

    def create_tenant(self, name: str, *, limits: Limits | None = None, actor: str = "local") -> Tenant:
        if not TENANT_RE.match(name or ""):
            raise InvalidInputError(f"invalid tenant name {name!r}: 1-64 characters of a-z, 0-9, '.', '_', '-'")
        limits = limits or Limits()
        if limits.budget_period not in PERIODS:
            raise InvalidInputError(f"budget period must be one of {', '.join(PERIODS)}")
        with self._audited(actor, None, "tenant.create", name) as session:
            if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
                raise ConflictError(f"tenant {name!r} already exists")
            tenant = Tenant(
                name=name,
                requests_per_minute=limits.requests_per_minute,
                tokens_per_minute=limits.tokens_per_minute,
                token_budget=limits.token_budget,
                budget_period=limits.budget_period,
            )
            session.add(tenant)
        return tenant

    def tenants(self) -> list[Tenant]:
        with self.session() as session:
            return list(session.scalars(select(Tenant).order_by(Tenant.name)))

    def tenant_id(self, name: str) -> int:
        with self.session() as session:
            tenant = session.scalar(select(Tenant).where(Tenant.name == name))
            if tenant is None:
                raise NotFoundError(f"tenant {name!r} not found; `llmos tenants list` shows them")
            return tenant.id

    # --- keys -------------------------------------------------------------------------------------------------------

    def create_key(
        self,
        tenant: str,
        role: str,
        *,
        creator: Principal | None = None,
        expires_in: timedelta | None = None,
        models: Iterable[str] | None = None,
        limits: Limits | None = None,
    ) -> tuple[str, KeyInfo]:
        """Mint a key; returns the full key (shown once) and its stored description."""
        creator = creator or Principal(tenant=tenant, tenant_id=None, role="admin")
        if role not in RANK:
            raise InvalidInputError(f"role must be one of {', '.join(ROLES)}", param="role")
        if not can_create_role(creator, role, tenant):
            self.audit(creator.actor, creator.tenant, "key.create", f"{tenant}/{role}", "denied")
            raise PermissionDeniedError(f"a {creator.role} key cannot create a {role} key for tenant {tenant!r}")
        limits = limits or Limits()
        if limits.budget_period not in PERIODS:
            raise InvalidInputError(f"budget period must be one of {', '.join(PERIODS)}")
        if expires_in is not None and expires_in.total_seconds() <= 0:
            raise InvalidInputError("a key's lifetime must be positive", param="expires")
        prefix = secrets.token_hex(6)
        key = f"llmos_{prefix}_{secrets.token_urlsafe(32)}"
        with self._audited(creator.actor, creator.tenant, "key.create", f"{tenant}/{role}/{prefix}") as session:
            owner = session.scalar(select(Tenant).where(Tenant.name == tenant))
            if owner is None:
                raise NotFoundError(f"tenant {tenant!r} not found; create it with `llmos tenants create {tenant}`")
            row = ApiKey(
                prefix=prefix,
                key_hash=hash_key(key),
                tenant_id=owner.id,
                role=role,
                models=sorted(set(models)) if models else None,
                requests_per_minute=limits.requests_per_minute,
                tokens_per_minute=limits.tokens_per_minute,
                token_budget=limits.token_budget,
                budget_period=limits.budget_period,
                expires_at=datetime.now(UTC) + expires_in if expires_in else None,
                created_by=creator.actor,
            )
            session.add(row)
            session.flush()
            info = self._key_info(row, tenant)
        return key, info

    @staticmethod
    def _key_info(row: ApiKey, tenant: str) -> KeyInfo:
        return KeyInfo(
            prefix=row.prefix,
            tenant=tenant,
            role=row.role,
            models=row.models,
            expires_at=as_utc(row.expires_at),
            revoked_at=as_utc(row.revoked_at),
            created_at=as_utc(row.created_at) or datetime.now(UTC),
            created_by=row.created_by,
        )

    def keys(self, tenant: str | None = None) -> list[KeyInfo]:
        with self.session() as session:
            query = select(ApiKey, Tenant.name).join(Tenant).order_by(ApiKey.created_at)
            if tenant is not None:
                query = query.where(Tenant.name == tenant)
            return [self._key_info(row, name) for row, name in session.execute(query)]

    def revoke_key(self, prefix: str, *, actor: Principal | None = None) -> KeyInfo:
        actor = actor or Principal(tenant="default", tenant_id=None, role="admin")
        with self._audited(actor.actor, actor.tenant, "key.revoke", prefix) as session:
            row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
            if row is None or not (actor.is_admin or row.tenant_id == actor.tenant_id):
                raise NotFoundError(f"no key with prefix {prefix!r}")
            if not actor.is_admin and RANK[row.role] > RANK[actor.role]:
                raise PermissionDeniedError("a key cannot revoke a key of a higher role")
            row.revoked_at = row.revoked_at or datetime.now(UTC)
            info = self._key_info(row, row.tenant.name)
        return info

    def auth_required(self) -> bool:
        if self.settings.auth:
            return True
        with self.session() as session:
            return bool(session.scalar(select(func.count()).select_from(ApiKey)))

    def authenticate(self, header: str | None) -> Principal:
        """The principal behind an ``Authorization: Bearer <key>`` header, or AuthenticationError."""
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if self.peer_authenticator is not None and scheme.lower() == "bearer" and token.startswith("llmos-peer-"):
            peer = self.peer_authenticator(token)
            if peer is None:
                raise AuthenticationError("invalid or expired front-end token")
            return Principal(tenant=f"peer:{peer[:12]}", tenant_id=None, role="admin")
        match = KEY_RE.match(token) if scheme.lower() == "bearer" else None
        if match is None:
            hmac.compare_digest(_DUMMY_HASH, hash_key(token))
            raise AuthenticationError(
                "missing or malformed API key; send `Authorization: Bearer <key>` with a key from `llmos keys create`"
            )
        with self.session() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.prefix == match.group(1)))
            stored = row.key_hash if row is not None else _DUMMY_HASH
            if not hmac.compare_digest(stored, hash_key(token)) or row is None:
                raise AuthenticationError(f"invalid API key (prefix {match.group(1)})")
            if row.revoked_at is not None:
                raise AuthenticationError(f"the API key with prefix {row.prefix} has been revoked")
            expires = as_utc(row.expires_at)
            if expires is not None and expires <= datetime.now(UTC):
                raise AuthenticationError(f"the API key with prefix {row.prefix} has expired")
            tenant = row.tenant
            return Principal(
                tenant=tenant.name,
                tenant_id=tenant.id,
                role=row.role,
                key_prefix=row.prefix,
                models=tuple(row.models) if row.models else None,
                key_limits=_limits(row),
                tenant_limits=_limits(tenant),
            )

    # --- audit and usage --------------------------------------------------------------------------------------------

    @contextmanager
    def _audited(self, actor: str, tenant: str | None, action: str, target: str) -> Iterator[Session]:
        """A transaction for a security-relevant change that commits only together with its audit event.

        The body's own errors roll it back and pass through; if the event (or the commit) cannot be written, the
        change is rolled back too and AuditUnavailableError raised.
        """
        with self.session() as session:
            transaction = session.begin()
            try:
                yield session
                session.flush()
            except BaseException:
                transaction.rollback()
                raise
            try:
                session.add(AuditEvent(actor=actor, tenant=tenant, action=action, target=target, outcome="ok",
                                       details={}))  # fmt: skip
                session.flush()
                transaction.commit()
            except SQLAlchemyError as exc:
                transaction.rollback()
                raise self._audit_failed(action, type(exc).__name__) from exc
        self._audit_error = None

    def _audit_failed(self, action: str, error: str, *, refused: bool = True) -> AuditUnavailableError:
        """Count and log a failed audit write; the error to raise where the action is refused (the caller reports
        that one, so it is logged at INFO: the CLI prints one line, not two)."""
        with self._audit_lock:
            self.audit_failures += 1
        self._audit_error = error
        log.log(logging.INFO if refused else logging.ERROR, "could not write an audit event for %s (%s)", action, error)
        return AuditUnavailableError(
            f"the audit log cannot be written ({error}), so {action} was refused and nothing changed;"
            " retry when /ready reports the audit log healthy"
        )

    def _insert_event(
        self, actor: str, tenant: str | None, action: str, target: str | None, outcome: str, details: dict[str, Any]
    ) -> None:
        with self.session() as session, session.begin():
            session.add(
                AuditEvent(actor=actor, tenant=tenant, action=action, target=target, outcome=outcome, details=details)
            )

    def audit(
        self, actor: str, tenant: str | None, action: str, target: str | None, outcome: str, **details: Any
    ) -> bool:
        """Append an event about something that already happened or was refused; a failure is counted and logged,
        never raised (whatever it records cannot be undone here). False if it was not written."""
        try:
            self._insert_event(actor, tenant, action, target, outcome, details)
        except Exception as exc:
            self._audit_failed(action, type(exc).__name__, refused=False)
            return False
        self._audit_error = None
        return True

    def require_audit(
        self, actor: str, tenant: str | None, action: str, target: str | None, outcome: str = "ok", **details: Any
    ) -> None:
        """Append an event before the action it records: AuditUnavailableError (503) if it cannot be written, so
        the caller refuses the action."""
        try:
            self._insert_event(actor, tenant, action, target, outcome, details)
        except SQLAlchemyError as exc:
            raise self._audit_failed(action, type(exc).__name__) from exc
        self._audit_error = None

    def audit_writable(self) -> bool:
        """Whether an audit event can be written now: a trial insert, rolled back (nothing is recorded)."""
        try:
            with self.session() as session:
                transaction = session.begin()
                try:
                    session.add(AuditEvent(actor="probe", tenant=None, action="probe", target=None, outcome="probe",
                                           details={}))  # fmt: skip
                    session.flush()
                finally:
                    transaction.rollback()
        except SQLAlchemyError as exc:
            self._audit_error = type(exc).__name__
            return False
        self._audit_error = None
        return True

    def check_audit(self, action: str) -> None:
        """Refuse ``action`` (AuditUnavailableError, counted) unless the audit log can be written now."""
        if not self.audit_writable():
            raise self._audit_failed(action, self._audit_error or "unknown error")

    def audit_events(self, limit: int = 100, tenant: str | None = None) -> list[AuditEvent]:
        with self.session() as session:
            query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
            if tenant is not None:
                query = query.where(AuditEvent.tenant == tenant)
            return list(session.scalars(query))

    def record_usage(self, **fields: Any) -> Future[bool]:
        """Hand one usage record to the writer; the future resolves once it is committed (True) or failed (False)."""
        return self.usage.record(**fields)

    def unrecorded(self, key_prefix: str | None) -> str | None:
        """Why requests of this key (None: the keyless local caller) must be refused now, or None."""
        if not self.usage.unrecorded(key_prefix):
            return None
        who = f"key {key_prefix}" if key_prefix else "this server's local caller"
        return (
            f"earlier usage of {who} could not be recorded yet, so its requests are refused until it is (the server"
            " retries every second; /ready shows why)"
        )

    def flush_usage(self, timeout: float = 10.0) -> None:
        """Stop the usage writer after it has tried to write everything queued (shutdown, tests)."""
        self.usage.flush(timeout)

    def record_counts(self) -> tuple[int, int, int]:
        """``(audit write failures, usage write failures, usage records pending)`` for /metrics."""
        return self.audit_failures, self.usage.failures, self.usage.pending()

    def records_health(self) -> dict[str, dict[str, Any]]:
        """The ``audit`` and ``usage`` checks of /ready: ok, or not with the reason (no paths, no keys)."""
        audit: dict[str, Any] = {"ok": True}
        if self._audit_error is not None and not self.audit_writable():  # re-tested only while it is failing
            audit = {"ok": False, "reason": f"audit events cannot be written ({self._audit_error}); "
                     "security-relevant and state-changing requests are refused"}  # fmt: skip
        usage: dict[str, Any] = {"ok": True}
        pending = self.usage.pending()
        if pending:
            usage = {"ok": False, "reason": f"{pending} usage records could not be written ({self.usage.last_error});"
                     " requests of their keys are refused until the retries succeed"}  # fmt: skip
        return {"audit": audit, "usage": usage}

    def scope_usage_since(self, scope: str, start: datetime) -> int:
        """Tokens used since ``start`` by a quota scope (``key:<prefix>`` or ``tenant:<name>``)."""
        kind, _, name = scope.partition(":")
        if kind == "key":
            return self.usage_since(start, key_prefix=name)
        return self.usage_since(start, tenant=name)

    def usage_since(self, since: datetime, *, tenant: str | None = None, key_prefix: str | None = None) -> int:
        """Tokens (prompt + completion) recorded since ``since`` for a tenant or a key."""
        with self.session() as session:
            query = select(func.coalesce(func.sum(UsageRecord.prompt_tokens + UsageRecord.completion_tokens), 0))
            query = query.where(UsageRecord.created_at >= since)
            if tenant is not None:
                query = query.where(UsageRecord.tenant == tenant)
            if key_prefix is not None:
                query = query.where(UsageRecord.key_prefix == key_prefix)
            return int(session.scalar(query) or 0)

    def usage_report(self, by: str = "tenant", since: datetime | None = None) -> list[dict[str, Any]]:
        columns = {"tenant": UsageRecord.tenant, "model": UsageRecord.model, "key": UsageRecord.key_prefix}
        group: list[Any] = [columns[b] for b in by.split(",") if b in columns]
        day = func.date(UsageRecord.created_at)
        if "day" in by.split(","):
            group.append(day)
        if not group:
            raise InvalidInputError("--by takes tenant, model, key and/or day (comma-separated)")
        query = select(
            *group,
            func.count(),
            func.sum(UsageRecord.prompt_tokens),
            func.sum(UsageRecord.completion_tokens),
            func.avg(UsageRecord.latency_ms),
        ).group_by(*group)
        if since is not None:
            query = query.where(UsageRecord.created_at >= since)
        names = [b for b in by.split(",") if b in (*columns, "day")]
        rows = []
        with self.session() as session:
            for row in session.execute(query.order_by(*group)):
                *keys, count, prompt, completion, latency = row
                rows.append(
                    {
                        **{name: str(value) for name, value in zip(names, keys, strict=True)},
                        "requests": int(count),
                        "prompt_tokens": int(prompt or 0),
                        "completion_tokens": int(completion or 0),
                        "avg_latency_ms": round(float(latency or 0), 1),
                    }
                )
        return rows

    def close(self) -> None:
        self.usage.close()
        self.engine.dispose()
