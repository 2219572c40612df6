"""Pruning math on a tiny random Llama: exact magnitude sparsity, structured slicing that keeps the function."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.compression import prune as P
from llmos.errors import InvalidInputError
from tests.helpers import make_tiny_base

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread (no thread hand-offs on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and MLP weights, so a wrong slice shows up in the output
        for block in model.model.layers:
            block.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return model


def test_magnitude_zeroes_exactly_the_requested_fraction_of_each_block_linear() -> None:
    model = tiny_llama()
    embeddings = model.model.embed_tokens.weight.detach().clone()
    norms = model.model.layers[0].input_layernorm.weight.detach().clone()
    before = {name: linear.weight.detach().clone() for name, linear in P.block_linears(model)}
    result = P.prune_model_(model, "magnitude", 0.3)
    for name, linear in P.block_linears(model):
        weight, original = linear.weight.detach(), before[name]
        zeros = weight == 0
        assert int(zeros.sum()) == round(0.3 * weight.numel())
        # the zeroed weights are the smallest in magnitude, the rest are untouched
        assert float(original[zeros].abs().max()) <= float(original[~zeros].abs().min())
        assert torch.equal(weight[~zeros], original[~zeros])
    assert len(before) == 2 * 7
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norms)
    assert math.isclose(result.achieved_sparsity, 0.3, abs_tol=1e-3)
    assert result.parameters_after == result.parameters_before and result.intermediate_size_after == 48


@pytest.mark.parametrize("activation_aware", [False, True])
def test_structured_child_equals_parent_with_the_removed_channels_zeroed(activation_aware: bool) -> None:
    parent = tiny_llama()
    ids = torch.randint(0, 61, (2, 12))
    norms = P.mlp_activation_norms(parent, [ids[0], ids[1]]) if activation_aware else None
    kept = P.channels_to_keep(parent, 0.25, norms)
    assert all(len(k) == 36 for k in kept) and all(torch.equal(k, k.sort().values) for k in kept)

    zeroed = copy.deepcopy(parent)
    with torch.no_grad():
        for block, keep in zip(zeroed.model.layers, kept, strict=True):
            removed = torch.ones(48, dtype=torch.bool)
            removed[keep] = False
            block.mlp.down_proj.weight[:, removed] = 0
    child = copy.deepcopy(parent)
    assert P.slice_mlp_(child, kept) == 36
    assert child.config.intermediate_size == 36
    assert child.model.layers[1].mlp.up_proj.weight.shape == (36, 32)
    assert child.model.layers[1].mlp.down_proj.weight.shape == (32, 36)
    assert P.count_parameters(parent) - P.count_parameters(child) == 2 * 3 * 32 * 12
    with torch.no_grad():
        expected, got = zeroed(ids).logits, child(ids).logits
        assert not torch.allclose(parent(ids).logits, expected, atol=1e-4)  # the pruning did change something
    assert torch.allclose(got, expected, atol=1e-5)


def test_batched_calibration_masks_the_padding() -> None:
    model = tiny_llama()
    texts = [torch.randint(0, 61, (n,)) for n in (3, 11, 7, 1)]
    one_by_one = P.mlp_activation_norms(model, texts, batch_size=1)
    batched = P.mlp_activation_norms(model, texts, batch_size=16)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(one_by_one, batched, strict=True))
    assert all(bool((norms > 0).all()) for norms in batched)


def test_activation_importance_keeps_a_channel_with_small_weights_but_large_activations() -> None:
    model = tiny_llama()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, 5] *= 0.01  # tiny column: weight-only ranking drops channel 5
        mlp.gate_proj.weight[5] *= 0.5
    weight_kept = P.channels_to_keep(model, 0.5)[0]
    norms = [torch.ones(48) for _ in range(2)]
    norms[0][5] = 1e6  # ... but it carries a huge activation
    aware_kept = P.channels_to_keep(model, 0.5, norms)[0]
    assert 5 not in weight_kept.tolist() and 5 in aware_kept.tolist()


def test_prune_hf_dir_writes_a_smaller_loadable_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = make_tiny_base(tmp_path / "base")
    weights = (source / "model.safetensors").read_bytes()
    result = P.prune_hf_dir(
        source, tmp_path / "out", method="structured", sparsity=0.5, calibration_texts=["double 12?", "24"]
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())["intermediate_size"]
    assert config["intermediate_size"] == result.intermediate_size_after == original - round(original / 2)
    assert result.parameters_after < result.parameters_before and result.details["importance"] == "activation"
    assert (tmp_path / "out" / "model.safetensors").stat().st_size < (source / "model.safetensors").stat().st_size
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(source).get_vocab()
    with torch.no_grad():
        assert model(torch.tensor([tokenizer("double 3?")["input_ids"]])).logits.isfinite().all()
    assert (source / "model.safetensors").read_bytes() == weights  # the source is untouched


@pytest.mark.parametrize("sparsity", [0, 1, -0.1, 1.5, 0.0, 1.0, float("nan"), float("inf"), True, "0.5"])
def test_sparsity_outside_the_open_interval_is_refused(sparsity: object) -> None:
    with pytest.raises(InvalidInputError, match="sparsity must be"):
        P.check_sparsity(sparsity)


def test_unknown_method_and_model_type_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="unknown pruning method 'random'; choose one of magnitude"):
        P.check_method("random")
    with pytest.raises(InvalidInputError, match="unknown pruning method"):
        P.prune_model_(tiny_llama(), "heads", 0.5)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(InvalidInputError, match="a gpt2 model; pruning supports llama"):
        P.prune_hf_dir(tmp_path / "gpt2", tmp_path / "out", method="structured", sparsity=0.5)
    assert not (tmp_path / "out").exists()
