"""`llmos quantize`: GGUF children made by llama.cpp, registered with lineage, measured against the parent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmos.config import Settings
from llmos.registry import sources
from llmos.registry.service import Registry
from tests.helpers import run_cli


@pytest.mark.timeout(900)
def test_quantized_children_answer_and_keep_perplexity(tmp_path: Path) -> None:
    home = tmp_path / "home"
    registry = Registry(Settings(home=home))
    sources.pull(registry, "smollm2")
    registry.close()

    result = run_cli(home, "quantize", "smollm2", "--type", "q8_0", "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    parent, child = json.loads(result.stdout)
    assert child["model"] == "smollm2:q8_0" and child["quantization"] == "Q8_0"
    assert child["size"] > parent["size"]  # 8 bits per weight against the shipped 4.5
    assert "Paris" in child["answer"] and "Paris" in parent["answer"]
    assert abs(child["perplexity_delta_pct"]) <= 1.0  # Q8_0 holds the Q4_1 source almost exactly
    view = Registry(Settings(home=home)).show("smollm2:q8_0")
    assert view.lineage[0].operation == "quantize" and view.lineage[0].parent_name == "smollm2:latest"

    smaller = run_cli(home, "quantize", "smollm2", "--type", "q4_0", "--name", "smollm2-small", "--no-report")
    assert smaller.returncode == 0, smaller.stderr
    assert Registry(Settings(home=home)).show("smollm2-small").size < parent["size"]

    for args, message in [
        (["smollm2", "--type", "q9_9"], "unknown quantization type"),
        (["nothing", "--type", "q8_0"], "not found"),
    ]:
        bad = run_cli(home, "quantize", *args)
        assert bad.returncode == 1 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
