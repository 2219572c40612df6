from __future__ import annotations

import errno
import hashlib
import multiprocessing
from pathlib import Path

import pytest

from llmos.errors import DiskFullError, IntegrityError, InvalidInputError
from llmos.store.blobs import BlobStore, validate_digest


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_write_is_content_addressed_and_deduplicated(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    with store.writing():
        first = store.write_stream([b"hello ", b"world"])
        second = store.write_bytes(b"hello world")
    assert first.digest == second.digest == sha(b"hello world")
    path = store.path(first.digest)
    assert path.read_bytes() == b"hello world"
    assert path.parent.name == first.digest[7:9]
    assert list(store.iter_digests()) == [first.digest]
    assert list(store.tmp_dir.iterdir()) == []


def test_expected_digest_mismatch_stores_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    with pytest.raises(IntegrityError), store.writing():
        store.write_stream([b"abc"], expected_digest=sha(b"abd"))
    assert list(store.iter_digests()) == []
    assert list(store.tmp_dir.iterdir()) == []


def test_disk_full_is_reported_and_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")

    def chunks():
        yield b"a" * 1024
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError), store.writing():
        store.write_stream(chunks())
    assert list(store.iter_digests()) == []
    assert list(store.tmp_dir.iterdir()) == []


def test_rehash_detects_changed_bytes(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    with store.writing():
        info = store.write_bytes(b"original")
    store.path(info.digest).write_bytes(b"tampered")
    assert store.rehash(info.digest) != info.digest


@pytest.mark.parametrize("digest", ["sha256:" + "a" * 63, "sha256:" + "a" * 65, "sha256:" + "A" * 64, "md5:00", ""])
def test_invalid_digests_are_refused(digest: str) -> None:
    with pytest.raises(InvalidInputError):
        validate_digest(digest)


def test_names_that_are_not_digests_are_ignored(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    (store.data_dir / "zz").mkdir()
    (store.data_dir / "zz" / "not-a-digest").write_text("x")
    assert list(store.iter_digests()) == []


def _hold_write_lock(
    root: str, ready: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event
) -> None:
    store = BlobStore(Path(root))
    with store.writing():
        ready.set()
        release.wait(10)


def test_maintenance_waits_for_writers_in_other_processes(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    (store.tmp_dir / "blob-leftover.partial").write_bytes(b"half")
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    writer = multiprocessing.Process(target=_hold_write_lock, args=(str(store.root), ready, release))
    writer.start()
    try:
        assert ready.wait(10)
        with store.maintenance() as acquired:
            assert not acquired  # a live writer may still need its temp file
        assert (store.tmp_dir / "blob-leftover.partial").exists()
    finally:
        release.set()
        writer.join(10)
    with store.maintenance() as acquired:
        assert acquired
        assert store.clean_tmp() == 1
    assert list(store.tmp_dir.iterdir()) == []
