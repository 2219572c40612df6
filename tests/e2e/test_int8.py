"""`llmos quantize --type int8`: an int8 child of a safetensors model, loaded by the PyTorch backend.

The child stores its linear weights (and embeddings) as int8 with per-row scales, so it is about 4x smaller than
the float32 parent; it still answers Paris and keeps the parent's perplexity on the held-out text.
"""

from __future__ import annotations

import json

from llmos.config import Settings
from llmos.engine.backends.int8 import DECODE_ROWS, Int8Linear
from llmos.formats.int8 import quantize_rows
from llmos.registry.convert import quantize
from llmos.registry.service import Registry
from tests.e2e.test_convert_gguf import float_reference, heldout_perplexity, paris
from tests.helpers import run_cli, store_snapshot


def test_int8_linear_matches_float_per_token_and_ignores_its_batch() -> None:
    import torch

    torch.manual_seed(0)
    weight = torch.randn(96, 64) * 0.1
    x = torch.randn(DECODE_ROWS + 4, 64)
    x[0] *= 30  # an outlier token (like the first position of a prompt) must not cost the others precision
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    linear = Int8Linear(q, scale)
    reference = x @ weight.T
    decode = torch.cat([linear(x[i : i + 2]) for i in range(0, DECODE_ROWS, 2)])  # the int8 kernel, per token
    prefill = linear(x)  # the float path on dequantized weights
    for got, rows in ((decode, slice(1, DECODE_ROWS)), (prefill, slice(1, None))):
        error = (got[rows] - reference[rows]).norm() / reference[rows].norm()
        assert error < 0.05, float(error)
    assert torch.equal(linear(x[1:2]), linear(x[:2])[1:])  # a token's result does not depend on its batch


def test_int8_child_is_smaller_answers_paris_and_keeps_perplexity(converted_settings: Settings) -> None:
    registry = Registry(converted_settings)
    parent, child = registry.show("smollm2:safetensors"), quantize(registry, "smollm2:safetensors", kind="int8")
    config = json.loads((registry.model_dir(registry.resolve(child.name)) / "config.json").read_text())
    registry.close()
    assert child.name == "smollm2:int8"
    assert child.format == "hf" and child.quantization == "int8_dynamic"
    assert config["llmos_quantization"] == "int8_dynamic"
    assert child.size < 0.3 * parent.size  # int8 instead of float32, plus one scale per row
    assert child.lineage[0].operation == "quantize" and child.lineage[0].parent_name == "smollm2:safetensors"
    assert child.lineage[0].params["type"] == "int8"

    assert "Paris" in paris(converted_settings, child.name)
    ppl, tokens, backend = heldout_perplexity(converted_settings, child.name)
    ref, ref_tokens = float_reference(converted_settings)
    assert backend == "torch" and tokens == ref_tokens
    print(f"\nperplexity on {tokens} held-out tokens: int8 {ppl:.3f}, float32 {ref:.3f}")
    assert abs(ppl / ref - 1) <= 0.015


def test_quantization_and_conversion_types_that_do_not_fit_are_refused(converted_settings: Settings) -> None:
    home = converted_settings.home
    before = store_snapshot(home)
    for args, message in [
        (["quantize", "smollm2:safetensors", "--type", "q4_k_m"], "valid types for it: int8"),
        (["quantize", "smollm2", "--type", "int8"], "is a GGUF model; int8 is for safetensors models"),
        (["convert", "smollm2", "--to", "gguf"], "only safetensors models and LoRA adapters convert to GGUF"),
        (["convert", "smollm2:safetensors", "--to", "gguf", "--type", "q4_0"], "must be one of f16, f32, q8_0"),
    ]:
        bad = run_cli(home, *args)
        assert bad.returncode == 1, (args, bad.stderr)
        assert message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert store_snapshot(home) == before
