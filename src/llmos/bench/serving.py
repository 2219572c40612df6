"""Serving benchmark: llmos against llama-cpp-python's ``llama_cpp.server`` on the same GGUF, in one run.

Contract: :func:`run_benchmark` starts the servers (llmos, llmos with its model inside the server process, and the
peer) as subprocesses on free loopback ports, checks that both answer
the Paris question correctly, then drives them in turns (never both at once) with the same streaming chat workload
at each concurrency level (distinct prompts, ``max_tokens`` output tokens, greedy), alternating which goes first,
and returns per side and level: aggregate output tok/s, time to first token p50/p95, end-to-end p50/p95, errors,
and for llmos the latency of ``/health`` probed while the streams run. :func:`format_table` prints it with
llmos/peer ratios.

The other suites that compare the two servers start them through :func:`running_servers` and stream requests
through :func:`stream_chat` (text, time to first token, end time and the usage a server reports).
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
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from llmos.errors import BackendUnavailableError

LLMOS = "llmos"
IN_PROCESS = "llmos-in-process"
"""``llmos serve`` with ``LLMOS_MODEL_PROCESSES=0``: the engine inside the server process (the cost of model
processes is the difference to :data:`LLMOS`)."""
PEER = "llama_cpp.server"
READY_PATHS = {LLMOS: "/ready", IN_PROCESS: "/ready", PEER: "/v1/models"}

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
                    raise BackendUnavailableError(f"server exited with {process.returncode}; see {log_path}")
                try:
                    if httpx.get(ready_url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            else:
                raise BackendUnavailableError(f"server not ready after 180 s; see {log_path}")
            yield process
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@dataclass
class StreamResult:
    """One streamed chat completion as the client saw it (times in seconds from sending the request)."""

    ok: bool
    text: str = ""
    chunks: int = 0
    """Chunks that carried content or tool-call deltas (one per token on servers that stream token by token)."""
    ttft: float = 0.0
    total: float = 0.0
    usage: dict[str, Any] | None = None
    """The usage object of the final chunk, when the server sent one (``stream_options.include_usage``)."""
    error: str = ""

    @property
    def tokens(self) -> int:
        """Completion tokens: the server's count where it reports usage, else the content chunks."""
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return int(self.usage["completion_tokens"])
        return self.chunks

    @property
    def cached_tokens(self) -> int | None:
        """``usage.prompt_tokens_details.cached_tokens`` where the server reports it."""
        details = (self.usage or {}).get("prompt_tokens_details") or {}
        value = details.get("cached_tokens")
        return int(value) if isinstance(value, int) else None

    @property
    def decode_rate(self) -> float:
        """Tokens after the first per second after the first token arrived (0 without two tokens)."""
        span = self.total - self.ttft
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


def chat_body(model: str, messages: list[dict[str, str]], max_tokens: int, **extra: Any) -> dict[str, Any]:
    """A greedy streaming chat request that asks for usage in its last chunk (servers that do not know
    ``stream_options`` ignore it); ``extra`` adds server-specific fields."""
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


def _http_error(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", errors="replace")
    return f"HTTP {status}: {message}" if message else f"HTTP {status}"


def decode_rate(results: list[StreamResult]) -> float:
    """Per-stream decode tok/s of ``results``: tokens after each one's first over the time after its first token,
    summed over the successful ones (NaN when none decoded)."""
    ok = [r for r in results if r.ok and r.tokens > 1]
    span = sum(r.total - r.ttft for r in ok)
    return sum(r.tokens - 1 for r in ok) / span if span > 0 else float("nan")


def error_summary(results: list[StreamResult], limit: int = 3) -> str:
    """The distinct errors of ``results`` with their counts ('' when none failed)."""
    counts: dict[str, int] = {}
    for result in results:
        if not result.ok:
            counts[result.error] = counts.get(result.error, 0) + 1
    shown = [f"{count}x {error}" for error, count in sorted(counts.items(), key=lambda item: -item[1])[:limit]]
    return "; ".join(shown)


async def stream_chat(client: httpx.AsyncClient, base: str, body: dict[str, Any]) -> StreamResult:
    """POST a streaming chat completion and read it to the end."""
    started = time.perf_counter()
    first = 0.0
    parts: list[str] = []
    chunks = 0
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return StreamResult(False, error=_http_error(response.status_code, await response.aread()))
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return StreamResult(False, "".join(parts), chunks, error=str(chunk["error"].get("message")))
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    content = delta.get("content")
                    if content:
                        parts.append(content)
                    if content or delta.get("tool_calls"):  # a tool call's name and argument fragments count too
                        chunks += 1
                        if not first:
                            first = time.perf_counter() - started
    except httpx.HTTPError as exc:
        return StreamResult(False, "".join(parts), chunks, error=type(exc).__name__)
    return StreamResult(True, "".join(parts), chunks, first, time.perf_counter() - started, usage)


async def one_request(client: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int) -> RequestResult:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    result = await stream_chat(client, base, body)
    if not result.ok:
        return RequestResult(False, error=result.error)
    return RequestResult(True, result.chunks, result.ttft, result.total)


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


@contextmanager
def running_servers(
    model: str, gguf: Path, threads: int, context: int, home: Path | None, log_dir: Path, peer: bool = True,
    in_process: bool = False, llmos_env: Mapping[str, str] | None = None,
) -> Iterator[dict[str, str]]:  # fmt: skip
    """``llmos serve --model MODEL`` (with ``home`` as ``LLMOS_HOME`` and ``llmos_env`` added to its environment),
    with ``in_process`` also one whose model runs inside the server process (:data:`IN_PROCESS`), and with ``peer``,
    llama_cpp.server on the same GGUF (:func:`peer_command`), each on a free loopback port and answering; yields their
    base URLs by name (:data:`LLMOS`, :data:`IN_PROCESS`, :data:`PEER`) and stops them all on exit. Logs go to
    ``log_dir/NAME.log``."""
    env = {**os.environ}
    if home is not None:
        env["LLMOS_HOME"] = str(home)
    ports = {LLMOS: free_port()}
    commands = {LLMOS: [sys.executable, "-m", "llmos", "serve", "--model", model, "--port", str(ports[LLMOS])]}
    envs = {LLMOS: {**env, **(llmos_env or {})}}
    if in_process:
        ports[IN_PROCESS] = free_port()
        commands[IN_PROCESS] = [*commands[LLMOS][:-1], str(ports[IN_PROCESS])]
        envs[IN_PROCESS] = {**envs[LLMOS], "LLMOS_MODEL_PROCESSES": "0"}
    if peer:
        ports[PEER] = free_port()
        commands[PEER] = peer_command(gguf, ports[PEER], threads, context)
    bases = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    with ExitStack() as stack:
        for name, command in commands.items():
            side_env = envs.get(name, env)
            stack.enter_context(server(command, bases[name] + READY_PATHS[name], side_env, log_dir / f"{name}.log"))
        yield bases


def run_benchmark(
    model: str, gguf: Path, levels: list[int], max_tokens: int, threads: int, context: int, home: Path | None,
    log_dir: Path, peer: bool = True, repeats: int = 2, in_process: bool = True,
) -> list[SideResult]:  # fmt: skip
    """Start the servers (llmos, with ``in_process`` llmos with its model inside the server process, with ``peer``
    llama_cpp.server), then for each level drive them in turns (llmos, in-process, peer, peer, in-process, llmos...).

    A server is idle while another is driven; alternating the order cancels slow drifts of a shared, noisy
    machine, which back-to-back runs would attribute to one side.
    """
    with running_servers(model, gguf, threads, context, home, log_dir, peer, in_process) as bases:
        runs: dict[str, dict[int, list[LevelResult]]] = {name: {} for name in bases}
        answers = {name: paris_check(base, model) for name, base in bases.items()}
        for level in levels:
            rounds = 2 if level <= 16 else 1
            for repeat in range(repeats):
                order = list(bases) if repeat % 2 == 0 else list(bases)[::-1]
                for name in order:
                    probe = name in (LLMOS, IN_PROCESS)
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
    names = [side.name for side in sides]
    if LLMOS in names and PEER in names:
        lines += ["", f"{'clients':>7} {'tok/s ratio':>12} {'TTFT p95 ratio':>15}   (llmos / peer)"]
        for concurrency, pair in sorted(by_level.items()):
            ours, theirs = pair.get(LLMOS), pair.get(PEER)
            if ours and theirs and theirs.throughput:
                ttft_ratio = ours.pct("ttft", 0.95) / theirs.pct("ttft", 0.95)
                lines.append(f"{concurrency:>7} {ours.throughput / theirs.throughput:>12.2f} {ttft_ratio:>15.3f}")
    if LLMOS in names and IN_PROCESS in names:
        lines += ["", f"{'clients':>7} {'tok/s ratio':>12} {'TTFT p50 diff':>14}   (model processes / in-process)"]
        for concurrency, pair in sorted(by_level.items()):
            ours, inside = pair.get(LLMOS), pair.get(IN_PROCESS)
            if ours and inside and inside.throughput:
                diff_ms = (ours.pct("ttft", 0.5) - inside.pct("ttft", 0.5)) * 1000
                lines.append(f"{concurrency:>7} {ours.throughput / inside.throughput:>12.3f} {diff_ms:>+11.1f} ms")
    for side in sides:
        for level in side.levels if side.name in (LLMOS, IN_PROCESS) else []:
            if level.health_latencies:
                finite = [h for h in level.health_latencies if h != float("inf")]
                worst = max(level.health_latencies)
                median = statistics.median(finite) if finite else float("nan")
                lines.append(
                    f"{side.name} /health while {level.concurrency} streams decode: median {median * 1000:.1f} ms,"
                    f" max {worst * 1000:.1f} ms over {len(level.health_latencies)} probes"
                )
    return "\n".join(lines)
