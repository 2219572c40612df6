"""HF -> GGUF writing on tiny random Llamas: llama.cpp must read the file exactly as transformers reads the checkpoint.

The strong checks go through llama.cpp itself (the consumer of the file): its tokenization of a mixed text equals
the Hugging Face tokenizer's (so the pre-tokenizer and the special tokens are right) and its logits equal
transformers' logits (so every tensor name, the q/k rotary permutation and the hyperparameters are right).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmos.errors import InvalidInputError
from llmos.formats.gguf_write import hf_to_gguf, permute_qk
from tests.helpers import make_tiny_base, make_tiny_bpe_llama

SAMPLE = "<|im_start|>user\ndouble 12345? It's (1999), isn't it?\n\n  Hello,   world! Ünïcode ✓<|im_end|>\n"


def hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()  # type: ignore[no-any-return]


def llamacpp(path: Path, *, vocab_only: bool = False) -> Any:
    from llmos.engine.backends.llamacpp import load_library

    llama_cpp = load_library()  # on the CPU path the probe chose: llama_cpp.Llama's defaults may fault elsewhere

    return llama_cpp.Llama(  # an f32 KV cache: llama.cpp then computes like transformers up to rounding
        model_path=str(path), n_ctx=64, logits_all=True, vocab_only=vocab_only, n_threads=1, verbose=False,
        type_k=0, type_v=0,
    )  # fmt: skip


def llamacpp_logits(path: Path, ids: list[int]) -> np.ndarray[Any, Any]:
    llm = llamacpp(path)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe"])
def test_llamacpp_tokenizes_like_transformers_and_computes_the_same_logits(tmp_path: Path, pre: str) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    model_dir = make_tiny_bpe_llama(tmp_path / "hf", pre=pre)
    out = hf_to_gguf(model_dir, tmp_path / "model.gguf", "f32")

    reader = GGUFReader(str(out))
    fields = {
        name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.t")
    }
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.pre"] == pre
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 16 and fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "blk.1.attn_q.weight" in names  # tied embeddings: no separate head

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected = tokenizer(SAMPLE)["input_ids"]
    vocab = llamacpp(out, vocab_only=True)
    try:
        assert vocab.tokenize(SAMPLE.encode(), add_bos=False, special=True) == expected
        assert vocab.detokenize(expected[1:-1]).decode() == SAMPLE.removeprefix("<|im_start|>").removesuffix(
            "<|im_end|>\n"
        )
    finally:
        vocab.close()

    ids = expected[:40]
    reference = hf_logits(model_dir, ids)
    ours = llamacpp_logits(out, ids)
    assert np.abs(ours - reference).max() <= 1e-3 * max(1.0, float(np.abs(reference).max()))


def test_untied_head_f16_and_q8_0_files_track_the_checkpoint(tmp_path: Path) -> None:
    from gguf import GGUFReader

    model_dir = make_tiny_bpe_llama(tmp_path / "hf", tied=False, seed=1)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(SAMPLE)["input_ids"][:32]
    reference = hf_logits(model_dir, ids)
    spread = float(reference.std())
    errors = {}
    for out_type, file_type in (("f16", 1), ("q8_0", 7)):
        out = hf_to_gguf(model_dir, tmp_path / f"{out_type}.gguf", out_type)
        reader = GGUFReader(str(out))
        assert reader.fields["general.file_type"].contents() == file_type
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["output.weight"] == out_type.upper() and types["blk.0.attn_norm.weight"] == "F32"
        errors[out_type] = float(np.abs(llamacpp_logits(out, ids) - reference).mean()) / spread
    assert errors["f16"] < 0.01 and errors["q8_0"] < 0.05, errors


def test_gguf_round_trips_to_the_same_weights_through_transformers(tmp_path: Path) -> None:
    """transformers' GGUF reader undoes the q/k permutation: HF -> GGUF (f32) -> HF gives the very same tensors."""
    from safetensors.torch import load_file

    from llmos.formats.convert import gguf_to_hf

    model_dir = make_tiny_bpe_llama(tmp_path / "hf", tied=False, seed=2)
    (tmp_path / "gguf").mkdir()
    hf_to_gguf(model_dir, tmp_path / "gguf" / "model.gguf", "f32")
    gguf_to_hf(tmp_path / "gguf" / "model.gguf", tmp_path / "back")
    before, after = (
        load_file(str(model_dir / "model.safetensors")),
        load_file(str(tmp_path / "back" / "model.safetensors")),
    )
    assert set(before) == set(after)
    for key, tensor in before.items():
        assert bool((after[key] == tensor).all()), key


def test_permutation_is_the_inverse_of_transformers_reader() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.arange(36 * 5, dtype=np.float32).reshape(36, 5)  # 6 heads of dimension 6
    for heads in (6, 3):
        permuted = permute_qk(weights, heads)
        assert not np.array_equal(permuted, weights)
        undone = LlamaTensorProcessor(config={})._reverse_permute_weights(permuted, heads)
        assert np.array_equal(undone, weights)


def test_default_names_keep_children_of_different_versions_apart() -> None:
    from llmos.registry.convert import derived_name

    assert derived_name("smollm2:safetensors", "gguf-f16") == "smollm2:gguf-f16"
    assert derived_name("zephyr-lora:latest", "gguf-q8_0") == "zephyr-lora:gguf-q8_0"
    assert derived_name("smollm2:gguf-f16", "q4_k_m") == "smollm2:q4_k_m"
    assert derived_name("smollm2:int8", "gguf-f16") == "smollm2:int8-gguf-f16"
    assert derived_name("team/base:v2", "int8") == "team/base:v2-int8"


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_what_gguf_cannot_hold_is_refused_by_name(tmp_path: Path) -> None:
    char_model = make_tiny_base(tmp_path / "char")  # WordLevel character tokenizer
    with pytest.raises(InvalidInputError, match="byte-level BPE tokenizers, not WordLevel"):
        hf_to_gguf(char_model, tmp_path / "a.gguf")

    model_dir = make_tiny_bpe_llama(tmp_path / "hf")
    with pytest.raises(InvalidInputError, match="--type must be one of f16, f32, q8_0"):
        hf_to_gguf(model_dir, tmp_path / "b.gguf", "q4_k_m")
    _edit_json(model_dir / "config.json", architectures=["Qwen2ForCausalLM"])
    with pytest.raises(InvalidInputError, match="not Qwen2ForCausalLM"):
        hf_to_gguf(model_dir, tmp_path / "c.gguf")
    _edit_json(model_dir / "config.json", architectures=["LlamaForCausalLM"], rope_parameters={"rope_type": "llama3"})
    with pytest.raises(InvalidInputError, match="rope scaling 'llama3'"):
        hf_to_gguf(model_dir, tmp_path / "d.gguf")
    _edit_json(model_dir / "config.json", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(InvalidInputError, match=r"pre-tokenizer \(Whitespace\)"):
        hf_to_gguf(model_dir, tmp_path / "e.gguf")
    assert not any(tmp_path.glob("*.gguf"))
