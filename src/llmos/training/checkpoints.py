"""Training checkpoints and other intermediate files of a training run: private, encrypted when a key is set, atomic.

Contract: :class:`Checkpoints` owns one directory of ``step-NNNNNNN/state.pt`` checkpoints (fine-tuning, distillation
and Ray training all use it; the state is a ``torch.save`` mapping read back with ``weights_only=True``).

* **Private**: directories are made 0700 and files 0600 whatever the umask (:func:`make_private_dir`,
  :func:`write_private`), so another user of the machine reads nothing, not even while a file is being written.
* **Encrypted** when built with a :class:`~llmos.store.crypto.BlobCipher` (the registry's, i.e. the store's key):
  the state is serialised into memory, encrypted there, and only ciphertext is written; no plaintext copy touches
  the disk, not even briefly. Reading decrypts in memory. Checkpoints written before a key was configured
  (plaintext) still load; an encrypted checkpoint without a key is refused with
  :class:`~llmos.errors.StorageError`.
* **Atomic**: a checkpoint is written under ``.step-NNNNNNN.partial/`` (the file fsynced), renamed into place and
  the directory fsynced; the ``keep`` newest are kept. A failed write (disk full) raises
  :class:`~llmos.errors.StorageError`, removes the partial copy and leaves earlier checkpoints intact.
* **Resume**: :meth:`Checkpoints.load_latest` returns the newest checkpoint that loads (a damaged newest one falls
  back to the one before), or None. If checkpoints exist and none of them decrypts (the key changed), it raises
  :class:`~llmos.errors.IntegrityError` rather than silently starting over.
* **Across processes** (Ray workers): a :class:`Checkpoints` pickles as its directory, ``keep`` and ``reopen``, a
  picklable callable that returns the cipher again in the other process; one with a cipher and no ``reopen``
  refuses to pickle (a key is never serialised by this module).
* :class:`CheckpointStore` is what the training loop needs (``save`` and ``load_latest``); Ray training ranks on
  other machines use a proxy that ships :func:`state_bytes` to the front end, where
  :meth:`Checkpoints.save_serialised` writes them as :meth:`Checkpoints.save` would.
* :meth:`Checkpoints.remove` deletes the directory (the jobs layer calls it when a job succeeds).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from llmos.errors import IntegrityError, StorageError
from llmos.store.crypto import CHUNK, MAGIC, BlobCipher

STATE_FILE = "state.pt"
CipherSource = Callable[[], BlobCipher | None]


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as 0700 directories; an existing one is made 0700 too."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to a new file ``path`` created 0600 (never wider, whatever the umask) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())


def _pieces(view: memoryview) -> Iterator[bytes]:
    for start in range(0, len(view), CHUNK):
        yield bytes(view[start : start + CHUNK])


class Checkpoints:
    """The checkpoints of one training run in ``directory``; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        cipher: BlobCipher | None = None,
        *,
        keep: int = 2,
        reopen: CipherSource | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)
        self._cipher = cipher
        self._reopen = reopen

    @classmethod
    def of(cls, target: Checkpoints | Path) -> Checkpoints:
        """``target`` itself, or plaintext private checkpoints in the directory ``target``."""
        return target if isinstance(target, Checkpoints) else cls(target)

    @property
    def encrypted(self) -> bool:
        return self._cipher is not None

    def __getstate__(self) -> dict[str, Any]:
        if self._cipher is not None and self._reopen is None:
            raise TypeError("encrypted checkpoints cross processes only with a `reopen` that rebuilds the cipher")
        return {"directory": str(self.directory), "keep": self.keep, "reopen": self._reopen}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.directory, self.keep, self._reopen = Path(state["directory"]), int(state["keep"]), state["reopen"]
        self._cipher = self._reopen() if self._reopen is not None else None

    def steps(self) -> list[Path]:
        """The checkpoint directories, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("step-*"))

    # --- writing -------------------------------------------------------------------------------------------------

    def _serialise(self, state: dict[str, Any]) -> Iterator[bytes]:
        buffer = io.BytesIO()
        _torch_save(state, buffer)
        view = buffer.getbuffer()
        try:
            yield from self._encrypted(_pieces(view))
        finally:
            view.release()

    def _encrypted(self, plain: Iterable[bytes]) -> Iterable[bytes]:
        return self._cipher.encrypt(plain) if self._cipher is not None else plain

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` as ``step-NNNNNNN`` atomically; on failure the partial copy is removed, older ones stay."""
        return self._write(step, self._serialise(state))

    def save_serialised(self, step: int, data: bytes) -> Path:
        """:meth:`save` for a state already serialised with :func:`state_bytes` (received from another machine)."""
        return self._write(step, self._encrypted(_pieces(memoryview(data))))

    def _write(self, step: int, chunks: Iterable[bytes]) -> Path:
        make_private_dir(self.directory)
        final = self.directory / f"step-{step:07d}"
        partial = self.directory / f".step-{step:07d}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir(mode=0o700)
            os.chmod(partial, 0o700)
            write_private(partial / STATE_FILE, chunks)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(partial, final)
            _fsync_dir(self.directory)
        except (OSError, RuntimeError) as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise StorageError(f"could not write the checkpoint of step {step}: {exc}") from exc
        for old in self.steps()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    # --- reading -------------------------------------------------------------------------------------------------

    def _read(self, path: Path) -> dict[str, Any]:
        import torch

        with path.open("rb") as handle:
            encrypted = handle.read(len(MAGIC)) == MAGIC
            handle.seek(0)
            if encrypted:
                if self._cipher is None:
                    raise StorageError(
                        f"the checkpoint {path.parent.name} is encrypted; set LLMOS_ENCRYPTION_KEY to resume from it"
                    )
                data = io.BytesIO()
                for chunk in self._cipher.decrypt(handle, f"checkpoint {path.parent.name}"):
                    data.write(chunk)
                data.seek(0)
                state: dict[str, Any] = torch.load(data, map_location="cpu", weights_only=True)
            else:
                state = torch.load(handle, map_location="cpu", weights_only=True)
        return state

    def load_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that loads (a damaged newest one falls back to the one before), or None."""
        undecryptable: IntegrityError | None = None
        for candidate in reversed(self.steps()):
            try:
                return self._read(candidate / STATE_FILE)
            except IntegrityError as exc:
                undecryptable = undecryptable or exc
            except (OSError, RuntimeError, EOFError, ValueError):
                continue
        if undecryptable is not None:
            raise IntegrityError(f"no checkpoint could be resumed: {undecryptable}")
        return None

    def remove(self) -> None:
        """Delete every checkpoint (and the directory)."""
        shutil.rmtree(self.directory, ignore_errors=True)


class CheckpointStore(Protocol):
    """What the training loop needs of a checkpoint store: :class:`Checkpoints`, or a proxy of one on another
    machine (:mod:`llmos.distributed.trainhub`)."""

    def save(self, step: int, state: dict[str, Any]) -> Any: ...

    def load_latest(self) -> dict[str, Any] | None: ...


def _torch_save(state: dict[str, Any], buffer: io.BytesIO) -> None:
    import torch

    torch.save(state, buffer)


def state_bytes(state: dict[str, Any]) -> bytes:
    """A checkpoint state serialised the way :class:`Checkpoints` stores it (before encryption)."""
    buffer = io.BytesIO()
    _torch_save(state, buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes) -> dict[str, Any]:
    """The inverse of :func:`state_bytes` (``weights_only``: tensors and plain containers only)."""
    import torch

    state: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Plaintext private checkpoint in ``directory`` (shorthand for ``Checkpoints(directory, keep=keep).save``)."""
    return Checkpoints(directory, keep=keep).save(step, state)


def load_latest_checkpoint(target: Checkpoints | Path) -> dict[str, Any] | None:
    """The newest checkpoint of ``target`` (a :class:`Checkpoints` or a directory) that loads."""
    return Checkpoints.of(target).load_latest()
