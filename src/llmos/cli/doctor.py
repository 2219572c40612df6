"""``llmos doctor``: this machine, the llama.cpp path llmos runs on it and why, PyTorch, memory, disk, the registry.

Contract: a thin renderer over :func:`llmos.runtime.doctor.diagnose`: a readable report for people, the whole
report as JSON with ``--json``; exit code 1 when a check failed (a broken registry), 0 otherwise (warnings, such as
the safe llama.cpp path, are not failures). ``--recheck`` forgets the cached fast-path verdict and probes again
(after a BIOS, hypervisor or kernel change that the cache key cannot see).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from llmos.cli.common import app, out, print_json, settings

STYLES = {"ok": "green", "warn": "yellow", "fail": "red"}


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / 1024**3:.1f} GiB"


def database_label(registry: dict[str, Any]) -> str:
    """``sqlite`` or ``postgresql 15.8``: the kind, and the server's version where there is a server (no URL)."""
    version = registry.get("database_version")
    return f"{registry['database']} {version}" if version else str(registry["database"])


def render(report: dict[str, Any]) -> None:
    cpu, llama, torch, resources, registry = (
        report["cpu"], report["llama_cpp"], report["torch"], report["resources"], report["registry"],
    )  # fmt: skip
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("llmos", f"{report['llmos']} (home {escape(report['home'])})")
    table.add_row("CPU", f"{escape(cpu['model'])}, {cpu['usable_cores']} of {cpu['cores']} cores usable")
    table.add_row("CPU flags", " ".join(cpu["kernel_flags"]) or "-")
    if llama["installed"]:
        table.add_row("llama.cpp", f"llama-cpp-python {llama['version']} in {escape(llama['lib_dir'])}")
        if llama["variants"]:
            table.add_row("variant builds", escape(", ".join(llama["variants"])))
        table.add_row("llama.cpp build", escape(llama.get("system_info", "?")))
        verdict = llama.get("verdict")
        if verdict is not None:
            how = {"probe": "probed now", "cache": "cached verdict", "explicit": "explicit setting"}[verdict["source"]]
            seconds = f", probe took {verdict['seconds']:.1f} s" if verdict["source"] != "explicit" else ""
            table.add_row("llama.cpp path", f"{verdict['path']} ({how}{seconds})")
            table.add_row("why", escape(verdict["reason"]))
    else:
        table.add_row("llama.cpp", "not installed")
    if torch["installed"]:
        table.add_row("torch", f"{torch['version']}, {'CUDA ' + str(torch['cuda']) if torch['cuda'] else 'CPU build'}")
        table.add_row("torch device", escape(str(report.get("torch_device"))))
    else:
        table.add_row("torch", "not installed")
    table.add_row(
        "memory", f"{_gib(resources['memory_available_bytes'])} available of {_gib(resources['memory_total_bytes'])}"
    )
    table.add_row("disk", f"{_gib(resources['disk_free_bytes'])} free of {_gib(resources['disk_total_bytes'])}")
    if registry["ok"]:
        table.add_row(
            "registry",
            f"{database_label(registry)}, schema {registry['schema_revision']}, {registry['models']} model version(s),"
            f" {registry['datasets']} dataset version(s), {registry['blobs']} blob(s) ({_gib(registry['blob_bytes'])})",
        )
    out.print(table, highlight=False)
    out.print()
    for check in report["checks"]:
        style = STYLES[check["status"]]
        out.print(f"[{style}]{check['status']:>4}[/] {check['name']}: {escape(check['detail'])}", highlight=False)


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole report as JSON for scripts.")] = False,
    recheck: Annotated[
        bool, typer.Option("--recheck", help="Forget the cached llama.cpp fast-path verdict and probe again.")
    ] = False,
) -> None:
    """Check this machine: CPU, the llama.cpp fast-path verdict and why, torch, memory, disk and the registry."""
    from llmos.runtime.doctor import diagnose

    report = diagnose(settings(), recheck=recheck)
    if as_json:
        print_json(report)
    else:
        render(report)
    if not report["ok"]:
        raise typer.Exit(1)
