"""Serving benchmark: llmos against llama-cpp-python's ``llama_cpp.server`` on the same GGUF, in one run.

Contract: :func:`run_benchmark` starts both servers as subprocesses on free loopback ports, checks that both answer
the Paris question correctly, then drives them in turns (never both at once) with the same streaming chat workload
at each concurrency level (distinct prompts, ``max_tokens`` output tokens, greedy), alternating which goes first,
and returns per side and level: aggregate output tok/s, time to first token p50/p95, end-to-end p50/p95, errors,
and for llmos the latency of ``/health`` probed while the streams run. :func:`format_table` prints it with
llmos/peer ratios.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TOPICS = [
    "a lighthouse keeper", "a robot chef", "a lost dragon", "a desert city", "a time traveller", "a river spirit",
    "a mountain village", "an old library", "a sky whale", "a clockwork bird", "a pirate astronomer", "a winter fox",
    "a jazz musician", "a glass forest", "a night market", "a moon garden",
]  # fmt: skip


@dataclass
class RequestResult:
    ok: bool
    tokens: int = 0
    ttft: float = 0.0
    total: float = 0.0
    error: str = ""


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    wall: float
    results: list[RequestResult]
    health_latencies: list[float] = field(default_factory=list)

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    @property
    def errors(self) -> int:
        return len(self.results) - len(self.ok)

    @property
    def throughput(self) -> float:
        return sum(r.tokens for r in self.ok) / self.wall if self.wall else 0.0

    def pct(self, attr: str, q: float) -> float:
        values = sorted(getattr(r, attr) for r in self.ok)
        if not values:
            return float("nan")
        return float(values[min(len(values) - 1, round(q * (len(values) - 1)))])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(
    command: list[str], ready_url: str, env: dict[str, str], log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited with {process.returncode}; see {log_path}")
                try:
                    if httpx.get(ready_url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            else:
                raise RuntimeError(f"server not ready after 180 s; see {log_path}")
            yield process
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


async def one_request(client: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int) -> RequestResult:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    try:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestResult(False, error=f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(False, error=str(chunk["error"].get("message")))
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        tokens += 1
                        if not first:
                            first = time.perf_counter() - started
    except httpx.HTTPError as exc:
        return RequestResult(False, error=type(exc).__name__)
    return RequestResult(True, tokens, first, time.perf_counter() - started)


async def probe_health(base: str, stop: asyncio.Event, latencies: list[float]) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                await client.get(f"{base}/health")
                latencies.append(time.perf_counter() - started)
            except httpx.HTTPError:
                latencies.append(float("inf"))
            await asyncio.sleep(0.25)


async def run_level(
    base: str,
    model: str,
    concurrency: int,
    rounds: int,
    max_tokens: int,
    probe: bool,
    salt: str,
    headers: dict[str, str] | None = None,
) -> LevelResult:
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    results: list[RequestResult] = []
    health: list[float] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits, headers=headers) as client:

        async def client_loop(index: int) -> None:
            for round_ in range(rounds):
                topic = TOPICS[(index + round_) % len(TOPICS)]
                prompt = f"({salt} {index}.{round_}) Write a long, detailed story about {topic}."
                results.append(await one_request(client, base, model, prompt, max_tokens))

        prober = asyncio.create_task(probe_health(base, stop, health)) if probe else None
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        wall = time.perf_counter() - started
        stop.set()
        if prober is not None:
            await prober
    return LevelResult(concurrency, concurrency * rounds, wall, results, health)


def paris_check(base: str, model: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24,
        "temperature": 0.0,
    }
    response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"]).strip()


@dataclass
class SideResult:
    name: str
    answer: str
    levels: list[LevelResult]


def merge(runs: list[LevelResult]) -> LevelResult:
    """Several runs of one level as one: requests pooled, wall time summed (so tok/s is the overall rate)."""
    merged = LevelResult(runs[0].concurrency, sum(r.requests for r in runs), sum(r.wall for r in runs), [])
    for run in runs:
        merged.results.extend(run.results)
        merged.health_latencies.extend(run.health_latencies)
    return merged


def peer_command(gguf: Path, port: int, threads: int, context: int) -> list[str]:
    """llama_cpp.server in its best correct configuration: ChatML (the GGUF's template derails this model's answers)
    and no interruption of running streams by new requests (its default cuts them off), on the CPU path llmos
    chose for this machine (:mod:`llmos.bench.peer_server`)."""
    return [
        sys.executable, "-m", "llmos.bench.peer_server", "--model", str(gguf),
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(context),
        "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_batch", "512",
        "--chat_format", "chatml", "--interrupt_requests", "False",
    ]  # fmt: skip


def run_benchmark(
    model: str, gguf: Path, levels: list[int], max_tokens: int, threads: int, context: int, home: Path | None,
    log_dir: Path, peer: bool = True, repeats: int = 2,
) -> list[SideResult]:  # fmt: skip
    """Start both servers, then for each level drive them in turns (llmos, peer, peer, llmos, ...).

    A server is idle while the other is driven; alternating the order cancels slow drifts of a shared, noisy
    machine, which back-to-back runs would attribute to one side.
    """
    env = {**os.environ}
    if home is not None:
        env["LLMOS_HOME"] = str(home)
    ports = {"llmos": free_port()}
    commands = {"llmos": [sys.executable, "-m", "llmos", "serve", "--model", model, "--port", str(ports["llmos"])]}
    if peer:
        ports["llama_cpp.server"] = free_port()
        commands["llama_cpp.server"] = peer_command(gguf, ports["llama_cpp.server"], threads, context)
    ready = {"llmos": "/ready", "llama_cpp.server": "/v1/models"}
    bases = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    runs: dict[str, dict[int, list[LevelResult]]] = {name: {} for name in bases}
    with ExitStack() as stack:
        for name, command in commands.items():
            stack.enter_context(server(command, bases[name] + ready[name], env, log_dir / f"{name}.log"))
        answers = {name: paris_check(base, model) for name, base in bases.items()}
        for level in levels:
            rounds = 2 if level <= 16 else 1
            for repeat in range(repeats):
                order = list(bases) if repeat % 2 == 0 else list(bases)[::-1]
                for name in order:
                    probe = name == "llmos"
                    result = asyncio.run(
                        run_level(bases[name], model, level, rounds, max_tokens, probe, f"{name}{repeat}")
                    )
                    runs[name].setdefault(level, []).append(result)
                    print(f"  {name}: {level} clients: {result.throughput:.1f} tok/s", file=sys.stderr, flush=True)
    return [SideResult(name, answers[name], [merge(runs[name][level]) for level in levels]) for name in bases]


def format_table(sides: list[SideResult]) -> str:
    lines = []
    for side in sides:
        lines.append(f"{side.name} answers the Paris question with: {side.answer!r}")
    header = (
        f"{'clients':>7} {'server':<17} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9}"
        f" {'E2E p50':>8} {'E2E p95':>8} {'errors':>6}"
    )
    lines += ["", header, "-" * len(header)]
    by_level: dict[int, dict[str, LevelResult]] = {}
    for side in sides:
        for level in side.levels:
            by_level.setdefault(level.concurrency, {})[side.name] = level
            lines.append(
                f"{level.concurrency:>7} {side.name:<17} {level.throughput:>8.1f} {level.pct('ttft', 0.5):>8.2f}s"
                f" {level.pct('ttft', 0.95):>8.2f}s {level.pct('total', 0.5):>7.2f}s {level.pct('total', 0.95):>7.2f}s"
                f" {level.errors:>6}"
            )
    if len(sides) == 2:
        lines += ["", f"{'clients':>7} {'tok/s ratio':>12} {'TTFT p95 ratio':>15}   (llmos / peer)"]
        for concurrency, pair in sorted(by_level.items()):
            ours, theirs = pair.get(sides[0].name), pair.get(sides[1].name)
            if ours and theirs and theirs.throughput:
                ttft_ratio = ours.pct("ttft", 0.95) / theirs.pct("ttft", 0.95)
                lines.append(f"{concurrency:>7} {ours.throughput / theirs.throughput:>12.2f} {ttft_ratio:>15.3f}")
    for level in sides[0].levels:
        if level.health_latencies:
            finite = [h for h in level.health_latencies if h != float("inf")]
            worst = max(level.health_latencies)
            median = statistics.median(finite) if finite else float("nan")
            lines.append(
                f"/health while {level.concurrency} streams decode: median {median * 1000:.1f} ms,"
                f" max {worst * 1000:.1f} ms over {len(level.health_latencies)} probes"
            )
    return "\n".join(lines)
