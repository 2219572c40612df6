"""Models from scratch through the SDK and `llmos train --from-scratch`: learn, save into the registry, serve."""

from __future__ import annotations

import json
from pathlib import Path

import llmos
from llmos.config import Settings
from llmos.registry.datasets import store_rows
from llmos.registry.service import Registry
from tests.helpers import run_cli

TEXTS = [" ".join(str(n) for n in range(start, start + 12)) for start in range(1, 40)]


def test_create_fit_generate_save_and_load_back_through_the_runtime(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    model = llmos.create_model(arch="gpt", layers=2, d_model=64, heads=4, context=64, texts=TEXTS, settings=settings)
    history = model.fit(TEXTS, epochs=40, batch_size=16, optimizer="adamw", lr=3e-3)
    assert history["loss"][-1] < 0.25 < history["loss"][0]
    assert model.evaluate(TEXTS)["perplexity"] < 1.5
    assert model.generate_text("7 8 9 ", max_length=9).startswith("10 11 12")
    name = model.save("counter:v1")
    assert name == "counter:v1"
    view = Registry(settings).show("counter:v1")
    assert view.format == "hf" and view.lineage[0].operation == "train"
    assert view.lineage[0].params["arch"] == "gpt"
    loaded = llmos.load_model("counter:v1", settings=settings, backend="torch")
    try:
        assert loaded.generate_text("7 8 9 ", raw=True, max_length=9).startswith("10 11 12")
    finally:
        loaded.close()


def test_train_from_scratch_job_from_a_config_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    registry = Registry(Settings(home=home))
    store_rows(registry, [{"text": t} for t in TEXTS], "counting", operation="import", report={})
    registry.close()
    config = tmp_path / "counter.json"
    config.write_text(json.dumps({
        "arch": "lstm", "layers": 1, "d_model": 64, "data": "counting", "name": "lstm-counter",
        "epochs": 40, "batch_size": 16, "lr": 0.01,
    }))  # fmt: skip
    result = run_cli(home, "train", "--from-scratch", str(config), "--wait", timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["model"] == "lstm-counter:latest" and outcome["metrics"]["loss"] < 0.6
    view = Registry(Settings(home=home)).show("lstm-counter")
    assert {item.parent_name for item in view.lineage} == {"counting:latest"}

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": "counting", "name": "x", "layerz": 2}))
    failed = run_cli(home, "train", "--from-scratch", str(bad), "--wait", timeout=300)
    assert failed.returncode == 1 and "layerz" in failed.stderr
