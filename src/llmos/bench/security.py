"""Security benchmark: what authentication, quotas and usage records cost, and whether fair share holds.

Contract: :func:`run` prepares two private stores under ``work_dir`` (the model pulled into each from the
installed package), starts two ``llmos serve`` processes on loopback ports and returns report lines:

* **Cost** at ``clients`` concurrent streaming clients: server *on* (API keys required, every key with a
  requests-per-minute, tokens-per-minute and token-budget limit high enough never to refuse, usage recorded per
  request) against server *off* (no keys, no auth, ``LLMOS_USAGE_RECORDS=0``), driven in turns with alternating
  order; the table gives tok/s of both and the on/off ratio. The in-process cost of the security path per request
  (authenticate + reserve + settle + usage record) is also timed directly, as a noise-free complement.
* **Database**, with ``database_url`` (e.g. a PostgreSQL server): a third server, *on* with its store's database at
  that URL, driven in the same turns; the table adds its tok/s and its ratio to *on* on SQLite (the default store).
* **Fairness** on the *on* server: tenant B's time to first token for sequential requests on an idle server, then
  again while tenant A keeps ``flood`` streams running; the ratio of medians is what the issue bounds (2x).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from llmos.bench.serving import LevelResult, RequestResult, free_port, merge, one_request, run_level, server
from llmos.config import Settings
from llmos.security.principal import Limits
from llmos.security.quotas import QuotaManager
from llmos.security.service import SecurityService

GENEROUS = Limits(requests_per_minute=1_000_000, tokens_per_minute=1_000_000_000, token_budget=10**12)


def _env(home: Path, database_url: str | None) -> dict[str, str]:
    env = {**os.environ, "LLMOS_HOME": str(home)}
    env.pop("LLMOS_DATABASE_URL", None)
    if database_url:
        env["LLMOS_DATABASE_URL"] = database_url
    return env


def _prepare_home(home: Path, model: str, database_url: str | None = None) -> None:
    env = _env(home, database_url)
    subprocess.run([sys.executable, "-m", "llmos", "pull", model], env=env, check=True, capture_output=True)


def _keys(home: Path, database_url: str | None = None) -> dict[str, str]:
    """Tenants a and b with limited developer keys; returns {tenant: key}."""
    security = SecurityService(Settings(home=home, database_url=database_url))
    keys = {}
    for tenant in ("a", "b"):
        security.create_tenant(tenant, limits=GENEROUS)
        keys[tenant], _ = security.create_key(tenant, "developer", limits=GENEROUS)
    security.close()
    return keys


def security_path_cost(home: Path, key: str, iterations: int = 300) -> float:
    """Milliseconds per request spent in authenticate + quota reserve/settle + usage record, in process."""
    settings = Settings(home=home)
    security = SecurityService(settings)
    quotas = QuotaManager(security.scope_usage_since)
    started = time.perf_counter()
    for i in range(iterations):
        caller = security.authenticate(f"Bearer {key}")
        reservation = quotas.reserve(caller, 160)
        quotas.settle(reservation, 150)
        security.record_usage(
            request_id=f"bench-{i}",
            tenant=caller.tenant,
            key_prefix=caller.key_prefix,
            model="bench",
            endpoint="/v1/chat/completions",
            prompt_tokens=30,
            completion_tokens=120,
            latency_ms=1,
            status=200,
        )
    security.flush_usage()
    elapsed = time.perf_counter() - started
    security.close()
    return elapsed / iterations * 1000


async def _ttfts(base: str, model: str, key: str, count: int, max_tokens: int, tag: str) -> list[RequestResult]:
    headers = {"Authorization": f"Bearer {key}"}
    results = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), headers=headers) as client:
        for i in range(count):
            prompt = f"({tag} {i}) In one sentence, what is a good name for a cat?"
            results.append(await one_request(client, base, model, prompt, max_tokens))
    return results


@dataclass
class Fairness:
    idle: list[RequestResult]
    loaded: list[RequestResult]
    flood_completed: int
    flood_throughput: float
    """Tenant a's completion tokens per second while b's loaded requests ran."""


def _flood_main(base: str, model: str, key: str, flood: int, stop: Any, done: Any, tokens: Any) -> None:
    """Child process: tenant a keeps ``flood`` streams open until ``stop`` is set; counts completed requests and
    their completion tokens.

    It runs at low CPU priority: on a machine this small the load generator shares the cores with the server (whose
    compute threads are themselves niced below its HTTP loop), while real tenants' clients run elsewhere.
    """
    os.nice(10)

    async def main() -> None:
        limits = httpx.Limits(max_connections=flood + 8, max_keepalive_connections=flood + 8)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits, headers=headers) as client:

            async def flooder(index: int) -> None:
                round_ = 0
                while not stop.is_set():
                    prompt = f"(flood {index}.{round_}) Write a long story about a lighthouse keeper."
                    result = await one_request(client, base, model, prompt, 96)
                    with done.get_lock():
                        done.value += int(result.ok)
                        tokens.value += result.tokens if result.ok else 0
                    round_ += 1

            await asyncio.gather(*(flooder(i) for i in range(flood)))

    asyncio.run(main())


async def _fairness(base: str, model: str, keys: dict[str, str], flood: int, count: int) -> Fairness:
    """Tenant b's TTFT idle, then while tenant a floods from another process (as another user would: the flood's
    client work does not share b's process)."""
    idle = await _ttfts(base, model, keys["b"], count, 8, "idle")
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    done = context.Value("i", 0)
    tokens = context.Value("q", 0)
    flooder = context.Process(target=_flood_main, args=(base, model, keys["a"], flood, stop, done, tokens), daemon=True)
    flooder.start()
    try:
        await asyncio.sleep(10.0)  # let the flood fill every slot and the waiting queue
        started, tokens_before = time.perf_counter(), tokens.value
        loaded = await _ttfts(base, model, keys["b"], count, 8, "loaded")
        await asyncio.sleep(max(20.0 - (time.perf_counter() - started), 0.0))  # a window long enough for a's rate
        throughput = (tokens.value - tokens_before) / (time.perf_counter() - started)
    finally:
        stop.set()
        flooder.join(300)
        if flooder.is_alive():
            flooder.terminate()
    return Fairness(idle, loaded, done.value, throughput)


def run(
    model: str,
    work_dir: Path,
    *,
    clients: int = 16,
    max_tokens: int = 64,
    repeats: int = 4,
    flood: int = 64,
    fairness_requests: int = 10,
    database_url: str | None = None,
) -> list[str]:
    homes = {"on": work_dir / "home-on", "off": work_dir / "home-off"}
    urls: dict[str, str | None] = {"on": None, "off": None}
    if database_url:
        homes["on-db"], urls["on-db"] = work_dir / "home-on-db", database_url
    for side, home in homes.items():
        _prepare_home(home, model, urls[side])
    keys = {side: _keys(homes[side], urls[side]) for side in homes if side != "off"}
    lines = [f"security path in process: {security_path_cost(homes['on'], keys['on']['a']):.3f} ms per request"]
    ports = {side: free_port() for side in homes}
    bases = {side: f"http://127.0.0.1:{port}" for side, port in ports.items()}
    runs: dict[str, list[LevelResult]] = {side: [] for side in homes}
    with ExitStack() as stack:
        for side, home in homes.items():
            env = {**_env(home, urls[side]), "LLMOS_USAGE_RECORDS": "0" if side == "off" else "1"}
            command = [sys.executable, "-m", "llmos", "serve", "--model", model, "--port", str(ports[side])]
            stack.enter_context(server(command, bases[side] + "/ready", env, work_dir / f"llmos-{side}.log"))
        for repeat in range(repeats):
            order = list(homes) if repeat % 2 == 0 else list(reversed(homes))
            for side in order:
                headers = {"Authorization": f"Bearer {keys[side]['a']}"} if side != "off" else {}
                result = asyncio.run(
                    run_level(bases[side], model, clients, 1, max_tokens, False, f"{side}{repeat}", headers)
                )
                runs[side].append(result)
                print(f"  auth {side}: {clients} clients: {result.throughput:.1f} tok/s", file=sys.stderr, flush=True)
        fairness = asyncio.run(_fairness(bases["on"], model, keys["on"], flood, fairness_requests))
    on, off = merge(runs["on"]), merge(runs["off"])
    ratio = on.throughput / off.throughput if off.throughput else float("nan")
    per_repeat = ", ".join(f"{a.throughput / b.throughput:.2f}" for a, b in zip(runs["on"], runs["off"], strict=True))
    lines += [
        "",
        f"{'clients':>7} {'security':<9} {'tok/s':>8} {'errors':>6}",
        f"{clients:>7} {'on':<9} {on.throughput:>8.1f} {on.errors:>6}",
        f"{clients:>7} {'off':<9} {off.throughput:>8.1f} {off.errors:>6}",
        f"throughput on/off: {ratio:.3f} (cost {(1 - ratio) * 100:+.1f}%); per repeat: {per_repeat}",
    ]
    if "on-db" in runs:
        on_db = merge(runs["on-db"])
        db_ratio = on_db.throughput / on.throughput if on.throughput else float("nan")
        per_repeat = ", ".join(
            f"{a.throughput / b.throughput:.2f}" for a, b in zip(runs["on-db"], runs["on"], strict=True)
        )
        scheme = (database_url or "").split(":", 1)[0]
        lines[-1:-1] = [f"{clients:>7} {'on, ' + scheme:<9} {on_db.throughput:>8.1f} {on_db.errors:>6}"]
        lines.append(f"throughput on {scheme} / on SQLite: {db_ratio:.3f}; per repeat: {per_repeat}")
    idle = [r.ttft for r in fairness.idle if r.ok]
    loaded = [r.ttft for r in fairness.loaded if r.ok]
    flood_ok = fairness.flood_completed
    if idle and loaded:
        slowdown = statistics.median(loaded) / statistics.median(idle)
        lines += [
            "",
            f"fairness: tenant b, {len(loaded)} sequential requests while tenant a keeps {flood} streams open"
            f" ({flood_ok} flood requests completed; a's rate meanwhile {fairness.flood_throughput:.1f} tok/s)",
            f"  b TTFT idle:   median {statistics.median(idle) * 1000:.0f} ms, max {max(idle) * 1000:.0f} ms",
            f"  b TTFT loaded: median {statistics.median(loaded) * 1000:.0f} ms, max {max(loaded) * 1000:.0f} ms",
            f"  ratio loaded/idle (median): {slowdown:.2f} (bound: 2.0)",
        ]
    else:
        lines.append("fairness: tenant b's requests failed; see the server log")
    return lines
