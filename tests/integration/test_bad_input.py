"""Every bad input gets one clear line on stderr, a non-zero exit, and leaves the store exactly as it was."""

from __future__ import annotations

import errno
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from llmos.config import Settings
from llmos.errors import DiskFullError
from llmos.registry.service import Registry
from tests.helpers import gguf_bytes, run_cli, store_snapshot

BadFile = Callable[[Path, Path], Path]


def _truncated_real(tmp: Path, real: Path) -> Path:
    with real.open("rb") as handle:
        (tmp / "truncated.gguf").write_bytes(handle.read(1024 * 1024))
    return tmp / "truncated.gguf"


def _write(name: str, data: bytes) -> BadFile:
    def make(tmp: Path, _real: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return make


def _absurd_string() -> bytes:
    data = bytearray(gguf_bytes(metadata={"general.name": "x"}))
    at = 4 + 4 + 8 + 8 + 8 + len("general.name") + 4
    data[at : at + 8] = struct.pack("<Q", 2**62)
    return bytes(data)


BAD_FILES: dict[str, tuple[BadFile, str]] = {
    "truncated-gguf": (_truncated_real, "not a valid GGUF file"),
    "magic-only": (_write("magic.gguf", b"GGUF"), "not a valid GGUF file"),
    "absurd-tensor-count": (_write("count.gguf", gguf_bytes(n_tensors_override=2**60)), "tensors"),
    "absurd-string-length": (_write("string.gguf", _absurd_string()), "claims"),
    "not-a-model": (_write("readme.txt", b"hello, this is not a model\n" * 100), "unrecognised model format"),
    "safetensors-header-too-long": (
        _write("x.safetensors", struct.pack("<Q", 2**40) + b'{"w": {}}'),
        "exceeds the file",
    ),
    "pickle-bin": (_write("pytorch_model.bin", pickle.dumps({"w": 1})), "arbitrary code"),
    "pickle-pt": (_write("model.pt", pickle.dumps({"w": 1})), "arbitrary code"),
    "missing-file": (lambda tmp, _r: tmp / "does-not-exist.gguf", "no such file"),
}


@pytest.fixture
def seeded_home(home: Path, tmp_path: Path) -> Path:
    """A store that already holds a model, so 'unchanged' is a meaningful check."""
    model = tmp_path / "seed.gguf"
    model.write_bytes(gguf_bytes())
    assert run_cli(home, "import", str(model), "--name", "seed").returncode == 0
    return home


def assert_clean_failure(result: object, fragment: str) -> None:
    assert result.returncode != 0  # type: ignore[attr-defined]
    stderr = result.stderr.strip()  # type: ignore[attr-defined]
    assert fragment in stderr, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("error:")
    assert "Traceback" not in stderr


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_are_refused_without_changes(
    case: str, seeded_home: Path, tmp_path: Path, smollm2_file: Path
) -> None:
    make, fragment = BAD_FILES[case]
    path = make(tmp_path, smollm2_file)
    before = store_snapshot(seeded_home)
    result = run_cli(seeded_home, "import", str(path), "--name", "victim")
    assert_clean_failure(result, fragment)
    assert store_snapshot(seeded_home) == before


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("import", "{model}", "--name", "../../x"), "at most one '/'"),
        (("import", "{model}", "--name", "a/../../b"), "at most one '/'"),
        (("import", "{model}", "--name", "x:"), "tag after ':' is empty"),
        (("import", "{model}", "--name", "n" * 300), "300 characters"),
        (("show", "seed@sha256:" + "a" * 63), "64 hex digits"),
        (("show", "seed@sha256:" + "a" * 65), "64 hex digits"),
        (("rm", "seed@sha256:" + "a" * 63), "64 hex digits"),
        (("tag", "seed", "../evil"), "must not contain '..'"),
        (("pull", "../../etc/passwd"), "at most one '/'"),
    ],
)
def test_bad_names_are_refused_without_changes(
    args: tuple[str, ...], fragment: str, seeded_home: Path, tmp_path: Path
) -> None:
    model = tmp_path / "ok.gguf"
    model.write_bytes(gguf_bytes(tensors=[("x", (32,), 0)]))
    before = store_snapshot(seeded_home)
    result = run_cli(seeded_home, *(a.replace("{model}", str(model)) for a in args))
    assert_clean_failure(result, fragment)
    assert store_snapshot(seeded_home) == before


def test_usage_errors_are_one_line_with_exit_2(home: Path) -> None:
    result = run_cli(home, "import", "x.gguf")  # --name missing
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--name" in result.stderr


def test_disk_full_during_import_is_reported_and_changes_nothing(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(settings)
    seed = tmp_path / "seed.gguf"
    seed.write_bytes(gguf_bytes())
    registry.import_path(seed, "seed")
    before = store_snapshot(settings.home)

    model = tmp_path / "new.gguf"
    model.write_bytes(gguf_bytes(tensors=[("t", (64, 64), 0)]))

    def no_space(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("llmos.store.blobs.os.fsync", no_space)
    with pytest.raises(DiskFullError, match="no space left"):
        registry.import_path(model, "victim")
    monkeypatch.undo()
    assert store_snapshot(settings.home) == before
