"""Evaluation: perplexity through the engine, stored reports, and agreement with an independent computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llmos.config import Settings
from llmos.data.shipped import heldout_text_path
from llmos.evaluation.perplexity import windows
from llmos.registry.datasets import store_rows
from llmos.registry.service import Registry
from tests.helpers import run_cli

PARAGRAPHS = 12


def test_windows_score_every_token_once() -> None:
    for n, window, stride in [(10, 4, 2), (1000, 128, 64), (5, 8, 4), (17, 5, 5), (2, 2, 1)]:
        scored = [i for _begin, end, first in windows(n, window, stride) for i in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - begin <= window for begin, end, _ in windows(n, window, stride))


def transformers_perplexity(model_dir: Path, text: str, window: int, stride: int) -> float:
    """The textbook strided loop with plain transformers (no llmos code on the scoring path)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    nll, count, previous_end = 0.0, 0, 1
    begin = 0
    while previous_end < len(ids):
        end = min(begin + window, len(ids))
        chunk = ids[begin:end].unsqueeze(0)
        with torch.no_grad():
            logits = model(chunk).logits[0, :-1].double()
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, chunk[0, 1:, None])[:, 0]
        first = previous_end - begin  # positions before this were scored by an earlier window
        nll -= float(logprobs[first - 1 :].sum())
        count += end - previous_end
        previous_end = end
        begin = end - (window - stride)
    return math.exp(nll / count)


@pytest.mark.timeout(900)
def test_perplexity_agrees_with_transformers_and_reports_are_stored(converted_settings: Settings) -> None:
    home = converted_settings.home  # the session's store: smollm2 and its float32 conversion smollm2:safetensors
    registry = Registry(converted_settings)
    model_dir = registry.model_dir(registry.resolve("smollm2:safetensors"))
    # the held-out text as a dataset of paragraphs; the first PARAGRAPHS (about 1,300 tokens: five strided windows)
    # are scored, which `--data ... --limit` joins back into the same text the reference scores
    paragraphs = [p for p in heldout_text_path().read_text(encoding="utf-8").split("\n\n") if p.strip()]
    store_rows(registry, [{"text": p} for p in paragraphs], "heldout-prose", operation="import", report={})
    registry.close()

    text = "\n\n".join(paragraphs[:PARAGRAPHS])
    reference = transformers_perplexity(model_dir, text, 512, 256)
    scored = ("--data", "heldout-prose", "--limit", str(PARAGRAPHS), "--window", "512", "--stride", "256", "--json")
    result = run_cli(home, "eval", "smollm2:safetensors", *scored, timeout=600)
    assert result.returncode == 0, result.stderr
    ours = json.loads(result.stdout)[0]
    assert ours["params"]["backend"] == "torch"
    assert abs(ours["metrics"]["perplexity"] - reference) <= 0.02 * reference, (ours["metrics"], reference)

    assert ours["metrics"]["tokens"] > 1024  # several windows, so the stride's bookkeeping counts
    gguf = run_cli(home, "eval", "smollm2", *scored, timeout=600)
    assert gguf.returncode == 0, gguf.stderr
    quantized = json.loads(gguf.stdout)[0]["metrics"]["perplexity"]
    assert quantized > 1 and abs(quantized - reference) <= 0.25 * reference  # Q4_1 costs a little quality
    print(f"\nheld-out text perplexity (first {PARAGRAPHS} paragraphs): transformers fp32 {reference:.3f},"
          f" llmos torch fp32 {ours['metrics']['perplexity']:.3f}, llmos llama.cpp Q4_1 {quantized:.3f}")  # fmt: skip

    compared = run_cli(home, "eval", "compare", "smollm2", "smollm2:safetensors", "--json")
    rows = json.loads(compared.stdout)
    assert [round(r["perplexity"], 6) for r in rows[:2]] == [
        round(quantized, 6),
        round(ours["metrics"]["perplexity"], 6),
    ]
    assert run_cli(home, "eval", "compare", "smollm2:nothing").returncode == 1
    assert run_cli(home, "eval", "smollm2", "--task", "bleu").returncode == 1
