"""Answers of ``/v1/responses`` kept per tenant (``store: true``), for ``previous_response_id``, GET and DELETE.

Contract: :meth:`ResponseStore.save` keeps one record (the response object and the conversation it continued) in
the ``responses`` table of the registry's database, encrypted with the store's key when one is configured, and
drops records older than the retention period (``Settings.responses_retention_hours``) as it goes. A record is
visible only to the tenant that created it: :meth:`load` and :meth:`delete` answer 404 for an id that is unknown,
expired, deleted or another tenant's, so ids leak nothing. All methods block (call them from a worker thread).
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select

from llmos.errors import NotFoundError
from llmos.registry.service import Registry
from llmos.store.schema import StoredResponse, as_utc


class ResponseNotFoundError(NotFoundError):
    code = "response_not_found"


class ResponseStore:
    def __init__(self, registry: Registry, retention_hours: float) -> None:
        self._registry = registry
        self._retention = timedelta(hours=retention_hours)

    def _seal(self, record: dict[str, Any]) -> tuple[bytes, bool]:
        data = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        cipher = self._registry.blobs.cipher
        if cipher is None:
            return data, False
        return b"".join(cipher.encrypt([data])), True

    def _open(self, row: StoredResponse) -> dict[str, Any]:
        data = row.payload
        if row.encrypted:
            cipher = self._registry.blobs.cipher
            if cipher is None:
                raise ResponseNotFoundError(
                    f"response {row.id!r} is encrypted and the server has no encryption key configured"
                )
            data = b"".join(cipher.decrypt(io.BytesIO(data), name=f"response {row.id}"))
        record: dict[str, Any] = json.loads(data)
        return record

    def save(self, response_id: str, tenant_id: int | None, model: str, record: dict[str, Any]) -> None:
        payload, encrypted = self._seal(record)
        now = datetime.now(UTC)
        with self._registry.session() as session, session.begin():
            session.execute(delete(StoredResponse).where(StoredResponse.expires_at < now))
            session.add(
                StoredResponse(
                    id=response_id,
                    tenant_id=tenant_id,
                    model=model,
                    payload=payload,
                    encrypted=encrypted,
                    created_at=now,
                    expires_at=now + self._retention,
                )
            )

    def _row(self, session: Any, response_id: str, tenant_id: int | None) -> StoredResponse:
        row = session.scalar(select(StoredResponse).where(StoredResponse.id == response_id))
        expires = as_utc(row.expires_at) if row is not None else None
        if row is None or row.tenant_id != tenant_id or (expires is not None and expires < datetime.now(UTC)):
            raise ResponseNotFoundError(f"no response with id {response_id!r}", param="response_id")
        stored: StoredResponse = row
        return stored

    def load(self, response_id: str, tenant_id: int | None) -> dict[str, Any]:
        """The record saved under ``response_id`` for this tenant (404 otherwise)."""
        with self._registry.session() as session:
            return self._open(self._row(session, response_id, tenant_id))

    def delete(self, response_id: str, tenant_id: int | None) -> None:
        with self._registry.session() as session, session.begin():
            session.delete(self._row(session, response_id, tenant_id))
