"""Speculative-decoding benchmark: decode speed of one client on prompts that copy from themselves and on chat.

Contract: :func:`measure` starts ``llmos serve`` and, unless ``peer`` is off, llama_cpp.server on the same GGUF
(:func:`llmos.bench.serving.running_servers`), then sends one request at a time, greedy and streaming, of two kinds:
**copy** prompts that ask to repeat, quote or lightly edit a ~150-170-token passage given in the prompt
(:data:`llmos.bench.prompts.COPY_TASKS`; the answer copies most of it, which prompt-lookup drafting accelerates) and
ordinary **chat** prompts. Each prompt goes to three variants: llmos with speculative decoding on (the server starts
with ``LLMOS_SPECULATIVE=on``), llmos with ``speculative: false`` in the request body, and the peer; the variants'
order rotates from one prompt to the next and every prompt runs ``repeats`` times. Decode speed of a request is its
completion tokens after the first divided by the time from the first streamed token to the end (tokens from the
server's usage where it reports it, else content chunks); a variant's speed on a kind is the total of those tokens
over the total of those times. :func:`format_report` prints speed, TTFT and answer length per kind and variant, how
many llmos answers were identical with and without speculation (greedy output must not change), the ratios and the
issue's goals: copy prompts at least 1.5x llmos without speculation and 1.5x the peer, chat no more than 3% slower.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from llmos.bench.prompts import CHAT_PROMPTS, COPY_TASKS, PASSAGES
from llmos.bench.serving import (
    LLMOS,
    PEER,
    StreamResult,
    chat_body,
    decode_rate,
    error_summary,
    running_servers,
    stream_chat,
)

ANSWER_TOKENS = 256
SPEC_ON = "llmos, speculative"
SPECULATIVE_ON = {"LLMOS_SPECULATIVE": "on"}
SPEC_OFF = "llmos, no speculative"
KINDS = ("copy", "chat")
DRAFTS_METRIC = "llmos_speculative_draft_tokens_total"
ACCEPTED_METRIC = "llmos_speculative_accepted_tokens_total"
COPY_GOAL = 1.5
CHAT_FLOOR = 0.97


def copy_prompts() -> list[str]:
    """One prompt per passage, each with another task (repeat, quote, rewrite, edit punctuation)."""
    return [COPY_TASKS[i % len(COPY_TASKS)].format(passage=passage) for i, passage in enumerate(PASSAGES)]


@dataclass
class Sample:
    variant: str
    kind: str
    prompt: int
    repeat: int
    result: StreamResult


@dataclass
class SpeculativeResult:
    cpu: str
    model: str
    max_tokens: int
    repeats: int
    samples: list[Sample] = field(default_factory=list)
    draft_tokens: int = 0
    """Draft tokens the llmos server verified over the whole run (its /metrics), and of those the accepted ones."""
    accepted_draft_tokens: int = 0

    def variants(self) -> list[str]:
        return list(dict.fromkeys(s.variant for s in self.samples))

    def of(self, variant: str, kind: str) -> list[StreamResult]:
        return [s.result for s in self.samples if s.variant == variant and s.kind == kind]

    def rate(self, variant: str, kind: str) -> float:
        """Decode tok/s of ``variant`` on ``kind`` (:func:`~llmos.bench.serving.decode_rate`)."""
        return decode_rate(self.of(variant, kind))

    def identical(self, kind: str) -> tuple[int, int]:
        """(llmos answers equal with and without speculation, pairs compared) on ``kind``."""
        on = {(s.prompt, s.repeat): s.result for s in self.samples if s.variant == SPEC_ON and s.kind == kind}
        off = {(s.prompt, s.repeat): s.result for s in self.samples if s.variant == SPEC_OFF and s.kind == kind}
        pairs = [(on[key], off[key]) for key in on.keys() & off.keys() if on[key].ok and off[key].ok]
        return sum(a.text == b.text for a, b in pairs), len(pairs)


async def _one(base: str, body: dict[str, Any]) -> StreamResult:
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
        return await stream_chat(client, base, body)


def measure(
    model: str, gguf: Path, *, threads: int, context: int, home: Path | None, log_dir: Path, cpu: str,
    peer: bool = True, max_tokens: int = ANSWER_TOKENS, repeats: int = 2, copy: int | None = None,
    chat: int | None = None,
) -> SpeculativeResult:  # fmt: skip
    """Start the servers and send every prompt to every variant, one request at a time (module docstring).

    ``copy`` and ``chat`` limit how many prompts of each kind are used (all by default)."""
    prompts = {"copy": copy_prompts()[:copy], "chat": CHAT_PROMPTS[:chat]}
    out = SpeculativeResult(cpu, model, max_tokens, repeats)
    # the server forces speculative decoding on (auto, the default, depends on the CPU's kernels); a request turns
    # it off
    with running_servers(model, gguf, threads, context, home, log_dir, peer, llmos_env=SPECULATIVE_ON) as bases:
        # cache_prompt false: the prefix cache would hand one variant the prompt another one computed (TTFT only)
        variants: dict[str, tuple[str, dict[str, Any]]] = {
            SPEC_ON: (LLMOS, {"cache_prompt": False}),
            SPEC_OFF: (LLMOS, {"cache_prompt": False, "speculative": False}),
        }
        if PEER in bases:
            variants[PEER] = (PEER, {})
        names = list(variants)
        for base in bases.values():  # warm-up: first-request costs land on no variant
            asyncio.run(_one(base, chat_body(model, [{"role": "user", "content": "Hello!"}], 8)))
        turn = 0
        for repeat in range(repeats):
            for kind in KINDS:
                for index, prompt in enumerate(prompts[kind]):
                    shift = turn % len(names)
                    turn += 1
                    for name in names[shift:] + names[:shift]:
                        side, extra = variants[name]
                        body = chat_body(model, [{"role": "user", "content": prompt}], max_tokens, **extra)
                        result = asyncio.run(_one(bases[side], body))
                        out.samples.append(Sample(name, kind, index, repeat, result))
                        print(
                            f"  {kind} {index}.{repeat}: {name}: {result.tokens} tokens,"
                            f" {result.decode_rate:.1f} tok/s",
                            file=sys.stderr,
                            flush=True,
                        )
        out.draft_tokens, out.accepted_draft_tokens = draft_counts(bases[LLMOS])
    return out


def draft_counts(base: str) -> tuple[int, int]:
    """(draft tokens verified, draft tokens accepted) so far, summed over models, from an llmos server's /metrics."""
    totals = {DRAFTS_METRIC: 0.0, ACCEPTED_METRIC: 0.0}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return int(totals[DRAFTS_METRIC]), int(totals[ACCEPTED_METRIC])


def _ratio(label: str, ours: float, theirs: float, goal: float, better: str) -> str:
    if theirs != theirs or ours != ours or not theirs:
        return f"{label} n/a"
    ratio = ours / theirs
    verdict = "met" if ratio >= goal else "not met"
    return f"{label} {ratio:.3f} (goal >= {goal:.2f}{better}): {verdict}"


def format_report(result: SpeculativeResult) -> list[str]:
    lines = [
        f"speculative on {result.cpu}: {result.model}; 1 client, greedy, up to {result.max_tokens} tokens per answer,"
        f" {result.repeats} runs of each prompt, variants interleaved; decode tok/s = tokens after the first /"
        " time after the first token",
        "  copy: repeat, quote or lightly edit a passage given in the prompt; chat: ordinary questions;"
        " llmos requests carry cache_prompt: false (each variant computes its prompt)",
        "",
        f"{'kind':<5} {'server':<22} {'decode tok/s':>12} {'TTFT p50':>9} {'tokens':>7} {'requests':>8} {'errors':>6}",
    ]
    lines.append("-" * len(lines[-1]))
    variants = result.variants()
    for kind in KINDS:
        for variant in variants:
            runs = result.of(variant, kind)
            ok = [r for r in runs if r.ok]
            ttft = statistics.median(r.ttft for r in ok) if ok else float("nan")
            tokens = statistics.fmean(r.tokens for r in ok) if ok else float("nan")
            lines.append(
                f"{kind:<5} {variant:<22} {result.rate(variant, kind):>12.1f} {ttft:>8.3f}s {tokens:>7.0f}"
                f" {len(runs):>8} {len(runs) - len(ok):>6}"
            )
    for kind in KINDS:
        for variant in variants:
            if summary := error_summary(result.of(variant, kind)):
                lines.append(f"errors of {kind}, {variant}: {summary}")
    lines.append("")
    accepted = result.accepted_draft_tokens / result.draft_tokens if result.draft_tokens else 0.0
    lines.append(
        f"llmos drafted {result.draft_tokens} tokens over the run and the model accepted"
        f" {result.accepted_draft_tokens} ({accepted:.0%}; {ACCEPTED_METRIC} in /metrics)"
    )
    for kind in KINDS:
        same, pairs = result.identical(kind)
        lines.append(f"{kind}: llmos answers identical with and without speculative decoding: {same}/{pairs}")
    lines += ["", f"goals (issue 18) on {result.cpu}:"]
    on_copy, off_copy = result.rate(SPEC_ON, "copy"), result.rate(SPEC_OFF, "copy")
    lines.append(_ratio("copy: speculative/no speculative decode tok/s", on_copy, off_copy, COPY_GOAL, ""))
    peer_copy = result.rate(PEER, "copy") if PEER in variants else float("nan")
    lines.append(_ratio("copy: llmos speculative/peer decode tok/s", on_copy, peer_copy, COPY_GOAL, ""))
    on_chat, off_chat = result.rate(SPEC_ON, "chat"), result.rate(SPEC_OFF, "chat")
    lines.append(_ratio("chat: speculative/no speculative decode tok/s", on_chat, off_chat, CHAT_FLOOR, ", no slower"))
    peer_chat = result.rate(PEER, "chat") if PEER in variants else float("nan")
    if peer_chat == peer_chat:
        lines.append(f"chat: llmos speculative/peer decode tok/s {on_chat / peer_chat:.3f} (for reference; no goal)")
    return lines
