"""Parsers bound their depth and ranges: GGUF metadata, safetensors headers, bundle manifests and every JSON the store
reads refuse excessive nesting with a clean error (never RecursionError); safetensors ranges must tile the data
section; bundle paths are followed component by component. `llmos import` of each bad file exits 1 with one line and
leaves the registry as it was."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llmos.config import Settings
from llmos.edge import runner as er
from llmos.errors import InvalidInputError, InvalidModelFileError
from llmos.formats import safe_json
from llmos.formats.detect import inspect_path
from llmos.formats.gguf import MAX_NESTING, read_gguf
from llmos.formats.safetensors import read_safetensors_header
from llmos.registry.service import Registry
from llmos.registry.transfer import DOCUMENT_SCHEMA, parse_document
from tests.helpers import ARRAY, STRING, U32, _s, gguf_bytes, run_cli, store_snapshot

DEEP = 100_000


def deep_json(levels: int, inner: str = "1") -> str:
    return "[" * levels + inner + "]" * levels


# --- safe_json ------------------------------------------------------------------------------------------------------


def test_json_depth_is_measured_without_recursion_and_ignores_strings() -> None:
    assert safe_json.depth(b'{"a": [1, {"b": "]]]\\"[[[{{"}], "c": []}') == 3
    assert safe_json.depth(b'"[[[["') == 0 and safe_json.depth(b"42") == 0
    assert safe_json.depth(deep_json(DEEP).encode()) == DEEP
    assert safe_json.loads(deep_json(safe_json.MAX_DEPTH), "x") is not None
    with pytest.raises(InvalidModelFileError, match=r"^x\.json: JSON nested 65 levels deep \(the limit is 64\)$"):
        safe_json.loads(deep_json(65), "x.json")
    with pytest.raises(InvalidModelFileError, match="nested 100000 levels deep"):
        safe_json.loads('{"a": ' + deep_json(DEEP - 1) + "}", "x.json")
    for bad in (b"{", b"\xff{}", b"[1,]"):
        with pytest.raises(InvalidModelFileError, match="not valid"):
            safe_json.loads(bad, "x.json")


# --- GGUF -----------------------------------------------------------------------------------------------------------


def nested_gguf(levels: int) -> bytes:
    """A small valid GGUF whose metadata holds one value made of ``levels`` arrays, each holding the next."""
    value = struct.pack("<I", ARRAY) + (struct.pack("<I", ARRAY) + struct.pack("<Q", 1)) * (levels - 1)
    value += struct.pack("<I", U32) + struct.pack("<Q", 1) + struct.pack("<I", 7)
    entries = [_s("general.architecture") + struct.pack("<I", STRING) + _s("llama"), _s("evil.nested") + value]
    table = _s("token_embd.weight") + struct.pack("<IQQIQ", 2, 8, 4, 0, 0)  # 8x4 F32 at offset 0
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, len(entries)) + b"".join(entries) + table
    return header + b"\0" * (-len(header) % 32) + b"\0" * (8 * 4 * 4)


def test_gguf_array_nesting_is_bounded(tmp_path: Path) -> None:
    ok = tmp_path / "ok.gguf"
    ok.write_bytes(nested_gguf(MAX_NESTING))
    value: Any = read_gguf(ok).metadata["evil.nested"]
    for _ in range(MAX_NESTING - 1):
        value = value[0]
    assert value == [7]
    deep = tmp_path / "deep.gguf"
    deep.write_bytes(nested_gguf(DEEP))
    with pytest.raises(InvalidModelFileError, match=r"deep\.gguf: not a valid GGUF file: .* nests arrays more than 64"):
        read_gguf(deep)


# --- safetensors ----------------------------------------------------------------------------------------------------


def safetensors_file(path: Path, header: dict[str, Any] | str, data_size: int) -> Path:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_size)
    return path


def tensor(start: int, end: int, count: int | None = None) -> dict[str, Any]:
    return {"dtype": "F32", "shape": [(end - start) // 4 if count is None else count], "data_offsets": [start, end]}


@pytest.mark.parametrize(
    ("tensors", "data_size", "message"),
    [
        ({"a": tensor(0, 8), "b": tensor(4, 12)}, 12, r"tensor 'b' \(bytes 4\.\.12\) overlaps tensor 'a'"),
        ({"a": tensor(0, 8), "b": tensor(0, 8)}, 8, r"tensor 'b' \(bytes 0\.\.8\) overlaps tensor 'a'"),
        ({"a": tensor(4, 8)}, 8, r"a gap of 4 bytes lies before tensor 'a'"),
        ({"a": tensor(0, 4)}, 8, r"the tensors cover 4 bytes of the 8-byte data section"),
        ({"a": tensor(0, 8, count=3)}, 8, r"byte range does not match its shape and dtype"),
        ({"a": tensor(0, 16)}, 8, r"outside the 8-byte data section"),
    ],
)
def test_safetensors_ranges_must_tile_the_data_section(
    tmp_path: Path, tensors: dict[str, Any], data_size: int, message: str
) -> None:
    path = safetensors_file(tmp_path / "w.safetensors", tensors, data_size)
    with pytest.raises(InvalidModelFileError, match=message):
        read_safetensors_header(path)


def test_safetensors_ranges_in_any_order_and_empty_tensors_are_fine(tmp_path: Path) -> None:
    tensors = {"z": tensor(8, 12), "a": tensor(0, 8), "empty": tensor(0, 0, count=0), "tail": tensor(12, 12, count=0)}
    header = read_safetensors_header(safetensors_file(tmp_path / "w.safetensors", tensors, 12))
    assert set(header.tensors) == {"z", "a", "empty", "tail"}


def test_safetensors_header_nesting_is_bounded(tmp_path: Path) -> None:
    header = '{"__metadata__": {"x": ' + deep_json(DEEP) + '}, "a": ' + json.dumps(tensor(0, 4)) + "}"
    path = safetensors_file(tmp_path / "w.safetensors", header, 4)
    with pytest.raises(InvalidModelFileError, match=r"not a valid safetensors file: header: JSON nested 100002 levels"):
        read_safetensors_header(path)


def test_hf_directory_json_nesting_is_bounded(tmp_path: Path) -> None:
    directory = tmp_path / "hf"
    directory.mkdir()
    safetensors_file(directory / "model.safetensors", {"a": tensor(0, 4)}, 4)
    (directory / "config.json").write_text('{"model_type": "llama", "x": ' + deep_json(DEEP) + "}")
    with pytest.raises(InvalidModelFileError, match=r"config\.json: JSON nested"):
        inspect_path(directory)


def test_a_transfer_manifest_nesting_is_bounded() -> None:
    manifest = '{"files": ' + deep_json(DEEP) + "}"
    digest = f"sha256:{hashlib.sha256(manifest.encode()).hexdigest()}"
    document = {"schema": DOCUMENT_SCHEMA, "name": "x", "digest": digest, "manifest": manifest, "format": "gguf"}
    with pytest.raises(InvalidInputError, match=r"invalid transfer document: the manifest: JSON nested 100001 levels"):
        parse_document(document)


# --- edge bundles ---------------------------------------------------------------------------------------------------


def make_bundle(root: Path, *, manifest_text: Callable[[dict[str, Any]], str] = json.dumps, subdir: str = "") -> Path:
    """A bundle holding a small valid GGUF (under ``subdir`` when given) and its chat template."""
    files = {
        f"{subdir}model.gguf": gguf_bytes(),
        "chat_template.json": json.dumps({"template": "{{ messages }}", "origin": "model"}).encode(),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    manifest = {
        "format": er.BUNDLE_FORMAT,
        "name": "bundled:latest",
        "model": {"file": f"{subdir}model.gguf", "chat_template": "chat_template.json"},
        "files": [{"path": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()],
    }
    (root / er.MANIFEST_NAME).write_text(manifest_text(manifest))
    return root


def deep_manifest(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest)[:-1] + ', "extra": ' + deep_json(DEEP) + "}"


def symlinked_weights(tmp_path: Path) -> Path:
    """A bundle whose ``weights/model.gguf`` is reached through ``weights``, a link to a directory outside it (the
    bytes there match the manifest, so only the path check can refuse it)."""
    root = make_bundle(tmp_path / "bundle", subdir="weights/")
    outside = tmp_path / "outside"
    (root / "weights").rename(outside)
    (root / "weights").symlink_to(outside, target_is_directory=True)
    return root


def test_a_bundle_manifest_nesting_is_bounded(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "bundle", manifest_text=deep_manifest)
    assert er.is_bundle(root)  # it says it is one, so importing it is refused as a bundle, with the reason
    with pytest.raises(er.BundleError, match=r"manifest\.json cannot be read: JSON nested more than 64 levels deep"):
        er.verify_bundle(root)


def test_a_bundle_path_through_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(er.BundleError, match=r"weights/model\.gguf .* weights on its path is a symbolic link"):
        er.verify_bundle(symlinked_weights(tmp_path))
    plain = make_bundle(tmp_path / "plain", subdir="weights/")
    assert er.verify_bundle(plain)["model"]["file"] == "weights/model.gguf"  # a real subdirectory is fine


def test_the_edge_runner_refuses_a_deep_request_body() -> None:
    with pytest.raises(ValueError, match="nested more than 64"):
        er.parse_json(b'{"messages": ' + deep_json(DEEP).encode() + b"}")


# --- the CLI --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store holding one model, which every refused import must leave exactly as it was, and its `llmos list`."""
    home = tmp_path_factory.mktemp("bounds") / "home"
    source = home.parent / "keep.gguf"
    source.write_bytes(gguf_bytes())
    registry = Registry(Settings(home=home))
    registry.import_path(source, "keep")
    registry.close()
    listed = run_cli(home, "list")
    assert listed.returncode == 0 and "keep" in listed.stdout
    return home, listed.stdout


def bad_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "deep.gguf"
    path.write_bytes(nested_gguf(DEEP))
    return path


def bad_safetensors_nesting(tmp_path: Path) -> Path:
    header = '{"__metadata__": {"x": ' + deep_json(DEEP) + '}, "a": ' + json.dumps(tensor(0, 4)) + "}"
    return safetensors_file(tmp_path / "deep.safetensors", header, 4)


def bad_safetensors_overlap(tmp_path: Path) -> Path:
    return safetensors_file(tmp_path / "overlap.safetensors", {"a": tensor(0, 8), "b": tensor(0, 8)}, 8)


def bad_bundle_nesting(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle", manifest_text=deep_manifest)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (bad_gguf, r"deep\.gguf: not a valid GGUF file: .*nests arrays more than 64 deep"),
        (bad_safetensors_nesting, r"deep\.safetensors: not a valid safetensors file: header: JSON nested 100002"),
        (bad_safetensors_overlap, r"overlap\.safetensors: .*tensor 'b' \(bytes 0\.\.8\) overlaps tensor 'a'"),
        (bad_bundle_nesting, r"edge bundle .* rejected, nothing was imported: manifest\.json cannot be read: JSON"),
        (symlinked_weights, r"edge bundle .* rejected.*weights on its path is a symbolic link"),
    ],
    ids=["gguf-nesting", "safetensors-nesting", "safetensors-overlap", "bundle-nesting", "bundle-symlink"],
)
def test_llmos_import_refuses_with_one_line_and_changes_nothing(
    cli_home: tuple[Path, str], tmp_path: Path, make: Callable[[Path], Path], message: str
) -> None:
    home, listed = cli_home
    before = store_snapshot(home)
    result = run_cli(home, "import", str(make(tmp_path)), "--name", "evil", timeout=120)
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "RecursionError" not in result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert store_snapshot(home) == before
    after = run_cli(home, "list")
    assert after.returncode == 0 and after.stdout == listed
