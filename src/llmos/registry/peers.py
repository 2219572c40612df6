"""Front ends that share one database, and blobs fetched from each other by digest.

Contract:

* Every ``llmos serve`` registers itself in ``front_ends`` (:meth:`FrontEnds.register`): a random id, the URL other
  front ends reach it at (``advertise_url``, else ``http://host:port``), and the SHA-256 of a random secret. It
  refreshes ``heartbeat_at`` while it runs (:meth:`FrontEnds.heartbeat`) and removes its row when it stops; a front
  end whose heartbeat is older than ``job_lease_seconds`` counts as gone.
* The database is shared, the blob stores are not: a version registered by one front end has its bytes in that
  front end's store only. :meth:`FrontEnds.fetch_blob` asks each live peer for a missing blob over the registry's
  transfer route ``GET /v1/registry/blobs/{digest}`` and writes it through the blob store's digest check (a
  corrupt or substituted transfer is refused and the next peer is tried). The registry calls it when it resolves a
  version whose files are missing here (:attr:`llmos.registry.service.Registry.blob_fetcher`).
* Peers authenticate with ``Authorization: Bearer llmos-peer-<id>-<secret>`` (:func:`peer_token`), checked by
  :meth:`FrontEnds.authenticate` against the stored hash while that front end is alive. A peer acts as an admin:
  any front end of the deployment already holds the database, and with it every key and tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from llmos.errors import IntegrityError, LlmosError
from llmos.store.blobs import BlobStore
from llmos.store.schema import FrontEnd, as_utc, utcnow

log = logging.getLogger("llmos.registry")
PEER_TOKEN_RE = re.compile(r"^llmos-peer-([0-9a-f]{32})-([A-Za-z0-9_-]{43})$")
CHUNK_BYTES = 1024 * 1024


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def advertised_url(host: str, port: int, configured: str | None) -> str:
    """Where other front ends reach this one: the configured URL, else this host and port."""
    if configured:
        return configured.rstrip("/")
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 (a wildcard bind: peers need a name)
        host = socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(frozen=True)
class Peer:
    id: str
    url: str


class FrontEnds:
    """This front end's row in ``front_ends`` and the live peers of the same database."""

    def __init__(self, sessions: Callable[[], Session], lease_seconds: float) -> None:
        self._sessions = sessions
        self.lease = timedelta(seconds=lease_seconds)
        self.id = secrets.token_hex(16)
        self._secret = secrets.token_urlsafe(32)

    @property
    def token(self) -> str:
        """What this front end presents to its peers."""
        return f"llmos-peer-{self.id}-{self._secret}"

    def _alive(self, heartbeat: datetime) -> bool:
        return as_utc(heartbeat) > utcnow() - self.lease

    def register(self, url: str) -> None:
        with self._sessions() as session, session.begin():
            session.add(
                FrontEnd(
                    id=self.id,
                    url=url,
                    hostname=socket.gethostname()[:255],
                    pid=os.getpid(),
                    token_hash=_hash(self._secret),
                    started_at=utcnow(),
                    heartbeat_at=utcnow(),
                )
            )

    def heartbeat(self) -> None:
        with self._sessions() as session, session.begin():
            session.execute(update(FrontEnd).where(FrontEnd.id == self.id).values(heartbeat_at=utcnow()))
            # rows of front ends gone for a long time are only history: drop them
            session.execute(delete(FrontEnd).where(FrontEnd.heartbeat_at < utcnow() - 10 * self.lease))

    def unregister(self) -> None:
        with self._sessions() as session, session.begin():
            session.execute(delete(FrontEnd).where(FrontEnd.id == self.id))

    def peers(self) -> list[Peer]:
        """Live front ends other than this one, most recently seen first."""
        with self._sessions() as session:
            rows = session.scalars(select(FrontEnd).where(FrontEnd.id != self.id))
            fresh = [row for row in rows if row.url and self._alive(row.heartbeat_at)]
        fresh.sort(key=lambda row: as_utc(row.heartbeat_at), reverse=True)
        return [Peer(row.id, str(row.url)) for row in fresh]

    def live_ids(self) -> set[str]:
        """Ids of the front ends (this one included) whose heartbeat is within the lease."""
        with self._sessions() as session:
            rows = session.execute(select(FrontEnd.id, FrontEnd.heartbeat_at)).all()
        return {self.id} | {row.id for row in rows if self._alive(row.heartbeat_at)}

    def authenticate(self, token: str) -> str | None:
        """The id of the live front end presenting ``token``, or None."""
        match = PEER_TOKEN_RE.match(token)
        if match is None:
            return None
        with self._sessions() as session:
            row = session.get(FrontEnd, match.group(1))
            stored = row.token_hash if row is not None else "0" * 64
            if not hmac.compare_digest(stored, _hash(match.group(2))) or row is None:
                return None
            if not self._alive(row.heartbeat_at):
                return None
            return row.id

    def fetch_blob(self, blobs: BlobStore, digest: str) -> bool:
        """Copy ``digest`` from the first live peer that has it into ``blobs`` (digest-checked); False if none had."""
        for peer in self.peers():
            try:
                with (
                    httpx.Client(timeout=httpx.Timeout(30.0, read=300.0), trust_env=False) as client,
                    client.stream(
                        "GET",
                        f"{peer.url}/v1/registry/blobs/{digest}",
                        headers={"authorization": f"Bearer {self.token}"},
                    ) as response,
                ):
                    if response.status_code != 200:
                        log.info("peer %s has no blob %s (%s)", peer.url, digest, response.status_code)
                        continue
                    with blobs.writing():
                        blobs.write_stream(  # encrypted at rest here whenever this store has a key
                            response.iter_bytes(CHUNK_BYTES),
                            expected_digest=digest,
                            encrypt=blobs.cipher is not None,
                        )
                log.info("fetched blob %s from front end %s", digest, peer.url)
                return True
            except (httpx.HTTPError, IntegrityError, LlmosError) as exc:
                log.warning("fetching blob %s from %s failed: %s", digest, peer.url, exc)
        return False
