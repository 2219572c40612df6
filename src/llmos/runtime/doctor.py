"""``llmos doctor``: what this machine is and whether llmos can run well on it, in one report.

Contract: :func:`diagnose` gathers, without loading any model: the CPU (model, the feature flags llama.cpp's kernels
care about, usable cores), the llama.cpp build (version, library directory, variant builds, the features it was
compiled with) and the fast-path verdict this process runs on (decided as every llmos entry point decides it: the
explicit setting, the cached probe, or a probe now; ``recheck`` forgets the cached verdict first), the PyTorch build
(read from its files, not imported) and the device the PyTorch backend and training would use
(:func:`torch_device_report`), memory and disk, and the registry's health (the database opens at the current
schema, SQLite's quick check, versions and blobs counted; ``llmos verify`` re-hashes every blob). Each part ends in
a :class:`Check` (``ok`` / ``warn`` / ``fail``); the report is a plain dict, ready for ``--json``.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from llmos.config import Settings
from llmos.machine import llamacpp_probe

# CPU features llama.cpp's x86 / ARM kernels select on, in the order people look for them
KERNEL_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "sve", "i8mm",
)  # fmt: skip


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_report() -> dict[str, Any]:
    model, flags = llamacpp_probe.cpu_description()
    present = set(flags.split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count() or 1
    return {
        "model": model,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "kernel_flags": [flag for flag in KERNEL_FLAGS if flag in present],
        "advertises_amx": "amx_tile" in present,
        "flags": sorted(present),
    }


def torch_report() -> dict[str, Any]:
    """The installed torch's version and CUDA build, read from ``torch/version.py`` (importing torch takes seconds)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return {"installed": False}
    values: dict[str, Any] = {}
    try:
        tree = ast.parse((Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.AnnAssign | ast.Assign):
                targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
                for target in targets:
                    if isinstance(target, ast.Name) and node.value is not None:
                        try:
                            values[target.id] = ast.literal_eval(node.value)
                        except ValueError:
                            continue
    except (OSError, SyntaxError):
        pass
    return {
        "installed": True,
        "version": values.get("__version__") or _package_version("torch"),
        "cuda": values.get("cuda"),
        "hip": values.get("hip"),
    }


def torch_device_report(settings: Settings, torch: dict[str, Any]) -> str | None:
    """``cpu`` or ``cuda:N <name>, <memory> GiB`` for ``settings.torch_device`` (``unavailable: <why>`` when it
    cannot be met; None without torch). A CPU-only torch build with ``auto`` or ``cpu`` answers without importing
    torch; anything else asks a child process (:func:`llmos.engine.torch_device.describe_in_child`)."""
    if not torch.get("installed"):
        return None
    spec = settings.torch_device
    if spec == "cpu" or (spec == "auto" and not torch.get("cuda")):
        return "cpu"
    from llmos.engine.torch_device import describe_in_child

    return describe_in_child(spec)


def _meminfo() -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    found[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return found


def resources_report(settings: Settings) -> dict[str, Any]:
    memory = _meminfo()
    where = settings.home if settings.home.exists() else settings.home.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    disk = shutil.disk_usage(where)
    return {
        "memory_total_bytes": memory.get("MemTotal"),
        "memory_available_bytes": memory.get("MemAvailable"),
        "disk_path": str(settings.home),
        "disk_total_bytes": disk.total,
        "disk_free_bytes": disk.free,
    }


def llamacpp_report(settings: Settings, recheck: bool) -> dict[str, Any]:
    from llmos.engine.backends import llamacpp_path

    native, variants = llamacpp_path.builds(settings)
    report: dict[str, Any] = {
        "installed": native is not None,
        "version": _package_version("llama-cpp-python"),
        "lib_dir": str(native) if native else None,
        "variants": [str(v) for v in variants],
    }
    if native is None:
        return report
    if recheck:
        cache = llamacpp_path.cache_dir(settings)
        for stale in cache.glob("llamacpp-*.json") if cache.is_dir() else []:
            stale.unlink(missing_ok=True)
    from llmos.engine.backends.llamacpp import load_library, system_info

    load_library(settings)
    verdict = llamacpp_path.chosen()
    report["system_info"] = system_info()
    if verdict is not None:
        report["verdict"] = {**verdict.to_json(), "path": verdict.describe}
    return report


def registry_report(settings: Settings) -> dict[str, Any]:
    """The store's health: ``database`` is the kind (``sqlite`` / ``postgresql``, never the URL: it may hold a
    password), with the server's version for PostgreSQL and SQLite's quick check."""
    from sqlalchemy import text

    from llmos.errors import LlmosError
    from llmos.registry.service import Registry
    from llmos.store.db import SCHEMA_HEAD, current_revision

    try:
        registry = Registry(settings, maintain=False)
    except LlmosError as exc:
        return {"ok": False, "error": exc.message}
    try:
        revision = current_revision(registry.engine)
        quick_check = server_version = None
        kind = registry.engine.dialect.name
        with registry.engine.connect() as conn:
            if kind == "sqlite":
                quick_check = str(conn.execute(text("PRAGMA quick_check")).scalar())
            elif kind == "postgresql":
                server_version = str(conn.execute(text("SHOW server_version")).scalar())
        models = registry.list_versions("model")
        datasets = registry.list_versions("dataset")
        digests = list(registry.blobs.iter_digests())
        blob_bytes = sum(registry.blobs.size(d) for d in digests)
    except Exception as exc:  # a broken database shows as a failed check, not a traceback
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        registry.close()
    ok = revision == SCHEMA_HEAD and quick_check in (None, "ok")
    return {
        "ok": ok,
        "database": kind,
        "database_version": server_version,
        "schema_revision": revision,
        "schema_head": SCHEMA_HEAD,
        "quick_check": quick_check,
        "models": len(models),
        "datasets": len(datasets),
        "blobs": len(digests),
        "blob_bytes": blob_bytes,
    }


def _checks(report: dict[str, Any]) -> list[Check]:
    checks = []
    llama = report["llama_cpp"]
    verdict = llama.get("verdict")
    if not llama["installed"]:
        checks.append(Check("llama.cpp", "warn", "llama-cpp-python is not installed: GGUF models cannot run"))
    elif verdict is None:
        checks.append(Check("llama.cpp", "fail", "the llama.cpp path could not be decided"))
    elif verdict["extra_buffers"] and verdict["lib_dir"] is None:
        checks.append(Check("llama.cpp", "ok", f"fast path ({verdict['reason']})"))
    else:
        checks.append(Check("llama.cpp", "warn", f"{verdict['path']}: {verdict['reason']}"))
    torch = report["torch"]
    device = report.get("torch_device") or "cpu"
    checks.append(
        Check(
            "torch",
            "warn" if device.startswith("unavailable") else "ok",
            f"torch {torch['version']} ({'CUDA ' + torch['cuda'] if torch.get('cuda') else 'CPU'}); device {device}",
        )
        if torch["installed"]
        else Check("torch", "warn", "not installed: no fine-tuning or safetensors models (pip install 'llmos[torch]')")
    )
    resources = report["resources"]
    available = resources.get("memory_available_bytes")
    if available is not None:
        status = "ok" if available >= 2 * 1024**3 else "warn"
        checks.append(Check("memory", status, f"{available / 1024**3:.1f} GiB available"))
    free = resources["disk_free_bytes"]
    checks.append(Check("disk", "ok" if free >= 5 * 1024**3 else "warn", f"{free / 1024**3:.1f} GiB free"))
    registry = report["registry"]
    if registry["ok"]:
        counts = f"{registry['models']} model version(s), {registry['blobs']} blob(s)"
        checks.append(Check("registry", "ok", f"{counts}; schema current"))
    else:
        detail = registry.get("error") or (
            f"schema {registry.get('schema_revision')} (expected {registry.get('schema_head')}),"
            f" quick check: {registry.get('quick_check')}"
        )
        checks.append(Check("registry", "fail", detail))
    return checks


def diagnose(settings: Settings, *, recheck: bool = False) -> dict[str, Any]:
    """The whole report (see the module docstring); ``recheck`` probes the fast path again."""
    report: dict[str, Any] = {
        "llmos": _package_version("llmos"),
        "home": str(settings.home),
        "cpu": cpu_report(),
        "llama_cpp": llamacpp_report(settings, recheck),
        "torch": torch_report(),
        "resources": resources_report(settings),
        "registry": registry_report(settings),
    }
    report["torch_device"] = torch_device_report(settings, report["torch"])
    report["checks"] = [asdict(check) for check in _checks(report)]
    report["ok"] = all(check["status"] != "fail" for check in report["checks"])
    return report
