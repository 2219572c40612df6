"""`llmos data` end to end on a real store: every step a new version with lineage and a report; bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx

from llmos.config import Settings
from llmos.registry import sources
from llmos.registry.service import Registry
from llmos.security.service import SecurityService
from tests.helpers import ServerProcess, run_cli


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_import_clean_split_tokenize_augment_preview_and_remove(tmp_path: Path) -> None:
    home = tmp_path / "home"
    registry = Registry(Settings(home=home))
    sources.pull(registry, "smollm2")
    registry.close()
    rows: list[object] = [
        {"prompt": f"What is item {i}?", "completion": f"Item {i} is a <b>widget</b>. Mail bob{i}@example.com"}
        for i in range(30)
    ]
    rows += [
        rows[0],
        "{not json",
        {"prompt": "What is item 0?", "completion": "Item 0 is a  widget. Mail bob0@example.com"},
    ]
    source = write_jsonl(tmp_path / "qa.jsonl", rows)

    refused = run_cli(home, "data", "import", str(source), "--name", "qa")
    assert refused.returncode == 1 and "line 32" in refused.stderr
    imported = run_cli(home, "data", "import", str(source), "--name", "qa", "--on-error", "skip", "--json")
    assert imported.returncode == 0, imported.stderr
    report = json.loads(imported.stdout)["report"]
    assert report["rows"] == 32 and report["skipped"][0]["line"] == 32

    cleaned = run_cli(home, "data", "clean", "qa", "--name", "qa:clean", "--json")
    assert cleaned.returncode == 0, cleaned.stderr
    clean_report = json.loads(cleaned.stdout)["report"]
    assert clean_report["rows_in"] == 32 and clean_report["rows_out"] == 30
    assert clean_report["dropped"]["duplicate"] + clean_report["dropped"]["near_duplicate"] == 2
    assert clean_report["pii"]["email"] >= 30

    split = run_cli(home, "data", "split", "qa:clean", "--name", "qa:split", "--seed", "1", "--json")
    assert split.returncode == 0, split.stderr
    counts = json.loads(split.stdout)["report"]["counts"]
    assert sum(counts.values()) == 30 and counts["train"] > counts["validation"]

    tokens = run_cli(home, "data", "tokenize", "qa:split", "--model", "smollm2", "--name", "qa:tokens", "--json")
    assert tokens.returncode == 0, tokens.stderr
    stats = json.loads(tokens.stdout)["report"]
    assert stats["rows"] == 30 and 10 < stats["mean"] < 60 and stats["max"] >= stats["p95"] >= stats["p50"]

    augmented = run_cli(
        home, "data", "augment", "qa:clean", "--name", "qa:aug", "--template", "Q: {prompt}",
        "--paraphrase-with", "smollm2", "--json", timeout=600,
    )  # fmt: skip
    assert augmented.returncode == 0, augmented.stderr
    aug = json.loads(augmented.stdout)
    assert aug["rows"] > 60  # originals + one template variant each + the paraphrases that survived cleaning

    preview = run_cli(home, "data", "preview", "qa:split", "--rows", "3", "--split", "train")
    lines = preview.stdout.strip().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["split"] == "train" for line in lines)
    assert "[EMAIL]" in preview.stdout and "<b>" not in preview.stdout

    shown = json.loads(run_cli(home, "data", "show", "qa:tokens", "--json").stdout)
    assert shown["lineage"][0]["operation"] == "tokenize" and shown["lineage"][0]["parent_name"] == "qa:split"
    listed = run_cli(home, "data", "list").stdout
    assert all(tag in listed for tag in ("qa:latest", "qa:clean", "qa:split", "qa:tokens", "qa:aug"))
    assert "qa:" not in run_cli(home, "list").stdout  # datasets are not models
    assert run_cli(home, "data", "rm", "qa:aug").returncode == 0
    assert "qa:aug" not in run_cli(home, "data", "list").stdout
    assert run_cli(home, "data", "show", "smollm2").returncode == 1  # a model is not a dataset


def test_bad_files_fail_with_one_clear_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    unknown = tmp_path / "odd.csv"
    unknown.write_text("foo,bar\n1,2\n")
    huge = tmp_path / "huge.jsonl"
    with huge.open("wb") as handle:  # a 2 GB line without a newline (sparse: no disk used)
        handle.truncate(2 * 1024**3)
    cases = [(empty, "empty"), (unknown, "foo"), (huge, "longer than"), (tmp_path / "missing.jsonl", "not a file")]
    for path, message in cases:
        result = run_cli(home, "data", "import", str(path), "--name", "bad", timeout=120)
        assert result.returncode == 1, (path, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (path, result.stderr)
    assert "bad" not in run_cli(home, "data", "list").stdout
    os.unlink(huge)


def test_datasets_over_the_admin_api_are_tenant_scoped(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = Settings(home=home)
    security = SecurityService(settings)
    security.create_tenant("acme")
    security.create_tenant("globex")
    acme, _ = security.create_key("acme", "developer")
    globex, _ = security.create_key("globex", "developer")
    consumer, _ = security.create_key("acme", "consumer")
    security.close()
    server = ServerProcess(home)
    try:

        def call(method: str, path: str, key: str, **kwargs: object) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"}
            return httpx.request(method, f"{server.base}{path}", headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]

        rows = [{"text": f"line {i}"} for i in range(5)]
        created = call("POST", "/admin/datasets", acme, json={"name": "notes", "rows": rows})
        assert created.status_code == 200, created.text
        assert created.json()["details"]["rows"] == 5
        assert [d["name"] for d in call("GET", "/admin/datasets", acme).json()["data"]] == ["notes:latest"]
        assert call("GET", "/admin/datasets", globex).json()["data"] == []
        assert call("GET", "/admin/datasets/notes", globex).status_code == 404
        assert call("GET", "/admin/datasets/notes/preview", globex).status_code == 404
        assert call("DELETE", "/admin/datasets/notes", globex).status_code == 404
        assert call("GET", "/admin/datasets", consumer).status_code == 403
        preview = call("GET", "/admin/datasets/notes/preview?rows=2", acme).json()["data"]
        assert preview == rows[:2]
        bad = call("POST", "/admin/datasets", acme, json={"name": "x", "rows": [{"foo": 1}]})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        job = call("POST", "/admin/jobs", globex, json={"base": "nope", "data": "notes", "name": "o"})
        assert job.status_code == 404
        assert call("GET", "/admin/jobs", consumer).status_code == 403
        assert call("DELETE", "/admin/datasets/notes", acme).json()["deleted"] is True
    finally:
        server.stop()
