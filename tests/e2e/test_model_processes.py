"""Model processes under `llmos serve`: a crash in one model's process fails that model's requests cleanly and
nothing else; the model comes back on the next request; no process outlives the server.

Real models (SmolLM2 and a byte-different twin of it, so two models with two processes), a real server, real
signals sent to the real model processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import ServerProcess, run_cli

TWIN_NAME = b"Smollm2 135M 8k Lc100K Mix1 Ep2"
PROMPTS = ["Name a colour.", "What is 2 + 2?", "Say hello in French.", "Name a fruit."]


def make_twin(smollm2_file: Path, directory: Path) -> Path:
    """SmolLM2 with one metadata string changed: the same weights under another digest (a second model)."""
    data = bytearray(smollm2_file.read_bytes())
    at = data.find(TWIN_NAME)
    assert at > 0
    data[at : at + 4] = b"Twin"
    path = directory / "twin.gguf"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, smollm2_file: Path) -> Path:
    home = tmp_path_factory.mktemp("processes") / "home"
    assert run_cli(home, "pull", "smollm2").returncode == 0
    twin = make_twin(smollm2_file, home.parent)
    imported = run_cli(home, "import", str(twin), "--name", "twin")
    assert imported.returncode == 0, imported.stderr
    return home


@pytest.fixture(scope="module")
def server(store: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(store, "--model", "smollm2", "--model", "twin")
    yield process
    process.stop()


def runtime(server: ServerProcess) -> dict[str, Any]:
    return dict(httpx.get(f"{server.base}/admin/runtime", timeout=10).json())


def model_pid(server: ServerProcess, name: str) -> int:
    for model in runtime(server)["models"]:
        if model["name"].startswith(name + ":") and model["alive"]:
            return int(model["pid"])
    raise AssertionError(f"{name} is not resident and alive")


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in httpx.get(f"{server.base}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def greedy(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> str:
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens
    )
    return answer.choices[0].message.content or ""


@dataclass
class Stream:
    model: str
    prompt: str
    max_tokens: int
    text: str = ""
    first_token: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    ended_at: float = 0.0

    def run(self, client: openai.OpenAI) -> None:
        try:
            chunks = client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": self.prompt}],
                temperature=0,
                max_tokens=self.max_tokens,
                stream=True,
            )
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    self.text += chunk.choices[0].delta.content
                    self.first_token.set()
        except BaseException as exc:  # the crash ends the stream with an error event, which the client raises
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.first_token.set()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def twin_alone(client: openai.OpenAI) -> list[str]:
    """The twin's greedy answers, one request at a time."""
    return [greedy(client, "twin", prompt, 48) for prompt in PROMPTS]


@pytest.mark.parametrize("sent", [signal.SIGSEGV, signal.SIGKILL, signal.SIGABRT], ids=lambda s: s.name)
def test_a_crashed_model_fails_only_its_own_streams_and_comes_back(
    server: ServerProcess, client: openai.OpenAI, twin_alone: list[str], sent: signal.Signals
) -> None:
    crashes_before = metric(server, "llmos_model_crashes_total", cause=sent.name, model="smollm2:latest")
    restarts_before = metric(server, "llmos_model_restarts_total", model="smollm2:latest")
    victim = model_pid(server, "smollm2")
    doomed = [Stream("smollm2", f"Count from 1 to 400 ({i}).", 1500) for i in range(8)]
    bystanders = [Stream("twin", prompt, 48) for prompt in PROMPTS]
    threads = [threading.Thread(target=s.run, args=(client,)) for s in doomed + bystanders]
    for thread in threads:
        thread.start()
    for stream in doomed:
        assert stream.first_token.wait(60), "a stream of the model to crash never started"
    os.kill(victim, sent)
    killed_at = time.monotonic()
    for thread in threads:
        thread.join(120)

    for stream in doomed:
        assert isinstance(stream.error, openai.APIError), stream.error
        assert "model_crashed" in str(stream.error.body) or "died" in str(stream.error), stream.error
        assert stream.ended_at - killed_at < 1.0, f"a stream ended {stream.ended_at - killed_at:.2f} s after the kill"
    assert [s.error for s in bystanders] == [None] * 4
    assert [s.text for s in bystanders] == twin_alone  # the other model never noticed

    assert httpx.get(f"{server.base}/health", timeout=5).status_code == 200
    ready = httpx.get(f"{server.base}/ready", timeout=5).json()
    assert ready["status"] == "ready"
    assert any(
        c["model"] == "smollm2:latest" and c["signal"] == sent.name for c in ready["checks"]["models"]["crashed"]
    )

    assert "Paris" in greedy(client, "smollm2", "What is the capital of France?", 24)  # restarted on demand
    state = runtime(server)
    smollm2 = next(m for m in state["models"] if m["name"] == "smollm2:latest")
    assert smollm2["alive"] and smollm2["pid"] != victim
    assert smollm2["last_failure"]["pid"] == victim and smollm2["last_failure"]["signal"] == sent.name
    assert state["restarts"]["smollm2:latest"] >= 1
    assert metric(server, "llmos_model_crashes_total", cause=sent.name, model="smollm2:latest") == crashes_before + 1
    assert metric(server, "llmos_model_restarts_total", model="smollm2:latest") == restarts_before + 1
    assert model_pid(server, "twin") != victim


def alive_pids(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie waiting for its reaper has ended)."""
    running = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if "\nState:\tZ" not in status:
            running.append(pid)
    return running


def test_kill_9_of_the_server_leaves_no_model_process_behind(store: Path) -> None:
    first = ServerProcess(store, "--model", "smollm2", "--model", "twin")
    try:
        state = runtime(first)
        pids = [int(m["pid"]) for m in state["models"]] + [int(p) for p in state["zygotes"].values()]
        assert len(pids) == 3 and first.process.pid not in pids  # two models and the llama.cpp zygote
        assert alive_pids(pids) == pids
        first.process.kill()
        first.process.wait(10)
        deadline = time.monotonic() + 10
        while alive_pids(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive_pids(pids) == []
    finally:
        first.stop()
    second = ServerProcess(store, "--model", "smollm2")
    try:
        client = openai.OpenAI(base_url=f"{second.base}/v1", api_key="unused", max_retries=0, timeout=120)
        assert "Paris" in greedy(client, "smollm2", "What is the capital of France?", 24)
    finally:
        second.stop()


def test_a_model_process_that_stops_answering_is_killed_and_its_streams_end(store: Path) -> None:
    server = ServerProcess(store, "--model", "smollm2", env={"LLMOS_MODEL_PROCESS_TIMEOUT_SECONDS": "3"})
    try:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)
        victim = model_pid(server, "smollm2")
        stream = Stream("smollm2", "Count from 1 to 400.", 1500)
        thread = threading.Thread(target=stream.run, args=(client,))
        thread.start()
        assert stream.first_token.wait(60)
        os.kill(victim, signal.SIGSTOP)  # alive, but silent: a deadlock looks like this from outside
        stopped_at = time.monotonic()
        thread.join(30)
        assert isinstance(stream.error, openai.APIError) and "stopped answering" in str(stream.error)
        assert stream.ended_at - stopped_at < 6
        assert "Paris" in greedy(client, "smollm2", "What is the capital of France?", 24)
        assert metric(server, "llmos_model_crashes_total", cause="hang", model="smollm2:latest") == 1
    finally:
        server.stop()


def test_a_fast_path_fault_on_the_first_decode_restarts_on_the_safe_path(
    store: Path, tmp_path: Path, shared_probe_cache: Path
) -> None:
    probes = tmp_path / "probes"  # the fault is recorded as this machine's verdict: keep it out of the shared cache
    shutil.copytree(shared_probe_cache, probes)
    env = {
        "LLMOS_PROBE_CACHE_DIR": str(probes),
        "LLMOS_LLAMACPP_EXTRA_BUFFERS": "1",  # the fast path, whatever this machine's verdict
        "LLMOS_TEST_MODEL_FAULT": "SIGILL@first-decode",  # ... which dies like a faulting AMX kernel
    }
    server = ServerProcess(store, "--model", "smollm2", env=env)
    try:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)
        first = model_pid(server, "smollm2")
        assert "Paris" in greedy(client, "smollm2", "What is the capital of France?", 24)  # no error reached it
        state = runtime(server)
        smollm2 = next(m for m in state["models"] if m["name"] == "smollm2:latest")
        assert smollm2["pid"] != first and smollm2["alive"]
        failure = smollm2["last_failure"]
        assert failure["signal"] == "SIGILL" and "safe path" in failure["recovered"]
        assert state["llamacpp"]["extra_buffers"] is False and "SIGILL" in state["llamacpp"]["reason"]
        assert metric(server, "llmos_model_crashes_total", cause="SIGILL_recovered", model="smollm2:latest") == 1
    finally:
        server.stop()
    doctor = run_cli(store, "doctor", env={"LLMOS_PROBE_CACHE_DIR": str(probes), "LLMOS_LLAMACPP_EXTRA_BUFFERS": None})
    assert "SIGILL on its first decode" in doctor.stdout, doctor.stdout
