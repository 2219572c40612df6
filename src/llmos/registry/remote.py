"""Push and pull versions between this llmos home and another llmos server over HTTP (``llmos push`` / ``pull``).

Contract: :class:`Remote` talks to one server checked by :func:`llmos.registry.netguard.check_target` (no private or
reserved targets unless allowed; the connection goes to the checked address; redirects are never followed; proxies
from the environment are not used; the API key is sent only to that server). :func:`push` sends a local version:
for each distinct blob it asks the server how much it already has (``GET /v1/registry/uploads/{digest}``), skips
blobs it has completely, resumes partial ones from the received offset, and sends the rest in ``chunk_size`` requests;
it registers the version last (``POST /v1/registry/{kind}``), so the receiver has all or nothing.
:func:`pull` fetches a remote version's transfer document (models first, then datasets: a name is one or the other),
validates it like a receiver would, skips blobs the local store has, downloads the others into
``<home>/transfers/downloads`` resuming partial files with ``Range``, verifies each digest, and registers the version
locally (public, like ``llmos import``) with its lineage; a corrupted blob is discarded and nothing is registered.
Both return a :class:`TransferReport` (what was sent, skipped, resumed). Version ids stay identical on both sides.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from llmos.errors import (
    AuthenticationError,
    BackendUnavailableError,
    ConflictError,
    DiskFullError,
    InvalidInputError,
    InvalidModelFileError,
    LlmosError,
    ModelNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    StorageError,
)
from llmos.formats import safe_json
from llmos.registry.names import parse_ref
from llmos.registry.netguard import Resolver, Target, check_target
from llmos.registry.service import ProgressFactory, Registry
from llmos.registry.transfer import (
    Document,
    Staging,
    TransferFile,
    commit,
    kind_of,
    parse_document,
    read_range,
    version_document,
)

CHUNK = 8 * 1024 * 1024
"""Bytes per upload request: small enough to beat a server's request deadline, large enough to be cheap."""
ChunkFilter = Callable[[str, int, bytes], bytes]
"""``(digest, offset, data) -> data``: sees every chunk before it is sent or written (fault injection in tests; it
may alter the bytes or raise to interrupt the transfer)."""
_ERRORS: dict[int, type[LlmosError]] = {
    400: InvalidInputError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    507: DiskFullError,
}


@dataclass
class TransferReport:
    direction: str
    name: str
    digest: str
    kind: str
    blobs: int = 0
    skipped: int = 0
    """Blobs not transferred because the receiving side already had them."""
    resumed: int = 0
    """Blobs continued from a partial copy left by an interrupted transfer."""
    bytes_transferred: int = 0
    total_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Remote:
    """An HTTP client for one checked llmos server (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        allow_private: bool = False,
        resolve: Resolver | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.target: Target = check_target(url, allow_private=allow_private, resolve=resolve)
        headers = {"host": self.target.host_header, "user-agent": "llmos-transfer"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=self.target.connect_url,
            headers=headers,
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,
            transport=transport,
        )
        self._extensions = {"sni_hostname": self.target.host} if self.target.scheme == "https" else {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, extensions=self._extensions, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        try:
            with self._http.stream(method, path, extensions=self._extensions, **kwargs) as response:
                yield response
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: httpx.HTTPError) -> BackendUnavailableError:
        return BackendUnavailableError(f"no llmos server answers at {self.target.url} ({type(exc).__name__})")

    def parse(self, response: httpx.Response) -> dict[str, Any]:
        """The JSON object ``response`` carries, its nesting bounded (:mod:`llmos.formats.safe_json`)."""
        try:
            data = safe_json.loads(response.content, f"the answer of {self.target.host}")
        except InvalidModelFileError as exc:
            raise BackendUnavailableError(exc.message) from exc
        if not isinstance(data, dict):
            raise BackendUnavailableError(f"the answer of {self.target.host} is not a JSON object")
        return data

    def check(self, response: httpx.Response, *ok: int) -> httpx.Response:
        """``response`` if its status is one of ``ok`` (default 200), else the matching llmos error."""
        if response.status_code in (ok or (200,)):
            return response
        if 300 <= response.status_code < 400:
            raise InvalidInputError(
                f"{self.target.url} answered with a redirect ({response.status_code}); redirects are not followed,"
                " give the server's final URL",
                param="url",
            )
        try:
            error = response.json()["error"]
            message, param = str(error["message"]), error.get("param")
        except Exception:
            message, param = response.text[:200] or response.reason_phrase, None
        error_type = _ERRORS.get(response.status_code)
        text = f"{self.target.host} answered {response.status_code}: {message}"
        if error_type is None:
            raise BackendUnavailableError(text)
        raise error_type(text, param=param if isinstance(param, str) else None)


def _rechunk(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The same bytes in pieces of exactly ``size`` (the last one shorter)."""
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


def _default_target(name: str) -> str:
    ref = parse_ref(name)
    return ref.repository if ref.digest else str(ref)


def push(
    registry: Registry,
    name: str,
    remote: Remote,
    *,
    target: str | None = None,
    progress: ProgressFactory | None = None,
    chunk_size: int = CHUNK,
    chunk_filter: ChunkFilter | None = None,
) -> TransferReport:
    """Send the local version ``name`` to ``remote`` and register it there as ``target`` (default: the same name)."""
    if chunk_size < 1:
        raise InvalidInputError("chunk_size must be positive")
    view = registry.show(name)
    document = version_document(view)
    document["name"] = target or _default_target(name)
    parsed = parse_document(document)  # the receiver will check the same; fail here before sending any byte
    collection = "datasets" if parsed.kind == "dataset" else "models"
    report = TransferReport("push", parsed.name, view.digest, kind_of(view), blobs=len(parsed.blobs))
    for blob in parsed.blobs:
        report.total_bytes += blob.size
        _push_blob(registry, remote, blob, report, progress, chunk_size, chunk_filter)
    response = remote.check(remote.request("POST", f"/v1/registry/{collection}", json=document))
    registered = remote.parse(response)
    if registered.get("digest") != view.digest:
        raise StorageError(f"{remote.target.host} registered {registered.get('digest')} instead of {view.digest}")
    return report


def _push_blob(
    registry: Registry,
    remote: Remote,
    blob: TransferFile,
    report: TransferReport,
    progress: ProgressFactory | None,
    chunk_size: int,
    chunk_filter: ChunkFilter | None,
) -> None:
    path = f"/v1/registry/uploads/{blob.digest}"
    status = remote.parse(remote.check(remote.request("GET", path)))
    if status.get("complete"):
        report.skipped += 1
        return
    offset = int(status.get("offset") or 0)
    if not 0 <= offset <= blob.size:
        raise StorageError(f"{remote.target.host} reports {offset} bytes of a {blob.size}-byte blob")
    if offset:
        report.resumed += 1
    callback = progress(blob.path, blob.size) if progress else None
    if callback and offset:
        callback(offset)
    complete = False
    rest = read_range(registry.blobs, blob.digest, offset) if offset < blob.size else iter([b""])
    pieces = _rechunk(rest, chunk_size) if offset < blob.size else rest  # b"": one request completes and verifies
    for piece in pieces:
        data = chunk_filter(blob.digest, offset, piece) if chunk_filter else piece
        answer = remote.parse(
            remote.check(remote.request("PATCH", path, params={"offset": offset, "size": blob.size}, content=data))
        )
        if int(answer.get("offset", -1)) != offset + len(data):
            raise StorageError(f"{remote.target.host} acknowledged {answer.get('offset')} bytes of {blob.digest}")
        offset += len(data)
        report.bytes_transferred += len(data)
        complete = bool(answer.get("complete"))
        if callback:
            callback(len(data))
    if not complete:
        raise StorageError(f"{remote.target.host} did not accept {blob.digest} as complete")


def fetch_document(remote: Remote, name: str) -> dict[str, Any]:
    """The transfer document of ``name`` on the remote server (a model or a dataset)."""
    parse_ref(name)
    quoted = quote(name, safe="/:@")
    for collection in ("models", "datasets"):
        response = remote.request("GET", f"/v1/registry/{collection}/{quoted}/manifest")
        if response.status_code == 404:
            continue
        return remote.parse(remote.check(response))
    raise ModelNotFoundError(f"{name!r} was not found on {remote.target.url} (or this key may not see it)")


def pull(
    registry: Registry,
    name: str,
    remote: Remote,
    *,
    target: str | None = None,
    progress: ProgressFactory | None = None,
    chunk_filter: ChunkFilter | None = None,
) -> TransferReport:
    """Fetch ``name`` from ``remote`` into the local store as ``target`` (default: the same name)."""
    ref = parse_ref(name)
    local_name = target or _default_target(name)
    parse_ref(local_name)
    document = parse_document(fetch_document(remote, name), name=local_name)
    if ref.digest and document.digest != ref.digest:
        raise InvalidInputError(f"{remote.target.host} sent version {document.digest} for {name}")
    staging = Staging(registry.settings.home / "transfers" / "downloads")
    report = TransferReport("pull", document.name, document.digest, document.kind, blobs=len(document.blobs))
    for blob in document.blobs:
        report.total_bytes += blob.size
        if registry.blobs.exists(blob.digest) or staging.complete(blob.digest) is not None:
            report.skipped += 1
            continue
        _pull_blob(remote, staging, blob, report, progress, chunk_filter)
    view = commit(registry, document, staging, usable=lambda _digest: True)
    report.name = view.name
    return report


def _pull_blob(
    remote: Remote,
    staging: Staging,
    blob: TransferFile,
    report: TransferReport,
    progress: ProgressFactory | None,
    chunk_filter: ChunkFilter | None,
) -> None:
    offset = staging.received(blob.digest)
    if offset > blob.size:
        staging.discard(blob.digest)
        offset = 0
    headers = {"range": f"bytes={offset}-"} if offset else {}
    with remote.stream("GET", f"/v1/registry/blobs/{blob.digest}", headers=headers) as response:
        if response.status_code not in (200, 206):
            response.read()
            remote.check(response)
        if response.status_code == 200 and offset:  # the server ignored the range: start over
            staging.discard(blob.digest)
            offset = 0
        elif response.status_code == 206:
            expected = f"bytes {offset}-{blob.size - 1}/{blob.size}"
            if response.headers.get("content-range") != expected:
                raise StorageError(f"{remote.target.host} answered a resume with the wrong range")
        if offset:
            report.resumed += 1
        callback = progress(blob.path, blob.size) if progress else None
        if callback and offset:
            callback(offset)
        with staging.append(blob.digest, offset, blob.size) as appender:
            position = offset
            try:
                for piece in response.iter_bytes():
                    data = chunk_filter(blob.digest, position, piece) if chunk_filter else piece
                    appender.write(data)
                    position += len(data)
                    report.bytes_transferred += len(data)
                    if callback:
                        callback(len(data))
            except httpx.HTTPError as exc:
                appender.finish()  # keep what arrived; the next pull resumes from there
                raise remote._unreachable(exc) from exc
            if not appender.finish():
                raise StorageError(
                    f"{remote.target.host} sent {position} of {blob.size} bytes of {blob.digest}; run the same"
                    " command again to resume"
                )


__all__ = ["CHUNK", "ChunkFilter", "Document", "Remote", "TransferReport", "fetch_document", "pull", "push"]
