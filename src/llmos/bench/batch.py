"""Batch-efficiency benchmark: what llmos's serving path leaves on the table against raw ``llama_decode``.

Contract: :func:`measure` loads the model in-process exactly as ``llmos serve`` would
(:meth:`llmos.runtime.loader.Loader.load_from` with the effective settings: context length, KV pool, batch size,
threads, KV cache type, running sequences) and drives its :class:`~llmos.engine.backends.llamacpp.LlamaCppModel`
directly: for each level N, N chat prompts (the serving benchmark's story prompts, rendered by the model's chat
template as the server renders them) are prefilled in batches of at most ``n_batch`` tokens and decoded together,
one token per sequence per ``decode`` call, greedy, each sequence ending at an end-of-generation token or
``max_tokens``. Only the ``decode`` calls are timed (sampling is not): **raw tok/s** = generated tokens / time of
all decode calls (prefill included), **raw decode-only** = tokens of the one-token steps / their time. It also
starts ``llmos serve`` and, unless ``peer`` is off, llama_cpp.server on the same GGUF, and sends the same N prompts
as N concurrent streaming requests: **served tok/s** = completion tokens (the server's usage where it reports it)
/ wall time from the first request to the last answer. llmos's requests carry ``speculative: false`` and
``cache_prompt: false`` so that it computes the same batches as the raw loop. The three variants run in turns,
their order rotating every run, ``repeats`` runs per level; a variant's figure is the total of its tokens over the
total of its times. :func:`format_report` prints the table, served/raw and llmos/peer ratios and the issue's goals
(served at least 90% of raw at 16 sequences; llmos at least 3x the peer on Q4_1, 5x on Q4_0, at 16 clients).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from llmos.bench.serving import LLMOS, PEER, TOPICS, chat_body, error_summary, running_servers, stream_chat
from llmos.config import Settings
from llmos.engine.backends.base import BatchItem
from llmos.registry.service import Registry, ResolvedModel
from llmos.runtime.loader import Loader
from llmos.types import ChatMessage, SamplingParams

RAW = "raw llama_decode"
LEVELS = [1, 4, 8, 16]
ANSWER_TOKENS = 128
SERVED_GOAL = 0.9
PEER_GOALS = {"Q4_1": 3.0, "Q4_0": 5.0}
"""Issue 18: llmos/peer at 16 clients on the shipped Q4_1 and on a Q4_0 child."""


@dataclass
class Run:
    """One variant at one level, one run: generated tokens and the seconds they took."""

    tokens: int
    seconds: float
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    errors: int = 0
    error: str = ""
    """The distinct errors of a served run with their counts."""


@dataclass
class BatchResult:
    cpu: str
    model: str
    quantization: str | None
    kernel_note: str | None
    settings_line: str
    max_tokens: int
    repeats: int
    levels: list[int]
    runs: dict[tuple[str, int], list[Run]] = field(default_factory=dict)

    def variants(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.runs))

    def rate(self, variant: str, level: int) -> float:
        runs = self.runs.get((variant, level), [])
        seconds = sum(r.seconds for r in runs)
        return sum(r.tokens for r in runs) / seconds if seconds > 0 else float("nan")

    def decode_rate(self, level: int) -> float:
        runs = self.runs.get((RAW, level), [])
        seconds = sum(r.decode_seconds for r in runs)
        return sum(r.decode_tokens for r in runs) / seconds if seconds > 0 else float("nan")

    def errors(self, variant: str, level: int) -> int:
        return sum(r.errors for r in self.runs.get((variant, level), []))


def prompts_for(level: int, repeat: int) -> list[str]:
    return [f"(batch {repeat}.{i}) Write a long, detailed story about {TOPICS[i % len(TOPICS)]}." for i in range(level)]


def raw_run(model: Any, prompts: list[list[int]], max_tokens: int) -> Run:
    """Prefill and greedily decode ``prompts`` as sequences 0..N-1 of ``model`` (a backend), timing only decode."""
    samplers = [model.new_sampler(SamplingParams(max_tokens=max_tokens, temperature=0.0)) for _ in prompts]
    last: dict[int, int] = {}
    run = Run(0, 0.0)

    def step(items: list[BatchItem]) -> float:
        started = time.perf_counter()
        rows = model.decode(items)
        elapsed = time.perf_counter() - started
        for seq, seq_rows in rows.items():
            last[seq] = samplers[seq].sample(seq_rows[-1])
        return elapsed

    try:
        for seq in range(len(prompts)):
            model.forget_sequence(seq)
        batch: list[BatchItem] = []
        room = model.n_batch
        for seq, tokens in enumerate(prompts):  # whole prompts packed into batches of at most n_batch tokens
            for start in range(0, len(tokens), model.n_batch):
                chunk = tokens[start : start + model.n_batch]
                if len(chunk) > room:
                    run.seconds += step(batch)
                    batch, room = [], model.n_batch
                final = start + len(chunk) == len(tokens)
                batch.append(BatchItem(seq, chunk, start, "last" if final else "none"))
                room -= len(chunk)
        if batch:
            run.seconds += step(batch)
        positions = {seq: len(tokens) for seq, tokens in enumerate(prompts)}
        generated = dict.fromkeys(positions, 0)
        active = []
        for seq in positions:
            if not model.is_end_of_generation(last[seq]):
                generated[seq] = 1
                if max_tokens > 1:
                    active.append(seq)
        while active:
            items = [BatchItem(seq, [last[seq]], positions[seq]) for seq in active]
            elapsed = step(items)
            run.seconds += elapsed
            run.decode_seconds += elapsed
            still = []
            for seq in active:
                positions[seq] += 1
                if model.is_end_of_generation(last[seq]):
                    continue
                generated[seq] += 1
                run.decode_tokens += 1
                if generated[seq] < max_tokens:
                    still.append(seq)
            active = still
        run.tokens = sum(generated.values())
    finally:
        for sampler in samplers:
            sampler.close()
        for seq in range(len(prompts)):
            model.forget_sequence(seq)
    return run


async def _served(base: str, model: str, prompts: list[str], max_tokens: int, extra: dict[str, Any]) -> Run:
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                stream_chat(client, base, chat_body(model, [{"role": "user", "content": p}], max_tokens, **extra))
                for p in prompts
            )
        )
        wall = time.perf_counter() - started
    failed = sum(not r.ok for r in results)
    return Run(sum(r.tokens for r in results if r.ok), wall, errors=failed, error=error_summary(list(results)))


def measure(
    settings: Settings, registry: Registry, resolved: ResolvedModel, model_dir: Path, *, gguf: Path,
    home: Path | None, log_dir: Path, cpu: str, levels: list[int] | None = None, max_tokens: int = ANSWER_TOKENS,
    repeats: int = 2, peer: bool = True,
) -> BatchResult:  # fmt: skip
    """Load the model in-process as the server would, start the servers, run every level (module docstring).

    ``model_dir`` holds the model's files under their own names (:meth:`Registry.loadable_dir`), ``gguf`` is the
    file in it that the peer serves; ``home`` is the llmos home the served ``llmos serve`` uses."""
    from llmos.compression.quantize import batched_kernel

    levels = levels or LEVELS
    view = resolved.view
    kernel = batched_kernel(view.quantization, view.format, view.name, settings)
    loaded = Loader(settings, registry).load_from(resolved, "llama.cpp", model_dir)
    backend: Any = loaded.backend
    settings_line = (
        f"threads {settings.threads}, n_batch {backend.n_batch}, KV pool {getattr(backend, 'kv_pool_tokens', '?')}"
        f" cells of {settings.kv_cache_type}, context {backend.n_ctx_seq}, {backend.n_seq_max} running sequences"
    )
    out = BatchResult(
        cpu, view.name, view.quantization, kernel.line if kernel else None, settings_line, max_tokens, repeats, levels
    )
    try:
        with running_servers(view.name, gguf, settings.threads, settings.context_length, home, log_dir, peer) as bases:
            variants = [RAW, LLMOS, *([PEER] if PEER in bases else [])]
            for base in bases.values():  # warm-up: first-request costs land on no level
                asyncio.run(_served(base, view.name, ["Hello!"], 4, {}))
            turn = 0
            for level in levels:
                for repeat in range(repeats):
                    prompts = prompts_for(level, repeat)
                    shift = turn % len(variants)
                    turn += 1
                    for name in variants[shift:] + variants[:shift]:
                        if name == RAW:
                            tokens = [loaded.chat_tokens([ChatMessage("user", p)]) for p in prompts]
                            result = raw_run(backend, tokens, max_tokens)
                        else:
                            extra = {"speculative": False, "cache_prompt": False} if name == LLMOS else {}
                            result = asyncio.run(_served(bases[name], view.name, prompts, max_tokens, extra))
                        out.runs.setdefault((name, level), []).append(result)
                        rate = result.tokens / result.seconds if result.seconds else 0.0
                        print(f"  {level} sequences: {name}: {rate:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        loaded.engine.shutdown()
    return out


def format_report(result: BatchResult) -> list[str]:
    variants = result.variants()
    lines = [
        f"batch on {result.cpu}: {result.model} ({result.quantization or 'unknown type'}); {result.settings_line};"
        f" up to {result.max_tokens} greedy tokens per sequence, {result.repeats} runs per level, variants interleaved",
        "  raw: the served model's LlamaCppModel.decode driven directly (only decode calls timed, prefill included);"
        " served: N concurrent streaming requests, completion tokens / wall time; llmos requests carry"
        " speculative: false and cache_prompt: false",
    ]
    if result.kernel_note:
        lines.append(f"  {result.kernel_note}")
    header = f"{'N':>3} {'raw tok/s':>10} {'raw decode-only':>15} {'llmos tok/s':>12}"
    if PEER in variants:
        header += f" {'peer tok/s':>11}"
    header += f" {'llmos/raw':>10}"
    if PEER in variants:
        header += f" {'llmos/peer':>11}"
    header += f" {'errors':>6}"
    lines += ["", header, "-" * len(header)]
    for level in result.levels:
        raw, ours = result.rate(RAW, level), result.rate(LLMOS, level)
        row = f"{level:>3} {raw:>10.1f} {result.decode_rate(level):>15.1f} {ours:>12.1f}"
        if PEER in variants:
            row += f" {result.rate(PEER, level):>11.1f}"
        row += f" {ours / raw:>10.3f}"
        if PEER in variants:
            row += f" {ours / result.rate(PEER, level):>11.3f}"
        row += f" {sum(result.errors(v, level) for v in variants):>6}"
        lines.append(row)
    for (variant, level), runs in result.runs.items():
        for run in runs:
            if run.error:
                lines.append(f"errors of {variant} at {level}: {run.error}")
    top = max(result.levels)
    lines += ["", f"goals (issue 18) on {result.cpu}:"]
    served = result.rate(LLMOS, top) / result.rate(RAW, top)
    verdict = "met" if served >= SERVED_GOAL else "not met"
    note = "" if top == 16 else " (the goal is stated at 16)"
    lines.append(f"{top} sequences: llmos served/raw {served:.3f} (goal >= {SERVED_GOAL:.2f}{note}): {verdict}")
    if PEER in variants:
        ratio = result.rate(LLMOS, top) / result.rate(PEER, top)
        goal = PEER_GOALS.get(result.quantization or "")
        if goal is None:
            lines.append(f"{top} clients: llmos/peer {ratio:.3f} (goals: >= 3x on Q4_1, >= 5x on a Q4_0 child)")
        else:
            verdict = "met" if ratio >= goal else "not met"
            lines.append(
                f"{top} clients: llmos/peer {ratio:.3f} (goal >= {goal:.1f}x on {result.quantization}): {verdict}"
            )
    return lines
