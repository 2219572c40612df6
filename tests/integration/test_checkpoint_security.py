"""Training checkpoints on encrypted data: ciphertext only, private, gone after success (or kept encrypted on request).

The job test runs a real worker subprocess on a tiny LoRA job while a thread scans the job directory every 20 ms.
"""

from __future__ import annotations

import os
import pickle
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from llmos.config import Settings
from llmos.errors import IntegrityError, StorageError
from llmos.jobs.context import JobContext, StoreCipher
from llmos.jobs.service import JobService
from llmos.registry.datasets import store_rows
from llmos.registry.service import Registry
from llmos.store.crypto import MAGIC, BlobCipher
from llmos.training.checkpoints import Checkpoints, save_checkpoint
from tests.helpers import make_tiny_base, toy_qa_rows

KEY = "a" * 64  # 32 bytes in hex
TORCH_ZIP = b"PK\x03\x04"
JOB = {
    "base": "tiny", "data": "secret", "name": "tiny-secret", "method": "lora", "lr": 0.02, "batch_size": 4,
    "warmup_steps": 1, "max_steps": 8, "checkpoint_every": 1, "eval_every": 100, "seed": 1, "threads": 1,
    "lora_r": 4,
}  # fmt: skip


def plaintext_weights(head: bytes) -> bool:
    """A torch zip archive, or a safetensors file (u64 little-endian header length, then a JSON object)."""
    if head.startswith(TORCH_ZIP):
        return True
    return len(head) >= 9 and 0 < struct.unpack("<Q", head[:8])[0] < 100_000_000 and head[8:9] == b"{"


# --- the checkpoint store itself (in process) ----------------------------------------------------------------------


def test_encrypted_checkpoints_round_trip_hold_no_plaintext_and_refuse_a_wrong_or_missing_key(tmp_path: Path) -> None:
    cipher = BlobCipher(bytes(range(32)))
    store = Checkpoints(tmp_path / "ckpt", cipher)
    weights = {"lora_A": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    for step in (1, 2, 3):
        store.save(step, {"weights": weights, "step": step})
    kept = store.steps()
    assert [p.name for p in kept] == ["step-0000002", "step-0000003"]  # the two newest
    for directory in [store.directory, *kept]:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in [p / "state.pt" for p in kept]:
        data = path.read_bytes()
        assert data.startswith(MAGIC) and TORCH_ZIP not in data and stat.S_IMODE(path.stat().st_mode) == 0o600
    state = store.load_latest()
    assert state is not None and state["step"] == 3 and torch.equal(state["weights"]["lora_A"], weights["lora_A"])

    with pytest.raises(IntegrityError, match="wrong LLMOS_ENCRYPTION_KEY"):
        Checkpoints(store.directory, BlobCipher(bytes(32))).load_latest()  # never silently starts over
    with pytest.raises(StorageError, match="encrypted; set LLMOS_ENCRYPTION_KEY"):
        Checkpoints(store.directory).load_latest()

    newest = kept[-1] / "state.pt"  # a damaged newest one falls back to the one before
    newest.write_bytes(newest.read_bytes()[:-5])
    assert store.load_latest()["step"] == 2  # type: ignore[index]

    save_checkpoint(tmp_path / "old", 7, {"step": 7})  # written before a key was configured: plaintext, still private
    assert stat.S_IMODE((tmp_path / "old" / "step-0000007" / "state.pt").stat().st_mode) == 0o600
    assert Checkpoints(tmp_path / "old", cipher).load_latest() == {"step": 7}


def test_encrypted_checkpoints_cross_processes_only_by_rebuilding_the_cipher(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", encryption_key=KEY)
    source = StoreCipher(settings)
    store = Checkpoints(tmp_path / "ckpt", source(), reopen=source)
    store.save(1, {"step": 1})
    copy = pickle.loads(pickle.dumps(store))  # noqa: S301  (our own bytes: what Ray does to reach its workers)
    assert copy.encrypted and copy.load_latest() == {"step": 1}
    with pytest.raises(TypeError, match="reopen"):
        pickle.dumps(Checkpoints(tmp_path / "ckpt", source()))


# --- a real job ------------------------------------------------------------------------------------------------------


@pytest.fixture
def keyed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    home = tmp_path / "home"
    monkeypatch.setenv("LLMOS_HOME", str(home))
    monkeypatch.setenv("LLMOS_ENCRYPTION_KEY", KEY)  # the worker subprocess reads it from its environment
    settings = Settings(home=home)
    registry = Registry(settings)
    try:
        registry.import_path(make_tiny_base(tmp_path / "base"), "tiny")
        rows = toy_qa_rows(40)
        for i, row in enumerate(rows):
            row["split"] = "validation" if i % 5 == 0 else "train"
        view = store_rows(registry, rows, "secret", operation="import", report={})
        assert all(registry.blobs.is_encrypted(f.digest) for f in view.files)  # an encrypted dataset
    finally:
        registry.close()
    return settings


@dataclass
class Scan:
    """Every file and directory seen under a job directory while it ran, and what was wrong with any of them."""

    root: Path
    checkpoint_files: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def once(self) -> None:
        for folder, dirs, files in os.walk(self.root):
            for name in dirs:
                self._check(Path(folder) / name, 0o700, directory=True)
            for name in files:
                self._check(Path(folder) / name, 0o600, directory=False)

    def _check(self, path: Path, mode: int, *, directory: bool) -> None:
        relative = path.relative_to(self.root)
        try:
            found = stat.S_IMODE(path.lstat().st_mode)
            head = b""
            if not directory:
                with path.open("rb") as handle:
                    head = handle.read(16)
        except FileNotFoundError:  # renamed or removed meanwhile
            return
        if found != mode:
            self.problems.append(f"{relative} is {found:o}")
        if relative.parts[0] == "checkpoints" and not directory:
            self.checkpoint_files.add(str(relative))
            if plaintext_weights(head):
                self.problems.append(f"{relative} is plaintext")
        elif relative.parts[0] != "output" and plaintext_weights(head):
            self.problems.append(f"{relative} is plaintext weights")

    def run(self) -> None:
        while not self.stop.is_set():
            self.once()
            time.sleep(0.02)


def test_a_lora_job_on_an_encrypted_dataset_never_shows_a_plaintext_checkpoint_and_leaves_none(
    keyed: Settings,
) -> None:
    jobs = JobService(keyed)
    job = jobs.create("train", JOB, resource="train")
    scan = Scan(jobs.job_dir(job.id))
    scanner = threading.Thread(target=scan.run, daemon=True)
    scanner.start()
    try:
        assert jobs.dispatch() == [job.id]
        deadline = time.monotonic() + 120
        while jobs.get(job.id).state in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.05)
        deadline = time.monotonic() + 10  # the worker removes them right after recording success, then exits
        while jobs.checkpoint_dir(job.id).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        scan.stop.set()
        scanner.join()
    done = jobs.get(job.id)
    assert done.state == "succeeded", jobs.log_path(job.id).read_text()
    assert any(name.endswith("state.pt") for name in scan.checkpoint_files), scan.checkpoint_files  # seen mid-run
    assert scan.problems == []
    assert not jobs.checkpoint_dir(job.id).exists()  # removed after success
    assert stat.S_IMODE(jobs.job_dir(job.id).stat().st_mode) == 0o700
    assert stat.S_IMODE(jobs.log_path(job.id).stat().st_mode) == 0o600


def test_keep_checkpoints_keeps_them_encrypted(keyed: Settings) -> None:
    from llmos.jobs import worker

    jobs = JobService(keyed)
    job = jobs.create("train", {**JOB, "max_steps": 2, "keep_checkpoints": True}, resource="train")
    with jobs.session() as session, session.begin():  # run the worker in this process (no subprocess start-up)
        from llmos.store.schema import Job

        row = session.get(Job, job.id)
        assert row is not None
        row.state = "running"
    assert worker.run(job.id, keyed) == 0, jobs.log_path(job.id).read_text()
    assert jobs.get(job.id).state == "succeeded"
    kept = sorted(jobs.checkpoint_dir(job.id).glob("step-*/state.pt"))
    assert [p.parent.name for p in kept] == ["step-0000001", "step-0000002"]
    assert all(p.read_bytes().startswith(MAGIC) for p in kept)
    context = JobContext(jobs, jobs.get(job.id), keyed)
    assert context.checkpoints.load_latest()["step"] == 2  # type: ignore[index]
