"""`llmos prune` and `llmos distill` on the bundled SmolLM2: a smaller dense child that still generates, a distilled
student whose loss falls, both registered with lineage; bad input is refused with one line and stores nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmos.config import Settings
from llmos.data.shipped import load_qa
from llmos.jobs.service import JobService
from llmos.registry.datasets import store_rows
from llmos.registry.service import Registry
from tests.helpers import make_tiny_base, run_cli

PRUNED = "prunetest:structured-30"


def _versions(settings: Settings) -> list[str]:
    registry = Registry(settings)
    try:
        return sorted(v.digest for v in registry.list_versions()) + sorted(
            v.digest for v in registry.list_versions(kind="dataset")
        )
    finally:
        registry.close()


@pytest.fixture(scope="module")
def pruned(converted_settings: Settings) -> dict[str, object]:
    """`llmos prune smollm2:safetensors --sparsity 0.3 --method structured` (once for this module)."""
    home = converted_settings.home
    result = run_cli(
        home, "prune", "smollm2:safetensors", "--sparsity", "0.3", "--method", "structured", "--name", PRUNED,
        "--json", timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, object] = json.loads(result.stdout)
    return report


@pytest.mark.timeout(900)
def test_structured_prune_makes_a_smaller_dense_child_that_generates(
    converted_settings: Settings, pruned: dict[str, object]
) -> None:
    import llmos

    parent, child = pruned["parent"], pruned["child"]
    assert isinstance(parent, dict) and isinstance(child, dict)
    assert child["model"] == PRUNED and child["intermediate_size_after"] == 1536 - round(0.3 * 1536)
    assert child["parameters"] < parent["parameters"] and child["size"] < parent["size"]
    assert child["achieved_sparsity"] == pytest.approx(0.3, abs=1e-3)
    registry = Registry(converted_settings)
    view = registry.show(PRUNED)
    model_dir = registry.model_dir(registry.resolve(PRUNED))
    registry.close()
    assert view.format == "hf" and view.parameter_count == child["parameters"]
    (lineage,) = view.lineage
    assert lineage.operation == "prune" and lineage.parent_name == "smollm2:safetensors"
    assert lineage.params["method"] == "structured" and lineage.params["parameters_after"] == child["parameters"]
    assert json.loads((model_dir / "config.json").read_text())["intermediate_size"] == 1075

    model = llmos.load_model(PRUNED, settings=converted_settings, backend="torch")
    try:
        text = model.generate_text("The capital of France is", max_length=8)
    finally:
        model.close()
    assert text.strip() and model.last_stats is not None and model.last_stats.completion_tokens > 0


@pytest.mark.timeout(600)
def test_bad_prune_and_distill_input_is_refused_with_one_line(converted_settings: Settings, tmp_path: Path) -> None:
    home = converted_settings.home
    registry = Registry(converted_settings)
    registry.import_path(make_tiny_base(tmp_path / "char"), "prunetest-char")
    store_rows(registry, load_qa()[:8], "prunetest-data", operation="import", report={})
    registry.close()
    before = _versions(converted_settings)
    cases = [
        (["prune", "smollm2:safetensors", "--sparsity", "0", "--method", "structured"], "strictly between 0 and 1"),
        (["prune", "smollm2:safetensors", "--sparsity", "-0.1", "--method", "structured"], "strictly between 0 and"),
        (["prune", "smollm2:safetensors", "--sparsity", "1.5", "--method", "structured"], "strictly between 0 and"),
        (["prune", "smollm2:safetensors", "--sparsity", "0.5", "--method", "random"], "unknown pruning method"),
        (["prune", "smollm2", "--sparsity", "0.5", "--method", "structured"], "`llmos convert smollm2:latest"),
        (
            ["distill", "--teacher", "smollm2:safetensors", "--student", "prunetest-char", "--data", "prunetest-data"],
            "teacher and student use different tokenizers",
        ),
        (
            ["distill", "--teacher", "smollm2:safetensors", "--student", PRUNED, "--data", "x", "--alpha", "1.5"],
            "alpha must be in [0, 1]",
        ),
    ]
    for args, message in cases:
        result = run_cli(home, *args)
        assert result.returncode == 1, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    assert _versions(converted_settings) == before
    jobs = JobService(converted_settings)
    assert not [j for j in jobs.list_jobs() if j.kind == "distill" and "prunetest-char" in str(j.params)]
    jobs.close()


@pytest.mark.timeout(900)
def test_distilling_the_pruned_model_lowers_its_loss_and_records_both_parents(
    converted_settings: Settings, pruned: dict[str, object]
) -> None:
    home = converted_settings.home
    texts = [str(row["completion"]) for row in load_qa() if row["variant"] == 0]  # short sentences: a fast test
    data = [{"text": t, "split": "train"} for t in texts[:8]] + [
        {"text": t, "split": "validation"} for t in texts[8:10]
    ]
    registry = Registry(converted_settings)
    store_rows(registry, data, "prunetest-zephyr", operation="import", report={})
    registry.close()

    result = run_cli(
        home, "distill", "--teacher", "smollm2:safetensors", "--student", PRUNED, "--data", "prunetest-zephyr",
        "--max-steps", "1", "--batch-size", "8", "--max-length", "32", "--lr", "2e-4", "--warmup-steps", "1",
        "--name", "prunetest:distilled", "--wait", "--json", timeout=800,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outcome = json.loads(result.stdout)
    metrics = outcome["metrics"]
    assert metrics["steps"] == 1
    assert metrics["validation"]["loss"] < metrics["initial_validation"]["loss"]

    registry = Registry(converted_settings)
    view = registry.show("prunetest:distilled")
    registry.close()
    assert {item.operation for item in view.lineage} == {"distill"}
    assert {item.parent_name for item in view.lineage} == {"smollm2:safetensors", PRUNED, "prunetest-zephyr:latest"}
    assert view.parameter_count == pruned["child"]["parameters"]  # type: ignore[index]
    jobs = JobService(converted_settings)
    curve = jobs.metrics(outcome["job"])
    jobs.close()
    assert [point["step"] for point in curve] == [1] and curve[0]["kl"] > 0 and curve[0]["ce"] > 0
