"""Formats benchmark (issue 22): the ONNX Runtime backend against PyTorch and llama.cpp, in this process.

Contract: :func:`prepare` makes the versions the suite needs where they are missing (MiniLM pulled, ``minilm:onnx``,
``MODEL:safetensors`` and ``MODEL:onnx`` converted, ``minilm:onnx-int8`` and ``MODEL:onnx-int8`` quantized; the int8
names may be None to skip them). :func:`measure` loads every model through llmos's own
:class:`~llmos.runtime.loader.Loader` and measures:

* **Embeddings**: MiniLM on ONNX Runtime (:class:`~llmos.runtime.onnx_embedding.OnnxEmbeddingModel`) against
  sentence-transformers on PyTorch (:class:`~llmos.runtime.embedding.EmbeddingModel`), both loaded at once, on the
  same deterministic sentences (:func:`sentences`, 8 to 30 words), each side batching as it does by default. One
  warm-up pass per side, then ``max(3, repeats)`` timed passes per side in alternating order; a side's figure is its
  **best** (fastest) pass, in sentences/s: on a shared machine the slow passes measure the neighbours. The lowest
  cosine between the two sides' vectors of one sentence is the sanity check; the goal is ONNX/PyTorch >=
  :data:`EMBED_GOAL`.
* **Decode**: the LLM on ONNX Runtime (``MODEL:onnx``), on the PyTorch backend (``MODEL:safetensors``) and on
  llama.cpp (the GGUF), one model loaded at a time and closed after it is measured. For each level N, N different
  ChatML questions are submitted at once to an :class:`~llmos.engine.core.EngineCore` stepped here (no prefix cache,
  no speculation, greedy, ``max_tokens`` each; a warm-up run of 4 tokens per level first), ``repeats`` runs per
  level; a run's figure is generated tokens / wall seconds from submission to the last token, its time to first
  token the median over its requests; a backend's figure is its **best** run (highest tok/s, lowest TTFT). The
  table gives every backend's ratio to llama.cpp at the same level.

:func:`format_report` prints it all as lines, the CPU first. Timing figures compare only within one run.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmos.config import Settings
from llmos.engine.core import EngineConfig, EngineCore
from llmos.engine.request import GenerationRequest
from llmos.engine.streams import SyncOutputStream
from llmos.errors import DecodeError, NotFoundError
from llmos.registry.service import Registry
from llmos.runtime.loader import Loader
from llmos.types import ChatMessage, SamplingParams

EMBED_SENTENCES = 1000
LEVELS = [1, 16]
ANSWER_TOKENS = 64
EMBED_GOAL = 1.5
"""Issue 22: MiniLM embeddings on ONNX Runtime at least 1.5x sentence-transformers on PyTorch."""
WARMUP_TOKENS = 4
ONNX, TORCH, LLAMA = "ONNX Runtime", "PyTorch", "llama.cpp"
ONNX_INT8 = "ONNX Runtime int8"

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "List three colors.",
    "Explain photosynthesis briefly.",
    "What is 12 times 7?",
    "Name a famous painter.",
    "How do airplanes fly?",
    "Give me a recipe for pancakes.",
    "What is Python?",
    "Translate 'hello' to Spanish.",
    "Why is the sky blue?",
    "Tell me a joke.",
    "What is the tallest mountain?",
    "Describe a cat.",
    "What year did the Second World War end?",
    "How does a refrigerator keep food cold?",
]

_SUBJECTS = [
    "The old lighthouse keeper", "A young engineer from Lisbon", "My neighbour's cat", "The city council",
    "Our support team", "A retired history teacher", "The delivery driver", "Two students in the library",
    "The new hospital", "A small bakery on the corner", "The river", "Most software projects", "Her grandfather",
    "The night shift nurse", "A group of hikers", "The orchestra", "Every tourist in town", "The quiet librarian",
    "A stray dog", "The marketing department",
]  # fmt: skip
_VERBS = [
    "repaired", "painted", "carefully reviewed", "quietly ignored", "described", "ordered", "photographed", "rebuilt",
    "measured", "donated", "forgot about", "argued over", "cleaned", "translated", "delivered", "praised",
]  # fmt: skip
_OBJECTS = [
    "the broken radio", "a long report about water prices", "the garden fence", "three boxes of apples",
    "the network switch in the basement", "an old map of the harbour", "the school's annual budget",
    "a recipe for lemon cake", "the bicycle", "two tickets to the concert", "the roof of the train station",
    "a letter from the bank", "the new parking rules", "a painting of the mountains", "the kitchen sink",
    "the results of the election",
]  # fmt: skip
_ADVERBIALS = [
    "before the storm arrived", "on a rainy Tuesday morning", "without telling anyone", "for the third time this year",
    "after a long meeting with the board", "in front of a curious crowd", "while the kettle was boiling",
    "during the summer holidays", "with surprising patience", "late at night", "despite the terrible weather",
    "as the sun went down",
]  # fmt: skip
_CLAUSES = [
    "because the old one had stopped working", "so that the children could play outside",
    "although nobody had asked for it", "and then went home to rest", "which surprised everyone in the village",
    "but the problem came back a week later", "since the deadline was only two days away",
]  # fmt: skip


def sentences(count: int = EMBED_SENTENCES) -> list[str]:
    """``count`` different English sentences of 8 to 30 words, the same on every call."""
    rng = random.Random(22)  # noqa: S311 -- a fixed workload, not a secret
    found: dict[str, None] = {}
    while len(found) < count:
        parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        parts += rng.sample(_ADVERBIALS, rng.randint(0, 2))
        if rng.random() < 0.5:
            parts.append(rng.choice(_CLAUSES))
        text = " ".join(parts)
        while len(text.split()) < 8:
            text += " " + rng.choice(_ADVERBIALS)
        if len(text.split()) <= 30:
            found[text + "."] = None
    return list(found)


@dataclass(frozen=True)
class Names:
    """The registry versions the suite runs on."""

    embed_torch: str = "minilm"
    embed_onnx: str = "minilm:onnx"
    embed_onnx_int8: str | None = "minilm:onnx-int8"
    llm_onnx: str = "smollm2:onnx"
    llm_onnx_int8: str | None = "smollm2:onnx-int8"
    llm_torch: str = "smollm2:safetensors"
    llm_gguf: str = "smollm2"

    @classmethod
    def for_model(cls, gguf: str) -> Names:
        """The conversions of the GGUF ``gguf`` as :func:`prepare` names them (``REPO:safetensors``, ``REPO:onnx``)."""
        from llmos.registry.convert import derived_name

        onnx = derived_name(gguf, "onnx")
        return cls(
            llm_gguf=gguf,
            llm_torch=derived_name(gguf, "safetensors"),
            llm_onnx=onnx,
            llm_onnx_int8=derived_name(onnx, "int8"),
        )


def _exists(registry: Registry, name: str) -> bool:
    try:
        registry.show(name)
    except NotFoundError:
        return False
    return True


def prepare(registry: Registry, names: Names) -> None:
    """Pull MiniLM and convert the ONNX and safetensors versions that ``names`` asks for and the store lacks."""
    from llmos.registry import sources
    from llmos.registry.convert import convert, quantize

    def int8(source: str, target: str | None) -> Callable[[], object]:
        return lambda: quantize(registry, source, kind="int8", target=target)

    steps: list[tuple[str | None, Callable[[], object]]] = [
        (names.embed_torch, lambda: sources.pull(registry, names.embed_torch)),
        (names.embed_onnx, lambda: convert(registry, names.embed_torch, to="onnx", target=names.embed_onnx)),
        (names.embed_onnx_int8, int8(names.embed_onnx, names.embed_onnx_int8)),
        (names.llm_torch, lambda: convert(registry, names.llm_gguf, target=names.llm_torch)),
        (names.llm_onnx, lambda: convert(registry, names.llm_torch, to="onnx", target=names.llm_onnx)),
        (names.llm_onnx_int8, int8(names.llm_onnx, names.llm_onnx_int8)),
    ]
    for name, make in steps:
        if name is not None and not _exists(registry, name):
            print(f"  making {name} ...", file=sys.stderr, flush=True)
            make()


@dataclass
class EmbedResult:
    sentences: int
    tokens: int
    """Tokens of all sentences, as the ONNX side counts them."""
    seconds: dict[str, list[float]] = field(default_factory=dict)
    """Per side: the seconds of each timed pass over all sentences."""
    min_cosine: float = float("nan")
    int8_min_cosine: float = float("nan")
    """The lowest cosine of the int8 ONNX side's vectors to sentence-transformers'."""

    def rate(self, side: str) -> float:
        """Sentences per second of the fastest pass."""
        passes = self.seconds.get(side, [])
        return self.sentences / min(passes) if passes else float("nan")


@dataclass
class DecodeRun:
    sequences: int
    tokens: int
    seconds: float
    ttft: float
    """Median over the run's requests of the seconds from submission to their first token."""

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class FormatsResult:
    cpu: str
    threads: int
    names: Names
    levels: list[int]
    max_tokens: int
    repeats: int
    embed: EmbedResult
    decode: dict[tuple[str, int], list[DecodeRun]] = field(default_factory=dict)

    def rate(self, backend: str, level: int) -> float:
        """Tokens per second of the backend's fastest run at ``level``."""
        runs = self.decode.get((backend, level), [])
        return max(r.rate for r in runs) if runs else float("nan")

    def ttft(self, backend: str, level: int) -> float:
        """The lowest of the runs' median times to first token at ``level``."""
        runs = self.decode.get((backend, level), [])
        return min(r.ttft for r in runs) if runs else float("nan")


def measure_embeddings(loader: Loader, registry: Registry, names: Names, texts: list[str], repeats: int) -> EmbedResult:
    """Every MiniLM side loaded at once, a warm-up pass each, then alternating timed passes (module docstring)."""
    wanted = [(ONNX, names.embed_onnx, "onnx"), (TORCH, names.embed_torch, "sentence-transformers")]
    if names.embed_onnx_int8 is not None:
        wanted.append((ONNX_INT8, names.embed_onnx_int8, "onnx"))
    sides: list[tuple[str, Any]] = []
    try:
        for side, name, backend in wanted:
            sides.append((side, loader(registry.resolve(name, verify=True), backend)))
        vectors = {side: model.embed(texts) for side, model in sides}
        result = EmbedResult(len(texts), vectors[ONNX][1], {side: [] for side, _ in sides})
        result.min_cosine = min_cosine(vectors[ONNX][0], vectors[TORCH][0])
        if ONNX_INT8 in vectors:
            result.int8_min_cosine = min_cosine(vectors[ONNX_INT8][0], vectors[TORCH][0])
        for turn in range(max(3, repeats)):
            for side, model in sides if turn % 2 == 0 else sides[::-1]:
                started = time.perf_counter()
                model.embed(texts)
                result.seconds[side].append(time.perf_counter() - started)
            timings = ", ".join(f"{side} {result.seconds[side][-1]:.2f}s" for side, _ in sides)
            print(f"  embeddings pass {turn + 1}: {timings}", file=sys.stderr, flush=True)
    finally:
        for _side, model in sides:
            model.close()
    return result


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest cosine similarity between row i of ``a`` and row i of ``b``."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min((a * b).sum(axis=1) / np.maximum(norms, 1e-12)))


def decode_run(core: EngineCore, prompts: list[list[int]], max_tokens: int) -> DecodeRun:
    """Submit all ``prompts`` at once, step ``core`` until idle; a failed request raises its error."""
    streams = []
    started = time.monotonic()
    for prompt in prompts:
        stream = SyncOutputStream()
        core.submit(GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0)), stream)
        streams.append(stream)
    while core.has_work():
        core.step()
    wall = time.monotonic() - started
    tokens, firsts = 0, []
    for stream in streams:
        events = list(stream)
        for event in events:
            if event.error is not None:
                raise event.error
        if not events or not events[-1].finished:
            raise DecodeError("a benchmark request ended without finishing")
        tokens += sum(len(event.token_ids) for event in events)
        firsts.append(next((e.time - started for e in events if e.token_ids), wall))
    return DecodeRun(len(prompts), tokens, wall, statistics.median(firsts))


def measure_decode(
    loader: Loader, registry: Registry, name: str, backend: str, levels: list[int], max_tokens: int, repeats: int
) -> dict[int, list[DecodeRun]]:
    """One LLM version on one backend: warm-up, then ``repeats`` runs per level; the model is closed after."""
    instance: Any = loader(registry.resolve(name, verify=True), backend)
    try:
        model = instance.backend
        core = EngineCore(model, EngineConfig(prefix_cache=False, speculative=False), background=False)
        runs: dict[int, list[DecodeRun]] = {}
        for level in levels:
            prompts = [instance.chat_tokens([ChatMessage("user", QUESTIONS[i % len(QUESTIONS)])]) for i in range(level)]
            decode_run(core, prompts, WARMUP_TOKENS)
            for _ in range(repeats):
                run = decode_run(core, prompts, max_tokens)
                runs.setdefault(level, []).append(run)
                print(f"  {name} ({backend}), {level} streams: {run.rate:.1f} tok/s", file=sys.stderr, flush=True)
        return runs
    finally:
        instance.close()


def measure(
    settings: Settings,
    registry: Registry,
    *,
    cpu: str,
    names: Names | None = None,
    sentence_count: int = EMBED_SENTENCES,
    levels: list[int] | None = None,
    max_tokens: int = ANSWER_TOKENS,
    repeats: int = 3,
) -> FormatsResult:
    """Run the embeddings and decode measurements on versions that exist (see :func:`prepare`)."""
    names = names or Names()
    levels = levels or LEVELS
    repeats = max(1, repeats)
    loader = Loader(settings, registry, max_running=max(16, *levels))
    texts = sentences(sentence_count)
    result = FormatsResult(
        cpu, settings.threads, names, levels, max_tokens, repeats,
        measure_embeddings(loader, registry, names, texts, repeats),
    )  # fmt: skip
    backends = [(ONNX, names.llm_onnx, "onnx"), (TORCH, names.llm_torch, "torch"), (LLAMA, names.llm_gguf, "llama.cpp")]
    if names.llm_onnx_int8 is not None:
        backends.insert(1, (ONNX_INT8, names.llm_onnx_int8, "onnx"))
    for label, name, backend in backends:
        for level, runs in measure_decode(loader, registry, name, backend, levels, max_tokens, repeats).items():
            result.decode[(label, level)] = runs
    return result


def format_report(result: FormatsResult) -> list[str]:
    embed, names = result.embed, result.names
    onnx_rate, torch_rate = embed.rate(ONNX), embed.rate(TORCH)
    ratio = onnx_rate / torch_rate
    int8_lines = []
    if ONNX_INT8 in embed.seconds:
        int8_ratio = embed.rate(ONNX_INT8) / torch_rate
        int8_lines = [
            f"  {ONNX_INT8:<19}{embed.rate(ONNX_INT8):>10.1f} sentences/s ({names.embed_onnx_int8}, lowest cosine to"
            f" PyTorch's vectors {embed.int8_min_cosine:.4f}): {int8_ratio:.2f}x PyTorch"
        ]
    passes = len(embed.seconds.get(ONNX, []))
    lines = [
        f"formats on {result.cpu}: threads {result.threads}; every model through llmos's loader in this process",
        "",
        f"embeddings: {embed.sentences} sentences ({embed.tokens} tokens), {names.embed_onnx} on {ONNX} vs"
        f" {names.embed_torch} on sentence-transformers ({TORCH}); best of {passes} alternating passes after a"
        " warm-up, each side batching as it does by default",
        f"  {ONNX:<19}{onnx_rate:>10.1f} sentences/s",
        f"  {TORCH:<19}{torch_rate:>10.1f} sentences/s",
        f"  lowest cosine between the float sides' vectors: {embed.min_cosine:.6f}",
        f"  goal: ONNX/PyTorch {ratio:.2f} (goal >= {EMBED_GOAL:.1f}): {'met' if ratio >= EMBED_GOAL else 'not met'}",
        *int8_lines,
        "",
        f"decode: {names.llm_onnx} ({ONNX}), {names.llm_onnx_int8} ({ONNX_INT8}), {names.llm_torch} ({TORCH}),"
        f" {names.llm_gguf} ({LLAMA}); N chat"
        f" questions submitted at once, up to {result.max_tokens} greedy tokens each, engine stepped in-process"
        f" without prefix cache or speculation; tok/s = generated tokens / wall time, best of {result.repeats}"
        " runs after a warm-up (TTFT p50: the median over one run's requests, lowest of the runs)",
        "",
        "| backend | streams | tok/s | TTFT p50 | vs llama.cpp |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label in (ONNX, ONNX_INT8, TORCH, LLAMA):
        if (label, result.levels[0]) not in result.decode:
            continue
        for level in result.levels:
            rate = result.rate(label, level)
            versus = rate / result.rate(LLAMA, level)
            lines.append(
                f"| {label} | {level} | {rate:.1f} | {result.ttft(label, level) * 1000:.0f} ms | {versus:.2f}x |"
            )
    return lines
