"""Moving a version between llmos homes: the transfer document, staged blobs, and verified registration.

Contract, shared by the receiving server (``llmos.api.transfer``) and the pulling client (``llmos.registry.remote``):

* :func:`version_document` describes a version for transfer: its canonical manifest (whose sha256 is the version
  id), the blobs it names (digest and plaintext size), and the facts the manifest does not hold (chat template,
  tokenizer, details, lineage). :func:`parse_document` never trusts one: it checks types and sizes, that the manifest
  hashes to the claimed digest, that every file path is a safe relative path, and that the manifest rebuilt from the
  document's fields is byte for byte the manifest sent. So the receiver registers the *same* version id or nothing.
  (The tokenizer and details dictionaries are descriptive and not covered by the digest; the chat template is.)
* :class:`Staging` keeps blobs being received *outside* the blob store (``<home>/transfers/...``), so store
  maintenance never removes a half-received blob and an interrupted transfer resumes from the bytes already on
  disk. A blob is appended to ``<hex>.partial`` at an exact offset under an exclusive file lock; when the last byte
  arrives the whole file is hashed and either renamed to ``<hex>`` (complete) or deleted (:class:`InvalidInputError`
  naming the digest mismatch). Staged files untouched for :data:`STAGING_TTL_S` are removed when a new one starts.
* :func:`commit` registers a parsed document: it first checks that every blob is either staged complete or already in
  the store and usable by the caller, then, holding the store lock shared, copies staged blobs into the store with
  digest verification (encrypted at rest by the same rule as a local import) and adds the version with its lineage
  and tag in one transaction. If anything is missing or wrong nothing is registered.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from llmos.errors import ConflictError, InvalidInputError, InvalidModelFileError, LlmosError, StorageError
from llmos.formats import safe_json
from llmos.formats.detect import inspect_path
from llmos.formats.info import ModelFile, ModelFormat, ModelInfo
from llmos.registry.names import ModelRef, parse_ref
from llmos.registry.service import ENCRYPTED_OPERATIONS, MANIFEST_SCHEMA, ParentRef, Registry
from llmos.registry.views import VersionView, canonical_json, version_view
from llmos.store.blobs import CHUNK_SIZE, BlobInfo, BlobStore, validate_digest
from llmos.store.crypto import MAGIC
from llmos.store.schema import Model, ModelVersion, VersionFile

DOCUMENT_SCHEMA = "llmos.transfer.v1"
FORMATS: tuple[ModelFormat, ...] = ("gguf", "safetensors", "hf", "lora", "onnx", "dataset")
KINDS = {"models": "model", "datasets": "dataset"}
STAGING_TTL_S = 7 * 86400
"""Staged blobs nobody touched for this long are removed (an abandoned transfer)."""
MAX_FILES = 1000
MAX_TEXT = 1_000_000


def kind_of(view: VersionView) -> str:
    return "dataset" if view.format == "dataset" else "model"


def version_document(view: VersionView) -> dict[str, Any]:
    """What ``GET /v1/registry/{kind}/{name}/manifest`` returns for a version."""
    return {
        "schema": DOCUMENT_SCHEMA,
        "kind": kind_of(view),
        "name": view.name,
        "digest": view.digest,
        "manifest": view.manifest,
        "format": view.format,
        "architecture": view.architecture,
        "parameter_count": view.parameter_count,
        "quantization": view.quantization,
        "context_length": view.context_length,
        "size": view.size,
        "chat_template": view.chat_template,
        "tokenizer": view.tokenizer,
        "details": view.details,
        "files": [{"path": f.path, "digest": f.digest, "size": f.size} for f in view.files],
        "lineage": [
            {
                "operation": item.operation,
                "parent_digest": item.parent_digest,
                "parent_name": item.parent_name,
                "params": item.params,
            }
            for item in view.lineage
        ],
    }


@dataclass(frozen=True)
class TransferFile:
    path: str
    digest: str
    size: int


@dataclass
class Document:
    """A validated transfer document."""

    name: str
    digest: str
    manifest: str
    info: ModelInfo
    files: list[TransferFile]
    operation: str
    params: dict[str, Any]
    parents: list[ParentRef] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "dataset" if self.info.format == "dataset" else "model"

    @property
    def blobs(self) -> list[TransferFile]:
        """One entry per distinct blob, in manifest order."""
        seen: dict[str, TransferFile] = {}
        for item in self.files:
            seen.setdefault(item.digest, item)
        return list(seen.values())


def _bad(message: str, param: str = "document") -> InvalidInputError:
    return InvalidInputError(f"invalid transfer document: {message}", param=param)


def _opt(data: dict[str, Any], key: str, kind: type, limit: int | None = None) -> Any:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise _bad(f"'{key}' must be {kind.__name__} or null", key)
    if limit is not None and isinstance(value, str) and len(value) > limit:
        raise _bad(f"'{key}' is longer than {limit} characters", key)
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < 2**63:
        raise _bad(f"'{key}' is out of range", key)
    return value


def safe_path(path: Any) -> str:
    """A file path inside a version: relative, ``/``-separated, no ``.``/``..``/empty parts, printable, short."""
    if not isinstance(path, str) or not path or len(path) > 255 or "\\" in path or "\0" in path:
        raise _bad(f"file path {path!r} is not allowed", "files")
    parts = PurePosixPath(path).parts
    if path.startswith("/") or any(p in ("", ".", "..") or not p.isprintable() for p in parts) or len(parts) > 4:
        raise _bad(f"file path {path!r} is not allowed", "files")
    if "/".join(parts) != path:
        raise _bad(f"file path {path!r} is not normalised", "files")
    return path


def _manifest_files(manifest: str) -> list[TransferFile]:
    try:
        parsed = safe_json.loads(manifest, "the manifest")
    except InvalidModelFileError as exc:
        raise _bad(exc.message, "manifest") from exc
    raw = parsed.get("files") if isinstance(parsed, dict) else None
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_FILES:
        raise _bad(f"the manifest must list 1 to {MAX_FILES} files", "manifest")
    files: list[TransferFile] = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("size"), int) or isinstance(item["size"], bool):
            raise _bad("a manifest file entry is malformed", "manifest")
        if item["size"] < 0:
            raise _bad("a file size is negative", "manifest")
        files.append(TransferFile(safe_path(item.get("path")), validate_digest(str(item.get("digest"))), item["size"]))
    if len({f.path for f in files}) != len(files):
        raise _bad("the manifest names a path twice", "manifest")
    return files


def parse_document(data: Any, *, name: str | None = None, kind: str | None = None) -> Document:
    """Validate a transfer document (see the module docstring). ``name`` overrides the name it carries."""
    if not isinstance(data, dict) or data.get("schema") != DOCUMENT_SCHEMA:
        raise _bad(f"expected a JSON object with schema {DOCUMENT_SCHEMA!r}")
    target = name if name is not None else data.get("name")
    if not isinstance(target, str):
        raise _bad("'name' is missing", "name")
    ref = parse_ref(target)
    if ref.digest:
        raise InvalidInputError("register a version under a name with an optional :tag, not a digest", param="name")
    digest = validate_digest(str(data.get("digest")))
    manifest = data.get("manifest")
    if not isinstance(manifest, str) or len(manifest) > MAX_TEXT:
        raise _bad("'manifest' must be a string", "manifest")
    if f"sha256:{hashlib.sha256(manifest.encode('utf-8')).hexdigest()}" != digest:
        raise _bad("the manifest does not hash to the version digest", "manifest")
    fmt = data.get("format")
    if fmt not in FORMATS:
        raise _bad(f"unknown format {fmt!r}", "format")
    if kind is not None and kind != ("dataset" if fmt == "dataset" else "model"):
        raise _bad(f"a {fmt} version cannot be registered as a {kind}", "format")
    tokenizer, details = data.get("tokenizer") or {}, data.get("details") or {}
    if not isinstance(tokenizer, dict) or not isinstance(details, dict):
        raise _bad("'tokenizer' and 'details' must be objects")
    files = _manifest_files(manifest)
    info = ModelInfo(
        format=fmt,
        files=[ModelFile(Path(), f.path, f.size) for f in files],
        architecture=_opt(data, "architecture", str, 128),
        parameter_count=_opt(data, "parameter_count", int),
        quantization=_opt(data, "quantization", str, 64),
        context_length=_opt(data, "context_length", int),
        chat_template=_opt(data, "chat_template", str, MAX_TEXT),
        tokenizer=tokenizer,
        metadata=details,
    )
    if _manifest_bytes(info, files) != manifest.encode("utf-8"):
        raise _bad("the manifest does not match the version's fields", "manifest")
    operation, params, parents = _lineage(data.get("lineage"))
    return Document(str(ref), digest, manifest, info, files, operation, params, parents)


def _manifest_bytes(info: ModelInfo, files: list[TransferFile]) -> bytes:
    """The manifest the registry would write for ``info`` (see ``Registry.add_version``)."""
    entries = [{"path": f.path, "digest": f.digest, "size": f.size} for f in files]
    return canonical_json({"schema": MANIFEST_SCHEMA, **info.manifest_config(), "files": entries})


def _lineage(raw: Any) -> tuple[str, dict[str, Any], list[ParentRef]]:
    """One operation with its parameters and parents (how the registry stores a version's lineage)."""
    if raw in (None, []):
        return "transfer", {}, []
    if not isinstance(raw, list) or len(raw) > 100 or not all(isinstance(item, dict) for item in raw):
        raise _bad("'lineage' must be a list of objects", "lineage")
    operation = raw[0].get("operation")
    params = raw[0].get("params") or {}
    if not isinstance(operation, str) or not 0 < len(operation) <= 32 or not isinstance(params, dict):
        raise _bad("a lineage entry needs an operation (1-32 characters) and params", "lineage")
    parents: list[ParentRef] = []
    for item in raw:
        parent_digest, parent_name = item.get("parent_digest"), item.get("parent_name")
        if parent_digest is None:
            continue
        validate_digest(parent_digest)
        if not isinstance(parent_name, str) or len(parent_name) > 255:
            raise _bad("a lineage parent needs a name", "lineage")
        parents.append(ParentRef(parent_digest, parent_name))
    return operation, params, parents


# --- staging --------------------------------------------------------------------------------------------------------


class Staging:
    """Blobs being received, under ``root`` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _paths(self, digest: str) -> tuple[Path, Path]:
        hexpart = validate_digest(digest).split(":", 1)[1]
        return self.root / hexpart, self.root / f"{hexpart}.partial"

    def complete(self, digest: str) -> Path | None:
        done, _ = self._paths(digest)
        return done if done.is_file() else None

    def received(self, digest: str) -> int:
        """Bytes of ``digest`` on disk so far (its whole size once complete)."""
        done, partial = self._paths(digest)
        for path in (done, partial):
            with contextlib.suppress(FileNotFoundError):
                return path.stat().st_size
        return 0

    def discard(self, digest: str) -> None:
        for path in self._paths(digest):
            path.unlink(missing_ok=True)

    def clean(self, max_age_s: float = STAGING_TTL_S) -> int:
        """Remove staged files older than ``max_age_s``; returns how many."""
        removed = 0
        cutoff = time.time() - max_age_s
        for entry in self.root.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
        return removed

    @contextlib.contextmanager
    def append(self, digest: str, offset: int, size: int) -> Iterator[Appender]:
        """Append bytes of ``digest`` (``size`` bytes in all) from ``offset``; see :class:`Appender`."""
        done, partial = self._paths(digest)
        if size < 0 or offset < 0 or offset > size:
            raise InvalidInputError(f"offset {offset} and size {size} do not fit together", param="offset")
        if done.is_file():
            raise ConflictError(f"blob {digest} is already complete", param="offset")
        if offset == 0 and not partial.exists():
            self.clean()
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise ConflictError(f"blob {digest} is being received by another transfer", param="digest") from exc
            have = os.fstat(fd).st_size
            if have != offset:
                raise ConflictError(
                    f"blob {digest}: {have} bytes are already received, not {offset}; resume from {have}",
                    param="offset",
                )
            os.lseek(fd, offset, os.SEEK_SET)
            with os.fdopen(os.dup(fd), "r+b", buffering=0) as handle:
                yield Appender(self, digest, handle, offset, size, done, partial)
        finally:
            os.close(fd)


class Appender:
    """Writes received bytes; :meth:`finish` verifies the digest once all ``size`` bytes are there."""

    def __init__(
        self, staging: Staging, digest: str, handle: BinaryIO, start: int, size: int, done: Path, partial: Path
    ) -> None:
        self.staging, self.digest, self.handle = staging, digest, handle
        self.start, self.offset, self.size = start, start, size
        self.done, self.partial = done, partial

    def write(self, data: bytes) -> None:
        if self.offset + len(data) > self.size:
            self.handle.truncate(self.start)  # keep what earlier requests delivered, drop this one
            raise InvalidInputError(
                f"blob {self.digest}: more than the declared {self.size} bytes were sent", param="size"
            )
        try:
            self.handle.write(data)
        except OSError as exc:
            self.handle.truncate(self.start)
            raise StorageError(f"cannot stage blob {self.digest}: {exc.strerror or exc}") from exc
        self.offset += len(data)

    def finish(self) -> bool:
        """Flush; when the blob is whole, verify it and mark it complete. Returns whether it is complete."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        if self.offset < self.size:
            return False
        self.handle.seek(0)
        hasher = hashlib.sha256()
        for chunk in iter(lambda: self.handle.read(CHUNK_SIZE), b""):
            hasher.update(chunk)
        actual = f"sha256:{hasher.hexdigest()}"
        if actual != self.digest:
            self.partial.unlink(missing_ok=True)
            raise InvalidInputError(
                f"blob {self.digest} was corrupted in transit: the {self.size} bytes received hash to {actual};"
                " the upload was discarded and nothing was registered",
                param="digest",
            )
        os.replace(self.partial, self.done)
        return True


# --- reading and registering ----------------------------------------------------------------------------------------


def versions_with_blob(registry: Registry, digest: str) -> list[VersionView]:
    """Every registered version that names ``digest`` among its files (to decide who may read the blob)."""
    validate_digest(digest)
    with registry.session() as session:
        versions = session.scalars(
            select(ModelVersion)
            .join(VersionFile, VersionFile.version_id == ModelVersion.id)
            .where(VersionFile.blob_digest == digest)
            .options(
                selectinload(ModelVersion.model).selectinload(Model.tags),
                selectinload(ModelVersion.files),
                selectinload(ModelVersion.lineage),
            )
        ).all()
        return [version_view(v, ModelRef(v.model.namespace, v.model.name).repository, None) for v in versions]


def read_range(blobs: BlobStore, digest: str, start: int) -> Iterator[bytes]:
    """The plaintext of a blob from byte ``start`` on (decrypting and skipping when it is stored encrypted)."""
    with blobs.open(digest) as handle:
        encrypted = handle.read(len(MAGIC)) == MAGIC
        if not encrypted:
            handle.seek(start)
            yield from iter(lambda: handle.read(CHUNK_SIZE), b"")
            return
    skip = start
    for chunk in blobs.read_chunks(digest):
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        yield chunk[skip:]
        skip = 0


def commit(
    registry: Registry,
    document: Document,
    staging: Staging,
    *,
    usable: Callable[[str], bool],
    tenant_id: int | None = None,
) -> VersionView:
    """Register ``document`` once every blob is present and verified (see the module docstring).

    ``usable(digest)`` says whether a blob already in the store may be referenced by this caller (a tenant may not
    claim another tenant's private blob by naming its digest).
    """
    missing = [
        f.digest
        for f in document.blobs
        if staging.complete(f.digest) is None and not (registry.blobs.exists(f.digest) and usable(f.digest))
    ]
    if missing:
        raise InvalidInputError(
            f"{len(missing)} blob(s) of {document.name} were not received ({', '.join(missing[:3])}); upload them"
            " first, nothing was registered",
            param="files",
        )
    for item in document.blobs:  # a blob taken from the store: its size is known here, not taken from the sender
        known = None if staging.complete(item.digest) else _known_size(registry, item.digest)
        if known is not None and known != item.size:
            raise InvalidInputError(f"blob {item.digest} has {known} bytes, the manifest says {item.size}")
    info = _reinspect(registry, document, staging)
    if _manifest_bytes(info, document.files) != document.manifest.encode("utf-8"):
        raise InvalidInputError(f"the details of {document.name} change its manifest; nothing was registered")
    _check_base(registry, info)
    encrypt = registry.blobs.cipher is not None and (
        info.format in ("lora", "dataset") or document.operation in ENCRYPTED_OPERATIONS
    )
    ref = parse_ref(document.name)
    with registry.blobs.writing():
        stored: dict[str, BlobInfo] = {}
        for item in document.blobs:
            staged = staging.complete(item.digest)
            if staged is not None:
                blob = registry.blobs.write_file(staged, expected_digest=item.digest, encrypt=encrypt)
            elif registry.blobs.exists(item.digest):  # checked again now that removal is locked out
                blob = BlobInfo(item.digest, item.size)
            else:
                raise ConflictError(f"blob {item.digest} was removed meanwhile; transfer again", param="files")
            if blob.size != item.size:
                raise InvalidInputError(f"blob {item.digest} has {blob.size} bytes, the manifest says {item.size}")
            stored[item.digest] = blob
        view = registry.add_version(
            ref,
            info,
            [stored[f.digest] for f in document.files],
            operation=document.operation,
            parents=document.parents,
            params=document.params,
            tenant_id=tenant_id,
        )
    if view.digest != document.digest:  # parse_document rebuilt the manifest, so this would be a bug
        raise StorageError(f"registered {view.digest} instead of {document.digest}")
    for item in document.blobs:
        staging.discard(item.digest)
    return view


def _known_size(registry: Registry, digest: str) -> int | None:
    with registry.session() as session:
        return session.scalar(select(VersionFile.size).where(VersionFile.blob_digest == digest).limit(1))


IDENTITY = ("format", "architecture", "parameter_count", "quantization", "context_length")
"""Facts of a model that its files decide; a received version must have the values its files give here."""


def _reinspect(registry: Registry, document: Document, staging: Staging) -> ModelInfo:
    """Inspect the received files as ``llmos import`` would (format checks, allow-listed files only) and return the
    version's info with the tokenizer and details read from them rather than taken from the sender.

    Refuses a version whose files do not give the identity facts and the exact file list its manifest claims.
    """
    claimed = document.info
    if claimed.format == "dataset":
        return claimed
    scratch = registry.settings.home / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="inspect-", dir=scratch) as tmp:
        root = Path(tmp) / "model"
        for item in document.files:
            link = root / item.path
            link.parent.mkdir(parents=True, exist_ok=True)
            staged = staging.complete(item.digest)
            if staged is None and registry.blobs.is_encrypted(item.digest):
                with link.open("wb") as out:  # a private temporary directory, removed right after
                    for chunk in registry.blobs.read_chunks(item.digest):
                        out.write(chunk)
                continue
            source = staged or registry.blobs.path(item.digest)
            try:
                os.link(source, link)
            except OSError:
                shutil.copyfile(source, link)
        target = root if claimed.format in ("hf", "lora") else root / document.files[0].path
        try:
            found = inspect_path(target)
        except InvalidInputError as exc:
            raise InvalidInputError(
                f"the files of {document.name} are not a valid {claimed.format} model: {exc.message}", param="files"
            ) from exc
    checked = [key for key in IDENTITY if not (key == "architecture" and claimed.format == "lora")]
    wrong = [key for key in checked if getattr(found, key) != getattr(claimed, key)]
    if sorted((f.path, f.size) for f in found.files) != sorted((f.path, f.size) for f in document.files):
        wrong.append("files")
    if wrong:
        raise InvalidInputError(
            f"the files of {document.name} do not match its manifest ({', '.join(wrong)}); nothing was registered",
            param="files",
        )
    metadata = dict(found.metadata)
    if claimed.format == "lora":  # bound to its base when it was imported (see Registry.import_path)
        metadata.update({k: claimed.metadata.get(k) for k in ("base_digest", "base_name")})
    return ModelInfo(
        format=claimed.format,
        files=claimed.files,
        architecture=claimed.architecture,
        parameter_count=claimed.parameter_count,
        quantization=claimed.quantization,
        context_length=claimed.context_length,
        chat_template=claimed.chat_template,
        tokenizer=found.tokenizer,
        metadata=metadata,
    )


def _check_base(registry: Registry, info: ModelInfo) -> None:
    """A LoRA adapter runs on its base: the same base version must be registered here first."""
    if info.format != "lora":
        return
    base_digest, base_name = info.metadata.get("base_digest"), info.metadata.get("base_name")
    try:
        registry.show(f"{parse_ref(str(base_name)).repository}@{validate_digest(str(base_digest))}")
    except LlmosError as exc:
        raise InvalidInputError(
            f"the adapter's base model {base_name} ({base_digest}) is not registered here; transfer it first",
            param="base",
        ) from exc
