"""`llmos convert --to gguf`: safetensors models and LoRA fine-tunes become GGUF files that llama.cpp serves.

Acceptance: SmolLM2 goes GGUF (shipped Q4_1) -> safetensors (f32) -> GGUF f16 and comes back answering Paris on
llama.cpp with the perplexity the PyTorch backend measures on the safetensors copy (within 1%), and quantizes
further to q4_k_m. A LoRA adapter is merged into its base on the way, so llama.cpp alone answers like the PyTorch
backend serving base + adapter.
"""

from __future__ import annotations

import os
from pathlib import Path

import openai
import pytest

from llmos.config import Settings
from llmos.data.shipped import heldout_text_path
from llmos.evaluation.reports import evaluate
from llmos.registry.convert import convert, quantize
from llmos.registry.datasets import store_rows
from llmos.registry.service import Registry
from llmos.sdk import load_model
from llmos.training.finetune import FinetuneConfig, finetune
from llmos.training.optim import OptimizerConfig
from tests.helpers import ServerProcess, make_tiny_bpe_llama, run_cli, toy_qa_rows

HEAD_CHARS = 2000  # ~430 tokens of the held-out text: one window, a few seconds per backend


def heldout_head(settings: Settings, name: str) -> str:
    """A dataset holding the start of the shipped held-out text (created once per store)."""
    registry = Registry(settings)
    try:
        if not any(v.name.startswith(f"{name}:") for v in registry.list_versions()):
            text = heldout_text_path().read_text(encoding="utf-8")[:HEAD_CHARS]
            store_rows(registry, [{"text": text}], name, operation="import", report={"source": "heldout head"})
    finally:
        registry.close()
    return name


_FLOAT_REFERENCE: dict[Path, tuple[float, int]] = {}


def heldout_perplexity(settings: Settings, name: str) -> tuple[float, int, str]:
    """(perplexity, tokens scored, backend) of ``name`` on the held-out head, window 512, stride 256."""
    report = evaluate(settings, name, data=heldout_head(settings, "heldout-head"), window=512, stride=256)
    return report.metrics["perplexity"], report.metrics["tokens"], report.params["backend"]


def float_reference(settings: Settings) -> tuple[float, int]:
    """The torch backend's perplexity of `smollm2:safetensors` (float32) on the held-out head, once per store."""
    if settings.home not in _FLOAT_REFERENCE:
        ppl, tokens, backend = heldout_perplexity(settings, "smollm2:safetensors")
        assert backend == "torch"
        _FLOAT_REFERENCE[settings.home] = (ppl, tokens)
    return _FLOAT_REFERENCE[settings.home]


def paris(settings: Settings, name: str) -> str:
    with load_model(name, settings=settings, pull=False) as model:
        return model.generate_text("What is the capital of France?", max_length=24, temperature=0)


@pytest.mark.timeout(900)
def test_smollm2_round_trip_to_gguf_answers_paris_keeps_perplexity_and_quantizes(converted_settings: Settings) -> None:
    home = converted_settings.home
    result = run_cli(home, "convert", "smollm2:safetensors", "--to", "gguf", "--name", "smollm2-rt:gguf-f16")
    assert result.returncode == 0, result.stderr
    registry = Registry(converted_settings)
    source, view = registry.show("smollm2:safetensors"), registry.show("smollm2-rt:gguf-f16")
    registry.close()
    assert view.format == "gguf" and view.quantization == "F16" and view.architecture == "llama"
    assert 0.45 < view.size / source.size < 0.55  # 16 of 32 bits per weight
    lineage = view.lineage[0]
    assert lineage.operation == "convert" and lineage.parent_name == "smollm2:safetensors"
    assert lineage.params == {"to": "gguf", "type": "f16"}
    assert view.chat_template == source.chat_template

    assert "Paris" in paris(converted_settings, "smollm2-rt:gguf-f16")
    ppl, tokens, backend = heldout_perplexity(converted_settings, "smollm2-rt:gguf-f16")
    ref, ref_tokens = float_reference(converted_settings)
    assert backend == "llama.cpp" and tokens == ref_tokens  # the same tokenizer on both sides
    print(f"\nperplexity on {tokens} held-out tokens: GGUF f16 (llama.cpp) {ppl:.3f}, float32 (torch) {ref:.3f}")
    assert abs(ppl / ref - 1) <= 0.01

    registry = Registry(converted_settings)
    child = quantize(registry, "smollm2-rt:gguf-f16", kind="q4_k_m")
    registry.close()
    assert child.name == "smollm2-rt:q4_k_m" and child.quantization == "Q4_K_M" and child.size < view.size / 2
    assert "Paris" in paris(converted_settings, "smollm2-rt:q4_k_m")


@pytest.mark.timeout(900)
def test_a_lora_fine_tune_converts_to_gguf_and_llamacpp_answers_like_torch(tmp_path: Path) -> None:
    """A tiny byte-level-BPE Llama, LoRA-trained for a few seconds on 'double N?' -> 2N."""
    home = tmp_path / "home"
    key = os.urandom(32).hex()  # adapters are encrypted at rest; so must be the file they are merged into
    settings = Settings(home=home, encryption_key=key)
    base_dir = make_tiny_bpe_llama(tmp_path / "base", seed=3, init=0.05)
    rows = toy_qa_rows(48)
    config = FinetuneConfig(
        method="lora", optimizer=OptimizerConfig(lr=3e-2), batch_size=8, max_steps=120, warmup_steps=2,
        checkpoint_every=100, eval_every=100, seed=0, threads=1, lora_r=8,
    )  # fmt: skip
    result = finetune(base_dir, rows[:40], rows[40:], tmp_path / "out", tmp_path / "ckpt", config, log=lambda _: None)
    assert result.validation_loss is not None and result.initial_validation_loss is not None
    assert result.validation_loss < 0.95 * result.initial_validation_loss  # the adapter learned something
    registry = Registry(settings)
    registry.import_path(base_dir, "tiny-base")
    registry.import_path(tmp_path / "out", "tiny-lora", base="tiny-base", operation="fine-tune")

    view = convert(registry, "tiny-lora", to="gguf", out_type="f32")
    assert registry.blobs.is_encrypted(view.files[0].digest)
    registry.close()
    assert view.name == "tiny-lora:gguf-f32" and view.format == "gguf" and view.quantization == "F32"
    assert [(item.operation, item.parent_name) for item in view.lineage] == [
        ("convert", "tiny-lora:latest"),
        ("convert", "tiny-base:latest"),
    ]
    assert view.lineage[0].params == {"to": "gguf", "type": "f32", "merged_adapter": True, "base": "tiny-base:latest"}

    # f32 attention: llama.cpp then computes like torch up to rounding (the f16 default moved the log-probability of
    # one sharply attended token of this small model by 0.19 on an AMD EPYC, where the adapter trains differently)
    server = ServerProcess(home, env={"LLMOS_ENCRYPTION_KEY": key, "LLMOS_KV_CACHE_TYPE": "f32"})
    try:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", timeout=300)

        def answer(model: str, prompt: str) -> str:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0
            )
            return reply.choices[0].message.content or ""

        def prompt_logprobs(model: str, text: str) -> list[float]:
            scored = client.completions.create(model=model, prompt=text, max_tokens=0, echo=True, logprobs=0)
            assert scored.choices[0].logprobs is not None
            return [float(lp) for lp in scored.choices[0].logprobs.token_logprobs[1:]]

        prompts = ["double 3?", "double 21?", "double 44?"]
        torch_answers = [answer("tiny-lora", p) for p in prompts]  # base on torch + the adapter
        gguf_answers = [answer("tiny-lora:gguf-f32", p) for p in prompts]  # the merged file on llama.cpp
        base_answers = [answer("tiny-base", p) for p in prompts]
        text = "double 3? 6\ndouble 21? 42\ndouble 44? 88\nThe year (1905) had 365 days."
        torch_scores, gguf_scores, base_scores = (
            prompt_logprobs(model, text) for model in ("tiny-lora", "tiny-lora:gguf-f32", "tiny-base")
        )
    finally:
        server.stop()
    assert len(gguf_scores) == len(torch_scores) == len(base_scores) > 10
    worst = max(abs(a - b) for a, b in zip(gguf_scores, torch_scores, strict=True))
    moved = sum(abs(a - b) for a, b in zip(base_scores, torch_scores, strict=True)) / len(torch_scores)
    print(f"\nLoRA on torch {torch_answers}, merged GGUF on llama.cpp {gguf_answers}, base {base_answers};"
          f" prompt logprobs: GGUF vs torch max |diff| {worst:.4f}, base vs LoRA mean |diff| {moved:.3f}")  # fmt: skip
    assert gguf_answers == torch_answers and all(torch_answers)
    assert worst < 0.02
    # the merge carried the fine-tune: the base scores the same text differently, and answers differently
    assert moved > 0.2
    assert gguf_answers != base_answers
