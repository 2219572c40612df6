"""Observability benchmark: what Prometheus scraping and an open web console cost a busy server.

Contract: :func:`run` registers the model file in a private store under ``work_dir`` with one admin key, starts one
``llmos serve`` on a loopback port and drives it with the serving benchmark's load generator
(:func:`llmos.bench.serving.run_level`: ``clients`` concurrent streaming chat clients, ``rounds`` requests of
``max_tokens`` greedy tokens each). Runs alternate between

* **quiet**: the streams alone, and
* **observed**: the same streams while a background thread puts the HTTP load of Prometheus and of the console's
  runtime page on the server (``GET /metrics`` every ``metrics_every`` seconds, ``GET /admin/runtime`` every
  ``runtime_every`` seconds, both with the admin key, as a browser on another machine would),

in ``pairs`` pairs, the order flipping every pair (quiet, observed, observed, quiet, ...) so a slow drift of a shared
machine does not land on one side. Both runs of a pair send the same prompts (greedy decoding, so the same answers and
the same token counts): answers that end early leave fewer sequences in the batch, which changes tok/s by far more
than the effect measured here. ``rounds`` should be even: the engine hands slots out last-freed first, so the order of
sequence ids in the batch flips with every burst of requests that end together, and llama.cpp decodes a batch of
descending ids about half as fast as an ascending one; with an even number of bursts every run holds as many of one
as of the other (without it, runs alternate between two speeds whatever the side).

It returns report lines: each run's tok/s, the median of each side, their ratio and the cost
``(quiet - observed) / quiet``; the spread of each side (max - min over median) so a reader can tell whether the cost
is larger than the noise, and per run how many cores other processes of the machine kept busy (``/proc/stat`` minus
the server and the benchmark itself: on a shared host it shows which runs were disturbed); the latency of the scrapes
under load; and, as a noise-free complement, the server CPU time one scrape and one runtime poll take (``/proc``,
measured on the idle server after the runs) and what share of one core the observation rate therefore uses.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from llmos.bench.serving import LevelResult, free_port, run_level, server
from llmos.config import Settings
from llmos.registry.service import Registry
from llmos.security.service import SecurityService

BOUND = 0.02
"""The issue's bound on the throughput cost of observation."""


@dataclass
class PollStats:
    """Latencies (seconds) and failures of one polled path."""

    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class Poller:
    """A thread that polls paths of a server on fixed periods until stopped (a context manager)."""

    def __init__(self, base: str, headers: dict[str, str], periods: dict[str, float]) -> None:
        self.base = base
        self.headers = headers
        self.periods = periods
        self.stats = {path: PollStats() for path in periods}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="observability-poller", daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        due = dict.fromkeys(self.periods, time.monotonic())
        with httpx.Client(headers=self.headers, timeout=30) as client:
            while not self._stop.is_set():
                now = time.monotonic()
                for path, period in self.periods.items():
                    if now >= due[path]:
                        self._get(client, path)
                        due[path] += period
                self._stop.wait(max(0.0, min(due.values()) - time.monotonic()))

    def _get(self, client: httpx.Client, path: str) -> None:
        stats = self.stats[path]
        started = time.perf_counter()
        try:
            response = client.get(self.base + path)
            response.read()
        except httpx.HTTPError as exc:
            stats.failures.append(type(exc).__name__)
            return
        if response.status_code != 200:
            stats.failures.append(f"HTTP {response.status_code}")
            return
        stats.latencies.append(time.perf_counter() - started)


def _prepare(home: Path, model: str, gguf: Path) -> str:
    """The model file registered under ``model`` in a private store with one admin key; returns the key."""
    settings = Settings(home=home)
    registry = Registry(settings)
    registry.import_path(gguf, model)
    registry.close()
    security = SecurityService(settings)
    security.create_tenant("bench")
    key, _ = security.create_key("bench", "admin")
    security.close()
    return key


def _server_pid(port: int) -> int | None:
    """The pid of the ``llmos serve`` listening on ``port`` (found by its command line; Linux only)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        pairs = set(itertools.pairwise(args))
        if ("llmos", "serve") in pairs and ("--port", str(port)) in pairs:
            return int(entry.name)
    return None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_request(base: str, headers: dict[str, str], pid: int, path: str, count: int = 200) -> float:
    """Server CPU seconds per ``GET path``, over ``count`` sequential requests on an otherwise idle server."""
    with httpx.Client(headers=headers, timeout=30) as client:
        client.get(base + path).raise_for_status()
        before = _cpu_seconds(pid)
        for _ in range(count):
            client.get(base + path).raise_for_status()
        return (_cpu_seconds(pid) - before) / count


def _busy_seconds() -> float:
    """CPU seconds all processes of the machine have spent so far (``/proc/stat``: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How many cores processes other than the server and this benchmark kept busy while the block ran (or None)."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.cores: float | None = None

    def _sample(self) -> tuple[float, float, float]:
        assert self.server_pid is not None
        return time.monotonic(), _busy_seconds(), _cpu_seconds(self.server_pid) + _cpu_seconds(os.getpid())

    def __enter__(self) -> OtherLoad:
        try:
            self._start = self._sample() if self.server_pid else None
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._start is None:
            return
        try:
            end = self._sample()
        except OSError:
            return
        wall = end[0] - self._start[0]
        if wall > 0:
            self.cores = max(0.0, ((end[1] - self._start[1]) - (end[2] - self._start[2])) / wall)


@dataclass
class Run:
    side: str
    result: LevelResult
    other_cores: float | None


def _spread(values: list[float]) -> float:
    median = statistics.median(values)
    return (max(values) - min(values)) / median if median else float("nan")


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000:.1f}"


def run(
    model: str,
    gguf: Path,
    work_dir: Path,
    *,
    clients: int = 16,
    max_tokens: int = 128,
    rounds: int = 2,
    pairs: int = 3,
    metrics_every: float = 1.0,
    runtime_every: float = 2.0,
) -> list[str]:
    home = work_dir / "home"
    key = _prepare(home, model, gguf)
    headers = {"Authorization": f"Bearer {key}"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    periods = {"/metrics": metrics_every, "/admin/runtime": runtime_every}
    runs: list[Run] = []
    polls: dict[str, PollStats] = {path: PollStats() for path in periods}
    env = {**os.environ, "LLMOS_HOME": str(home)}
    command = [sys.executable, "-m", "llmos", "serve", "--model", model, "--port", str(port)]
    with ExitStack() as stack:
        stack.enter_context(server(command, base + "/ready", env, work_dir / "llmos.log"))  # model loaded
        pid = _server_pid(port)
        asyncio.run(run_level(base, model, clients, 1, 16, False, "warmup", headers))
        for pair in range(pairs):
            for side in ("quiet", "observed") if pair % 2 == 0 else ("observed", "quiet"):
                with ExitStack() as observing:
                    other = observing.enter_context(OtherLoad(pid))
                    poller = observing.enter_context(Poller(base, headers, periods)) if side == "observed" else None
                    result = asyncio.run(  # both sides of a pair send the same prompts (greedy: the same answers)
                        run_level(base, model, clients, rounds, max_tokens, False, f"pair{pair}", headers)
                    )
                if poller is not None:
                    for path, stats in poller.stats.items():
                        polls[path].latencies += stats.latencies
                        polls[path].failures += stats.failures
                runs.append(Run(side, result, other.cores))
                load = f"; other processes used {other.cores:.2f} cores" if other.cores is not None else ""
                print(
                    f"  {side}: {clients} clients: {result.throughput:.1f} tok/s in {result.wall:.1f} s"
                    f" ({result.errors} errors{load})",
                    file=sys.stderr,
                    flush=True,
                )
        cpu = {path: cpu_per_request(base, headers, pid, path) for path in periods} if pid else {}
    return _report(runs, polls, cpu, periods, clients, rounds, max_tokens)


def _report(
    runs: list[Run],
    polls: dict[str, PollStats],
    cpu: dict[str, float],
    periods: dict[str, float],
    clients: int,
    rounds: int,
    max_tokens: int,
) -> list[str]:
    quiet = [r.result.throughput for r in runs if r.side == "quiet"]
    observed = [r.result.throughput for r in runs if r.side == "observed"]
    a, b = statistics.median(quiet), statistics.median(observed)
    cost = (a - b) / a if a else float("nan")
    noise = max(_spread(quiet), _spread(observed))
    pair_costs = ", ".join(f"{(q - o) / q * 100:+.1f}%" for q, o in zip(quiet, observed, strict=True))
    lines = [
        f"{clients} streaming clients x {rounds} request(s) x {max_tokens} tokens per run; observed = /metrics every"
        f" {periods['/metrics']:g} s + /admin/runtime every {periods['/admin/runtime']:g} s (console runtime page)",
        "",
        f"{'run':>3} {'side':<9} {'tokens':>6} {'tok/s':>8} {'wall':>7} {'errors':>6} {'other load':>11}",
    ]
    for index, item in enumerate(runs, 1):
        other = f"{item.other_cores:.2f} cores" if item.other_cores is not None else "-"
        lines.append(
            f"{index:>3} {item.side:<9} {sum(r.tokens for r in item.result.ok):>6}"
            f" {item.result.throughput:>8.1f} {item.result.wall:>6.1f}s"
            f" {item.result.errors:>6} {other:>11}"
        )
    lines += [
        "",
        f"median tok/s: quiet {a:.1f} (spread {_spread(quiet):.1%}), observed {b:.1f} (spread {_spread(observed):.1%})",
        f"observed/quiet: {b / a:.3f}; cost (quiet - observed) / quiet: {cost * 100:+.2f}% (bound {BOUND * 100:.0f}%);"
        f" per pair: {pair_costs}",
    ]
    if noise > BOUND:
        verdict = "within the bound" if cost < BOUND else "over the bound"
        lines.append(
            f"noise: run-to-run spread up to {noise:.1%} is larger than the {BOUND:.0%} bound, so this run alone"
            f" cannot resolve a cost that small (measured cost: {verdict}); 'other load' shows which runs shared"
            " the CPU with other work"
        )
    else:
        lines.append(f"cost {'within' if cost < BOUND else 'OVER'} the {BOUND:.0%} bound (spread {noise:.1%})")
    for path, stats in polls.items():
        failed = f", {len(stats.failures)} failed ({', '.join(sorted(set(stats.failures)))})" if stats.failures else ""
        lines.append(
            f"{path} under load: {len(stats.latencies)} polls, latency median {_ms(stats.latencies, 0.5)} ms,"
            f" p95 {_ms(stats.latencies, 0.95)} ms, max {_ms(stats.latencies, 1.0)} ms{failed}"
        )
    if cpu:
        per_second = sum(cpu[path] / periods[path] for path in periods)
        shown = "; ".join(f"{path} {seconds * 1000:.2f} ms" for path, seconds in cpu.items())
        cores = os.cpu_count() or 1
        lines.append(
            f"server CPU per request (idle server): {shown}; at these rates {per_second * 1000:.1f} ms of CPU per"
            f" second = {per_second:.2%} of one core, {per_second / cores:.2%} of this machine's {cores} cores"
        )
    return lines
