"""Multi-turn benchmark: time to first token of chat conversations that resend their whole history every turn.

Contract: :func:`measure` starts ``llmos serve`` and, unless ``peer`` is off, llama_cpp.server on the same GGUF
(:func:`llmos.bench.serving.running_servers`) and runs three tests on both, sides interleaved:

* **1 conversation**: ``repeats`` conversations one after another, each ``turns`` turns long under the same
  ~900-token support-assistant system prompt (:func:`llmos.bench.prompts.system_prompt`). Every turn appends the
  model's actual answer and the next user message and resends the whole history, as chat clients do.
* **N conversations at once** (``conversations``, 4 by default), ``repeats`` rounds: each conversation has its own
  system prompt (another product: no prefix is shared between them), and at every turn all N send at once.
* **Shared prompt**: ``clients`` (16) clients at once, one shared system prompt, a different question each, after
  one warm-up request with that system prompt: llmos with its prefix cache (the default), llmos with
  ``cache_prompt: false`` in every request body (same server), and the peer.

Within a conversation test, each turn (every conversation's request of that turn) goes to one side, then to the
other, the order flipping every turn; the shared-prompt variants rotate their order every run. Each side's
conversations grow with that side's own greedy answers (``max_tokens`` each, 40 by default). Results record every
request: time to first token, prompt tokens and ``usage.prompt_tokens_details.cached_tokens`` where the server
reports them. :func:`format_report` prints mean / p50 / max TTFT of turns 2-N per test and side, llmos/peer ratios,
TTFT and llmos's prompt / cached tokens per turn, and the issue's goals: llmos no slower than the peer with one
conversation, at most 0.25x the peer with four, shared-prompt TTFT p50 with the cache at most 1/5 of without.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from llmos.bench.prompts import PRODUCTS, QUESTIONS, SCENARIOS, system_prompt
from llmos.bench.serving import LLMOS, PEER, StreamResult, chat_body, error_summary, running_servers, stream_chat

ANSWER_TOKENS = 40
ONE = "1 conversation"
CACHE_ON = "llmos, cache on"
CACHE_OFF = "llmos, cache off"
GOALS = {"one": 1.0, "many": 0.25, "shared": 0.2}
"""Issue 18: llmos/peer mean TTFT at one conversation, at four at once; cache on/off TTFT p50 at 16 clients."""


@dataclass
class Turn:
    side: str
    test: str
    conversation: int
    turn: int
    result: StreamResult


@dataclass
class MultiturnResult:
    cpu: str
    model: str
    turns: int
    max_tokens: int
    conversations: int
    clients: int
    repeats: int
    first_prompt_tokens: int | None
    """llmos's prompt tokens of a first turn: the system prompt, the first question and the chat template."""
    records: list[Turn] = field(default_factory=list)
    shared: dict[str, list[StreamResult]] = field(default_factory=dict)

    @property
    def many(self) -> str:
        return f"{self.conversations} conversations"

    def sides(self) -> list[str]:
        return list(dict.fromkeys(r.side for r in self.records))

    def turns_of(self, test: str, side: str, turn: int | None = None) -> list[StreamResult]:
        return [
            r.result
            for r in self.records
            if r.test == test and r.side == side and (r.turn == turn if turn is not None else r.turn >= 2)
        ]


class Conversation:
    """One side's copy of a scripted conversation: the history it resends and the user messages still to come."""

    def __init__(self, product: int, scenario: int, tag: str) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt(product)}]
        self.script = [message.format(order=tag) for message in SCENARIOS[scenario % len(SCENARIOS)]]

    def ask(self, turn: int) -> list[dict[str, str]]:
        line = self.script[turn % len(self.script)]
        self.messages.append({"role": "user", "content": line})
        return list(self.messages)

    def answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


async def _send_all(base: str, bodies: list[dict[str, Any]]) -> list[StreamResult]:
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        return list(await asyncio.gather(*(stream_chat(client, base, body) for body in bodies)))


def _conversation_test(
    bases: dict[str, str], model: str, test: str, products: list[int], scenarios: list[int], tag: str,
    turns: int, max_tokens: int, first: int, flip: bool, out: MultiturnResult,
) -> None:  # fmt: skip
    """Run one set of conversations (one per product, all at once) on every side, turn by turn, sides interleaved
    (the side that goes first changes every turn; ``flip`` starts with the other one)."""
    pairs = list(zip(products, scenarios, strict=True))
    sides = {name: [Conversation(p, s, f"{tag}{i}") for i, (p, s) in enumerate(pairs)] for name in bases}
    for turn in range(turns):
        order = list(bases) if (turn + flip) % 2 == 0 else list(bases)[::-1]
        for name in order:
            bodies = [chat_body(model, conv.ask(turn), max_tokens) for conv in sides[name]]
            results = asyncio.run(_send_all(bases[name], bodies))
            for index, (conv, result) in enumerate(zip(sides[name], results, strict=True)):
                conv.answer(result.text)
                out.records.append(Turn(name, test, first + index, turn + 1, result))
            worst = max(r.ttft for r in results)
            print(f"  {test}: {name} turn {turn + 1}: TTFT max {worst:.2f}s", file=sys.stderr, flush=True)


def _shared_bodies(model: str, clients: int, tag: str, max_tokens: int, **extra: Any) -> list[dict[str, Any]]:
    system = system_prompt(0)
    return [
        chat_body(
            model,
            [
                {"role": "system", "content": system},
                {"role": "user", "content": f"(ticket {tag}-{i}) {QUESTIONS[i % len(QUESTIONS)]}"},
            ],
            max_tokens,
            **extra,
        )
        for i in range(clients)
    ]


def measure(
    model: str, gguf: Path, *, threads: int, context: int, home: Path | None, log_dir: Path, cpu: str,
    peer: bool = True, turns: int = 6, max_tokens: int = ANSWER_TOKENS, conversations: int = 4, clients: int = 16,
    repeats: int = 2, shared_repeats: int = 1,
) -> MultiturnResult:  # fmt: skip
    """Start the servers and run the three tests (see the module docstring)."""
    out = MultiturnResult(cpu, model, turns, max_tokens, conversations, clients, repeats, None)
    with running_servers(model, gguf, threads, context, home, log_dir, peer) as bases:
        for repeat in range(repeats):
            flip = repeat % 2 == 1
            _conversation_test(bases, model, ONE, [0], [repeat], f"A{repeat}-", turns, max_tokens, repeat, flip, out)
        for repeat in range(repeats):
            products = [1 + c % (len(PRODUCTS) - 1) for c in range(conversations)]
            scenarios = [c + repeat for c in range(conversations)]
            _conversation_test(
                bases, model, out.many, products, scenarios, f"B{repeat}-", turns, max_tokens,
                repeat * conversations, repeat % 2 == 1, out,
            )  # fmt: skip
        warm = _shared_bodies(model, 1, "warm", max_tokens)
        for base in bases.values():
            asyncio.run(_send_all(base, warm))
        variants: dict[str, tuple[str, dict[str, Any]]] = {
            CACHE_ON: (LLMOS, {}),
            CACHE_OFF: (LLMOS, {"cache_prompt": False}),
        }
        if PEER in bases:
            variants[PEER] = (PEER, {})
        names = list(variants)
        for run in range(shared_repeats):
            for name in names[run % len(names) :] + names[: run % len(names)]:
                side, extra = variants[name]
                tag = f"C{run}.{names.index(name)}"  # new questions every run: only the system prompt is shared
                bodies = _shared_bodies(model, clients, tag, max_tokens, **extra)
                results = asyncio.run(_send_all(bases[side], bodies))
                out.shared.setdefault(name, []).extend(results)
                p50 = _stat([r.ttft for r in results if r.ok], 0.5)
                print(f"  shared prompt: {name}: TTFT p50 {p50:.2f}s", file=sys.stderr, flush=True)
    firsts = [r.result for r in out.records if r.side == LLMOS and r.turn == 1 and r.result.usage]
    if firsts and firsts[0].usage is not None:
        out.first_prompt_tokens = int(firsts[0].usage.get("prompt_tokens", 0)) or None
    return out


def _stat(values: list[float], q: float | None) -> float:
    """``q`` quantile (nearest rank) of ``values``, or their mean with ``q`` None; NaN when empty."""
    if not values:
        return float("nan")
    if q is None:
        return statistics.fmean(values)
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _row(test: str, side: str, results: list[StreamResult]) -> str:
    ok = [r.ttft for r in results if r.ok]
    return (
        f"{test:<20} {side:<18} {_stat(ok, None):>7.3f}s {_stat(ok, 0.5):>7.3f}s {max(ok, default=float('nan')):>7.3f}s"
        f" {len(ok):>7} {len(results) - len(ok):>6}"
    )


def _ratio_line(label: str, ours: float, theirs: float, goal: float, what: str) -> str:
    if not theirs or theirs != theirs or ours != ours:  # no peer figure (or NaN)
        return f"{label}: {what} n/a (goal <= {goal:.2f})"
    ratio = ours / theirs
    verdict = "met" if ratio <= goal else "not met"
    return f"{label}: {what} {ratio:.3f} (goal <= {goal:.2f}): {verdict}"


def format_report(result: MultiturnResult) -> list[str]:
    sides = result.sides()
    first = f" (a first turn's prompt: {result.first_prompt_tokens} tokens)" if result.first_prompt_tokens else ""
    lines = [
        f"multiturn on {result.cpu}: {result.model}; {result.turns}-turn conversations under a ~900-token system"
        f" prompt{first}, {result.max_tokens} greedy tokens per answer; TTFT of turns 2-{result.turns} (streaming)",
        f"  {ONE}: {result.repeats} conversations one after another, same system prompt",
        f"  {result.many}: {result.conversations} at once, each under its own system prompt (no shared prefix),"
        f" {result.repeats} rounds",
        f"  shared prompt: {result.clients} clients at once, one system prompt, different questions, after one"
        " warm-up request; cache off = body field cache_prompt: false on the same llmos server",
        "",
        f"{'test':<20} {'server':<18} {'mean':>8} {'p50':>8} {'max':>8} {'samples':>7} {'errors':>6}",
    ]
    lines.append("-" * len(lines[-1]))
    for test in (ONE, result.many):
        for side in sides:
            lines.append(_row(test, side, result.turns_of(test, side)))
    shared_label = f"{result.clients} clients shared"
    for name, results in result.shared.items():
        lines.append(_row(shared_label, name, results))
    failures = [
        (test, side, result.turns_of(test, side) + result.turns_of(test, side, 1))
        for test in (ONE, result.many)
        for side in sides
    ]
    failures += [(shared_label, name, results) for name, results in result.shared.items()]
    for test, side, results in failures:
        if summary := error_summary(results):
            lines.append(f"errors of {test}, {side} (all turns): {summary}")

    lines += ["", f"TTFT by turn (s, mean over conversations) on {result.cpu}"]
    lines.append(
        f"{'test':<20} {'server':<18} " + " ".join(f"{'turn ' + str(t):>8}" for t in range(1, result.turns + 1))
    )
    for test in (ONE, result.many):
        for side in sides:
            cells = []
            for turn in range(1, result.turns + 1):
                ok = [r.ttft for r in result.turns_of(test, side, turn) if r.ok]
                cells.append(f"{_stat(ok, None):>8.3f}")
            lines.append(f"{test:<20} {side:<18} " + " ".join(cells))
    lines += ["", "llmos prompt tokens / cached tokens by turn (usage.prompt_tokens_details.cached_tokens; mean)"]
    for test in (ONE, result.many):
        cells = []
        for turn in range(1, result.turns + 1):
            runs = result.turns_of(test, LLMOS, turn)
            prompt = [int(r.usage["prompt_tokens"]) for r in runs if r.usage and "prompt_tokens" in r.usage]
            cached = [c for r in runs if (c := r.cached_tokens) is not None]
            shown_prompt = f"{statistics.fmean(prompt):.0f}" if prompt else "-"
            shown_cached = f"{statistics.fmean(cached):.0f}" if cached else "-"
            cells.append(f"t{turn} {shown_prompt}/{shown_cached}")
        lines.append(f"{test:<20} " + "  ".join(cells))
    shared_cached = [c for r in result.shared.get(CACHE_ON, []) if (c := r.cached_tokens) is not None]
    if shared_cached:
        lines.append(
            f"{shared_label:<20} cache on: cached tokens p50 {_stat([float(c) for c in shared_cached], 0.5):.0f}"
        )

    lines += ["", f"goals (issue 18) on {result.cpu}:"]
    for test, goal in ((ONE, GOALS["one"]), (result.many, GOALS["many"])):
        ours = _stat([r.ttft for r in result.turns_of(test, LLMOS) if r.ok], None)
        theirs = _stat([r.ttft for r in result.turns_of(test, PEER) if r.ok], None) if PEER in sides else float("nan")
        lines.append(_ratio_line(test, ours, theirs, goal, "llmos/peer mean TTFT"))
    on = _stat([r.ttft for r in result.shared.get(CACHE_ON, []) if r.ok], 0.5)
    off = _stat([r.ttft for r in result.shared.get(CACHE_OFF, []) if r.ok], 0.5)
    lines.append(_ratio_line(shared_label, on, off, GOALS["shared"], "cache on/off TTFT p50"))
    if PEER in result.shared:
        peer_p50 = _stat([r.ttft for r in result.shared[PEER] if r.ok], 0.5)
        lines.append(f"{shared_label}: llmos cache on/peer TTFT p50 {on / peer_p50:.3f} (for reference; no goal)")
    return lines
