"""Every path verifies what it loads: after one byte of a blob is flipped in place with its mtime put back, `llmos
run`, the SDK and a server that had already loaded the model once all refuse it, naming the damaged file.

Each test works on a private copy of the pulled store (the session fixture is shared and must stay intact).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

import llmos
from llmos.config import Settings
from llmos.errors import ModelUnavailableError
from llmos.formats.detect import inspect_path
from llmos.registry.service import Registry
from llmos.runtime.residency import Residency
from tests.helpers import ServerProcess, run_cli

DAMAGED = r"smollm2:latest cannot be loaded: its file model\.gguf is damaged on disk"


@pytest.fixture
def private(pulled_settings: Settings, tmp_path: Path) -> Settings:
    """A copy of the pulled store (smollm2) this test may damage."""
    home = tmp_path / "home"
    shutil.copytree(pulled_settings.home, home, ignore=shutil.ignore_patterns("models", "tmp", "*.lock"))
    return Settings(home=home)


def blob_of(settings: Settings, name: str = "smollm2") -> Path:
    registry = Registry(settings)
    try:
        return registry.resolve(name).primary_path
    finally:
        registry.close()


def flip_one_byte(path: Path) -> None:
    """Invert one byte in the middle of ``path`` (in place, same inode) and put its access and modification times
    back, so that size, mtime and inode all look unchanged."""
    before = path.stat()
    with path.open("r+b") as handle:
        handle.seek(before.st_size // 2)
        byte = handle.read(1)
        handle.seek(before.st_size // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


def test_run_and_the_sdk_refuse_a_flipped_byte(private: Settings) -> None:
    flip_one_byte(blob_of(private))
    result = run_cli(private.home, "run", "smollm2", "hi", "--max-tokens", "4", timeout=120)
    assert result.returncode == 1, result
    assert result.stdout == ""  # no generated text
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], result.stderr
    assert "smollm2:latest cannot be loaded: its file model.gguf is damaged on disk" in lines[0]
    with pytest.raises(ModelUnavailableError, match=DAMAGED):
        llmos.load_model("smollm2", settings=private)


def test_a_server_that_loaded_the_model_refuses_it_once_damaged(private: Settings) -> None:
    server = ServerProcess(private.home)
    try:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        first = httpx.post(f"{server.base}/v1/chat/completions", json={**body, "keep_alive": 0}, timeout=120)
        assert first.status_code == 200, first.text  # loaded (and verified) once, then unloaded: keep_alive 0
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.base}/admin/runtime", timeout=10).json()["models"]:
            assert time.monotonic() < deadline, "the model was not unloaded after keep_alive 0"
            time.sleep(0.1)
        flip_one_byte(blob_of(private))
        second = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=120)
        assert second.status_code == 503, second.text
        error = second.json()["error"]
        assert "smollm2:latest cannot be loaded: its file model.gguf is damaged on disk" in error["message"]
        assert "choices" not in second.json()
    finally:
        server.stop()


def test_a_damaged_encrypted_blob_is_refused_clearly(tmp_path: Path, smollm2_file: Path) -> None:
    """Encrypted blobs are authenticated by decryption: a flipped ciphertext byte fails it, with the same kind of
    error, on every load (the registry's check and the server's load path alike)."""
    settings = Settings(home=tmp_path / "home", encryption_key=os.urandom(32).hex())
    registry = Registry(settings)
    try:
        registry.import_info(inspect_path(smollm2_file), "secret", encrypt=True)
        resolved = registry.resolve("secret", verify=True)  # intact: decrypts and matches
        assert registry.blobs.is_encrypted(resolved.view.files[0].digest)
        flip_one_byte(resolved.primary_path)
        message = r"secret:latest cannot be loaded: its file model\.gguf is damaged on disk \(it fails decryption"
        with pytest.raises(ModelUnavailableError, match=message):
            registry.resolve("secret", verify=True)
        loads: list[str] = []
        residency = Residency(
            settings,
            registry,
            lambda resolved, _backend: loads.append(resolved.view.name),  # type: ignore[arg-type]
            backend_for=lambda _view: "fake",
            estimator=lambda _view, _backend: 1,
        )
        try:
            with pytest.raises(ModelUnavailableError, match=message):
                residency.lease("secret")
            assert loads == []  # the loader never saw the damaged bytes
        finally:
            residency.close()
    finally:
        registry.close()
