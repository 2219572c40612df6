"""The ONNX Runtime backend end to end on the real models: SmolLM2 and MiniLM exported by `llmos convert --to onnx`.

* SmolLM2 on ONNX Runtime gives the PyTorch backend's greedy tokens on 5 prompts, alone and in a batch of 8 (the
  engine stepped directly, so the batch really is one batch), and answers Paris through `/v1/chat/completions` from
  a server that runs it as two replicas;
* MiniLM on ONNX Runtime embeds 50 sentences through the official openai client with cosine > 0.999 to
  sentence-transformers;
* `llmos quantize --type int8` of an ONNX model makes a smaller child (ONNX Runtime's dynamic quantization) whose
  embeddings stay close to the parent's, with lineage.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from llmos.config import Settings
from llmos.engine.core import EngineConfig, EngineCore
from llmos.engine.request import GenerationRequest
from llmos.engine.streams import SyncOutputStream
from llmos.errors import NotFoundError
from llmos.registry.service import Registry
from llmos.runtime.loader import Loader
from llmos.types import SamplingParams
from tests.helpers import ServerProcess, run_cli

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "List three colors.",
    "Explain photosynthesis briefly.",
    "What is 12 times 7?",
]
SENTENCES = [f"{subject} {verb} {thing}." for subject in ("The cat", "A engineer", "My neighbour", "The old server",
             "Everyone") for verb in ("likes", "repairs") for thing in ("green apples", "the network", "long walks",
             "quiet mornings", "compilers")]  # fmt: skip


@pytest.fixture(scope="module")
def onnx_settings(converted_settings: Settings) -> Settings:
    from llmos.registry import sources
    from llmos.registry.convert import convert

    registry = Registry(converted_settings)

    def missing(name: str) -> bool:
        try:
            registry.show(name)
        except NotFoundError:
            return True
        return False

    if missing("minilm"):
        sources.pull(registry, "minilm")
    # the session store may have them already (the formats benchmark test exports the same two): one export each
    if missing("smollm2:onnx"):
        convert(registry, "smollm2:safetensors", to="onnx", target="smollm2:onnx")
    if missing("minilm:onnx"):
        convert(registry, "minilm", to="onnx", target="minilm:onnx")
    registry.close()
    return converted_settings


def _generate(instance: Any, prompts: list[list[int]]) -> list[list[int]]:
    core = EngineCore(instance.backend, EngineConfig(prefix_cache=False, speculative=False), background=False)
    streams = []
    for prompt in prompts:
        stream = SyncOutputStream()
        core.submit(GenerationRequest(prompt, SamplingParams(max_tokens=24, temperature=0.0)), stream)
        streams.append(stream)
    while core.has_work():
        core.step()
    return [[t for event in stream for t in event.token_ids] for stream in streams]


def test_greedy_tokens_match_the_torch_backend_alone_and_in_a_batch_of_8(onnx_settings: Settings) -> None:
    registry = Registry(onnx_settings)
    loader = Loader(onnx_settings.model_copy(update={"threads": 2}), registry, max_running=8)
    onnx_view = registry.show("smollm2:onnx")
    assert loader.backend_for(onnx_view) == "onnx"
    onnx_model = loader(registry.resolve("smollm2:onnx"), "onnx")
    torch_model = loader(registry.resolve("smollm2:safetensors"), "torch")
    try:
        backend = onnx_model.backend
        prompts = [
            backend.tokenize(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", add_special=False)
            for q in QUESTIONS
        ]
        reference = [_generate(torch_model, [p])[0] for p in prompts]
        assert "Paris" in backend.detokenize(reference[0])
        alone = [_generate(onnx_model, [p])[0] for p in prompts]
        assert alone == reference
        batch = _generate(onnx_model, prompts + prompts[:3])
        assert batch == reference + reference[:3]
    finally:
        onnx_model.close()
        torch_model.close()
        registry.close()


@pytest.fixture(scope="module")
def server(onnx_settings: Settings) -> Iterator[ServerProcess]:
    process = ServerProcess(onnx_settings.home, "--model", "smollm2:onnx", "--replicas", "smollm2:onnx=2")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0)


def test_smollm2_on_onnx_answers_paris_through_chat_completions(client: openai.OpenAI, server: ServerProcess) -> None:
    response = client.chat.completions.create(
        model="smollm2:onnx",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=24,
    )
    assert "Paris" in (response.choices[0].message.content or "")
    chunks = client.chat.completions.create(
        model="smollm2:onnx",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=24,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == response.choices[0].message.content
    import httpx

    runtime = httpx.get(f"{server.base}/admin/runtime", timeout=10).json()
    [entry] = [m for m in runtime["models"] if m["name"] == "smollm2:onnx"]
    assert entry["backend"] == "onnx"
    assert entry["replicas"] == entry["replicas_alive"] == 2  # two model processes, load balanced


def test_minilm_on_onnx_embeds_like_sentence_transformers(client: openai.OpenAI, onnx_settings: Settings) -> None:
    from sentence_transformers import SentenceTransformer

    assert len(SENTENCES) == 50
    response = client.embeddings.create(model="minilm:onnx", input=SENTENCES)
    got = np.array([item.embedding for item in response.data], dtype=np.float32)
    registry = Registry(onnx_settings)
    with registry.loadable_dir(registry.resolve("minilm")) as directory:
        expected = SentenceTransformer(str(directory), device="cpu", local_files_only=True).encode(SENTENCES)
    registry.close()
    cosine = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.999, cosine.min()
    assert response.usage.prompt_tokens > 50


def test_int8_quantization_of_an_onnx_model(onnx_settings: Settings) -> None:
    result = run_cli(onnx_settings.home, "quantize", "minilm:onnx", "--type", "int8", "--name", "minilm:onnx-int8")
    assert result.returncode == 0, result.stderr
    registry = Registry(onnx_settings)
    child, parent = registry.show("minilm:onnx-int8"), registry.show("minilm:onnx")
    assert child.format == "onnx" and child.quantization == "int8"
    assert child.size < parent.size * 0.5
    assert child.lineage[0].operation == "quantize" and child.lineage[0].parent_digest == parent.digest
    loader = Loader(onnx_settings, registry)
    embeddings = []
    for name in ("minilm:onnx", "minilm:onnx-int8"):
        model = loader(registry.resolve(name), "onnx")
        embeddings.append(model.embed(SENTENCES[:10])[0])
        model.close()
    registry.close()
    cosine = np.sum(embeddings[0] * embeddings[1], axis=1)
    assert cosine.min() > 0.95, cosine.min()
