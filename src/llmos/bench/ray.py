"""Ray benchmark: what serving through Ray replicas costs against one local engine, and how it would scale.

Contract: :func:`run` pulls the model into a private store under ``work_dir``, starts a local Ray cluster for it
(:class:`llmos.distributed.cluster.LocalCluster`, loopback only; 4 logical CPUs so the sides can stay started) and
measures, in turns with alternating order, ``clients`` streaming chat clients against:

* ``local x1 (1 thread)`` and ``ray x1 (1 cpu)``: the same compute, so their ratio is the overhead of the Ray path
  (tokenization round trip, one Ray object per step per request, the front end's pump threads);
* ``local x1 (2 threads)`` and ``ray x2 (1 cpu each)``: the machine's cores as one engine or as two replicas.

With ``ray_address`` it uses that cluster instead of starting one (a real multi-node cluster, e.g. the test cluster
of network namespaces; each worker node needs 2 CPUs so both Ray servers stay started, and the replicas SPREAD
over the nodes); the report then says on how many nodes the replicas ran. Each server runs alone while it is driven
(the others idle). It reports tok/s per side and the ratios, the front
end's CPU seconds per generated token on the Ray side (what bounds how many replicas one front end can feed), and
a projection to N nodes from those measurements.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx

from llmos.bench.serving import LevelResult, free_port, merge, run_level, server
from llmos.distributed.cluster import LocalCluster


@dataclass
class Side:
    name: str
    args: list[str]
    env: dict[str, str]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _replica_nodes(base: str) -> set[str]:
    """Node addresses of the live replicas a server reports in ``/admin/runtime``."""
    models = httpx.get(f"{base}/admin/runtime", timeout=30).json().get("models", [])
    replicas = [r for m in models for r in m.get("per_replica", []) if r.get("alive", True)]
    return {str(r.get("node_ip") or r.get("node")) for r in replicas}


def run(
    model: str,
    work_dir: Path,
    *,
    clients: int = 16,
    max_tokens: int = 64,
    repeats: int = 2,
    ray_address: str | None = None,
) -> list[str]:
    home = work_dir / "home"
    env = {**os.environ, "LLMOS_HOME": str(home), "LLMOS_KEEP_ALIVE": "-1"}
    subprocess.run([sys.executable, "-m", "llmos", "pull", model], env=env, check=True, capture_output=True)
    cluster = LocalCluster(home)
    address = ray_address or cluster.start(cpus=4).address
    sides = [
        Side("local x1 (1 thread)", [], {"LLMOS_THREADS": "1"}),
        Side("ray x1 (1 cpu)", ["--ray", address, "--ray-replicas", "1"], {}),
        Side("local x1 (2 threads)", [], {"LLMOS_THREADS": "2"}),
        Side("ray x2 (1 cpu each)", ["--ray", address, "--ray-replicas", "2"], {}),
    ]
    placement = ""
    runs: dict[str, list[LevelResult]] = {side.name: [] for side in sides}
    cpu_per_token: list[float] = []
    try:
        with ExitStack() as stack:
            bases: dict[str, str] = {}
            pids: dict[str, int] = {}
            for index, side in enumerate(sides):
                port = free_port()
                command = [sys.executable, "-m", "llmos", "serve", "--model", model, "--port", str(port), *side.args]
                base = f"http://127.0.0.1:{port}"
                process = stack.enter_context(
                    server(command, base + "/ready", {**env, **side.env}, work_dir / f"server-{index}.log")
                )
                bases[side.name], pids[side.name] = base, process.pid
            where = _replica_nodes(bases["ray x2 (1 cpu each)"])
            placement = f"ray x2 replicas on {len(where)} node(s): {', '.join(sorted(where))}"
            for repeat in range(repeats):
                order = sides if repeat % 2 == 0 else sides[::-1]
                for side in order:
                    before = _cpu_seconds(pids[side.name])
                    result = asyncio.run(
                        run_level(bases[side.name], model, clients, 1, max_tokens, False, f"ray{repeat}")
                    )
                    if side.name.startswith("ray x2"):
                        tokens = sum(r.tokens for r in result.results if r.ok)
                        cpu_per_token.append((_cpu_seconds(pids[side.name]) - before) / max(tokens, 1))
                    runs[side.name].append(result)
                    print(f"  {side.name}: {result.throughput:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        if ray_address is None:
            cluster.stop()
    merged = {name: merge(results) for name, results in runs.items()}
    rate = {name: result.throughput for name, result in merged.items()}
    errors = {name: result.errors for name, result in merged.items()}
    lines = [placement, "", f"{'side':<22} {'tok/s':>8} {'errors':>6}"]
    lines += [f"{name:<22} {rate[name]:>8.1f} {errors[name]:>6}" for name in rate]
    overhead = 1 - rate["ray x1 (1 cpu)"] / rate["local x1 (1 thread)"]
    aggregate = rate["ray x2 (1 cpu each)"] / rate["local x1 (2 threads)"]
    per_replica = rate["ray x2 (1 cpu each)"] / 2
    front_cpu = sum(cpu_per_token) / len(cpu_per_token) if cpu_per_token else float("nan")
    ceiling = 1 / front_cpu if front_cpu > 0 else float("inf")
    lines += [
        "",
        f"Ray path overhead (ray x1 vs local x1, same compute): {overhead * 100:+.1f}% (target: under 10%)",
        f"2 Ray replicas vs 1 local engine on the same cores: {aggregate:.2f}x",
        f"front end CPU per generated token (ray x2): {front_cpu * 1000:.2f} ms -> one front-end core routes at most"
        f" ~{ceiling:.0f} tok/s, enough for ~{ceiling / per_replica:.0f} replicas like these per front-end core"
        if per_replica > 0
        else "",
        "",
        f"projection (per replica {per_replica:.1f} tok/s on one of these cores, Ray path overhead as measured):",
    ]
    for nodes in (2, 4, 8, 16):
        cores = nodes * 2
        ideal = per_replica * cores
        lines.append(
            f"  {nodes:>2} nodes x 2 cores: ~{min(ideal, ceiling):.0f} tok/s"
            + (" (front-end bound: add front ends behind a load balancer)" if ideal > ceiling else "")
        )
    return lines
