"""Test helpers: a writer for small synthetic GGUF files, and snapshots of a store's complete state."""

from __future__ import annotations

import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

STRING, ARRAY, U32, F32 = 8, 9, 4, 6


def _s(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def gguf_bytes(
    *,
    metadata: dict[str, Any] | None = None,
    tensors: list[tuple[str, tuple[int, ...], int]] | None = None,
    version: int = 3,
    n_tensors_override: int | None = None,
    n_kv_override: int | None = None,
) -> bytes:
    """A GGUF file with string / u32 / string-array metadata and F32 (type 0) tensors filled with zeros."""
    metadata = (
        {"general.architecture": "llama", "llama.context_length": 128, "general.file_type": 0}
        if metadata is None
        else metadata
    )
    tensors = [("token_embd.weight", (8, 4), 0)] if tensors is None else tensors
    body = bytearray(b"GGUF")
    body += struct.pack("<I", version)
    body += struct.pack("<Q", len(tensors) if n_tensors_override is None else n_tensors_override)
    body += struct.pack("<Q", len(metadata) if n_kv_override is None else n_kv_override)
    for key, value in metadata.items():
        body += _s(key)
        if isinstance(value, str):
            body += struct.pack("<I", STRING) + _s(value)
        elif isinstance(value, list):
            body += struct.pack("<I", ARRAY) + struct.pack("<I", STRING) + struct.pack("<Q", len(value))
            for item in value:
                body += _s(item)
        else:
            body += struct.pack("<I", U32) + struct.pack("<I", value)
    offset = 0
    sizes = []
    for name, shape, ggml_type in tensors:
        body += _s(name) + struct.pack("<I", len(shape))
        for dim in shape:
            body += struct.pack("<Q", dim)
        nbytes = 4
        for dim in shape:
            nbytes *= dim
        body += struct.pack("<I", ggml_type) + struct.pack("<Q", offset)
        sizes.append(nbytes)
        offset += -(-nbytes // 32) * 32
    body += b"\0" * (-len(body) % 32)
    for size in sizes:
        if size < 64 * 1024 * 1024:  # absurd shapes get no data: the header alone must be refused
            body += b"\0" * (-(-size // 32) * 32)
    return bytes(body)


def store_snapshot(home: Path) -> dict[str, Any]:
    """Every file under the store (names and sizes, lock files excluded) and every row of every table."""
    files = sorted(
        (str(p.relative_to(home)), p.stat().st_size)
        for p in home.rglob("*")
        if p.is_file() and not p.name.endswith((".lock", "-wal", "-shm", ".db"))
    )
    rows: dict[str, list[Any]] = {}
    db = home / "llmos.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for table in sorted(tables):
                rows[table] = sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)  # noqa: S608
    return {"files": files, "rows": rows}


def run_cli(home: Path, *args: str, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `llmos` CLI in a subprocess against the store at ``home``."""
    env = {**os.environ, "LLMOS_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "llmos", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        input=stdin,
        check=False,
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A real `llmos serve` subprocess on a free loopback port."""

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        import time

        import httpx

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "LLMOS_HOME": str(home), **(env or {})}
        self.log = (home.parent / f"server-{self.port}.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llmos", "serve", "--port", str(self.port), *args],
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited: {self.read_log()}"
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not healthy: {self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


# --- training ----------------------------------------------------------------------------------------------------

CHATML_CHARS = "<|im_start|>user\nassistant\nsystem<|im_end|>\n"


def toy_qa_rows(count: int = 48) -> list[dict[str, object]]:
    """Question/answer rows with a learnable rule: the answer to 'double N?' is 2N."""
    return [{"prompt": f"double {n}?", "completion": f"{2 * n}"} for n in range(count)]


def make_tiny_base(directory: Path, seed: int = 0) -> Path:
    """A tiny randomly initialised Llama (Hugging Face layout, character tokenizer) to fine-tune in tests."""
    from llmos.training.scratch import create_model

    texts = [CHATML_CHARS, "0123456789 double?"]
    model = create_model("gpt", layers=2, d_model=32, heads=2, context=64, texts=texts, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    return directory
