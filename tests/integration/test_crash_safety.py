"""kill -9 during an import, and a really full disk: the store stays consistent and shows no partial state."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import gguf_bytes, run_cli, store_snapshot

BIG_ELEMENTS = 192 * 1024 * 1024  # one F32 tensor of 768 MiB, stored sparse so the test file costs no disk


def make_big_gguf(path: Path) -> Path:
    header = gguf_bytes(tensors=[("big", (BIG_ELEMENTS,), 0)])
    with path.open("wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + BIG_ELEMENTS * 4)
    return path


def assert_store_consistent(home: Path) -> None:
    """No temp leftovers, every blob is referenced and intact, every referenced blob exists."""
    assert list((home / "blobs" / "tmp").iterdir()) == []
    on_disk = {f"sha256:{p.name}": p for p in (home / "blobs" / "sha256").rglob("*") if p.is_file()}
    with sqlite3.connect(home / "llmos.db") as conn:
        referenced = {row[0] for row in conn.execute("SELECT blob_digest FROM version_files")}
        orphan_versions = conn.execute(
            "SELECT count(*) FROM model_versions v"
            " WHERE NOT EXISTS (SELECT 1 FROM version_files f WHERE f.version_id = v.id)"
        ).fetchone()[0]
        empty_models = conn.execute(
            "SELECT count(*) FROM models m WHERE NOT EXISTS (SELECT 1 FROM model_versions v WHERE v.model_id = m.id)"
        ).fetchone()[0]
    assert set(on_disk) == referenced
    assert orphan_versions == 0 and empty_models == 0
    for digest, path in on_disk.items():
        hasher = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 22), b""):
                hasher.update(chunk)
        assert f"sha256:{hasher.hexdigest()}" == digest


@pytest.mark.parametrize("delay", [0.0, 0.3, 0.8, 1.6])
def test_kill_9_during_import_leaves_no_partial_state(home: Path, tmp_path: Path, delay: float) -> None:
    seed = tmp_path / "seed.gguf"
    seed.write_bytes(gguf_bytes())
    assert run_cli(home, "import", str(seed), "--name", "seed").returncode == 0
    big = make_big_gguf(tmp_path / "big.gguf")

    env = {**os.environ, "LLMOS_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmos", "import", str(big), "--name", "victim"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tmp_dir = home / "blobs" / "tmp"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None and not any(tmp_dir.iterdir()):
        time.sleep(0.005)  # wait until the import is writing its blob
    time.sleep(delay)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)

    listed = run_cli(home, "list", "--json")  # the next command
    assert listed.returncode == 0, listed.stderr
    names = {entry["name"] for entry in json.loads(listed.stdout)}
    assert "seed:latest" in names
    if killed:
        # either the kill came after the commit (the model is complete) or before it (no trace of it)
        assert names in ({"seed:latest"}, {"seed:latest", "victim:latest"})
        if delay == 0.0:  # killed while the blob was still being written: it cannot have been registered
            assert names == {"seed:latest"}
    assert_store_consistent(home)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, when this process may mount one (root in CI); the test is skipped otherwise."""
    mount_point = tmp_path / "tiny-disk"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)], capture_output=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_during_import_changes_nothing(tiny_disk: Path, tmp_path: Path) -> None:
    home = tiny_disk / "home"
    seed = tmp_path / "seed.gguf"
    seed.write_bytes(gguf_bytes())
    assert run_cli(home, "import", str(seed), "--name", "seed").returncode == 0
    big = tmp_path / "big.gguf"
    big.write_bytes(gguf_bytes(tensors=[("t", (4 * 1024 * 1024,), 0)]))  # 16 MiB of real bytes
    before = store_snapshot(home)
    result = run_cli(home, "import", str(big), "--name", "victim")
    assert result.returncode == 1
    assert "no space left" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert store_snapshot(home) == before
    assert run_cli(home, "verify").returncode == 0
