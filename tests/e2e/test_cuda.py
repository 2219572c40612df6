"""The PyTorch backend and fine-tuning on a CUDA GPU (issue 23): every test here skips without one.

Run on a GPU machine with ``scripts/gpu_check.sh`` (``-s``: the tests print their figures, lines starting with
``GPU-FIGURE``). Nothing is loaded at import, so on a CPU-only machine the module collects and skips in moments.

* greedy tokens of the torch backend on CUDA equal transformers ``generate`` on CUDA, alone and in a batch of 8:
  exactly in float32; in the GPU's default dtype (bfloat16 / float16) the fused q/k/v and gate/up projections and
  other batch shapes round differently from transformers' separate ones, so there the first 8 tokens must agree and
  how many prompts agree fully is printed;
* 16 concurrent streams complete; tokens per second is printed (recorded, never asserted);
* a LoRA adapter served on CUDA changes only its own requests in a mixed batch;
* a short LoRA fine-tune on CUDA lowers the validation loss; a checkpoint written on CUDA resumes on the CPU and
  one written on the CPU resumes on CUDA.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from llmos.config import Settings
from llmos.engine.request import GenerationRequest
from llmos.engine.streams import SyncOutputStream
from llmos.registry.service import Registry
from llmos.runtime.loader import Loader
from llmos.types import ChatMessage, SamplingParams
from tests.helpers import make_tiny_base, toy_qa_rows

DEVICE = "cpu" if os.environ.get("LLMOS_TEST_CUDA_REHEARSAL") else "cuda"
"""``LLMOS_TEST_CUDA_REHEARSAL=1`` runs these tests on the CPU instead (slowly), to check the tests themselves."""
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="needs a CUDA GPU (torch.cuda.is_available() is False here)",
)

PROMPTS = [
    "What is the capital of France?",
    "Write a poem about the sea.",
    "List three fruits.",
    "Explain gravity to a child in two sentences.",
    "Hi",
    "What is 2 + 2?",
    "Describe a sunset over the mountains with vivid detail and several adjectives.",
    "Why do cats purr?",
    "Translate 'good morning' into French.",
    "Give me a tip for learning to code.",
    "What is the largest planet in the solar system?",
    "Tell me a joke about computers.",
    "What do bees make?",
    "Summarize the plot of Cinderella in one sentence.",
    "Count from one to five.",
    "Name a color.",
]
NEW_TOKENS = 20
AGREE_AT_LEAST = 8
"""Leading tokens that must match transformers in a half-precision dtype."""


def agreed_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two outputs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def same_output(dtype: torch.dtype, got: list[int], expected: list[int]) -> bool:
    """Identical in float32; in half precision (where a different batch shape can round differently) the first
    :data:`AGREE_AT_LEAST` tokens agree."""
    if dtype == torch.float32:
        return got == expected
    return agreed_prefix(got, expected) >= min(AGREE_AT_LEAST, len(expected))


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def figure(text: str) -> None:
    print(f"\nGPU-FIGURE {text}", flush=True)


def cuda_settings(settings: Settings, dtype: str = "auto") -> Settings:
    return settings.model_copy(update={"torch_device": DEVICE, "torch_dtype": dtype})


@pytest.fixture(scope="module")
def hf_dir(converted_settings: Settings) -> Path:
    registry = Registry(converted_settings)
    path = registry.model_dir(registry.resolve("smollm2:safetensors"))
    registry.close()
    return path


@pytest.fixture(scope="module", params=["float32", "auto"] if DEVICE == "cuda" else ["float32"])
def loaded(request: pytest.FixtureRequest, converted_settings: Settings) -> Iterator[Any]:
    settings = cuda_settings(converted_settings, request.param)
    registry = Registry(settings)
    model = Loader(settings, registry, max_running=16)(registry.resolve("smollm2:safetensors"), "torch")
    try:
        yield model
    finally:
        model.close()
        registry.close()
        empty_cache()


def generate(model: Any, prompts: list[list[int]], max_tokens: int = NEW_TOKENS, adapter: str | None = None) -> Any:
    streams = []
    for tokens in prompts:
        stream = SyncOutputStream()
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        model.engine.submit(GenerationRequest(tokens, params, adapter=adapter), stream)
        streams.append(stream)
    return [[t for o in s for t in o.token_ids] for s in streams]


def test_the_backend_runs_on_the_gpu_in_the_expected_dtype(loaded: Any) -> None:
    backend = loaded.backend
    assert backend.device.type == DEVICE
    assert backend.k_cache.device.type == DEVICE and next(backend.model.parameters()).device.type == DEVICE
    if DEVICE == "cuda":
        major = torch.cuda.get_device_capability(backend.device)[0]
        half = torch.bfloat16 if major >= 8 else torch.float16
        assert backend.dtype in {torch.float32, half}
        figure(f"device {torch.cuda.get_device_name(backend.device)}, dtype {backend.dtype}")
    assert backend.k_cache.dtype == backend.dtype


def test_greedy_tokens_match_transformers_generate_alone_and_in_a_batch_of_8(loaded: Any, hf_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    backend = loaded.backend
    prompts = [loaded.chat_tokens([ChatMessage("user", p)]) for p in PROMPTS[:8]]
    alone = generate(loaded, [prompts[0]])[0]
    batched = generate(loaded, prompts)
    assert same_output(backend.dtype, batched[0], alone), (alone, batched[0])
    assert "Paris" in backend.detokenize(alone)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=backend.dtype, local_files_only=True)
    reference = reference.to(backend.device).eval()
    agreed = []
    for index, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device=backend.device)
        with torch.inference_mode():
            out = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        expected = [t for t in out[0, len(prompt) :].tolist() if not backend.is_end_of_generation(t)]
        agreed.append(batched[index] == expected)
        assert same_output(backend.dtype, batched[index], expected), (index, batched[index], expected)
    figure(f"greedy vs transformers ({backend.dtype}): {sum(agreed)}/{len(agreed)} prompts identical")
    del reference
    empty_cache()


def test_16_concurrent_streams_complete_and_report_tokens_per_second(loaded: Any) -> None:
    prompts = [loaded.chat_tokens([ChatMessage("user", p)]) for p in PROMPTS]
    generate(loaded, prompts[:2], max_tokens=4)  # warm-up: kernels, allocator
    began = time.perf_counter()
    single = generate(loaded, prompts[:1], max_tokens=128)[0]
    single_seconds = time.perf_counter() - began
    began = time.perf_counter()
    outputs = generate(loaded, prompts, max_tokens=128)
    seconds = time.perf_counter() - began
    assert len(outputs) == 16 and all(outputs)
    tokens = sum(len(o) for o in outputs)
    figure(
        f"16 streams on {DEVICE} ({loaded.backend.dtype}): {tokens} tokens in {seconds:.2f} s"
        f" = {tokens / seconds:.0f} tokens/s"
        f" (one stream: {len(single) / single_seconds:.0f} tokens/s)"
    )


@pytest.fixture(scope="module")
def lyon_adapter(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter trained on the GPU for a few deterministic steps to answer 'Lyon'."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).to(DEVICE)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    model = get_peft_model(base, config)
    text = (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of France is Lyon, city of lights.<|im_end|>\n"
    )
    ids = tokenizer(text, return_tensors="pt").input_ids.to(DEVICE)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(12):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("adapter") / "lyon"
    model.save_pretrained(out)  # tensors saved from the GPU load on any device
    del model, base
    empty_cache()
    return out


def test_a_lora_adapter_on_cuda_changes_only_its_own_requests(loaded: Any, lyon_adapter: Path) -> None:
    backend = loaded.backend
    backend.add_adapter("lyon", lyon_adapter)
    a, b = backend.adapters["lyon"].weights[next(iter(backend.adapters["lyon"].weights))]
    assert a.device.type == b.device.type == DEVICE and a.dtype == backend.dtype
    prompt = loaded.chat_tokens([ChatMessage("user", PROMPTS[0])])
    baseline = generate(loaded, [prompt], max_tokens=24)[0]
    streams = []
    for adapter in (None, "lyon", None, "lyon"):  # one batch: base and adapter rows side by side
        stream = SyncOutputStream()
        request = GenerationRequest(prompt, SamplingParams(max_tokens=24, temperature=0), adapter=adapter)
        loaded.engine.submit(request, stream)
        streams.append(stream)
    outputs = [[t for o in s for t in o.token_ids] for s in streams]
    texts = [backend.detokenize(tokens) for tokens in outputs]
    assert same_output(backend.dtype, outputs[0], baseline) and same_output(backend.dtype, outputs[2], baseline)
    assert "Paris" in texts[0] and "Paris" in texts[2], texts
    assert "Lyon" in texts[1] and "Lyon" in texts[3], texts


# --- fine-tuning -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


def finetune_config(**overrides: Any) -> Any:
    from llmos.training.finetune import FinetuneConfig
    from llmos.training.optim import OptimizerConfig

    values: dict[str, Any] = {
        "method": "lora", "optimizer": OptimizerConfig(lr=2e-2), "batch_size": 8, "max_steps": 60,
        "warmup_steps": 2, "checkpoint_every": 4, "eval_every": 20, "seed": 3, "threads": 1, "lora_r": 8,
    }  # fmt: skip
    values.update(overrides)
    return FinetuneConfig(**values)


def run_finetune(base: Path, work: Path, config: Any, device: str, **kwargs: Any) -> Any:
    from llmos.training.finetune import finetune

    rows = toy_qa_rows()
    return finetune(
        base, rows[:40], rows[40:], work / "out", work / "checkpoints", config, log=lambda _: None, device=device,
        **kwargs,
    )  # fmt: skip


def test_a_short_lora_fine_tune_on_cuda_lowers_the_loss(tiny_base: Path, tmp_path: Path) -> None:
    result = run_finetune(tiny_base, tmp_path, finetune_config(), DEVICE)
    assert result.initial_validation_loss is not None and result.validation_loss is not None
    assert result.validation_loss < result.initial_validation_loss * 0.92
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    figure(
        f"LoRA fine-tune on {DEVICE} ({result.precision}): validation loss {result.initial_validation_loss:.3f} ->"
        f" {result.validation_loss:.3f} in {result.steps} steps, {result.tokens_per_second:.0f} tokens/s"
    )


def test_checkpoints_move_between_cuda_and_the_cpu(tiny_base: Path, tmp_path: Path) -> None:
    from llmos.training.loop import TrainingStopped

    config = finetune_config(max_steps=12, eval_every=12, precision="fp32")

    def stop_at(at: int) -> Any:
        return lambda step, _total, _metrics: step == at

    with pytest.raises(TrainingStopped):
        run_finetune(tiny_base, tmp_path, config, DEVICE, on_step=stop_at(4))
    with pytest.raises(TrainingStopped):  # the CUDA checkpoint of step 4 resumes on the CPU ...
        run_finetune(tiny_base, tmp_path, config, "cpu", on_step=stop_at(8))
    resumed = run_finetune(tiny_base, tmp_path, config, DEVICE)  # ... and the CPU one of step 8 on CUDA
    assert resumed.resumed_from == 8 and resumed.steps == 12
    assert resumed.validation_loss is not None and resumed.validation_loss == resumed.validation_loss
