"""`llmos top` end to end: a real server with an admin key, the real CLI in a subprocess; and its pure rendering."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from llmos.cli import human_size
from llmos.cli.top import rates, render, shown_jobs
from llmos.config import Settings
from llmos.registry import sources
from llmos.registry.service import Registry
from llmos.security.service import SecurityService
from tests.helpers import ServerProcess, free_port, run_cli


class World:
    def __init__(self, home: Path, key: str, server: ServerProcess) -> None:
        self.home, self.key, self.server = home, key, server


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A private store (an admin key turns authentication on, so the shared ones stay keyless) and its server."""
    home = tmp_path_factory.mktemp("top") / "home"
    settings = Settings(home=home)
    registry = Registry(settings)
    sources.pull(registry, "smollm2")
    registry.close()
    security = SecurityService(settings)
    security.create_tenant("ops")
    key, _ = security.create_key("ops", "admin")
    security.close()
    server = ServerProcess(home)
    yield World(home, key, server)
    server.stop()


def chat(world: World, max_tokens: int) -> None:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": max_tokens}
    response = httpx.post(
        f"{world.server.base}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {world.key}"},
        timeout=120,
    )
    assert response.status_code == 200, response.text


def runtime_state(world: World) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {world.key}"}
    response = httpx.get(f"{world.server.base}/admin/runtime", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()
    return state


def test_once_shows_the_resident_model_its_memory_and_tokens_per_second(world: World) -> None:
    chat(world, 4)  # smollm2 becomes resident
    runtime = runtime_state(world)
    (model,) = runtime["models"]
    assert runtime["torch_device"] == "cpu" or runtime["torch_device"].startswith("cuda:")
    stop = threading.Event()

    def keep_generating() -> None:
        """Streams answers one after another; leaves (closing its stream) as soon as ``stop`` is set."""
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell a story."}], "stream": True}
        headers = {"Authorization": f"Bearer {world.key}"}
        with httpx.Client(base_url=world.server.base, headers=headers, timeout=120) as client:
            while not stop.is_set():
                with client.stream("POST", "/v1/chat/completions", json={**body, "max_tokens": 64}) as response:
                    for _ in response.iter_lines():
                        if stop.is_set():
                            break

    generators = [threading.Thread(target=keep_generating) for _ in range(2)]  # never both between two requests
    for generator in generators:
        generator.start()
    try:
        before = runtime_state(world)["models"][0]["generated_tokens"]
        result = run_cli(
            world.home, "top", "--once", "--url", world.server.base, "--api-key", world.key, "--interval", "2"
        )
        after = runtime_state(world)["models"][0]["generated_tokens"]
    finally:
        stop.set()
        for generator in generators:
            generator.join(120)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "smollm2:latest" in line)
    assert "llama.cpp" in row
    assert human_size(model["memory"]) in row
    assert f"of {human_size(runtime['budget'])} budget" in result.stdout
    header = next(line for line in result.stdout.splitlines() if "GEN TOK/S" in line)
    generated, prompt = row[header.index("GEN TOK/S") :].split()[:2]
    # computed from two polls at least 2 s apart, inside the window in which the server counted after - before
    # tokens (> 0 is not asserted: on a loaded machine the engine can stall for seconds)
    assert 0 <= float(generated) <= (after - before) / 2, (row, before, after)
    assert float(prompt) >= 0
    assert "(no jobs)" in result.stdout


@pytest.mark.parametrize(
    ("key", "problem"), [("llmos_wrong_key", "rejected the API key"), (None, "requires an API key")]
)
def test_a_bad_or_missing_key_is_one_line(world: World, key: str | None, problem: str) -> None:
    args = ["top", "--once", "--url", world.server.base, "--interval", "0.1"]
    result = run_cli(world.home, *args, *(["--api-key", key] if key else []))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0] and "401" in lines[0], result.stderr


def test_an_unreachable_server_is_one_line_and_exit_1(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli(tmp_path / "home", "top", "--once", "--url", url, "--interval", "0.1")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"no llmos server answers at {url}" in lines[0], result.stderr


# --- the pure parts -------------------------------------------------------------------------------------------------


def snapshot(time: float, generated: int, prompt: int, digest: str = "sha256:aa") -> dict[str, object]:
    model = {"name": "m:latest", "digest": digest, "generated_tokens": generated, "prompt_tokens": prompt}
    return {"time": time, "runtime": {"models": [model]}}


def test_rates_are_counter_deltas_over_poll_time_and_unknown_after_a_reload() -> None:
    first, second = snapshot(10.0, 100, 40), snapshot(12.0, 160, 50)
    assert rates(first, second) == {"m:latest@sha256:aa": {"generated": 30.0, "prompt": 5.0}}
    assert rates(None, second) == {"m:latest@sha256:aa": {"generated": None, "prompt": None}}
    reloaded = snapshot(13.0, 5, 5)  # counters went back: a new instance
    assert rates(second, reloaded)["m:latest@sha256:aa"] == {"generated": None, "prompt": None}
    other_version = snapshot(14.0, 500, 500, digest="sha256:bb")
    assert rates(second, other_version)["m:latest@sha256:bb"]["generated"] is None


def test_render_shows_models_memory_and_job_progress() -> None:
    jobs = [
        {"id": "jq", "kind": "train", "state": "queued", "progress": {}, "result": {}},
        {"id": "jr", "kind": "train", "state": "running", "result": {},
         "progress": {"step": 30, "total": 120, "eta_seconds": 95.0, "metrics": {"loss": 1.23456}}},
        {"id": "je", "kind": "eval", "state": "succeeded", "progress": {"step": 6, "total": 6, "metrics": {}},
         "result": {"model": "m:latest", "metrics": {"perplexity": 25.62, "tokens": 3224}}},
    ]  # fmt: skip
    model = {
        "name": "m:latest", "digest": "sha256:aa", "backend": "llama.cpp", "memory": 987_600_000, "in_flight": 3,
        "pinned": False, "expires_at": 1000.0 + 125, "running": 3, "slots": 16, "waiting": 2,
        "kv_cells_used": 512, "kv_cells_total": 2048,
    }  # fmt: skip
    data = {
        "url": "http://server:8470",
        "wall": 1000.0,
        "runtime": {"budget": 8_000_000_000, "used": 987_600_000, "rss": 1_200_000_000, "models": [model]},
        "jobs": jobs,
        "rates": {"m:latest@sha256:aa": {"generated": 42.5, "prompt": None}},
    }
    console = Console(record=True, width=200, color_system=None)
    console.print(render(data))
    text = console.export_text()
    row = next(line for line in text.splitlines() if "m:latest " in line and "llama.cpp" in line)
    assert re.search(r"987\.6 MB\s+3\s+3/16\s+2\s+512/2048 \(25%\)\s+42\.5\s+-\s+in 2m05s", row), row
    assert "987.6 MB of 8.0 GB budget (12%); server RSS 1.2 GB" in text
    assert "3 running, 2 waiting; 42.5 tok/s generated" in text
    running = next(line for line in text.splitlines() if line.lstrip().startswith("jr "))
    assert "30/120" in running and "1.2346" in running and "1m35s" in running
    assert "m:latest perplexity=25.62" in next(line for line in text.splitlines() if line.lstrip().startswith("je "))
    data["error"] = "no llmos server answers at http://server:8470 (ConnectError)"
    data["jobs"] = None
    console.print(render(data))
    text = console.export_text()
    assert "ConnectError" in text and "jobs: not available" in text


def test_shown_jobs_are_the_active_ones_then_the_newest_others() -> None:
    jobs = [{"id": f"j{i}", "state": "succeeded"} for i in range(8)]
    jobs.insert(6, {"id": "old-running", "state": "running"})
    assert [j["id"] for j in shown_jobs(jobs, recent=3)] == ["old-running", "j0", "j1", "j2"]
