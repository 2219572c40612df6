"""Test helpers: a writer for small synthetic GGUF files, and snapshots of a store's complete state."""

from __future__ import annotations

import os
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Callable, Mapping
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
    url = os.environ.get("LLMOS_DATABASE_URL")
    if url:  # the store's database is elsewhere (PostgreSQL): every row of every table it has
        return {"files": files, "rows": database_rows(url)}
    if db.exists():
        with sqlite3.connect(db) as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for table in sorted(tables):
                rows[table] = sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)  # noqa: S608
    return {"files": files, "rows": rows}


def database_rows(url: str) -> dict[str, list[Any]]:
    """Every row of every table of the database at ``url``, through SQLAlchemy (any dialect), sorted per table."""
    from sqlalchemy import MetaData

    from llmos.store.db import create_db_engine

    engine = create_db_engine(url)
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as conn:
            return {
                name: sorted((tuple(row) for row in conn.execute(table.select())), key=repr)
                for name, table in sorted(metadata.tables.items())
            }
    finally:
        engine.dispose()


def store_url(home: Path) -> str:
    """The database URL a store at ``home`` uses in this test: LLMOS_DATABASE_URL (PostgreSQL) or its SQLite file."""
    return os.environ.get("LLMOS_DATABASE_URL") or f"sqlite:///{home / 'llmos.db'}"


def store_sql(home: Path, statement: str, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """Run one SQL statement on the store's database (SQLite or PostgreSQL), committed; returns its rows."""
    from sqlalchemy import text

    from llmos.store.db import create_db_engine

    engine = create_db_engine(store_url(home))
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement), dict(params or {}))
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def child_env(home: Path, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment for a child working on the store at ``home``; ``extra`` sets (or, None, removes)."""
    env = {**os.environ, "LLMOS_HOME": str(home), "COLUMNS": "200"}
    for name, value in (extra or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_cli(
    home: Path, *args: str, timeout: float = 300, stdin: str | None = None, env: Mapping[str, str | None] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `llmos` CLI in a subprocess against the store at ``home`` (``env`` as in :func:`child_env`)."""
    return subprocess.run(
        [sys.executable, "-m", "llmos", *args],
        capture_output=True,
        text=True,
        env=child_env(home, env),
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

    def __init__(self, home: Path, *args: str, env: Mapping[str, str | None] | None = None) -> None:

        import httpx

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full_env = child_env(home, env)
        self.log = (home.parent / f"server-{self.port}.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llmos", "serve", "--port", str(self.port), *args],
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready(httpx.get, 120)

    def wait_ready(self, get: Any, timeout: float) -> None:
        """Poll ``/ready`` with ``get`` (httpx.get or a client's get) until it answers 200; fail if the server exits."""
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited: {self.read_log()}"
            try:
                if get(f"{self.base}/ready", timeout=2).status_code == 200:
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


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_bpe_llama(
    directory: Path, *, pre: str = "gpt-2", tied: bool = True, seed: int = 0, init: float = 0.3
) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer (the kind GGUF conversion supports) and a ChatML template.

    ``pre`` picks the pre-tokenizer: ``gpt-2`` (ByteLevel regex), ``smollm`` (single digits, then ByteLevel) or
    ``llama-bpe`` (Llama 3's split regex, then ByteLevel without regex). ``init`` is the weights' standard deviation:
    large enough that attention patterns (and so the rotary layout of q/k) visibly shape the logits.
    """
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from llmos.formats.gguf_write import LLAMA3_SPLIT

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
    steps: dict[str, list[Any]] = {
        "gpt-2": [byte_level],
        "smollm": [pre_tokenizers.Digits(individual_digits=True), byte_level],
        "llama-bpe": [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), byte_level],
    }
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # merges across digits and spaces too,
    backend.decoder = decoders.ByteLevel()  # so that the wrong pre-tokenizer would tokenize differently
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    corpus = [f"double {n}? {2 * n}. The year (19{n:02d}) had 365 days, isn't it?\n" for n in range(60)]
    backend.train_from_iterator([*corpus, "user assistant system Hello, world! Ünïcode ✓"] * 3, trainer)
    backend.pre_tokenizer = steps[pre][0] if len(steps[pre]) == 1 else pre_tokenizers.Sequence(steps[pre])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )  # fmt: skip
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tied, initializer_range=init, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# --- transfer ---------------------------------------------------------------------------------------------------


def make_tiny_hf(directory: Path) -> Path:
    """A Hugging Face model directory made without torch: random safetensors weights (~0.5 MB), config.json and a
    ~300 KB tokenizer.json (three blobs of different sizes, for transfer tests)."""
    import json

    directory.mkdir(parents=True)
    count = 128 * 1024
    header = json.dumps({"w": {"dtype": "F32", "shape": [count], "data_offsets": [0, 4 * count]}}).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + os.urandom(4 * count))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32}
    (directory / "config.json").write_text(json.dumps(config))
    vocab = {os.urandom(8).hex(): n for n in range(12000)}
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    return directory


class StreamsUnderFailure:
    """``count`` streaming chat requests in threads, for killing a replica (or a node) while they run.

    :meth:`wait_started` waits until ``started`` streams produced text; :meth:`kill` runs the kill and records when
    it began and when it was done; :meth:`finish` joins the threads and checks the failover promise: every request
    whose first text came after the kill (it had not started streaming) succeeded, resubmitted if it had to be, and
    every request that failed had streamed text before the kill was done. Between the kill's start and its end (and
    :data:`IN_FLIGHT_SECONDS` after it, for tokens already on their way) a stream may start on the dying replica and
    then be cut: those may end either way.
    """

    IN_FLIGHT_SECONDS = 1.0

    def __init__(self, client: Any, count: int, max_tokens: int) -> None:
        import threading

        self.count = count
        self.first_chunk: dict[int, float] = {}
        self.outcome: dict[int, str] = {}
        self.kill_started = self.kill_done = float("inf")
        self._client, self._max_tokens = client, max_tokens
        self._threads = [threading.Thread(target=self._one, args=(i,)) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def _one(self, index: int) -> None:
        import time

        try:
            stream = self._client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": f"Count from 1 to 30, request {index}."}],
                temperature=0,
                max_tokens=self._max_tokens,
                stream=True,
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    self.first_chunk.setdefault(index, time.monotonic())
            self.outcome[index] = "ok"
        except Exception as exc:  # the client sees the failure of a stream that was cut
            self.outcome[index] = f"error: {type(exc).__name__}: {exc}"

    def wait_started(self, started: int = 2, timeout: float = 120) -> None:
        import time

        deadline = time.monotonic() + timeout
        while len(self.first_chunk) < started and time.monotonic() < deadline:
            time.sleep(0.05)

    def kill(self, kill: Callable[[], None]) -> None:
        """Run ``kill`` (which returns once the victim is dead) and record when it began and ended."""
        import time

        self.kill_started = time.monotonic()
        kill()
        self.kill_done = time.monotonic()

    def finish(self, timeout: float = 300) -> None:
        for thread in self._threads:
            thread.join(timeout)
        assert not any(thread.is_alive() for thread in self._threads)
        settled = self.kill_done + self.IN_FLIGHT_SECONDS
        timeline = {
            i: (self.outcome.get(i), round(self.first_chunk.get(i, float("inf")) - self.kill_started, 2))
            for i in range(self.count)
        }  # (outcome, first text relative to the kill's start) for the messages below
        not_started = [i for i in range(self.count) if self.first_chunk.get(i, float("inf")) > settled]
        assert not_started, f"the kill came too late to test resubmission: {timeline}"
        failed = [i for i in not_started if self.outcome.get(i) != "ok"]
        assert failed == [], f"requests that had not started streaming failed: {timeline}"
        cut = [i for i in range(self.count) if self.outcome.get(i) != "ok"]
        assert all(self.first_chunk.get(i, float("inf")) <= settled for i in cut), timeline  # only running streams


TRAIN_STEPS = 100
TRAIN_ARGS = (
    "--base", "tiny", "--data", "toy", "--max-steps", str(TRAIN_STEPS), "--batch-size", "8", "--lr", "0.003",
    "--warmup-steps", "2", "--checkpoint-every", "10", "--eval-every", "50", "--seed", "3", "--method", "full",
    "--precision", "fp32",
)  # fmt: skip
"""The Ray training tests' job: a full fine-tune of the tiny base on the toy rows, 100 steps."""


def seed_training_store(home: Path, base_dir: Path) -> None:
    """Import the tiny base (``tiny``) and the toy rows with a validation split (``toy``) into the store at ``home``."""
    from llmos.config import Settings
    from llmos.registry.datasets import store_rows
    from llmos.registry.service import Registry

    registry = Registry(Settings(home=home))
    try:
        registry.import_path(make_tiny_base(base_dir), "tiny")
        rows = toy_qa_rows(60)
        for i, row in enumerate(rows):
            row["split"] = "validation" if i % 6 == 0 else "train"
        store_rows(registry, rows, "toy", operation="import", report={})
    finally:
        registry.close()


def train_metrics(home: Path, *args: str, env: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """`llmos train TRAIN_ARGS ARGS --wait` on ``home``; the finished job's metrics."""
    import json

    result = run_cli(home, "train", *TRAIN_ARGS, *args, "--wait", timeout=400, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return dict(json.loads(result.stdout.strip().splitlines()[-1])["metrics"])
