"""Greedy output on the real SmolLM2 GGUF through llama.cpp is the same tokens whatever else happens in the engine.

Alone or among 16, with or without the prefix cache (cold and warm), with or without prompt-lookup speculation, and
through a KV pool so small that sequences are preempted and recomputed: every answer is token-identical to the one
the request gets alone on an idle engine. This holds because llmos runs llama.cpp's CPU flash attention in its
batch-invariant form (Settings.batch_invariant, scripts/patches); with llama.cpp's stock kernels 11 of these 16
answers change in a batch. The engine is stepped directly (no threads, no sleeps).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.engine.core import EngineConfig, EngineCore
from llmos.engine.request import GenerationOutput, GenerationRequest
from llmos.engine.streams import SyncOutputStream
from llmos.types import SamplingParams

pytest.importorskip("llama_cpp")

from llmos.engine.backends.llamacpp import LlamaCppModel

SYSTEM = "You are a helpful assistant for a travel agency. Answer in one or two sentences. " * 3
QUESTIONS = [
    "What is the capital of France?",
    "Repeat exactly: the quick brown fox jumps over the lazy dog.",
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
]
MAX_TOKENS = 24


def chat(model: LlamaCppModel, question: str) -> list[int]:
    text = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return model.tokenize(text, add_special=False, parse_special=True)


def run(core: EngineCore, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[GenerationOutput]]:
    """Submit all prompts at once, step until the engine is idle, return each request's events."""
    streams = []
    for prompt in prompts:
        stream = SyncOutputStream()
        core.submit(GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0)), stream)
        streams.append(stream)
    while core.has_work():
        core.step()
    return [list(stream) for stream in streams]


def tokens(events: list[GenerationOutput]) -> list[int]:
    return [t for event in events for t in event.token_ids]


def new_engine(model: LlamaCppModel, **config: Any) -> EngineCore:
    return EngineCore(model, EngineConfig(**config), background=False)


@pytest.fixture(scope="module")
def model(smollm2_file: Path) -> Iterator[LlamaCppModel]:
    loaded = LlamaCppModel(smollm2_file, n_ctx_seq=8192, n_batch=512, n_seq_max=16, threads=2, kv_pool_tokens=16384)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def prompts(model: LlamaCppModel) -> list[list[int]]:
    return [chat(model, question) for question in QUESTIONS]


@pytest.fixture(scope="module")
def reference(model: LlamaCppModel, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt alone on an idle engine without prefix cache or speculation."""
    core = new_engine(model, prefix_cache=False, speculative=False)
    return [tokens(run(core, [prompt])[0]) for prompt in prompts]


def test_the_reference_answers_are_real_text(model: LlamaCppModel, reference: list[list[int]]) -> None:
    assert "Paris" in model.detokenize(reference[0])
    assert len({tuple(answer) for answer in reference}) == len(reference)  # 16 different answers


def test_a_batch_of_16_gives_the_answers_of_each_alone(
    model: LlamaCppModel, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    core = new_engine(model, prefix_cache=False, speculative=False)
    assert [tokens(events) for events in run(core, prompts)] == reference


def test_the_prefix_cache_cold_and_warm_alone_and_batched_changes_no_answer(
    model: LlamaCppModel, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    alone = new_engine(model, prefix_cache=True, speculative=False)
    answers = [run(alone, [prompt])[0] for prompt in prompts]
    assert [tokens(events) for events in answers] == reference
    assert all(events[-1].cached_tokens > 0 for events in answers[1:])  # the shared system prompt hit
    batched = new_engine(model, prefix_cache=True, speculative=False)
    cold = run(batched, prompts)
    warm = run(batched, prompts)
    assert [tokens(events) for events in cold] == reference
    assert [tokens(events) for events in warm] == reference
    assert all(events[-1].cached_tokens >= len(prompt) - 1 for events, prompt in zip(warm, prompts, strict=True))


def test_speculative_decoding_changes_no_answer(
    model: LlamaCppModel, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    alone = new_engine(model, prefix_cache=False, speculative=True)
    assert [tokens(run(alone, [prompt])[0]) for prompt in prompts] == reference
    batched = new_engine(model, prefix_cache=True, speculative=True)
    assert [tokens(events) for events in run(batched, prompts)] == reference
    assert alone.stats().draft_tokens > 0  # drafts were really verified


def test_a_pool_too_small_for_the_batch_preempts_and_every_answer_stays_the_same(
    smollm2_file: Path, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    small = LlamaCppModel(smollm2_file, n_ctx_seq=8192, n_batch=256, n_seq_max=16, threads=2, kv_pool_tokens=1024)
    try:
        core = new_engine(small, prefix_cache=False, speculative=False)  # every prompt takes its own cells
        answers = run(core, prompts)
        assert core.scheduler.preemptions > 0
        assert [tokens(events) for events in answers] == reference
        assert all(events[-1].finish_reason in ("stop", "length") for events in answers)
    finally:
        small.close()


CHILD = "LLMOS_TEST_CHILD"


def test_a_6000_token_sequence_runs_beside_15_short_ones(model: LlamaCppModel, prompts: list[list[int]]) -> None:
    """Capacity, not identity: run in a child process with batch-invariant attention off (a process reads the switch
    once), where prefilling 6000 tokens takes half the time it takes with the invariant kernel."""
    if os.environ.get(CHILD) != "1":
        test = f"{__file__}::test_a_6000_token_sequence_runs_beside_15_short_ones"
        env = {**os.environ, CHILD: "1", "LLMOS_BATCH_INVARIANT": "0"}
        child = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
            env=env,
            cwd=Path(__file__).parents[2],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
        assert "1 passed" in child.stdout
        return
    filler = model.tokenize("The travel agency keeps a long log of every booking it made. " * 520, add_special=False)
    long_prompt = prompts[0][:-12] + filler[:6000] + prompts[0][-12:]
    assert len(long_prompt) > 6000
    core = new_engine(model, prefix_cache=False, speculative=False)
    answers = run(core, [long_prompt, *prompts[1:]], max_tokens=4)
    assert all(events[-1].finish_reason in ("stop", "length") and tokens(events) for events in answers)
    assert core.scheduler.preemptions == 0
