"""Files from the front end to Ray nodes (and back) without a shared file system.

Contract:

* :class:`BlobServer` runs as an actor pinned to the front end's node and streams the plaintext of a blob of the
  front end's store in chunks of at most :data:`CHUNK_BYTES`.
* :func:`fetch_version` runs wherever a version's files are needed (a replica actor, a training rank): it fetches
  every blob the node-local store (:func:`node_store`, in the Ray node's own llmos home) lacks from a
  :class:`BlobServer` (or anything with its ``read`` generator), writes it with the blob store's digest check (a
  corrupt transfer is refused and nothing is kept) and lays the version out under its file names there. The front
  end's files are never opened by path.
* :func:`pieces` and :func:`join_pieces` cut bytes into :data:`CHUNK_BYTES` pieces with a SHA-256 digest and put them
  back together, refusing a result whose digest or size differs (checkpoints and outputs of Ray training travel so).
* Ray is imported inside functions only.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llmos.config import Settings
from llmos.errors import IntegrityError
from llmos.registry.service import Registry, ResolvedModel
from llmos.registry.views import VersionView
from llmos.store.blobs import BlobStore

CHUNK_BYTES = 4 * 1024 * 1024


class BlobServer:
    """Streams plaintext blobs out of the front end's store (runs on the front end's node)."""

    def __init__(self, settings: Settings) -> None:
        self.registry = Registry(settings, maintain=False)

    def read(self, digest: str) -> Iterator[bytes]:
        buffer = bytearray()
        for chunk in self.registry.blobs.read_chunks(digest):
            buffer += chunk
            while len(buffer) >= CHUNK_BYTES:
                yield bytes(buffer[:CHUNK_BYTES])
                del buffer[:CHUNK_BYTES]
        if buffer:
            yield bytes(buffer)


def node_dir() -> Path:
    """This Ray node's own llmos directory (node-local blobs and laid-out models): ``<LLMOS_HOME>/ray/node`` of the
    node (``llmos cluster start|join`` gives the node's processes the home that owns it; a separate directory, so
    that the registry's maintenance of that home never takes these blobs for orphans), else, on a Ray node started
    otherwise, one per node under the system temp dir."""
    import ray

    home = os.environ.get("LLMOS_HOME")
    if home:
        return Path(home).expanduser() / "ray" / "node"
    return Path(tempfile.gettempdir()) / "llmos-ray-nodes" / ray.get_runtime_context().get_node_id()[:16]


def node_store() -> BlobStore:
    root = node_dir()
    return BlobStore(root / "blobs", lock_path=root / "store.lock")


def fetch_version(
    blob_server: Any, view: VersionView, files: list[tuple[str, str]] | None = None
) -> tuple[ResolvedModel, Path, int]:
    """The version's files in this node's store (fetched from ``blob_server`` where missing): the version resolved
    to the node-local blobs, the directory where they appear under their own names, and how many were fetched."""
    import ray

    files = files if files is not None else [(file.path, file.digest) for file in view.files]
    store = node_store()
    fetched = 0
    for _, digest in files:
        if store.exists(digest):
            continue
        chunks = (ray.get(ref) for ref in blob_server.read.options(num_returns="streaming").remote(digest))
        with store.writing():
            store.write_stream(chunks, expected_digest=digest)
        fetched += 1
    resolved = ResolvedModel(view, {path: store.path(digest) for path, digest in files})
    return resolved, resolved.materialize(node_dir() / "models"), fetched


def pieces(data: bytes | memoryview) -> tuple[str, list[bytes]]:
    """``data`` as its SHA-256 (``sha256:...``) and pieces of at most :data:`CHUNK_BYTES`."""
    view = memoryview(data)
    digest = "sha256:" + hashlib.sha256(view).hexdigest()
    return digest, [bytes(view[start : start + CHUNK_BYTES]) for start in range(0, len(view), CHUNK_BYTES)]


def join_pieces(chunks: Iterable[bytes], digest: str, size: int, what: str) -> bytes:
    """The pieces put back together; :class:`~llmos.errors.IntegrityError` if the digest or the size differs."""
    data = b"".join(chunks)
    if len(data) != size or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise IntegrityError(f"{what} arrived damaged ({len(data)} of {size} bytes, or a different digest)")
    return data
