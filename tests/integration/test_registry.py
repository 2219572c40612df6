"""The registry through the real CLI and a real store (SQLite and PostgreSQL): digests, dedup, tags, removal,
verification."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from llmos.config import Settings
from llmos.registry.service import Registry
from tests.helpers import gguf_bytes, run_cli, store_snapshot
from tests.postgres import DATABASES

pytestmark = pytest.mark.parametrize("database", DATABASES, indirect=True)


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def blob_files(home: Path) -> list[Path]:
    return sorted(p for p in (home / "blobs" / "sha256").rglob("*") if p.is_file())


def test_pull_registers_the_bundled_model_with_content_digests(home: Path, smollm2_file: Path) -> None:
    result = run_cli(home, "pull", "smollm2")
    assert result.returncode == 0, result.stderr
    listed = json.loads(run_cli(home, "list", "--json").stdout)
    assert [entry["name"] for entry in listed] == ["smollm2:latest"]
    entry = listed[0]
    assert entry["files"][0]["digest"] == sha256_file(smollm2_file)  # the GGUF's own bytes
    assert (entry["format"], entry["architecture"], entry["quantization"]) == ("gguf", "llama", "Q4_1")
    shown = json.loads(run_cli(home, "show", "smollm2", "--json").stdout)
    manifest = shown["manifest"].encode()
    assert entry["digest"] == "sha256:" + hashlib.sha256(manifest).hexdigest()  # version id = manifest digest
    assert json.loads(manifest)["files"][0]["digest"] == entry["files"][0]["digest"]
    assert shown["lineage"][0]["operation"] == "pull"
    # pulling again changes nothing
    before = store_snapshot(home)
    assert run_cli(home, "pull", "smollm2").returncode == 0
    after = store_snapshot(home)
    assert before["files"] == after["files"]
    assert len(after["rows"]["model_versions"]) == 1


def test_same_file_twice_is_stored_once_and_blobs_follow_references(home: Path, tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(gguf_bytes())
    for name in ("tiny:one", "other/tiny:two"):
        result = run_cli(home, "import", str(model), "--name", name)
        assert result.returncode == 0, result.stderr
    assert len(blob_files(home)) == 1
    assert blob_files(home)[0].read_bytes() == model.read_bytes()

    assert run_cli(home, "rm", "tiny:one").returncode == 0
    assert len(blob_files(home)) == 1, "the other name still references the blob"
    names = [e["name"] for e in json.loads(run_cli(home, "list", "--json").stdout)]
    assert names == ["other/tiny:two"]

    assert run_cli(home, "rm", "other/tiny:two").returncode == 0
    assert blob_files(home) == []
    assert json.loads(run_cli(home, "list", "--json").stdout) == []
    rows = store_snapshot(home)["rows"]
    assert all(rows[table] == [] for table in ("models", "model_versions", "version_files", "tags", "lineage"))
    assert [r[4] for r in rows["audit_log"]] == ["model.import", "model.import", "model.remove", "model.remove"]


def test_tags_move_and_an_untagged_version_goes_away(home: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    first.write_bytes(gguf_bytes())
    second.write_bytes(gguf_bytes(tensors=[("token_embd.weight", (16, 4), 0)]))
    assert run_cli(home, "import", str(first), "--name", "m").returncode == 0
    assert run_cli(home, "tag", "m", "m:stable").returncode == 0
    assert run_cli(home, "import", str(second), "--name", "m").returncode == 0  # moves m:latest
    listed = {e["name"]: e for e in json.loads(run_cli(home, "list", "--json").stdout)}
    assert set(listed) == {"m:latest", "m:stable"}
    assert listed["m:latest"]["digest"] != listed["m:stable"]["digest"]
    assert len(blob_files(home)) == 2
    assert run_cli(home, "rm", "m:stable").returncode == 0
    assert len(blob_files(home)) == 1  # the first version lost its last tag, and its blob with it
    digest = listed["m:latest"]["digest"]
    assert run_cli(home, "rm", f"m@{digest}").returncode == 0
    assert blob_files(home) == []


def test_verify_detects_a_blob_changed_on_disk(home: Path, tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(gguf_bytes())
    assert run_cli(home, "import", str(model), "--name", "tiny").returncode == 0
    ok = run_cli(home, "verify")
    assert ok.returncode == 0, ok.stderr
    assert "verified 1 blob(s): ok" in ok.stderr
    blob = blob_files(home)[0]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    bad = run_cli(home, "verify", "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert report["corrupt"] == ["sha256:" + blob.name]
    assert report["affected"]["sha256:" + blob.name][0].startswith("tiny@sha256:")


def test_verify_reports_a_missing_blob(home: Path, tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(gguf_bytes())
    assert run_cli(home, "import", str(model), "--name", "tiny").returncode == 0
    blob_files(home)[0].unlink()
    result = run_cli(home, "verify", "--json")
    assert result.returncode == 1
    assert len(json.loads(result.stdout)["missing"]) == 1


def test_unknown_names_fail_cleanly(home: Path) -> None:
    for args in (("show", "nothing"), ("rm", "nothing:v1"), ("run", "nothing", "hi")):
        result = run_cli(home, *args)
        assert result.returncode == 1
        assert "not found" in result.stderr
        assert "Traceback" not in result.stderr
    pulled = run_cli(home, "pull", "no-such-model")
    assert pulled.returncode == 1
    assert "smollm2" in pulled.stderr and "gemma3-270m" in pulled.stderr


def test_config_version_and_doctor_name_the_database_but_never_its_password(
    home: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "canary-Pw-7341"
    if database == "postgresql":  # the test server trusts 127.0.0.1, so a password is accepted and never checked
        url = os.environ["LLMOS_DATABASE_URL"].replace("//llmos@", f"//llmos:{password}@")
        monkeypatch.setenv("LLMOS_DATABASE_URL", url)
    config = run_cli(home, "config", "--json")
    assert json.loads(config.stdout)["home"] == str(home)
    version = run_cli(home, "version")
    assert version.returncode == 0
    assert "llmos" in version.stdout and "llama-cpp-python 0.3.36" in version.stdout
    doctor = run_cli(home, "doctor", "--json")
    registry = json.loads(doctor.stdout)["registry"]
    assert registry["ok"] and registry["database"] == database, registry
    if database == "postgresql":
        assert registry["database_version"].split(".")[0].isdigit() and registry["quick_check"] is None
    else:
        assert registry["database_version"] is None and registry["quick_check"] == "ok"
    for result in (config, version, doctor):
        assert password not in result.stdout + result.stderr


def test_two_front_ends_creating_one_model_at_the_same_moment_both_register(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Front end A finds no model ``shared`` and is about to create it when front end B (its own connection)
    creates it first: A's transaction is refused by the database and runs again, so both versions are registered."""
    settings = Settings(home=home)
    first, second = Registry(settings), Registry(settings)
    files = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(gguf_bytes(metadata={"general.name": name}))
        files.append(path)
    original = Registry._get_or_create_model
    raced = []

    def racing(self: Registry, session: Session, ref: Any, tenant_id: int | None = None) -> Any:
        if self is first and not raced:  # A has looked for the model (none) and adds it: B commits it just before
            real_add = session.add

            def add_after_the_rival(instance: object, *args: Any, **kwargs: Any) -> None:
                session.add = real_add  # type: ignore[method-assign]
                raced.append(second.import_path(files[1], "shared:b"))
                real_add(instance, *args, **kwargs)

            session.add = add_after_the_rival  # type: ignore[method-assign]
        return original(self, session, ref, tenant_id)

    monkeypatch.setattr(Registry, "_get_or_create_model", racing)
    view = first.import_path(files[0], "shared:a")
    assert raced and view.tags == ["a"]
    assert sorted(tag for v in first.list_versions("model") for tag in v.tags) == ["a", "b"]
    first.close()
    second.close()
