"""The issue-18 benchmark suites (multiturn, speculative, batch) at a tiny size against the real SmolLM2.

They check that each suite drives real servers, that its report has every row with numbers, and the bookkeeping a
wrong figure would come from (conversations grow by their answers, the raw loop counts the tokens the server
generates); never the timing goals.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmos.bench import batch, multiturn, speculative
from llmos.bench.serving import LLMOS, PEER
from llmos.config import Settings
from llmos.registry.service import Registry, ResolvedModel
from tests.helpers import run_cli

NUMBER = r"\d+\.\d+"


@pytest.fixture(scope="module")
def smollm2(pulled_settings: Settings) -> ResolvedModel:
    registry = Registry(pulled_settings)
    try:
        return registry.resolve("smollm2", verify=True)
    finally:
        registry.close()


def _section(lines: list[str], start: str) -> list[str]:
    """The lines from the first that starts with ``start`` up to the next blank line."""
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    end = next((i for i in range(first, len(lines)) if not lines[i].strip()), len(lines))
    return lines[first:end]


def _row(lines: list[str], *prefix: str) -> str:
    found = [line for line in lines if re.match(r"\s*" + r"\s+".join(map(re.escape, prefix)) + r"\s", line)]
    assert len(found) == 1, f"no single row {prefix} in:\n" + "\n".join(lines)
    return found[0]


def test_multiturn_tiny(pulled_settings: Settings, smollm2: ResolvedModel, tmp_path: Path) -> None:
    result = multiturn.measure(
        smollm2.view.name, smollm2.primary_path, threads=pulled_settings.threads, context=2048,
        home=pulled_settings.home, log_dir=tmp_path, cpu="Test CPU", peer=False, turns=2, max_tokens=4,
        conversations=2, clients=2, repeats=1,
    )  # fmt: skip
    assert result.records and all(r.result.ok for r in result.records)
    assert {r.test for r in result.records} == {multiturn.ONE, "2 conversations"}
    for test, count in ((multiturn.ONE, 1), ("2 conversations", 2)):
        for conversation in range(count):
            first, second = (
                next(r.result for r in result.records if (r.test, r.conversation, r.turn) == (test, conversation, t))
                for t in (1, 2)
            )
            assert first.usage is not None and second.usage is not None
            # the second turn resends the system prompt, the first question, the model's answer and a new question
            assert second.usage["prompt_tokens"] >= first.usage["prompt_tokens"] + first.tokens + 5
            assert first.text
    assert result.first_prompt_tokens is not None and result.first_prompt_tokens > 900  # the ~900-token system prompt
    assert [len(result.shared[v]) for v in (multiturn.CACHE_ON, multiturn.CACHE_OFF)] == [2, 2]
    assert PEER not in result.shared

    lines = multiturn.format_report(result)
    assert "Test CPU" in lines[0] and "2-turn conversations" in lines[0]
    table = _section(lines, "test ")
    for prefix, samples in (
        ((multiturn.ONE, LLMOS), 1),
        (("2 conversations", LLMOS), 2),
        (("2 clients shared", multiturn.CACHE_ON), 2),
        (("2 clients shared", multiturn.CACHE_OFF), 2),
    ):
        match = re.search(rf"{NUMBER}s\s+{NUMBER}s\s+{NUMBER}s\s+(\d+)\s+0$", _row(table, *prefix))
        assert match and int(match.group(1)) == samples, prefix
    by_turn = _section(lines, "TTFT by turn")
    assert "Test CPU" in by_turn[0]
    for test in (multiturn.ONE, "2 conversations"):
        assert re.search(rf"\s{NUMBER}\s+{NUMBER}$", _row(by_turn, test, LLMOS))
    cached = _section(lines, "llmos prompt tokens / cached tokens")
    for test in (multiturn.ONE, "2 conversations"):
        assert re.search(r"t1 \d+/(\d+|-)\s+t2 \d+/(\d+|-)$", _row(cached, test))
    goals = _section(lines, "goals")
    assert "Test CPU" in goals[0]
    assert "1 conversation: llmos/peer mean TTFT n/a (goal <= 1.00)" in goals  # no peer in this run
    assert any(re.fullmatch(rf"2 clients shared: cache on/off TTFT p50 {NUMBER} \(goal <= 0.20\): (met|not met)", g)
               for g in goals)  # fmt: skip


def test_speculative_tiny_with_peer(pulled_settings: Settings, smollm2: ResolvedModel, tmp_path: Path) -> None:
    result = speculative.measure(
        smollm2.view.name, smollm2.primary_path, threads=pulled_settings.threads, context=2048,
        home=pulled_settings.home, log_dir=tmp_path, cpu="Test CPU", peer=True, max_tokens=8, repeats=1, copy=1,
        chat=1,
    )  # fmt: skip
    assert len(result.samples) == 6 and all(s.result.ok and s.result.tokens > 1 for s in result.samples)
    assert result.identical("copy")[1] == 1 and result.identical("chat")[1] == 1
    # speculation really ran (the server's /metrics): a copy prompt's answer repeats its passage, so drafts hit
    assert 0 < result.accepted_draft_tokens <= result.draft_tokens

    lines = speculative.format_report(result)
    assert "Test CPU" in lines[0]
    table = _section(lines, "kind ")
    for kind in speculative.KINDS:
        for variant in (speculative.SPEC_ON, speculative.SPEC_OFF, PEER):
            row = _row(table, kind, variant)
            assert re.search(rf"{NUMBER}\s+{NUMBER}s\s+\d+\s+1\s+0$", row), row
    goals = "\n".join(_section(lines, "goals"))
    assert "Test CPU" in goals
    for label in ("copy: speculative/no speculative", "copy: llmos speculative/peer", "chat: speculative/no"):
        assert re.search(re.escape(label) + rf".* {NUMBER} \(goal >= ", goals), label


def test_batch_tiny(pulled_settings: Settings, smollm2: ResolvedModel, tmp_path: Path) -> None:
    registry = Registry(pulled_settings)
    try:
        with registry.loadable_dir(smollm2) as model_dir:
            result = batch.measure(
                pulled_settings, registry, smollm2, model_dir, gguf=smollm2.primary_path, home=pulled_settings.home,
                log_dir=tmp_path, cpu="Test CPU", levels=[1, 2], max_tokens=6, repeats=1, peer=False,
            )  # fmt: skip
    finally:
        registry.close()
    for level in (1, 2):
        raw, served = result.runs[(batch.RAW, level)][0], result.runs[(LLMOS, level)][0]
        # story prompts run the full 6 tokens: the raw loop generates exactly what the server generates
        assert raw.tokens == served.tokens == 6 * level
        assert raw.decode_tokens == 5 * level and 0 < raw.decode_seconds < raw.seconds
        assert served.errors == 0
    lines = batch.format_report(result)
    assert "Test CPU" in lines[0] and "(Q4_1)" in lines[0]
    table = _section(lines, "  N ")
    for level in (1, 2):
        row = _row(table, str(level))
        assert re.fullmatch(rf"\s*{level}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+0", row), row
    assert any(re.match(rf"2 sequences: llmos served/raw {NUMBER} \(goal >= 0.90", line) for line in lines)


def test_cli_names_the_new_suites(pulled_settings: Settings) -> None:
    result = run_cli(pulled_settings.home, "bench", "--suite", "nope")
    assert result.returncode != 0
    message = result.stdout + result.stderr
    for suite in ("multiturn", "speculative", "batch", "constrained", "formats"):
        assert suite in message, message


def test_constrained_tiny(pulled_settings: Settings, smollm2: ResolvedModel, tmp_path: Path) -> None:
    from llmos.bench import constrained

    result = constrained.measure(
        smollm2.view.name, smollm2.primary_path, threads=pulled_settings.threads, context=2048,
        home=pulled_settings.home, log_dir=tmp_path, cpu="Test CPU", levels=[2], max_tokens=48, repeats=1,
    )  # fmt: skip
    assert len(result.samples) == 2 * len(constrained.VARIANTS) and all(s.result.ok for s in result.samples)
    for sample in result.samples:  # each variant really produced its kind of output
        if sample.variant == "json_schema" and sample.result.usage and sample.result.tokens < 48:
            assert sample.result.text.lstrip().startswith("{")
        if sample.variant == "tool_required":
            assert sample.result.text == ""  # the call goes out as tool_calls deltas, not content
    lines = constrained.format_report(result)
    for variant in constrained.VARIANTS:
        assert re.search(rf"{NUMBER}", _row(lines, "2", variant))
    assert any("tool_required" in line and "goal >= 0.9" in line for line in lines)


def test_formats_tiny(converted_settings: Settings) -> None:
    """Issue 22's suite on 24 sentences and 1 and 2 streams of 6 tokens: every side ran, the embeddings agree,
    every figure is a positive number. The suite makes the ONNX versions the session's store lacks."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("sentence_transformers")
    import math

    from llmos.bench import formats

    registry = Registry(converted_settings)

    try:
        names = formats.Names(  # the names tests/e2e/test_onnx.py uses too, so the session store exports each once
            embed_onnx="minilm:onnx",
            embed_onnx_int8="minilm:formats-onnx-int8",
            llm_onnx="smollm2:onnx",
            llm_onnx_int8=None,  # quantizing the LLM takes a minute; the embeddings' int8 side covers the path
        )
        formats.prepare(registry, names)
        result = formats.measure(
            converted_settings, registry, cpu="Test CPU", names=names, sentence_count=24, levels=[1, 2], max_tokens=6,
            repeats=1,
        )  # fmt: skip
    finally:
        registry.close()

    embed = result.embed
    assert embed.sentences == 24 and embed.tokens > 24 * 8  # every sentence has at least 8 words
    assert embed.min_cosine > 0.999
    assert 0.95 < embed.int8_min_cosine < 1.0
    for side in (formats.ONNX, formats.TORCH, formats.ONNX_INT8):
        assert len(embed.seconds[side]) == 3 and all(s > 0 for s in embed.seconds[side])  # at least 3 passes
        assert embed.rate(side) > 0
    for backend in (formats.ONNX, formats.TORCH, formats.LLAMA):
        for level in (1, 2):
            [run] = result.decode[(backend, level)]
            assert run.sequences == level and 0 < run.tokens <= 6 * level, (backend, level, run)
            assert 0 < run.ttft <= run.seconds
            ratio = result.rate(backend, level) / result.rate(formats.LLAMA, level)
            assert math.isfinite(ratio) and ratio > 0

    lines = formats.format_report(result)
    assert "Test CPU" in lines[0]
    assert "  lowest cosine between the float sides' vectors: " + f"{embed.min_cosine:.6f}" in lines
    assert any(line.startswith(f"  {formats.ONNX_INT8} ") and "x PyTorch" in line for line in lines)
    assert not any(line.startswith(f"| {formats.ONNX_INT8} |") for line in lines)  # no int8 LLM was asked for
    assert any(re.fullmatch(rf"  goal: ONNX/PyTorch {NUMBER} \(goal >= 1\.5\): (met|not met)", line) for line in lines)
    for backend in (formats.ONNX, formats.TORCH, formats.LLAMA):
        for level in (1, 2):
            assert any(
                re.fullmatch(rf"\| {re.escape(backend)} \| {level} \| {NUMBER} \| \d+ ms \| {NUMBER}x \|", line)
                for line in lines
            ), (backend, level)
