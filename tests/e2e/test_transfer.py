"""Instance-to-instance transfer end to end: two real `llmos serve` processes with their own homes and keys.

A holds smollm2, datasets and a small three-file Hugging Face model; B starts empty. Models and datasets move with
the real CLI (`llmos push`, `llmos pull --from`); interruption and corruption are injected in-process through the
transfer client's chunk hook, and the receiving server's own counters and upload status are the evidence.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.config import Settings
from llmos.errors import InvalidInputError, ModelNotFoundError
from llmos.registry import sources
from llmos.registry.datasets import import_dataset, store_rows
from llmos.registry.remote import Remote, pull, push
from llmos.registry.service import Registry
from llmos.security.service import SecurityService
from tests.helpers import ServerProcess, make_tiny_hf, run_cli

pytestmark = pytest.mark.slow


@dataclass
class Side:
    home: Path
    server: ServerProcess
    keys: dict[str, str]

    def cli(self, *args: str, timeout: float = 120) -> tuple[int, str, str]:
        result = run_cli(self.home, *args, timeout=timeout)
        return result.returncode, result.stdout, result.stderr

    def show(self, name: str) -> dict[str, Any]:
        """What `llmos show --json` prints (read in-process: cheaper than a CLI subprocess per look)."""
        registry = Registry(Settings(home=self.home), maintain=False)
        try:
            return registry.show(name).to_dict(full=True)
        finally:
            registry.close()

    def http(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.server.base, headers={"authorization": f"Bearer {self.keys[key]}"})

    def patch_requests(self) -> float:
        """Upload requests this server has answered (from its own /metrics)."""
        text = self.http("admin").get("/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("llmos_http_requests_total{") and 'method="PATCH"' in line
        )


def add_keys(home: Path) -> dict[str, str]:
    security = SecurityService(Settings(home=home))
    for tenant in ("team", "other"):
        security.create_tenant(tenant)
    keys = {
        "admin": security.create_key("team", "admin")[0],
        "developer": security.create_key("team", "developer")[0],
        "consumer": security.create_key("team", "consumer")[0],
        "outsider": security.create_key("other", "developer")[0],
    }
    security.close()
    return keys


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Side, Side]]:
    root = tmp_path_factory.mktemp("transfer")
    home_a, home_b = root / "a" / "home", root / "b" / "home"
    registry = Registry(Settings(home=home_a))
    sources.pull(registry, "smollm2")
    (root / "notes.jsonl").write_text("".join(json.dumps({"text": f"note {n}"}) + "\n" for n in range(200)))
    import_dataset(registry, root / "notes.jsonl", "notes")
    registry.import_path(make_tiny_hf(root / "tiny-hf"), "tiny-hf")
    registry.close()
    keys_a, keys_b = add_keys(home_a), add_keys(home_b)
    server_a = ServerProcess(home_a)
    try:
        server_b = ServerProcess(home_b)
    except BaseException:
        server_a.stop()
        raise
    yield Side(home_a, server_a, keys_a), Side(home_b, server_b, keys_b)
    server_a.stop()
    server_b.stop()


def test_push_model_and_dataset_then_pull_the_other_way(sides: tuple[Side, Side]) -> None:
    a, b = sides
    for name, target in (("smollm2", "smollm2"), ("notes", "shared/notes:v1")):
        code, _, stderr = a.cli("push", name, b.server.base, "--name", target, "--api-key", b.keys["developer"],
                                "--allow-private")  # fmt: skip
        assert code == 0, stderr
        assert "pushed" in stderr
        here, there = a.show(name), b.show(target)
        for field in ("digest", "files", "format", "size", "chat_template", "tokenizer", "details"):
            assert here[field] == there[field], field
        assert [(x["operation"], x["params"]) for x in there["lineage"]] == [
            (x["operation"], x["params"]) for x in here["lineage"]
        ]
    code, stdout, stderr = b.cli("verify", "--json")
    assert code == 0 and json.loads(stdout)["checked"] == 2, stderr
    # the pushed versions belong to the key's tenant on B: another tenant sees neither them nor their blobs
    blob = b.show("smollm2")["files"][0]["digest"]
    with b.http("outsider") as outsider:
        assert outsider.get("/v1/registry/models/smollm2/manifest").status_code == 404
        assert outsider.get(f"/v1/registry/blobs/{blob}").status_code == 404
        assert outsider.head(f"/v1/registry/blobs/{blob}").status_code == 404
    with b.http("developer") as developer:
        assert developer.head(f"/v1/registry/blobs/{blob}").status_code == 200
        ranged = developer.get(f"/v1/registry/blobs/{blob}", headers={"range": "bytes=98362400-"})
        assert ranged.status_code == 206 and len(ranged.content) == 32
    with b.http("consumer") as consumer:  # consumers use models; moving them needs a developer
        assert consumer.get(f"/v1/registry/uploads/{blob}").status_code == 403

    # the other way: A's home pulls from B's server; a blob A already holds is not fetched again
    registry = Registry(Settings(home=b.home))
    made_on_b = store_rows(registry, [{"text": "from b"}], "lab/b-only:v2", operation="import", report={})
    registry.close()
    pulls = [("lab/b-only:v2", "from-b", 0), ("shared/notes:v1", "notes-roundtrip", 1)]
    for remote_name, local_name, skipped in pulls:
        code, stdout, stderr = a.cli("pull", remote_name, "--from", b.server.base, "--name", local_name,
                                     "--api-key", b.keys["developer"], "--allow-private", "--json")  # fmt: skip
        assert code == 0, stderr
        assert json.loads(stdout)["skipped"] == skipped
    assert a.show("from-b")["digest"] == made_on_b.digest
    assert a.show("notes-roundtrip")["digest"] == a.show("notes")["digest"]
    # and B's home pulls a three-file model from A's server
    code, stdout, stderr = b.cli("pull", "tiny-hf", "--from", a.server.base, "--api-key", a.keys["developer"],
                                 "--allow-private", "--json")  # fmt: skip
    assert code == 0, stderr
    report = json.loads(stdout)
    assert (report["blobs"], report["skipped"], report["bytes_transferred"]) == (3, 0, report["total_bytes"])
    assert b.show("tiny-hf")["digest"] == a.show("tiny-hf")["digest"]
    assert b.show("tiny-hf")["files"] == a.show("tiny-hf")["files"]


def test_an_interrupted_push_resumes_without_resending_finished_blobs(sides: tuple[Side, Side], tmp_path: Path) -> None:
    a, b = sides
    registry = Registry(Settings(home=a.home))
    view = registry.import_path(make_tiny_hf(tmp_path / "resume-hf"), "resume-hf")
    sizes = {f.path: f.size for f in view.files}
    last = next(f for f in view.files if f.path == "tokenizer.json")

    class Interrupted(Exception):
        pass

    def cut(digest: str, offset: int, data: bytes) -> bytes:
        if digest == last.digest and offset >= 128 * 1024:
            raise Interrupted  # the connection drops in the middle of the last blob
        return data

    remote = Remote(b.server.base, api_key=b.keys["developer"], allow_private=True)
    with remote, pytest.raises(Interrupted):
        push(registry, "resume-hf", remote, chunk_size=64 * 1024, chunk_filter=cut)
    registry.close()
    with b.http("developer") as developer:
        status = {f.path: developer.get(f"/v1/registry/uploads/{f.digest}").json() for f in view.files}
    assert status["model.safetensors"]["complete"] and status["config.json"]["complete"]
    assert status["tokenizer.json"] == {"digest": last.digest, "offset": 128 * 1024, "complete": False,
                                        "in_store": False}  # fmt: skip
    with pytest.raises(ModelNotFoundError):  # nothing is registered before every blob is there
        b.show("resume-hf")

    before = b.patch_requests()
    code, stdout, stderr = a.cli("push", "resume-hf", b.server.base, "--api-key", b.keys["developer"],
                                 "--allow-private", "--json")  # fmt: skip
    assert code == 0, stderr
    report = json.loads(stdout)
    assert (report["skipped"], report["resumed"]) == (2, 1)
    assert report["bytes_transferred"] == sizes["tokenizer.json"] - 128 * 1024
    assert b.patch_requests() - before == 1  # one request carried the rest of the tokenizer; nothing else was sent
    assert b.show("resume-hf")["digest"] == view.digest

    # a pull cut short resumes too (with a Range request), into a third, empty home
    fresh = Registry(Settings(home=tmp_path / "c" / "home"))
    remote = Remote(a.server.base, api_key=a.keys["developer"], allow_private=True)
    with remote:
        with pytest.raises(Interrupted):
            pull(fresh, "resume-hf", remote, chunk_filter=cut)
        assert fresh.list_versions(kind="all") == []
        again = pull(fresh, "resume-hf", remote)
    received = sizes["tokenizer.json"] - again.bytes_transferred
    assert (again.skipped, again.resumed) == (2, 1) and 128 * 1024 <= received < sizes["tokenizer.json"]
    assert fresh.show("resume-hf").digest == view.digest and fresh.verify().ok
    fresh.close()


def test_a_corrupted_blob_in_flight_is_rejected_and_nothing_is_registered(sides: tuple[Side, Side]) -> None:
    a, b = sides
    registry = Registry(Settings(home=a.home))
    rows = [{"text": f"secret {n}"} for n in range(300)]
    view = store_rows(registry, rows, "fragile", operation="import", report={"rows": len(rows)})

    def flip(_digest: str, offset: int, data: bytes) -> bytes:
        return data if offset else bytes([data[0] ^ 0x20]) + data[1:]

    with Remote(b.server.base, api_key=b.keys["developer"], allow_private=True) as remote:
        with pytest.raises(InvalidInputError, match="corrupted in transit") as caught:
            push(registry, "fragile", remote, chunk_filter=flip)
        assert caught.value.param == "digest"
        blob = view.files[0].digest
        status = remote.check(remote.request("GET", f"/v1/registry/uploads/{blob}")).json()
        assert (status["offset"], status["complete"]) == (0, False)  # the bad upload was discarded
    assert "fragile" not in b.cli("data", "list", "--json")[1]
    with b.http("admin") as admin:
        events = admin.get("/admin/audit").json()["data"]
    assert any(e["action"] == "blob.upload" and e["outcome"] == "rejected" for e in events)

    # the same on the way in: a pull whose bytes are altered stores nothing on the pulling side
    with Remote(a.server.base, api_key=a.keys["developer"], allow_private=True) as remote:
        target = Registry(Settings(home=b.home))
        with pytest.raises(InvalidInputError, match="corrupted in transit"):
            pull(target, "fragile", remote, chunk_filter=flip)
        assert not target.blobs.exists(blob)
        assert [v for v in target.list_versions(kind="all") if v.repository == "fragile"] == []
        # and a clean transfer afterwards goes through
        assert pull(target, "fragile", remote).digest == view.digest
        target.close()
    registry.close()
    assert hashlib.sha256(view.manifest.encode()).hexdigest() == view.digest.split(":")[1]


@pytest.mark.parametrize(
    "args",
    [
        ("push", "smollm2", "http://169.254.169.254/"),
        ("push", "smollm2", "http://10.0.0.1:8470"),
        ("pull", "smollm2", "--from", "http://[::ffff:169.254.169.254]/"),
    ],
)
def test_private_and_metadata_targets_are_refused(sides: tuple[Side, Side], args: tuple[str, ...]) -> None:
    a, _ = sides
    code, _, stderr = a.cli(*args, "--api-key", "not-sent", timeout=60)
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to connect"), stderr
    assert "--allow-private" in lines[0] and "not-sent" not in stderr
