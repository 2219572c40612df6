"""Real generation with the bundled SmolLM2 GGUF through the SDK and the CLI."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import llmos
from llmos.config import Settings
from llmos.errors import ContextLengthExceededError, InvalidInputError, ModelNotFoundError
from llmos.sdk import Model
from tests.helpers import run_cli

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def model(pulled_settings: Settings) -> Iterator[Model]:
    with llmos.load_model("smollm2", settings=pulled_settings) as loaded:
        yield loaded


def test_greedy_sdk_generation_answers_paris(model: Model) -> None:
    text = model.generate_text(QUESTION, max_length=32)
    assert "Paris" in text
    stats = model.last_stats
    assert stats is not None and stats.completion_tokens <= 32 and stats.prompt_tokens > 5


@pytest.mark.parametrize("extra_buffers", [True, False])
def test_paris_on_both_cpu_kernel_paths(pulled_settings: Settings, extra_buffers: bool) -> None:
    """Each path in a child process (the fast one may fault on this CPU), forced past the probe's verdict."""
    from llmos.engine.backends.llamacpp_path import decide

    verdict = decide(pulled_settings.model_copy(update={"llamacpp_extra_buffers": None}))
    if extra_buffers and not verdict.extra_buffers:
        pytest.skip(f"the probe found llama.cpp's fast path unusable on this machine: {verdict.reason}")
    if extra_buffers and verdict.lib_dir is not None:  # forcing the fast path runs the installed build, no variant
        pytest.skip(f"only a variant build's fast path works on this machine: {verdict.reason}")
    env = {"LLMOS_LLAMACPP_EXTRA_BUFFERS": "1" if extra_buffers else "0"}
    result = run_cli(pulled_settings.home, "run", "smollm2", QUESTION, "--temperature", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "llama.cpp runs" not in result.stderr  # explicit: no probe, no notice


def test_chat_uses_the_template_and_history(model: Model) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    assert "Paris" in model.chat(messages, max_length=32)
    prompt = model.render(messages)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")


def test_streaming_deltas_add_up_to_the_full_answer(model: Model) -> None:
    deltas = list(model.stream_text("Name three colors.", max_length=40))
    assert len(deltas) > 3
    assert "".join(deltas) == model.generate_text("Name three colors.", max_length=40)


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(model: Model) -> None:
    a = model.generate_text("Tell me a fact about cats.", max_length=24)
    b = model.generate_text("Tell me a fact about cats.", max_length=24)
    assert a == b
    s1 = model.generate_text("Write a word.", max_length=16, temperature=1.0, seed=7)
    s2 = model.generate_text("Write a word.", max_length=16, temperature=1.0, seed=7)
    assert s1 == s2


def test_max_length_and_stop_strings(model: Model) -> None:
    model.generate_text("Count from 1 to 50, separated by commas.", max_length=5)
    assert model.last_stats is not None
    assert model.last_stats.completion_tokens == 5
    assert model.last_stats.finish_reason == "length"
    full = model.generate_text(QUESTION, max_length=32)
    cut = model.generate_text(QUESTION, max_length=32, stop=["Paris"])
    assert "Paris" not in cut and full.startswith(cut)
    assert model.last_stats.finish_reason == "stop"


def test_raw_completion(model: Model) -> None:
    text = model.generate_text("The capital of France is", raw=True, max_length=8)
    assert "Paris" in text


def test_prompt_longer_than_context_is_refused(model: Model) -> None:
    with pytest.raises(ContextLengthExceededError, match="maximum context length"):
        model.generate_text("word " * 9000, raw=True, max_length=4)  # beyond the 8192-token window


def test_invalid_sampling_parameters_are_refused(model: Model) -> None:
    with pytest.raises(InvalidInputError, match="temperature"):
        model.generate_text("hi", temperature=-1)
    with pytest.raises(InvalidInputError, match="top_p"):
        model.generate_text("hi", top_p=2.0)


def test_unknown_model_is_not_pulled(pulled_settings: Settings) -> None:
    with pytest.raises(ModelNotFoundError):
        llmos.load_model("no-such-model", settings=pulled_settings)


def test_load_model_pulls_a_bundled_model_on_first_use(settings: Settings) -> None:
    with llmos.load_model("smollm2", settings=settings) as loaded:
        assert loaded.name == "smollm2:latest"


def test_cli_run_streams_the_answer(pulled_settings: Settings) -> None:
    result = run_cli(pulled_settings.home, "run", "smollm2", QUESTION, "--temperature", "0", "--verbose")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "tok/s" in result.stderr
    piped = run_cli(pulled_settings.home, "run", "smollm2", "--temperature", "0", stdin=QUESTION)
    assert "Paris" in piped.stdout


def test_cli_interactive_chat_keeps_history(pulled_settings: Settings) -> None:
    """Drive `llmos run smollm2` through a real pseudo-terminal, as a person would."""
    main, child = pty.openpty()
    env = {**os.environ, "LLMOS_HOME": str(pulled_settings.home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmos", "run", "smollm2", "--temperature", "0", "--max-tokens", "32"],
        stdin=child,
        stdout=child,
        stderr=child,
        env=env,
    )
    os.close(child)

    def read_until(marker: bytes, timeout: float = 120) -> bytes:
        seen = b""
        deadline = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(main, 4096)
                except OSError:
                    break
        return seen

    try:
        assert b">>> " in read_until(b">>> ")
        os.write(main, (QUESTION + "\n").encode())
        first = read_until(b">>> ")
        assert b"Paris" in first
        os.write(main, b"/bye\n")
        proc.wait(30)
        assert proc.returncode == 0
    finally:
        proc.kill()
        os.close(main)
