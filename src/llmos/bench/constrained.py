"""Constrained-decoding benchmark: decode speed of tool calls and JSON-schema output against free text.

Contract: :func:`measure` starts ``llmos serve`` (no peer: the comparison is llmos with and without a grammar) and,
at each client count of ``levels``, runs ``repeats`` rounds in which every client sends one request of each variant
(the variants' order rotates by round): **free** (a chat answer without constraint), **json_schema**
(``response_format`` with a schema of a few fields) and **tool_required** (``tools`` with one function and
``tool_choice: required``). All are greedy, streamed, with ``cache_prompt: false`` (every variant computes its own
prompt). A variant's decode speed at a level is its completion tokens after each request's first over the time
after its first token, summed over its requests (per-stream tok/s). :func:`format_report` prints speed, tokens per
answer and errors per level and variant, and the issue's goal: each constrained variant at most 10% slower than free
text (ratio >= 0.90).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from llmos.bench.serving import (
    LLMOS,
    StreamResult,
    chat_body,
    decode_rate,
    error_summary,
    running_servers,
    stream_chat,
)

LEVELS = (1, 16)
ANSWER_TOKENS = 96
GOAL = 0.90
VARIANTS = ("free", "json_schema", "tool_required")
SUBJECTS = [
    "a lighthouse keeper", "a tea merchant", "a marathon runner", "a violin maker", "a glacier guide",
    "a night-shift baker", "a beekeeper", "a ferry captain", "a chess coach", "a radio host",
    "a mountain librarian", "a street painter", "a clockmaker", "a river pilot", "a spice trader", "a puppeteer",
]  # fmt: skip
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
        "hobbies": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "city", "hobbies"],
}
SAVE_TOOL = {
    "type": "function",
    "function": {"name": "save_character", "description": "Store a story character", "parameters": PERSON},
}


def body(model: str, variant: str, subject: str, max_tokens: int) -> dict[str, Any]:
    prompt = f"Invent a character: {subject}. Give a name, age, city and hobbies."
    extra: dict[str, Any] = {"cache_prompt": False}
    if variant == "json_schema":
        extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    elif variant == "tool_required":
        extra.update(tools=[SAVE_TOOL], tool_choice="required")
    return chat_body(model, [{"role": "user", "content": prompt}], max_tokens, **extra)


@dataclass
class Sample:
    level: int
    variant: str
    result: StreamResult


@dataclass
class ConstrainedResult:
    cpu: str
    model: str
    max_tokens: int
    repeats: int
    levels: list[int]
    samples: list[Sample] = field(default_factory=list)

    def of(self, level: int, variant: str) -> list[StreamResult]:
        return [s.result for s in self.samples if s.level == level and s.variant == variant]

    def rate(self, level: int, variant: str) -> float:
        return decode_rate(self.of(level, variant))


async def _round(base: str, bodies: list[dict[str, Any]]) -> list[StreamResult]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
        return list(await asyncio.gather(*(stream_chat(client, base, b) for b in bodies)))


def measure(
    model: str, gguf: Path, *, threads: int, context: int, home: Path | None, log_dir: Path, cpu: str,
    levels: list[int] | tuple[int, ...] = LEVELS, max_tokens: int = ANSWER_TOKENS, repeats: int = 2,
) -> ConstrainedResult:  # fmt: skip
    """Start llmos serve and run every level, variant and round (module docstring)."""
    out = ConstrainedResult(cpu, model, max_tokens, repeats, list(levels))
    with running_servers(model, gguf, threads, context, home, log_dir, peer=False) as bases:
        base = bases[LLMOS]
        asyncio.run(_round(base, [body(model, v, SUBJECTS[0], 8) for v in VARIANTS]))  # warm-up, grammars compiled
        for level in levels:
            for repeat in range(repeats):
                shift = repeat % len(VARIANTS)
                for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                    subjects = [SUBJECTS[(i + repeat) % len(SUBJECTS)] for i in range(level)]
                    results = asyncio.run(_round(base, [body(model, variant, s, max_tokens) for s in subjects]))
                    out.samples.extend(Sample(level, variant, r) for r in results)
                    rate = out.rate(level, variant)
                    print(f"  {level} clients, {variant}, run {repeat}: {rate:.1f} tok/s", file=sys.stderr, flush=True)
    return out


def format_report(result: ConstrainedResult) -> list[str]:
    lines = [
        f"constrained decoding on {result.cpu}: {result.model}; greedy, up to {result.max_tokens} tokens per answer,"
        f" {result.repeats} rounds per level, variants interleaved; decode tok/s per stream = tokens after the first"
        " / time after the first token",
        "",
        f"{'clients':>7} {'variant':<14} {'decode tok/s':>12} {'tokens':>7} {'vs free':>8} {'requests':>8}"
        f" {'errors':>6}",
    ]
    lines.append("-" * len(lines[-1]))
    verdicts = []
    for level in result.levels:
        free = result.rate(level, "free")
        for variant in VARIANTS:
            runs = result.of(level, variant)
            ok = [r for r in runs if r.ok]
            tokens = sum(r.tokens for r in ok) / len(ok) if ok else float("nan")
            rate = result.rate(level, variant)
            ratio = rate / free if free == free and free else float("nan")
            lines.append(
                f"{level:>7} {variant:<14} {rate:>12.1f} {tokens:>7.0f} {ratio:>8.3f} {len(runs):>8}"
                f" {len(runs) - len(ok):>6}"
            )
            if variant != "free":
                verdict = "met" if ratio >= GOAL else "not met"
                verdicts.append(f"  {level} clients, {variant}: {ratio:.3f} of free text (goal >= {GOAL}): {verdict}")
            if summary := error_summary(runs):
                lines.append(f"    errors: {summary}")
    return [*lines, "", f"goals (issue 19) on {result.cpu}:", *verdicts]
