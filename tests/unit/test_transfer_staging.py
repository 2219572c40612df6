"""Transfer building blocks: the document check, resumable staging with digest verification, all-or-nothing commit."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from llmos.config import Settings
from llmos.errors import ConflictError, InvalidInputError
from llmos.registry.datasets import store_rows
from llmos.registry.service import Registry
from llmos.registry.transfer import Staging, commit, parse_document, read_range, version_document
from tests.helpers import gguf_bytes, make_tiny_hf


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def test_staging_resumes_at_the_exact_offset_and_verifies_the_digest(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "staging")
    data = bytes(range(256)) * 40
    digest = digest_of(data)
    with staging.append(digest, 0, len(data)) as appender:
        appender.write(data[:1000])
        assert appender.finish() is False
    assert staging.received(digest) == 1000 and staging.complete(digest) is None
    # a client that lost track is told where to go on
    with pytest.raises(ConflictError, match="resume from 1000"), staging.append(digest, 0, len(data)):
        pass
    with staging.append(digest, 1000, len(data)) as appender, pytest.raises(InvalidInputError, match="declared"):
        appender.write(data[1000:] + b"x")
    assert staging.received(digest) == 1000  # the refused request left nothing behind
    with staging.append(digest, 1000, len(data)) as appender:
        appender.write(data[1000:])
        assert appender.finish() is True
    complete = staging.complete(digest)
    assert complete is not None and complete.read_bytes() == data
    with pytest.raises(ConflictError, match="already complete"), staging.append(digest, 0, len(data)):
        pass


def test_a_corrupted_blob_is_discarded_when_its_last_byte_arrives(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "staging")
    data = b"the real bytes" * 100
    digest = digest_of(data)
    damaged = bytearray(data)
    damaged[700] ^= 0x01
    with staging.append(digest, 0, len(data)) as appender:
        appender.write(bytes(damaged[:500]))
        appender.finish()
    with staging.append(digest, 500, len(data)) as appender:
        appender.write(bytes(damaged[500:]))
        with pytest.raises(InvalidInputError, match="corrupted in transit") as caught:
            appender.finish()
    assert caught.value.param == "digest"
    assert staging.received(digest) == 0 and staging.complete(digest) is None
    assert list(staging.root.iterdir()) == []


def test_concurrent_appends_to_one_blob_are_refused(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "staging")
    digest = digest_of(b"abc")
    with (
        staging.append(digest, 0, 3),
        pytest.raises(ConflictError, match="another transfer"),
        staging.append(digest, 0, 3),
    ):
        pass


@pytest.fixture
def dataset(settings: Settings) -> tuple[Registry, dict[str, Any]]:
    registry = Registry(settings)
    rows = [{"text": f"row {n}"} for n in range(50)]
    view = store_rows(registry, rows, "team/notes:v1", operation="import", report={"rows": 50})
    return registry, version_document(view)


def test_documents_that_do_not_rebuild_their_manifest_are_refused(dataset: tuple[Registry, dict[str, Any]]) -> None:
    _, document = dataset
    parsed = parse_document(document)
    assert parsed.name == "team/notes:v1" and parsed.kind == "dataset" and len(parsed.blobs) == 1
    assert parse_document(document, name="elsewhere:copy").name == "elsewhere:copy"

    def tampered(change: Any) -> dict[str, Any]:
        bad = copy.deepcopy(document)
        change(bad)
        return bad

    manifest = json.loads(document["manifest"])
    cases = {
        "schema": tampered(lambda d: d.update(schema="other")),
        "digest": tampered(lambda d: d.update(digest="sha256:" + "0" * 64)),
        "format": tampered(lambda d: d.update(format="gguf")),  # the manifest says dataset
        "architecture": tampered(lambda d: d.update(architecture="llama")),
        "name": tampered(lambda d: d.update(name="../../etc")),
        "traversal": _resigned(document, manifest, "../../outside"),
        "absolute": _resigned(document, manifest, "/etc/passwd"),
    }
    for case, bad in cases.items():
        with pytest.raises(InvalidInputError):  # noqa: PT012 - the failure names the case that got through
            parse_document(bad)
            pytest.fail(f"{case} was accepted")
    with pytest.raises(InvalidInputError, match="cannot be registered as a model"):
        parse_document(document, kind="model")


def _resigned(document: dict[str, Any], manifest: dict[str, Any], path: str) -> dict[str, Any]:
    """A document whose manifest names ``path`` and whose digest matches that manifest (a careful forger)."""
    forged = copy.deepcopy(manifest)
    forged["files"][0]["path"] = path
    text = json.dumps(forged, sort_keys=True, separators=(",", ":"))
    return {**document, "manifest": text, "digest": digest_of(text.encode())}


def test_commit_needs_every_blob_and_registers_the_same_version(
    dataset: tuple[Registry, dict[str, Any]], tmp_path: Path
) -> None:
    source, document = dataset
    receiver = Registry(Settings(home=tmp_path / "receiver"))
    staging = Staging(tmp_path / "receiver" / "transfers" / "uploads" / "local")
    parsed = parse_document(document, name="copy:v1")
    with pytest.raises(InvalidInputError, match="were not received"):
        commit(receiver, parsed, staging, usable=lambda _d: True)
    assert receiver.list_versions(kind="all") == []
    blob = parsed.blobs[0]
    data = b"".join(read_range(source.blobs, blob.digest, 0))
    assert b"".join(read_range(source.blobs, blob.digest, 17)) == data[17:]
    with staging.append(blob.digest, 0, blob.size) as appender:
        appender.write(data)
        assert appender.finish()
    view = commit(receiver, parsed, staging, usable=lambda _d: True)
    assert view.digest == document["digest"] and view.name == "copy:v1"
    assert [(f.digest, f.size) for f in view.files] == [(f["digest"], f["size"]) for f in document["files"]]
    assert view.lineage[0].operation == "import" and view.details["rows"] == 50
    assert staging.complete(blob.digest) is None  # moved into the store
    assert receiver.verify().ok
    # a blob already in the store counts only when the caller may use it (no claiming another tenant's blob)
    other = parse_document(document, name="claim:v1")
    with pytest.raises(InvalidInputError, match="were not received"):
        commit(receiver, other, staging, usable=lambda _d: False)
    assert commit(receiver, other, staging, usable=lambda _d: True).digest == document["digest"]
    # nor with a size of the sender's choosing: the store knows the blob's size
    entry = json.loads(document["manifest"])["files"][0]
    lying = _forged(document, files=[{**entry, "size": entry["size"] + 1}])
    with pytest.raises(InvalidInputError, match="the manifest says"):
        commit(receiver, parse_document(lying, name="liar:v1"), staging, usable=lambda _d: True)


def _forged(document: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A self-consistent document (its manifest rebuilt from ``fields`` and re-hashed): only the bytes can betray it."""
    manifest = json.loads(document["manifest"])
    files = fields.pop("files", manifest["files"])
    forged = {**document, **fields}
    manifest.update({k: v for k, v in fields.items() if k in manifest})
    manifest["files"] = files
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return {**forged, "manifest": text, "digest": digest_of(text.encode())}


def _stage(staging: Staging, data: bytes) -> tuple[str, int]:
    digest = digest_of(data)
    with staging.append(digest, 0, len(data)) as appender:
        appender.write(data)
        assert appender.finish()
    return digest, len(data)


def test_received_files_are_inspected_like_an_import(settings: Settings, tmp_path: Path) -> None:
    source = Registry(settings)
    (tmp_path / "tiny.gguf").write_bytes(gguf_bytes())
    document = version_document(source.import_path(tmp_path / "tiny.gguf", "tiny"))
    receiver = Registry(Settings(home=tmp_path / "receiver"))
    staging = Staging(tmp_path / "receiver-staging")
    data = b"".join(read_range(source.blobs, document["files"][0]["digest"], 0))
    _stage(staging, data)
    # descriptive fields the sender could lie about are read from the bytes instead
    lying = {**document, "details": {"task": "embedding"}, "tokenizer": {"model": "evil"}}
    view = commit(receiver, parse_document(lying), staging, usable=lambda _d: True)
    assert view.digest == document["digest"]
    assert "task" not in view.details and view.tokenizer == source.show("tiny").tokenizer

    # bytes that are not the model the manifest claims are refused, and nothing is registered
    digest, size = _stage(staging, b'{"text": "not a model"}\n')
    not_gguf = _forged(document, files=[{"path": "model.gguf", "digest": digest, "size": size}])
    with pytest.raises(InvalidInputError, match="not a valid gguf model"):
        commit(receiver, parse_document(not_gguf, name="fake"), staging, usable=lambda _d: True)
    wrong_facts = _forged(document, parameter_count=10**9)
    with pytest.raises(InvalidInputError, match="do not match its manifest"):
        commit(receiver, parse_document(wrong_facts, name="fake"), staging, usable=lambda _d: True)
    assert [v.repository for v in receiver.list_versions(kind="all")] == ["tiny"]


def test_a_hugging_face_version_brings_only_allow_listed_files(settings: Settings, tmp_path: Path) -> None:
    source = Registry(settings)
    document = version_document(source.import_path(make_tiny_hf(tmp_path / "hf"), "tiny-hf"))
    receiver = Registry(Settings(home=tmp_path / "receiver"))
    staging = Staging(tmp_path / "receiver-staging")
    for item in document["files"]:
        _stage(staging, b"".join(read_range(source.blobs, item["digest"], 0)))
    digest, size = _stage(staging, b"import os\nos.system('id')\n")
    smuggled = _forged(document, files=[*json.loads(document["manifest"])["files"],
                                        {"path": "modeling_evil.py", "digest": digest, "size": size}])  # fmt: skip
    with pytest.raises(InvalidInputError, match=r"do not match its manifest \(files\)"):
        commit(receiver, parse_document(smuggled, name="evil"), staging, usable=lambda _d: True)
    assert receiver.list_versions(kind="all") == []
    assert commit(receiver, parse_document(document), staging, usable=lambda _d: True).digest == document["digest"]
