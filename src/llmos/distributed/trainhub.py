"""The front end's side of a Ray training run: the one channel between the ranks and the job's llmos directory.

Contract: :class:`TrainingHub` runs as an actor pinned to the driver's node (the front end, which owns the llmos home
and the job's directory); the ranks of :mod:`llmos.distributed.training` reach it through its actor handle and never
open a path of the front end, so the run needs no shared file system, only the Ray cluster.

* **Blobs**: it is a :class:`~llmos.distributed.blobs.BlobServer`, so ranks fetch the base model's blobs from it
  into their node-local store (:func:`~llmos.distributed.blobs.fetch_version`).
* **Checkpoints**: ranks see :class:`HubCheckpoints`, a :class:`~llmos.training.checkpoints.CheckpointStore` whose
  ``save`` serialises the state (:func:`~llmos.training.checkpoints.state_bytes`) and uploads it in pieces of at
  most :data:`~llmos.distributed.blobs.CHUNK_BYTES` with its SHA-256; the hub checks digest and size and writes it
  with the job's :class:`~llmos.training.checkpoints.Checkpoints` (private, encrypted when that holds a cipher,
  atomic; the format of a local run). ``load_latest`` streams the newest checkpoint that loads on the front end
  back in pieces (digest-checked on arrival), so a rank restarted on any node resumes from it.
* **Files** under ``work_dir``, written by the hub: ``workers/rank-N.json`` (each rank's current PID, Ray node id
  and node address), ``starts`` (one line per worker-group start) and ``result.json`` (the
  :class:`~llmos.training.finetune.FinetuneResult` fields, or ``stopped``). The trained output (adapter or full
  model) is uploaded file by file like a checkpoint and written into ``output_dir`` (private; each file replaced
  atomically; emptied at every worker-group start).
* **Reporting**: ``on_step`` and ``log`` (picklable callables of the jobs layer) run in the hub, one call at a time.
* Uploads are keyed by a random id; a piece is kept in memory until its upload is committed or the hub ends.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from llmos.config import Settings
from llmos.distributed.blobs import BlobServer, join_pieces, pieces
from llmos.errors import InvalidInputError
from llmos.training.checkpoints import (
    Checkpoints,
    make_private_dir,
    state_bytes,
    state_from_bytes,
    write_private,
)
from llmos.training.loop import StepCallback

RESULT_FILE = "result.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class TrainingHub(BlobServer):
    """The actor on the front end's node; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        checkpoints: Checkpoints,
        work_dir: str,
        output_dir: str,
        on_step: StepCallback | None,
        log: Callable[[str], None],
    ) -> None:
        super().__init__(settings)
        self.checkpoints = checkpoints
        self.work_dir, self.output_dir = Path(work_dir), Path(output_dir)
        self._on_step, self._log = on_step, log
        self._uploads: dict[str, dict[int, bytes]] = {}
        self._lock = threading.Lock()  # uploads and files
        self._report = threading.Lock()  # on_step and log, one at a time

    def node(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    # --- records -----------------------------------------------------------------------------------------------------

    def start(self) -> int:
        """A worker group starts (called by rank 0): record it, drop a partial output; returns the start number."""
        with self._lock:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            with (self.work_dir / "starts").open("a") as handle:
                handle.write(f"{time.time():.3f}\n")
            shutil.rmtree(self.output_dir, ignore_errors=True)
            return len((self.work_dir / "starts").read_text().splitlines())

    def worker(self, rank: int, record: dict[str, Any]) -> None:
        write_json(self.work_dir / "workers" / f"rank-{int(rank)}.json", {**record, "rank": int(rank)})

    def finish(self, outcome: dict[str, Any]) -> None:
        write_json(self.work_dir / RESULT_FILE, outcome)

    def log(self, message: str) -> None:
        with self._report:
            self._log(message)

    def on_step(self, step: int, total: int, metrics: dict[str, float]) -> bool:
        if self._on_step is None:
            return False
        with self._report:
            return bool(self._on_step(step, total, metrics))

    # --- uploads -----------------------------------------------------------------------------------------------------

    def upload(self, key: str, index: int, data: bytes) -> None:
        with self._lock:
            self._uploads.setdefault(key, {})[int(index)] = data

    def _take(self, key: str, count: int, digest: str, size: int, what: str) -> bytes:
        with self._lock:
            parts = self._uploads.pop(key, {})
        return join_pieces((parts.get(i, b"") for i in range(count)), digest, size, what)

    def save_checkpoint(self, key: str, count: int, digest: str, size: int, step: int) -> None:
        data = self._take(key, count, digest, size, f"the checkpoint of step {step}")
        with self._lock:
            self.checkpoints.save_serialised(int(step), data)

    def latest_checkpoint(self) -> Iterator[Any]:
        """A header (``None`` without a checkpoint; else digest, size and step), then the serialised state."""
        with self._lock:
            state = self.checkpoints.load_latest()
        if state is None:
            yield None
            return
        digest, chunks = pieces(state_bytes(state))
        yield {"digest": digest, "size": sum(len(c) for c in chunks), "step": int(state["step"])}
        for chunk in chunks:  # noqa: UP028 (Ray calls `send` on a delegated iterator, which a list lacks)
            yield chunk

    def save_output(self, key: str, count: int, digest: str, size: int, relative: str) -> None:
        path = PurePosixPath(relative)
        if path.is_absolute() or not path.parts or any(part in ("", ".", "..") for part in path.parts):
            raise InvalidInputError(f"an output file name must stay inside the output directory: {relative!r}")
        data = self._take(key, count, digest, size, f"the output file {relative}")
        with self._lock:
            target = self.output_dir.joinpath(*path.parts)
            make_private_dir(target.parent)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            write_private(tmp, [data])
            os.replace(tmp, target)


# --- the ranks' side -------------------------------------------------------------------------------------------------


def send(hub: Any, data: bytes) -> tuple[str, int, str, int]:
    """Upload ``data`` to the hub in pieces; returns the key, piece count, digest and size its commit call takes."""
    import ray

    digest, chunks = pieces(data)
    key = uuid.uuid4().hex
    ray.get([hub.upload.remote(key, index, chunk) for index, chunk in enumerate(chunks)])
    return key, len(chunks), digest, len(data)


class HubCheckpoints:
    """The job's checkpoints as a rank on any node sees them: a
    :class:`~llmos.training.checkpoints.CheckpointStore` backed by the hub."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub

    def save(self, step: int, state: dict[str, Any]) -> None:
        import ray

        ray.get(self.hub.save_checkpoint.remote(*send(self.hub, state_bytes(state)), step))

    def load_latest(self) -> dict[str, Any] | None:
        import ray

        refs = iter(self.hub.latest_checkpoint.options(num_returns="streaming").remote())
        header = ray.get(next(refs))
        if header is None:
            return None
        what = f"the checkpoint of step {header['step']}"
        return state_from_bytes(join_pieces((ray.get(ref) for ref in refs), header["digest"], header["size"], what))


def send_directory(hub: Any, directory: Path) -> int:
    """Upload every file under ``directory`` into the hub's output directory; returns the number of files."""
    import ray

    files = sorted(path for path in directory.rglob("*") if path.is_file())
    for path in files:
        relative = path.relative_to(directory).as_posix()
        ray.get(hub.save_output.remote(*send(hub, path.read_bytes()), relative))
    return len(files)
