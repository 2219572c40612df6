"""``llmos export NAME --target edge --out DIR``, and the edge-bundle branch of ``llmos import``.

Contract: thin adapters over :mod:`llmos.registry.edge`. ``export`` writes a bundle (a quantized GGUF, its chat
template, a manifest with digests and lineage, and ``run_edge.py``, a server that needs only llama-cpp-python),
prints one line saying where and how to run it (``--json``: the manifest) and changes nothing in the store.
``llmos import DIR`` hands a directory whose ``manifest.json`` carries the edge marker to :func:`import_edge`, which
verifies every file before registering anything. Errors are one line and exit code 1, like every command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from llmos.cli.common import app, err, human_size, open_registry, print_json, progress_bars, record
from llmos.errors import InvalidInputError


@app.command("export")
def export(
    name: Annotated[str, typer.Argument(help="Registered model to export, e.g. smollm2.")],
    target: Annotated[
        str, typer.Option("--target", help="What to export for: edge (a GGUF bundle served by llama-cpp-python).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the bundle to (new or empty).")],
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize",
            help="llama.cpp type for the bundle's GGUF (q4_k_m, q8_0, ...); default: keep a quantized GGUF as is,"
            " q4_k_m for float models.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier edge bundle in --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the bundle's manifest as JSON.")] = False,
) -> None:
    """Export a model as an edge bundle: a quantized GGUF, its chat template, a manifest and a tiny runner.

    The bundle runs on a small device with only llama-cpp-python installed (`python run_edge.py --port 8080` serves
    the OpenAI chat route) and checks its files against the manifest's sha256 digests before it starts. `llmos
    import DIR` takes it back in.
    """
    from llmos.registry.edge import check_target, export_bundle

    check_target(target)
    registry = open_registry()
    try:
        result = export_bundle(registry, name, out, target=target, quantize=quantize, force=force)
    finally:
        registry.close()
    record("model.export", f"{result.manifest['name']} -> {result.path}")
    if as_json:
        print_json(result.manifest)
    model = result.manifest["model"]
    how = result.manifest["export"]
    source = result.manifest["source"]
    made = {
        "copy": "copied as is",
        "quantize": f"quantized from {source['quantization']}",
    }.get(how["operation"], f"converted from {source['format']}")
    err.print(
        f"exported [bold]{escape(result.manifest['name'])}[/] to {escape(str(result.path))}"
        f" ({model['quantization']} GGUF {made}, {human_size(model['size'])});"
        f" run it with `pip install llama-cpp-python && python {escape(str(result.path / 'run_edge.py'))}`",
        highlight=False,
    )


def import_edge(
    path: Path, name: str | None, *, tenant: str | None, chat_template: Path | None, base: str | None
) -> None:
    """``llmos import DIR`` for an edge bundle: verify it against its manifest, then register its GGUF."""
    from llmos.cli.tenancy import open_security
    from llmos.registry.edge import import_bundle
    from llmos.registry.names import parse_ref

    if chat_template is not None or base is not None:
        option = "--chat-template" if chat_template is not None else "--base"
        raise InvalidInputError(f"{option} does not apply to an edge bundle: it carries its own model and template")
    if name is not None:
        parse_ref(name)
    owner = open_security().tenant_id(tenant) if tenant else None
    registry = open_registry()
    try:
        with progress_bars() as progress:
            result = import_bundle(registry, path, name, tenant_id=owner, progress=progress)
    finally:
        registry.close()
    view = result.view
    record("model.import", view.name)
    if result.already_present:
        origin = "; this version was already in the store"
    elif result.parent:
        origin = f"; lineage: import from {escape(result.parent)}"
    elif result.identical_to:
        origin = f"; the same version as {escape(result.identical_to)}"
    else:
        origin = ""
    err.print(
        f"imported edge bundle as [bold]{escape(view.name)}[/] {view.short_digest} ({human_size(view.size)});"
        f" all files matched the manifest{origin}",
        highlight=False,
    )
