"""The Ray training hub's channel, without Ray: checkpoints and output files in digest-checked pieces.

The hub is a plain class here (Ray only makes it an actor), so the upload/commit protocol, the encryption of what it
writes, the refusal of damaged or incomplete uploads and of output names outside the output directory are checked
in milliseconds. The end-to-end runs are in ``tests/e2e/test_ray_training.py`` and
``tests/e2e/test_multinode_training.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmos.config import Settings
from llmos.distributed import blobs
from llmos.distributed.trainhub import TrainingHub
from llmos.errors import IntegrityError, InvalidInputError
from llmos.store.crypto import MAGIC, BlobCipher
from llmos.training.checkpoints import STATE_FILE, Checkpoints, state_bytes, state_from_bytes

torch = pytest.importorskip("torch")


def make_hub(tmp_path: Path, checkpoints: Checkpoints | None = None, **kw: Any) -> TrainingHub:
    return TrainingHub(
        Settings(home=tmp_path / "home"),
        checkpoints or Checkpoints(tmp_path / "checkpoints"),
        str(tmp_path / "work"),
        str(tmp_path / "output"),
        kw.get("on_step"),
        kw.get("log", print),
    )


def upload(hub: TrainingHub, data: bytes) -> tuple[str, int, str, int]:
    digest, chunks = blobs.pieces(data)
    key = f"k{len(data)}"
    for index, chunk in reversed(list(enumerate(chunks))):  # arrival order does not matter
        hub.upload(key, index, chunk)
    return key, len(chunks), digest, len(data)


def state(step: int) -> dict[str, Any]:
    return {"step": step, "weights": {"w": torch.arange(6.0).reshape(2, 3) * step}, "rng": [torch.zeros(3)]}


def test_a_checkpoint_crosses_in_pieces_and_comes_back_as_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobs, "CHUNK_BYTES", 64)  # many pieces from a small state
    cipher = BlobCipher(bytes(range(32)))
    hub = make_hub(tmp_path, Checkpoints(tmp_path / "checkpoints", cipher))
    assert list(hub.latest_checkpoint()) == [None]
    for step in (10, 20):
        hub.save_checkpoint(*upload(hub, state_bytes(state(step))), step)
    written = tmp_path / "checkpoints" / "step-0000020" / STATE_FILE
    assert written.read_bytes().startswith(MAGIC)  # encrypted by the job's Checkpoints, as a local run's are
    header, *chunks = list(hub.latest_checkpoint())
    assert header["step"] == 20 and len(chunks) > 1
    back = state_from_bytes(blobs.join_pieces(chunks, header["digest"], header["size"], "checkpoint"))
    assert back["step"] == 20 and torch.equal(back["weights"]["w"], state(20)["weights"]["w"])
    assert Checkpoints(tmp_path / "checkpoints", cipher).load_latest()["step"] == 20  # type: ignore[index]


@pytest.mark.parametrize("damage", ["flipped", "missing"])
def test_a_damaged_or_incomplete_upload_is_refused_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setattr(blobs, "CHUNK_BYTES", 64)
    hub = make_hub(tmp_path)
    key, count, digest, size = upload(hub, state_bytes(state(10)))
    if damage == "flipped":
        piece = hub._uploads[key][1]
        hub._uploads[key][1] = bytes([piece[0] ^ 1]) + piece[1:]
    else:
        del hub._uploads[key][count - 1]
    with pytest.raises(IntegrityError, match="arrived damaged"):
        hub.save_checkpoint(key, count, digest, size, 10)
    assert Checkpoints(tmp_path / "checkpoints").steps() == [] and hub._uploads == {}


def test_output_files_land_privately_under_the_output_directory_only(tmp_path: Path) -> None:
    hub = make_hub(tmp_path)
    hub.save_output(*upload(hub, b"weights"), "model.safetensors")
    hub.save_output(*upload(hub, b"{}"), "sub/config.json")
    output = tmp_path / "output"
    assert (output / "model.safetensors").read_bytes() == b"weights" and (output / "sub" / "config.json").exists()
    assert (output / "model.safetensors").stat().st_mode & 0o077 == 0 and output.stat().st_mode & 0o077 == 0
    for bad in ("../escaped", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(InvalidInputError):
            hub.save_output(*upload(hub, b"x"), bad)
    assert not (tmp_path / "escaped").exists()
    assert sorted(p.name for p in output.rglob("*") if p.is_file()) == ["config.json", "model.safetensors"]


def test_records_and_reports_go_to_the_job(tmp_path: Path) -> None:
    steps: list[int] = []
    lines: list[str] = []
    hub = make_hub(tmp_path, on_step=lambda step, total, metrics: steps.append(step) or step >= 2, log=lines.append)
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "partial").write_text("from a worker group that died while uploading")
    assert hub.start() == 1 and hub.start() == 2
    assert not (tmp_path / "output").exists()  # a new worker group uploads the output afresh
    hub.worker(1, {"pid": 42, "node_id": "n", "address": "10.0.0.2"})
    record = json.loads((tmp_path / "work" / "workers" / "rank-1.json").read_text())
    assert record == {"pid": 42, "node_id": "n", "address": "10.0.0.2", "rank": 1}
    assert hub.on_step(1, 5, {}) is False and hub.on_step(2, 5, {}) is True and steps == [1, 2]
    hub.log("hello")
    hub.finish({"steps": 5})
    assert lines == ["hello"] and json.loads((tmp_path / "work" / "result.json").read_text()) == {"steps": 5}
