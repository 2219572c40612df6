"""Runtime benchmark: the PyTorch backend against Hugging Face ``generate``, model switching, memory per model.

Contract: :func:`run` works in-process on registered models and returns printable lines:

* **Batched decoding**: the same 16 chat prompts, up to 128 greedy tokens each, through llmos's engine on the torch
  backend (continuous batching, 16 slots) and through ``transformers``' ``generate`` as one left-padded static
  batch, on the same weights and thread count; aggregate tok/s of both and the ratio, plus the llama.cpp backend
  on the GGUF for reference. Two workloads: 16 long stories (every sequence runs the full 128 tokens), and a mix of
  stories and one-line answers (sequences end at different times).
* **Model switch**: time to first token of a request whose model must be loaded, and of one that finds it resident.
* **Memory**: RSS growth of loading each model, against its size on disk.
"""

from __future__ import annotations

import time
from typing import Any

from llmos.config import Settings
from llmos.engine.request import GenerationRequest
from llmos.engine.streams import SyncOutputStream
from llmos.registry.service import Registry
from llmos.runtime.loader import Loader
from llmos.runtime.memory import human, process_rss, release_freed_memory
from llmos.runtime.model import LoadedModel
from llmos.runtime.residency import Residency
from llmos.types import ChatMessage, SamplingParams

PROMPTS = [
    f"Write a long, detailed story about {topic}."
    for topic in (
        "a lighthouse keeper", "a robot chef", "a lost dragon", "a desert city", "a time traveller",
        "a river spirit", "a mountain village", "an old library", "a sky whale", "a clockwork bird",
        "a pirate astronomer", "a winter fox", "a jazz musician", "a glass forest", "a night market", "a moon garden",
    )
]  # fmt: skip
MIXED = [
    *PROMPTS[:8],
    "What is 2 + 2?", "Name a color.", "What do bees make?", "Say hello.", "What is the capital of Italy?",
    "Is water wet? Answer yes or no.", "Spell 'cat'.", "What day comes after Monday?",
]  # fmt: skip
"""Half long stories, half one-line answers: sequences finish at different times, as in real traffic."""


def engine_throughput(model: LoadedModel, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """Aggregate tok/s and median time to first token of all prompts submitted at once."""
    streams = []
    started = time.monotonic()
    for tokens in prompts:
        stream = SyncOutputStream()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        model.engine.submit(GenerationRequest(tokens, params), stream)
        streams.append(stream)
    total = 0
    firsts = []
    finished_at = started
    for stream in streams:
        first = None
        for output in stream:  # event times are stamped by the engine, so reading order does not matter
            if first is None and output.token_ids:
                first = output.time - started
            if output.finished:
                total += output.completion_tokens
                finished_at = max(finished_at, output.time)
        firsts.append(first or 0.0)
    elapsed = finished_at - started
    return total / elapsed, sorted(firsts)[len(firsts) // 2]


def hf_static_batch(model_dir: Any, prompts: list[list[int]], max_tokens: int, eos: set[int]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    pad = model.generation_config.pad_token_id or 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    started = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
    elapsed = time.perf_counter() - started
    generated = 0
    for row in out[:, width:].tolist():
        for token in row:
            generated += 1
            if token in eos:
                break
    del model
    release_freed_memory()
    return generated / elapsed


def run(settings: Settings, *, gguf: str = "smollm2", hf: str = "smollm2:safetensors", embed: str = "minilm",
        max_tokens: int = 128) -> list[str]:  # fmt: skip
    registry = Registry(settings)
    lines = [f"threads {settings.threads}; {len(PROMPTS)} prompts x {max_tokens} greedy tokens"]
    loader = Loader(settings, registry, max_running=16)

    for label, texts in (("16 long stories", PROMPTS), ("8 stories + 8 short answers", MIXED)):
        torch_model = loader(registry.resolve(hf, verify=True), "torch")
        prompts = [torch_model.chat_tokens([ChatMessage("user", p)]) for p in texts]
        ours, ttft = engine_throughput(torch_model, prompts, max_tokens)
        model_dir = registry.model_dir(registry.resolve(hf))
        eos = set(getattr(torch_model.backend, "_eos", set()))
        torch_model.close()
        release_freed_memory()
        theirs = hf_static_batch(model_dir, prompts, max_tokens, eos)
        llama = loader(registry.resolve(gguf, verify=True), "llama.cpp")
        llama_prompts = [llama.chat_tokens([ChatMessage("user", p)]) for p in texts]
        llama_tps, llama_ttft = engine_throughput(llama, llama_prompts, max_tokens)
        llama.close()
        lines += [
            "",
            f"{label:<44}{'tok/s':>8}{'TTFT p50':>10}",
            f"{'llmos engine, torch backend (fp32)':<44}{ours:>8.1f}{ttft:>9.2f}s",
            f"{'transformers generate, static padded batch':<44}{theirs:>8.1f}{'-':>10}",
            f"{'llmos engine, llama.cpp backend (GGUF)':<44}{llama_tps:>8.1f}{llama_ttft:>9.2f}s",
            f"ratio torch backend / transformers generate: {ours / theirs:.2f}",
        ]

    residency = Residency(settings, registry, Loader(settings, registry), backend_for=loader.backend_for)
    lines += ["", f"{'model switch':<30}{'TTFT':>10}"]
    for label in ("load needed", "already resident"):
        started = time.perf_counter()
        lease = residency.lease(gguf)
        model = lease.instance
        stream = SyncOutputStream()
        tokens = model.chat_tokens([ChatMessage("user", "Say hello.")])
        params = SamplingParams(max_tokens=1, temperature=0.0)
        # the prompt is computed both times (no prefix-cache hit on the repeat): the difference is the load
        model.engine.submit(GenerationRequest(tokens, params, cache_prompt=False), stream)
        list(stream)
        lines.append(f"{label:<30}{time.perf_counter() - started:>9.3f}s")
        lease.release()
    residency.close()

    lines += ["", f"{'memory per resident model':<40}{'RSS delta':>12}{'on disk':>12}"]
    for name, backend in ((gguf, "llama.cpp"), (hf, "torch"), (embed, "sentence-transformers")):
        release_freed_memory()
        before = process_rss()
        instance = loader(registry.resolve(name, verify=True), backend)
        delta = process_rss() - before
        size = registry.show(name).size
        instance.close()
        lines.append(f"{name + ' (' + backend + ')':<40}{human(delta):>12}{human(size):>12}")
    registry.close()
    return lines
