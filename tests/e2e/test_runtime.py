"""Runtime end to end: the PyTorch backend, LoRA adapters, embeddings and a memory budget, on real models."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest
import torch

import llmos
from llmos.config import Settings
from llmos.engine.request import GenerationRequest
from llmos.engine.streams import SyncOutputStream
from llmos.registry import sources
from llmos.registry.service import Registry
from llmos.runtime.loader import Loader
from llmos.types import ChatMessage, SamplingParams
from tests.helpers import ServerProcess, run_cli

QUESTION = "What is the capital of France?"
MIXED_PROMPTS = [
    QUESTION,
    "Write a poem about the sea.",
    "List three fruits.",
    "Explain gravity to a child in two sentences.",
    "Hi",
    "What is 2 + 2?",
    "Describe a sunset over the mountains with vivid detail and several adjectives.",
    "Name a color.",
    "Why do cats purr?",
    "Translate 'good morning' into French.",
    "Give me a tip for learning to code.",
    "What is the largest planet in the solar system?",
    "Tell me a joke about computers.",
    "What do bees make?",
    "Summarize the plot of Cinderella in one sentence.",
    "Count from one to five.",
]


@pytest.fixture(scope="session")
def runtime_settings(converted_settings: Settings) -> Settings:
    """The session's store with SmolLM2 as GGUF and as a converted safetensors copy, plus MiniLM."""
    registry = Registry(converted_settings)
    sources.pull(registry, "minilm")
    registry.close()
    return converted_settings


@pytest.fixture(scope="session")
def hf_dir(runtime_settings: Settings) -> Path:
    registry = Registry(runtime_settings)
    path = registry.model_dir(registry.resolve("smollm2:safetensors"))
    registry.close()
    return path


def test_conversion_is_a_child_version_with_lineage(runtime_settings: Settings) -> None:
    shown = json.loads(run_cli(runtime_settings.home, "show", "smollm2:safetensors", "--json").stdout)
    parent = json.loads(run_cli(runtime_settings.home, "show", "smollm2", "--json").stdout)
    assert shown["format"] == "hf" and shown["quantization"] == "F32"
    (lineage,) = shown["lineage"]
    assert lineage["operation"] == "convert" and lineage["parent_digest"] == parent["digest"]
    assert shown["chat_template"] == parent["chat_template"]


def test_torch_backend_answers_paris(runtime_settings: Settings) -> None:
    with llmos.load_model("smollm2:safetensors", settings=runtime_settings) as model:
        assert "Paris" in model.generate_text(QUESTION, max_length=32)


def test_torch_greedy_matches_transformers_generate_alone_and_in_a_batch(
    runtime_settings: Settings, hf_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    registry = Registry(runtime_settings)
    loader = Loader(runtime_settings, registry, max_running=16)
    model = loader(registry.resolve("smollm2:safetensors"), "torch")
    try:
        prompts = [model.chat_tokens([ChatMessage("user", p)]) for p in MIXED_PROMPTS]
        assert len({len(p) for p in prompts}) > 5  # really mixed lengths

        def run(batch: list[list[int]]) -> list[list[int]]:
            streams = []
            for tokens in batch:
                stream = SyncOutputStream()
                model.engine.submit(GenerationRequest(tokens, SamplingParams(max_tokens=20, temperature=0)), stream)
                streams.append(stream)
            return [[t for o in s for t in o.token_ids] for s in streams]

        alone = run([prompts[0]])[0]
        batched = run(prompts)
        reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True)
        for index in (0, 1, 4, 6, 15):
            ids = torch.tensor([prompts[index]])
            expected = reference.generate(ids, max_new_tokens=20, do_sample=False)[0, len(prompts[index]) :].tolist()
            expected = [t for t in expected if not model.backend.is_end_of_generation(t)]
            assert batched[index] == expected[: len(batched[index])] and len(batched[index]) == len(expected), index
        assert alone == batched[0]
        assert "Paris" in model.backend.detokenize(alone)
    finally:
        model.close()
        registry.close()


@pytest.fixture(scope="session")
def adapter_dir(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter trained for a few deterministic steps to answer 'Lyon'."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    model = get_peft_model(base, config)
    text = (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of France is Lyon, city of lights.<|im_end|>\n"
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(12):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("adapter") / "lyon"
    model.save_pretrained(out)
    return out


def test_adapter_import_checks_its_base(runtime_settings: Settings, adapter_dir: Path, tmp_path: Path) -> None:
    missing = run_cli(runtime_settings.home, "import", str(adapter_dir), "--name", "x", "--base", "nothing")
    assert missing.returncode == 1 and "base model 'nothing' is not registered" in missing.stderr
    gguf_base = run_cli(runtime_settings.home, "import", str(adapter_dir), "--name", "x", "--base", "smollm2")
    assert gguf_base.returncode == 1 and "PyTorch backend" in gguf_base.stderr
    no_base = run_cli(runtime_settings.home, "import", str(adapter_dir), "--name", "x")
    assert no_base.returncode == 1 and "--base" in no_base.stderr
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4),
        },
        str(foreign / "adapter_model.safetensors"),
    )
    other = run_cli(runtime_settings.home, "import", str(foreign), "--name", "x", "--base", "smollm2:safetensors")
    assert other.returncode == 1 and "another architecture" in other.stderr
    assert "x:latest" not in run_cli(runtime_settings.home, "list").stdout


@pytest.fixture(scope="module")
def server(runtime_settings: Settings, adapter_dir: Path) -> Iterator[ServerProcess]:
    result = run_cli(
        runtime_settings.home, "import", str(adapter_dir), "--name", "smollm2-lyon", "--base", "smollm2:safetensors"
    )
    assert result.returncode == 0, result.stderr
    process = ServerProcess(runtime_settings.home, env={"LLMOS_MAX_RUNNING": "4", "LLMOS_MEMORY_BUDGET": "950MiB"})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=300)


def ask(client: openai.OpenAI, model: str, question: str = QUESTION) -> str:
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24
    )
    return response.choices[0].message.content or ""


def test_adapter_changes_only_its_own_requests(client: openai.OpenAI) -> None:
    baseline = ask(client, "smollm2:safetensors")
    assert "Paris" in baseline
    results: dict[str, list[str]] = {"base": [], "adapter": []}

    def worker(kind: str, model: str) -> None:
        results[kind].append(ask(client, model))

    threads = [threading.Thread(target=worker, args=("base", "smollm2:safetensors")) for _ in range(2)]
    threads += [threading.Thread(target=worker, args=("adapter", "smollm2-lyon")) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["base"] == [baseline, baseline]  # base requests in the same batch are unchanged
    assert all("Lyon" in text for text in results["adapter"])
    response = client.chat.completions.create(
        model="smollm2-lyon", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=8
    )
    assert response.model == "smollm2-lyon:latest"


def test_embeddings_match_sentence_transformers(client: openai.OpenAI, runtime_settings: Settings) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["The cat sits on the mat.", "A quick brown fox.", "llmos runs language models on your own machine."]
    response = client.embeddings.create(model="minilm", input=texts)
    assert [d.index for d in response.data] == [0, 1, 2]
    ours = np.array([d.embedding for d in response.data])
    assert ours.shape == (3, 384)
    registry = Registry(runtime_settings)
    reference = SentenceTransformer(str(registry.model_dir(registry.resolve("minilm"))), device="cpu").encode(texts)
    cosine = (ours * reference).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    assert (cosine > 0.999).all()
    assert response.usage.prompt_tokens > 10
    encoded = client.embeddings.create(model="minilm", input="hello", encoding_format="base64")
    single = client.embeddings.create(model="minilm", input="hello")
    raw = encoded.data[0].embedding
    decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str) else np.array(raw)
    assert np.allclose(decoded, single.data[0].embedding, atol=1e-6)


def test_embedding_and_keep_alive_bad_input(server: ServerProcess) -> None:
    too_many = httpx.post(f"{server.base}/v1/embeddings", json={"model": "minilm", "input": ["x"] * 10_000})
    assert too_many.status_code == 400 and "at most 2048" in too_many.json()["error"]["message"]
    too_long = httpx.post(f"{server.base}/v1/embeddings", json={"model": "minilm", "input": "word " * 600}, timeout=60)
    assert too_long.status_code == 400 and "at most 256" in too_long.json()["error"]["message"]
    wrong_kind = httpx.post(f"{server.base}/v1/embeddings", json={"model": "smollm2", "input": "x"}, timeout=120)
    assert wrong_kind.status_code == 400
    garbage = httpx.post(
        f"{server.base}/v1/chat/completions",
        json={"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "keep_alive": "soon"},
    )
    assert garbage.status_code == 400 and garbage.json()["error"]["param"] == "keep_alive"


def counter(base: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_three_models_cycle_through_a_budget_that_fits_two(runtime_settings: Settings) -> None:
    """With 4 slots, models are accounted at about: llama.cpp SmolLM2 400 MiB, torch SmolLM2 820 MiB, MiniLM 210 MiB.

    A 1100 MiB budget holds MiniLM with either SmolLM2, never both SmolLM2s. A fresh server, so the order of first
    loads is the same every run.
    """
    server = ServerProcess(runtime_settings.home, env={"LLMOS_MAX_RUNNING": "4", "LLMOS_MEMORY_BUDGET": "1100MiB"})
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=300)
    try:
        _cycle(server, client, runtime_settings)
    finally:
        server.stop()


def tree_anon(pid: int) -> int:
    """Anonymous memory of the server and every process under it (zygotes, model processes), each page counted once:
    proportional (Pss_Anon), so pages a model process shares with its zygote are not counted twice."""
    total = 0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            text = Path(f"/proc/{process.pid}/smaps_rollup").read_text()
        except OSError:
            continue  # it just ended
        total += sum(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("Pss_Anon:"))
    return total


def _cycle(server: ServerProcess, client: openai.OpenAI, runtime_settings: Settings) -> None:
    baseline = tree_anon(server.process.pid)
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(tree_anon(server.process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    loads_before = counter(server.base, "llmos_model_loads_total")
    try:
        for _ in range(2):
            assert "Paris" in ask(client, "smollm2")
            assert "Paris" in ask(client, "smollm2:safetensors")
            assert len(client.embeddings.create(model="minilm", input="hello").data[0].embedding) == 384
    finally:
        done.set()
        sampler.join()
    assert counter(server.base, "llmos_model_loads_total") - loads_before >= 3
    assert counter(server.base, "llmos_model_unloads_total") >= 2
    runtime = httpx.get(f"{server.base}/admin/runtime").json()
    assert runtime["used"] <= runtime["budget"]
    names = {m["name"] for m in runtime["models"]}
    assert not {"smollm2:latest", "smollm2:safetensors"} <= names  # never both at once
    ps = run_cli(runtime_settings.home, "ps", "--url", server.base)
    assert ps.returncode == 0 and "MEMORY" in ps.stdout
    margin = 400 * 1024 * 1024  # the zygotes' libraries (PyTorch ~250 MiB) stay after an eviction
    print(f"\npeak anonymous memory of the server and its model processes: {(max(samples) - baseline) / 2**20:.0f} MiB")
    assert max(samples) - baseline <= runtime["budget"] + margin, (max(samples) - baseline) / 2**20


def test_a_damaged_model_gets_503_and_the_others_go_on(server: ServerProcess, runtime_settings: Settings) -> None:
    registry = Registry(runtime_settings)
    blob = registry.resolve("minilm").paths["config.json"]
    registry.close()
    httpx.post(f"{server.base}/admin/runtime/unload", json={"model": "minilm"})
    time.sleep(1.0)
    original = blob.read_bytes()
    try:
        blob.write_bytes(original.replace(b"384", b"385"))
        broken = httpx.post(f"{server.base}/v1/embeddings", json={"model": "minilm", "input": "x"}, timeout=60)
        assert broken.status_code == 503
        assert "minilm:latest" in broken.json()["error"]["message"] and "damaged" in broken.json()["error"]["message"]
        ok = httpx.post(
            f"{server.base}/v1/chat/completions",
            json={"model": "smollm2", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0},
            timeout=120,
        )
        assert ok.status_code == 200 and "Paris" in ok.json()["choices"][0]["message"]["content"]
    finally:
        blob.write_bytes(original)
