"""Content-addressed blob store.

Contract:

* A blob lives at ``<root>/sha256/<first 2 hex>/<64 hex>`` and its bytes always hash to its name. Nothing else is
  ever visible under ``sha256/``: writes go to ``<root>/tmp/``, are hashed while streaming, fsynced, checked against
  an expected digest when one is given, and renamed into place (then the directory is fsynced). A writer killed at
  any moment leaves at most a file in ``tmp/``.
* Identical content is stored once: writing bytes that already exist discards the temporary copy.
* Writers hold the store lock *shared* for as long as they write and register blobs (:meth:`writing`);
  maintenance (:meth:`maintenance`) takes it *exclusive* and without waiting, so it never removes a temporary file
  or an unregistered blob that a live writer still needs. A lock held by a killed process is released by the kernel.
* Deleting a blob is the caller's decision (the registry knows references); this module only unlinks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llmos.errors import DiskFullError, IntegrityError, InvalidInputError, StorageError
from llmos.store.crypto import MAGIC, BlobCipher

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK_SIZE = 4 * 1024 * 1024

ProgressCallback = Callable[[int], None]
"""Called with the number of bytes just written."""


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:`` followed by exactly 64 lowercase hex digits, else raise."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise InvalidInputError(
            f"invalid digest {digest!r}: expected 'sha256:' followed by 64 lowercase hex digits", param="digest"
        )
    return digest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left on the device holding the llmos store while {what}")
    return StorageError(f"storage error while {what}: {exc.strerror or exc}")


class BlobStore:
    """Blobs under ``root``; see the module docstring for the guarantees."""

    def __init__(self, root: Path, lock_path: Path | None = None, cipher: BlobCipher | None = None) -> None:
        self.root = root
        self.cipher = cipher
        self.tmp_dir = root / "tmp"
        self.data_dir = root / "sha256"
        self.lock_path = lock_path or (root / "store.lock")
        for directory in (self.root, self.tmp_dir, self.data_dir):
            directory.mkdir(parents=True, exist_ok=True)

    # --- addressing -------------------------------------------------------------------------------------------------

    def path(self, digest: str) -> Path:
        hexpart = validate_digest(digest).split(":", 1)[1]
        return self.data_dir / hexpart[:2] / hexpart

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def open(self, digest: str) -> BinaryIO:
        try:
            return self.path(digest).open("rb")
        except FileNotFoundError as exc:
            raise IntegrityError(f"blob {digest} is missing from the store") from exc

    def iter_digests(self) -> Iterator[str]:
        """Every blob present on disk (names that are not digests are ignored)."""
        if not self.data_dir.is_dir():
            return
        for prefix in sorted(self.data_dir.iterdir()):
            if not prefix.is_dir() or len(prefix.name) != 2:
                continue
            for entry in sorted(prefix.iterdir()):
                digest = f"sha256:{entry.name}"
                if DIGEST_RE.match(digest) and entry.name.startswith(prefix.name):
                    yield digest

    # --- locking ----------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, mode: int, wait_s: float | None) -> Iterator[bool]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = None if wait_s is None else time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    acquired = True
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        acquired = False
                        break
                    time.sleep(0.05)
            try:
                yield acquired
            finally:
                if acquired:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold this while writing blobs and until they are referenced by committed registry rows."""
        with self._lock(fcntl.LOCK_SH, wait_s=None):
            yield

    @contextlib.contextmanager
    def maintenance(self, wait_s: float = 0.0) -> Iterator[bool]:
        """Exclusive access for cleanup; yields False (do nothing) if a writer is active after ``wait_s``."""
        with self._lock(fcntl.LOCK_EX, wait_s=wait_s) as acquired:
            yield acquired

    # --- writing ----------------------------------------------------------------------------------------------------

    def write_stream(
        self,
        chunks: Iterable[bytes],
        *,
        expected_digest: str | None = None,
        progress: ProgressCallback | None = None,
        encrypt: bool = False,
    ) -> BlobInfo:
        """Store the concatenation of ``chunks`` (encrypted at rest if asked). Call inside :meth:`writing`.

        The digest and size are those of the plaintext, whatever is stored.
        """
        if expected_digest is not None:
            validate_digest(expected_digest)
        if encrypt and self.cipher is None:
            raise StorageError("encryption was asked for but no LLMOS_ENCRYPTION_KEY is configured")
        hasher = hashlib.sha256()
        size = 0

        def plaintext() -> Iterator[bytes]:
            nonlocal size
            for chunk in chunks:
                hasher.update(chunk)
                size += len(chunk)
                if progress is not None:
                    progress(len(chunk))
                yield chunk

        try:
            fd, tmp_name = _make_temp(self.tmp_dir)
        except OSError as exc:
            raise _storage_error(exc, "creating a temporary file") from exc
        tmp_path = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                stored = self.cipher.encrypt(plaintext()) if encrypt and self.cipher else plaintext()
                for piece in stored:
                    out.write(piece)
                out.flush()
                os.fsync(out.fileno())
            digest = f"sha256:{hasher.hexdigest()}"
            if expected_digest is not None and digest != expected_digest:
                raise IntegrityError(f"content hashes to {digest}, expected {expected_digest}; nothing was stored")
            final = self.path(digest)
            if final.is_file():
                tmp_path.unlink()
                return BlobInfo(digest, size)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_path, final)
            _fsync_dir(final.parent)
            return BlobInfo(digest, size)
        except OSError as exc:
            tmp_path.unlink(missing_ok=True)
            raise _storage_error(exc, "writing a blob") from exc
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise

    def write_file(
        self,
        source: Path,
        *,
        expected_digest: str | None = None,
        progress: ProgressCallback | None = None,
        encrypt: bool = False,
    ) -> BlobInfo:
        try:
            handle = source.open("rb")
        except OSError as exc:
            raise InvalidInputError(f"cannot read {source}: {exc.strerror or exc}") from exc
        with handle:
            return self.write_stream(
                iter(lambda: handle.read(CHUNK_SIZE), b""),
                expected_digest=expected_digest,
                progress=progress,
                encrypt=encrypt,
            )

    def is_encrypted(self, digest: str) -> bool:
        with self.open(digest) as handle:
            return handle.read(len(MAGIC)) == MAGIC

    def read_chunks(self, digest: str) -> Iterator[bytes]:
        """The plaintext of a blob, decrypting it if it is stored encrypted."""
        with self.open(digest) as handle:
            if handle.read(len(MAGIC)) == MAGIC:
                if self.cipher is None:
                    raise IntegrityError(f"blob {digest} is encrypted; set LLMOS_ENCRYPTION_KEY to read it")
                handle.seek(0)
                yield from self.cipher.decrypt(handle, f"blob {digest}")
                return
            handle.seek(0)
            yield from iter(lambda: handle.read(CHUNK_SIZE), b"")

    def write_bytes(self, data: bytes) -> BlobInfo:
        return self.write_stream([data])

    # --- deleting and checking --------------------------------------------------------------------------------------

    def delete(self, digest: str) -> bool:
        path = self.path(digest)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only succeeds when empty
        return True

    def rehash(self, digest: str) -> str:
        """The digest of the bytes actually on disk for ``digest``."""
        hasher = hashlib.sha256()
        try:
            for chunk in self.read_chunks(digest):
                hasher.update(chunk)
        except IntegrityError:
            return "sha256:undecryptable"
        return f"sha256:{hasher.hexdigest()}"

    def clean_tmp(self) -> int:
        """Remove leftovers of interrupted writes. Call inside :meth:`maintenance`. Returns the count removed."""
        removed = 0
        for entry in self.tmp_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
        return removed


def _make_temp(directory: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix="blob-", suffix=".partial", dir=directory)
