"""Edge bundles: ``llmos export NAME --target edge --out DIR`` and ``llmos import BUNDLE``.

Contract:

* :func:`export_bundle` writes a directory that serves the model on a small device with nothing but
  llama-cpp-python: ``model.gguf``, ``chat_template.json`` (the template llmos renders this version with, and the
  BOS/EOS token texts), ``run_edge.py`` (:mod:`llmos.edge.runner`, standard library + ``llama_cpp``),
  ``llamacpp_probe.py`` (:mod:`llmos.machine.llamacpp_probe`: the runner's check of llama.cpp's fast CPU path),
  ``requirements.txt``, ``README.txt`` and ``manifest.json`` (format marker, name, source version digest, the
  version's lineage chain as the registry reports it, and every other file's path, size and sha256).
* The model file: a quantized GGUF version is copied as is (its bytes checked against the store on the way); a float
  GGUF (F32 / F16 / BF16) is quantized to :data:`DEFAULT_QUANT` by llama.cpp; ``quantize=TYPE`` re-quantizes any
  GGUF; a Hugging Face (safetensors) version of the llama family is converted to GGUF first (the torch extra).
  LoRA adapters, datasets and other formats are refused with the command that makes an exportable copy. Encrypted
  versions are decrypted into the bundle: exporting is how a model leaves the store.
* Writing is atomic: everything goes into a temporary sibling directory that is renamed onto ``out`` at the end, so
  ``out`` holds a complete bundle or what it held before. A non-empty ``out`` is refused, unless ``force`` is given
  and it holds an earlier edge bundle (never any other directory: ``--force`` cannot delete a home directory).
* The store is only read: nothing is registered by an export.
* :func:`import_bundle` verifies every listed file (reached one path component at a time, never through a symbolic
  link) against the manifest before it writes anything (any difference, or a manifest nested too deeply:
  :class:`~llmos.errors.IntegrityError`, nothing registered), stores the GGUF under the expected digest and registers
  it under ``name`` (default: the manifest's) with the bundle's chat template, so an unmodified export comes back as
  the very version it was exported from (same digest). Lineage: ``import`` from the exported version when that
  version is in this store (and is not the same version). Owner: the tenant the importer names; without one, the
  owner of the version the bundle came from when it is in this store (else public). The blob is encrypted when that
  version's is (:func:`llmos.registry.derive.child_policy`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmos.edge import runner as edge_runner
from llmos.edge.runner import (
    BUNDLE_FORMAT,
    MANIFEST_NAME,
    MAX_TEMPLATE_BYTES,
    PROBE_FILE,
    BundleError,
    ChatTemplate,
    bundle_file,
    read_json,
    verify_bundle,
)
from llmos.errors import ConflictError, IntegrityError, InvalidInputError, ModelNotFoundError
from llmos.formats.chat_template import template_for
from llmos.formats.gguf import inspect_gguf
from llmos.formats.info import ModelFile, ModelInfo
from llmos.registry.derive import child_policy
from llmos.registry.names import parse_ref
from llmos.registry.service import MANIFEST_SCHEMA, ParentRef, ProgressFactory, Registry, ResolvedModel
from llmos.registry.views import VersionView, canonical_json

TARGETS = ("edge",)
DEFAULT_QUANT = "q4_k_m"
"""What a float model (F32 / F16 / BF16 GGUF or safetensors) is quantized to unless ``quantize`` says otherwise."""
FLOAT_TYPES = ("F32", "F16", "BF16")
MODEL_FILE = "model.gguf"
TEMPLATE_FILE = "chat_template.json"
RUNNER_FILE = "run_edge.py"
README_FILE = "README.txt"
REQUIREMENTS_FILE = "requirements.txt"
MAX_LINEAGE = 64
"""Most versions the manifest's lineage chain names (a long fine-tuning history stays readable)."""
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: dict[str, Any]


@dataclass(frozen=True)
class ImportResult:
    view: VersionView
    parent: str | None
    """The exported version, when it is in this store and differs from the imported one."""
    identical_to: str | None
    """A version of another model in this store with the very same digest (an unmodified export), if any."""
    already_present: bool
    """The version was already in the store under this name's repository (only the tag was set)."""


# --- export ---------------------------------------------------------------------------------------------------------


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise InvalidInputError(f"--target must be one of {', '.join(TARGETS)}, not {target!r}", param="target")
    return target


def _check_out(out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise ConflictError(f"{out} exists and is not a directory", param="out")
        if any(out.iterdir()) and not force:
            raise ConflictError(f"{out} is not empty; choose another --out or pass --force to replace a bundle there")
        if any(out.iterdir()) and not edge_runner.is_bundle(out):
            raise ConflictError(f"{out} is not empty and holds no edge bundle; --force replaces only a bundle")


def _check_exportable(view: VersionView) -> None:
    if view.format in ("gguf", "hf"):
        return
    hints = {
        "lora": f"merge it into its base first: `llmos convert {view.name} --to gguf`, then export that",
        "dataset": "datasets are not models",
        "safetensors": "import it as a Hugging Face directory (with config and tokenizer) and export that",
    }
    hint = hints.get(view.format, "edge bundles hold GGUF models")
    raise InvalidInputError(f"{view.name} is {view.format}; it cannot be exported to an edge bundle: {hint}")


def _copy_hashing(source: Path, target: Path) -> str:
    digest = hashlib.sha256()
    with source.open("rb") as src, target.open("wb") as dst:
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            digest.update(chunk)
            dst.write(chunk)
    return f"sha256:{digest.hexdigest()}"


def _write_model(registry: Registry, resolved: ResolvedModel, target: Path, quantize: str | None) -> dict[str, Any]:
    """Write the bundle's GGUF at ``target``; returns how (operation, type)."""
    from llmos.compression.quantize import quantize_gguf

    view = resolved.view
    source_type = (view.quantization or "").upper()
    if view.format == "gguf":
        key = quantize or (DEFAULT_QUANT if source_type in FLOAT_TYPES else None)
        with registry.loadable_dir(resolved) as source_dir:
            source = source_dir / view.files[0].path
            if key is None or key.upper() == source_type:
                if _copy_hashing(source, target) != view.files[0].digest:
                    raise IntegrityError(f"{view.name}: its file changed while it was exported (run `llmos verify`)")
                return {"operation": "copy", "type": None}
            quantize_gguf(source, target, key)
        return {"operation": "quantize", "type": key}
    from llmos.formats.gguf_write import OUT_TYPES, hf_to_gguf

    key = quantize or DEFAULT_QUANT
    with registry.loadable_dir(resolved) as source_dir:
        if key in OUT_TYPES:
            hf_to_gguf(source_dir, target, key, name=view.name, chat_template=view.chat_template)
            return {"operation": "convert", "type": key}
        work = target.parent / f".convert-{uuid.uuid4().hex[:8]}"
        work.mkdir()
        try:
            hf_to_gguf(source_dir, work / "f16.gguf", "f16", name=view.name, chat_template=view.chat_template)
            quantize_gguf(work / "f16.gguf", target, key)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return {"operation": "convert+quantize", "type": key}


def lineage_chain(registry: Registry, view: VersionView, limit: int = MAX_LINEAGE) -> list[dict[str, Any]]:
    """The version and its ancestors still in the store, breadth first: each with the operations that made it."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    queue = [view]
    while queue and len(chain) < limit:
        current = queue.pop(0)
        if current.digest in seen:
            continue
        seen.add(current.digest)
        steps = []
        for item in current.lineage:
            steps.append(
                {
                    "operation": item.operation,
                    "parent_name": item.parent_name,
                    "parent_digest": item.parent_digest,
                    "params": item.params,
                    "created_at": item.created_at.isoformat(),
                }
            )
            if item.parent_digest and item.parent_name and item.parent_digest not in seen:
                parent = _by_digest(registry, item.parent_name, item.parent_digest)
                if parent is not None:  # else removed since: the step still names it
                    queue.append(parent)
        chain.append(
            {
                "name": current.name,
                "digest": current.digest,
                "format": current.format,
                "quantization": current.quantization,
                "created_at": current.created_at.isoformat(),
                "lineage": steps,
            }
        )
    return chain


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _readme(manifest: dict[str, Any]) -> str:
    model = manifest["model"]
    return f"""llmos edge bundle: {manifest["name"]}
{"=" * (19 + len(manifest["name"]))}

{model["architecture"] or "unknown"} model, {model["quantization"] or "unknown"} GGUF, {model["size"]} bytes.
Exported by llmos {manifest["llmos_version"]} on {manifest["created_at"]} from {manifest["source"]["digest"]}.

Run it on the device (Python 3.9+; llama-cpp-python is the only dependency):

    python -m venv .venv && . .venv/bin/activate
    pip install -r requirements.txt        # or: pip install llama-cpp-python
    python run_edge.py --port 8080         # --host, --threads, --ctx, --api-key: see --help

It checks every file against manifest.json (sha256) before it starts and refuses to run on any difference.
The first start on a machine also checks llama.cpp's fast CPU path (AMX, weight repacking) in a child process
(about a second) and uses the safe path, saying why, where the fast one crashes; --extra-buffers on|off skips that.
`python run_edge.py --verify-only` checks without serving. Then talk to it with any OpenAI client:

    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "{manifest["name"]}", "messages": [{{"role": "user", "content": "Hello"}}]}}'

Routes: POST /v1/chat/completions (stream or not), GET /v1/models, GET /health. It listens on 127.0.0.1 only
unless --host names another address, which needs --api-key.

Bring it back into an llmos store (verified against the manifest first): llmos import <this directory>
"""


def _entry(root: Path, relative: str) -> dict[str, Any]:
    path = root / relative
    return {"path": relative, "size": path.stat().st_size, "sha256": edge_runner.sha256_file(path)}


def _fsync_tree(root: Path) -> None:
    for path in [*root.iterdir(), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def export_bundle(
    registry: Registry, name: str, out: Path, *, target: str = "edge", quantize: str | None = None, force: bool = False
) -> ExportResult:
    """Write the edge bundle of registered model ``name`` to the directory ``out``; returns its path and manifest."""
    from llmos.compression.quantize import TYPES, check_type

    check_target(target)
    key = check_type(quantize) if quantize is not None else None
    if key is not None and key not in TYPES:
        raise InvalidInputError(f"--quantize takes a llama.cpp type ({', '.join(TYPES)}), not {key}", param="quantize")
    out = out.expanduser().absolute()
    _check_out(out, force)
    resolved = registry.resolve(name, verify=True)
    view = resolved.view
    _check_exportable(view)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be copied and read
        how = _write_model(registry, resolved, staging / MODEL_FILE, key)
        info = inspect_gguf(staging / MODEL_FILE)
        own = view.chat_template or (info.chat_template if view.format == "hf" else None)
        template = {
            "template": template_for(own, info.architecture or view.architecture),
            "bos_token": info.tokenizer.get("bos_token") or "",
            "eos_token": info.tokenizer.get("eos_token") or "",
            "origin": "model" if own else "llmos default for the architecture",
        }
        (staging / TEMPLATE_FILE).write_text(json.dumps(template, indent=2, ensure_ascii=False) + "\n", "utf-8")
        runner = importlib.resources.files("llmos.edge").joinpath("runner.py").read_bytes()
        (staging / RUNNER_FILE).write_bytes(runner)
        (staging / RUNNER_FILE).chmod(0o755)
        probe = importlib.resources.files("llmos.machine").joinpath("llamacpp_probe.py").read_bytes()
        (staging / PROBE_FILE).write_bytes(probe)
        llama_version = _package_version("llama-cpp-python")
        (staging / REQUIREMENTS_FILE).write_text(f"llama-cpp-python>={llama_version or '0.3.36'}\n", "utf-8")
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "name": view.name if view.tag else view.repository,  # exported by digest: the repository's name
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "llmos_version": _package_version("llmos") or "unknown",
            "model": {
                "file": MODEL_FILE,
                "chat_template": TEMPLATE_FILE,
                "architecture": info.architecture,
                "quantization": info.quantization,
                "parameter_count": info.parameter_count,
                "context_length": info.context_length,
                "size": info.size,
            },
            "source": {
                "name": view.name,
                "digest": view.digest,
                "format": view.format,
                "quantization": view.quantization,
                "size": view.size,
            },
            "export": {**how, "llama_cpp_python": llama_version},
            "lineage": lineage_chain(registry, view),
            "runner": {"file": RUNNER_FILE, "requires": REQUIREMENTS_FILE, "run": f"python {RUNNER_FILE} --port 8080"},
        }
        (staging / README_FILE).write_text(_readme(manifest), "utf-8")
        manifest["files"] = [
            _entry(staging, relative)
            for relative in (MODEL_FILE, TEMPLATE_FILE, RUNNER_FILE, PROBE_FILE, REQUIREMENTS_FILE, README_FILE)
        ]
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", "utf-8")
        _fsync_tree(staging)
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, manifest)


def _replace_dir(staging: Path, out: Path) -> None:
    """Rename ``staging`` onto ``out``; an existing ``out`` (empty, or replaced with force) goes only afterwards."""
    if not out.exists():
        os.rename(staging, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- import ---------------------------------------------------------------------------------------------------------


def _by_digest(registry: Registry, name: str, digest: str) -> VersionView | None:
    """Version ``digest`` of the repository ``name`` belongs to, named by one of its tags when it has one."""
    try:
        view = registry.show(f"{parse_ref(name).repository}@{digest}")
        return registry.show(f"{view.repository}:{view.tags[0]}") if view.tags else view
    except (ModelNotFoundError, InvalidInputError):
        return None


def _find_version(registry: Registry, name: object, digest: object, *, anywhere: bool = True) -> VersionView | None:
    """The version ``digest`` in this store: under the repository of ``name`` first, then (``anywhere``) under any
    name."""
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        return None
    if isinstance(name, str) and (found := _by_digest(registry, name, digest)) is not None:
        return found
    if not anywhere:
        return None
    return next((v for v in registry.list_versions("all") if v.digest == digest), None)


def _version_digest(info: ModelInfo, file_digest: str) -> str:
    """The digest :meth:`Registry.add_version` gives this model (the manifest it stores, hashed)."""
    files = [{"path": f.path, "digest": file_digest, "size": f.size} for f in info.files]
    manifest = canonical_json({"schema": MANIFEST_SCHEMA, **info.manifest_config(), "files": files})
    return f"sha256:{hashlib.sha256(manifest).hexdigest()}"


def import_bundle(
    registry: Registry,
    path: Path,
    name: str | None = None,
    *,
    tenant_id: int | None = None,
    progress: ProgressFactory | None = None,
) -> ImportResult:
    """Verify the bundle at ``path`` and register its model under ``name`` (default: the name it was exported as)."""
    root = path.expanduser().absolute()
    try:
        manifest = verify_bundle(root)  # every listed path followed component by component: no symlink on the way
        template = ChatTemplate.load(bundle_file(root, manifest["model"]["chat_template"]))
        model_path = bundle_file(root, manifest["model"]["file"])
    except BundleError as exc:
        raise IntegrityError(f"edge bundle {path} rejected, nothing was imported: {exc}") from exc
    ref = parse_ref(name or manifest["name"])
    if ref.digest:
        raise InvalidInputError("cannot import under a digest; give a name with an optional :tag", param="name")
    entry = next(e for e in manifest["files"] if e["path"] == manifest["model"]["file"])
    inspected = inspect_gguf(model_path)
    info = ModelInfo(
        format=inspected.format,
        files=[ModelFile(model_path, MODEL_FILE, entry["size"])],
        architecture=inspected.architecture,
        parameter_count=inspected.parameter_count,
        quantization=inspected.quantization,
        context_length=inspected.context_length,
        chat_template=template.template if _template_is_own(root, manifest) else inspected.chat_template,
        tokenizer=inspected.tokenizer,
        metadata=inspected.metadata,
    )
    expected = f"sha256:{entry['sha256']}"
    source: dict[str, Any] = manifest["source"] if isinstance(manifest.get("source"), dict) else {}
    exported = _find_version(registry, source.get("name"), source.get("digest"))
    new_digest = _version_digest(info, expected)
    present = _find_version(registry, str(ref), new_digest, anywhere=False) is not None
    identical = exported if exported is not None and exported.digest == new_digest else None
    if identical is None and not present:
        identical = _find_version(registry, None, new_digest)
    parents = [ParentRef(exported.digest, exported.name)] if exported is not None and identical is None else []
    params: dict[str, Any] = {
        "source": "edge bundle",
        "bundle": root.name,
        "exported_from": source.get("name"),
        "exported_digest": source.get("digest"),
        "exported_at": manifest.get("created_at"),
        "export": manifest.get("export"),
    }
    # The importer chooses the owner; a bundle of a version of this store otherwise comes back as that version's
    # (its tenant, encrypted like it): re-importing an export never publishes a tenant's model.
    origin = exported or identical
    policy = child_policy(registry, [origin] if origin is not None else [], tenant_id=tenant_id)
    owner = tenant_id if tenant_id is not None else policy.tenant_id
    with registry.blobs.writing():
        callback = progress(entry["path"], entry["size"]) if progress else None
        blob = registry.blobs.write_file(
            model_path, expected_digest=expected, progress=callback, encrypt=policy.encrypt
        )
        view = registry.add_version(
            ref, info, [blob], operation="import", parents=parents, params=params, tenant_id=owner
        )
    same = identical.name if identical is not None and identical.repository != view.repository else None
    return ImportResult(view, parents[0].name if parents else None, same, present)


def _template_is_own(root: Path, manifest: dict[str, Any]) -> bool:
    """Whether the bundle's template was the model's own (not llmos's default for its architecture)."""
    try:
        data = read_json(bundle_file(root, manifest["model"]["chat_template"]), MAX_TEMPLATE_BYTES)
    except BundleError:
        return False
    return isinstance(data, dict) and data.get("origin") == "model"
