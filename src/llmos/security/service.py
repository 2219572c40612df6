"""Tenants, API keys, authentication, the audit log and usage records.

Contract:

* Keys look like ``llmos_<12 hex prefix>_<43 url-safe secret>``. Only ``sha256(key)`` and the prefix are stored; the
  full key is returned once, by :meth:`SecurityService.create_key`. :meth:`SecurityService.authenticate` compares
  hashes with :func:`hmac.compare_digest` (constant time, also for unknown prefixes) and refuses malformed, unknown,
  revoked and expired keys alike with :class:`~llmos.errors.AuthenticationError`, whose message never contains the
  key.
* Authentication is required as soon as one key exists (or when forced by ``Settings.auth``).
* :meth:`SecurityService.audit` appends to the audit log (the database refuses updates and deletes of it);
  :meth:`SecurityService.record_usage` queues usage records that a background thread writes in batches, off the
  request path.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import queue
import re
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from llmos.config import Settings
from llmos.errors import AuthenticationError, ConflictError, InvalidInputError, NotFoundError, PermissionDeniedError
from llmos.security.principal import RANK, ROLES, Limits, Principal, can_create_role
from llmos.store.db import open_database, session_factory
from llmos.store.schema import ApiKey, AuditEvent, Tenant, UsageRecord

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


def _aware(moment: datetime | None) -> datetime | None:
    return None if moment is None else (moment if moment.tzinfo else moment.replace(tzinfo=UTC))


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
        self._usage: queue.SimpleQueue[UsageRecord | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()

    def session(self) -> Session:
        return self._sessions()

    # --- tenants ----------------------------------------------------------------------------------------------------

    def create_tenant(self, name: str, *, limits: Limits | None = None, actor: str = "local") -> Tenant:
        if not TENANT_RE.match(name or ""):
            raise InvalidInputError(f"invalid tenant name {name!r}: 1-64 characters of a-z, 0-9, '.', '_', '-'")
        limits = limits or Limits()
        if limits.budget_period not in PERIODS:
            raise InvalidInputError(f"budget period must be one of {', '.join(PERIODS)}")
        with self.session() as session, session.begin():
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
        self.audit(actor, None, "tenant.create", name, "ok")
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
        with self.session() as session, session.begin():
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
        self.audit(creator.actor, creator.tenant, "key.create", f"{tenant}/{role}/{prefix}", "ok")
        return key, info

    @staticmethod
    def _key_info(row: ApiKey, tenant: str) -> KeyInfo:
        return KeyInfo(
            prefix=row.prefix,
            tenant=tenant,
            role=row.role,
            models=row.models,
            expires_at=_aware(row.expires_at),
            revoked_at=_aware(row.revoked_at),
            created_at=_aware(row.created_at) or datetime.now(UTC),
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
        with self.session() as session, session.begin():
            row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
            if row is None or not (actor.is_admin or row.tenant_id == actor.tenant_id):
                raise NotFoundError(f"no key with prefix {prefix!r}")
            if not actor.is_admin and RANK[row.role] > RANK[actor.role]:
                raise PermissionDeniedError("a key cannot revoke a key of a higher role")
            row.revoked_at = row.revoked_at or datetime.now(UTC)
            info = self._key_info(row, row.tenant.name)
        self.audit(actor.actor, actor.tenant, "key.revoke", prefix, "ok")
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
            expires = _aware(row.expires_at)
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

    def audit(
        self, actor: str, tenant: str | None, action: str, target: str | None, outcome: str, **details: Any
    ) -> None:
        try:
            with self.session() as session, session.begin():
                session.add(
                    AuditEvent(
                        actor=actor, tenant=tenant, action=action, target=target, outcome=outcome, details=details
                    )
                )
        except Exception:  # the audit log must never break the operation it records; the failure is logged
            log.exception("could not write an audit event for %s", action)

    def audit_events(self, limit: int = 100, tenant: str | None = None) -> list[AuditEvent]:
        with self.session() as session:
            query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
            if tenant is not None:
                query = query.where(AuditEvent.tenant == tenant)
            return list(session.scalars(query))

    def record_usage(self, **fields: Any) -> None:
        self._ensure_writer()
        self._usage.put(UsageRecord(**fields))

    def _ensure_writer(self) -> None:
        with self._writer_lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_usage, name="llmos-usage-writer", daemon=True)
                self._writer.start()

    def _write_usage(self) -> None:
        while True:
            first = self._usage.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < 500:
                try:
                    item = self._usage.get(timeout=0.2)
                except queue.Empty:
                    break
                if item is None:
                    self._flush(batch)
                    return
                batch.append(item)
            self._flush(batch)

    def _flush(self, batch: list[UsageRecord]) -> None:
        try:
            with self.session() as session, session.begin():
                session.add_all(batch)
        except Exception:
            log.exception("could not write %d usage records", len(batch))

    def flush_usage(self, timeout: float = 10.0) -> None:
        """Stop the writer after it has written everything queued (shutdown, tests)."""
        with self._writer_lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            self._usage.put(None)
            writer.join(timeout)

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
        self.flush_usage()
        self.engine.dispose()
