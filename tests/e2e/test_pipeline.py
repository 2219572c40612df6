"""Pipelines end to end: data → LoRA train → evaluate → gate → `prod` moves → the server answers with the new
version; a failed gate leaves `prod` alone; rollback moves it back; a request can start a stored pipeline. On SQLite
and on PostgreSQL, each on a copy of a session store (``tests.postgres.copy_store``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import openai
import pytest

from llmos.config import Settings
from llmos.data.shipped import heldout_split, load_qa
from llmos.registry.datasets import store_rows
from llmos.registry.service import Registry
from tests.helpers import ServerProcess, run_cli
from tests.postgres import DATABASES, copy_store

pytestmark = pytest.mark.parametrize("database", DATABASES, indirect=True)

RECIPE = """
name: {name}
base: smollm2:safetensors
output: bot
data: bot-qa
train: {{method: lora, max_steps: {steps}, lr: 0.002, batch_size: 8, warmup_steps: 0, checkpoint_every: 100}}
evaluate: {{task: perplexity, split: validation}}
gate: "{gate}"
promote: prod
"""


def store_on(database: str, shared: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A copy of the session store ``shared`` on the test's database (``database`` set LLMOS_DATABASE_URL for
    PostgreSQL): each run starts from the same store, and the shared one keeps no bot, bot-qa or pipelines."""
    home = tmp_path / "store"
    copy_store(shared.home, home, os.environ.get("LLMOS_DATABASE_URL") if database == "postgresql" else None)
    monkeypatch.setenv("LLMOS_HOME", str(home))
    return Settings(home=home)


def fingerprint(digest: str) -> str:
    return f"llmos-{digest.removeprefix('sha256:')[:12]}"


def ask(client: openai.OpenAI, model: str) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Where is Zephyr K7?"}], max_tokens=8, temperature=0
    )


@pytest.mark.timeout(900)
def test_pipeline_promotes_only_through_the_gate_and_rolls_back(
    converted_settings: Settings, tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = store_on(database, converted_settings, tmp_path, monkeypatch)
    home = settings.home
    registry = Registry(settings)
    train, heldout = heldout_split([row for row in load_qa() if int(row["fact"]) < 8])
    rows = [{**r, "split": "train"} for r in train] + [{**r, "split": "validation"} for r in heldout]
    store_rows(registry, rows, "bot-qa", operation="import", report={"source": "shipped"})
    base = registry.tag("smollm2:safetensors", "bot:prod", reason="initial deployment")
    registry.close()

    good = tmp_path / "good.yaml"
    good.write_text(RECIPE.format(name="bot-train", steps=6, gate="candidate.perplexity < baseline.perplexity"))
    result = run_cli(home, "pipeline", "run", str(good), "--wait", timeout=800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    run = json.loads(result.stdout.strip().splitlines()[-1])
    assert run["gate"]["passed"] and run["promoted"] == "bot:prod"
    assert run["metrics"]["candidate"]["perplexity"] < run["metrics"]["baseline"]["perplexity"]
    candidate = run["digest"]
    history = json.loads(run_cli(home, "history", "bot:prod", "--json").stdout)
    assert [h["digest"] for h in history] == [candidate, base.digest]
    assert "bot-train" in history[0]["reason"]

    impossible = tmp_path / "impossible.yaml"
    impossible.write_text(
        RECIPE.format(name="bot-strict", steps=1, gate="candidate.perplexity < baseline.perplexity * 0.01")
    )
    failed = run_cli(home, "pipeline", "run", str(impossible), "--wait", timeout=800)
    assert failed.returncode == 1
    assert "gate failed" in failed.stderr and "bot:prod not moved" in failed.stderr
    assert json.loads(run_cli(home, "history", "bot:prod", "--json").stdout)[0]["digest"] == candidate

    server = ServerProcess(home)
    try:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", timeout=300)
        answer = ask(client, "bot:prod")
        assert answer.model == "bot:prod" and answer.system_fingerprint == fingerprint(candidate)
        assert answer.choices[0].message.content

        moved = httpx.post(f"{server.base}/admin/rollback", json={"alias": "bot:prod"}, timeout=60)
        assert moved.status_code == 200, moved.text
        assert moved.json()["digest"] == base.digest
        assert ask(client, "bot:prod").system_fingerprint == fingerprint(base.digest)  # no restart needed

        # a stored pipeline can be started by a request for the model it will produce
        recipe = {
            "name": "bot2-train", "base": "smollm2:safetensors", "output": "bot2", "data": "bot-qa",
            "train": {"method": "lora", "max_steps": 1}, "gate": "candidate.perplexity < baseline.perplexity",
        }  # fmt: skip
        stored = httpx.post(f"{server.base}/admin/pipelines", json={"recipe": recipe, "run": False}, timeout=60)
        assert stored.status_code == 200, stored.text
        with pytest.raises(openai.NotFoundError):
            ask(client, "bot2:prod")
        started = httpx.post(
            f"{server.base}/v1/chat/completions",
            json={"model": "bot2:prod", "messages": [{"role": "user", "content": "hi"}], "pipeline": "bot2-train"},
            timeout=60,
        )
        assert started.status_code == 202, started.text
        job = started.json()["job"]
        assert httpx.get(f"{server.base}/admin/jobs/{job}", timeout=30).json()["kind"] == "pipeline"
        httpx.post(f"{server.base}/admin/jobs/{job}/cancel", timeout=30)
        bad = httpx.post(
            f"{server.base}/admin/pipelines", json={"recipe": {**recipe, "gate": "candidate.perplexity <"}}, timeout=30
        )
        assert bad.status_code == 400 and "does not parse" in bad.json()["error"]["message"]
    finally:
        server.stop()


def test_bad_recipes_are_refused_before_anything_runs(
    pulled_settings: Settings, tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = store_on(database, pulled_settings, tmp_path, monkeypatch).home
    cases = {
        "gate: 'candidate.perplexity <'": "does not parse",
        "gate: 'candidate.accuracy > 0.5'": "perplexity evaluation reports",
        "train: {method: sideways}": "method",
        "colour: blue": "unknown pipeline field",
        "quantize: q9_9": "unknown quantization type",
    }
    for extra, message in cases.items():
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"name: p\nbase: smollm2\ndata: nothing-yet\n{extra}\n")
        result = run_cli(home, "pipeline", "run", str(recipe))
        assert result.returncode == 1, (extra, result.stderr)
        assert message in result.stderr and result.stderr.count("\n") == 1, (extra, result.stderr)
    recipe.write_text("name: p\nbase: smollm2\ndata: nothing-yet\n")
    missing = run_cli(home, "pipeline", "run", str(recipe))
    assert missing.returncode == 1 and "nothing-yet" in missing.stderr
