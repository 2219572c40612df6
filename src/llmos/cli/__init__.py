"""The ``llmos`` command line.

Contract: every command is a thin adapter over a service (registry, SDK): it parses arguments, calls one service
function and renders the result (a rich table for people, ``--json`` for scripts). Errors from :mod:`llmos.errors`
are printed as one line on stderr with a non-zero exit code (1 for errors, 2 for usage errors, 130 for Ctrl-C);
``--debug`` shows the traceback instead. Heavy modules (SQLAlchemy, llama.cpp) are imported inside commands so
``llmos --help`` stays instant.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from llmos.cli.common import (
    USAGE_ERRORS,
    app,
    err,
    human_count,
    human_size,
    open_registry,
    out,
    print_json,
    progress_bars,
    record,
    server_url,
    settings,
    state,
)
from llmos.config import Settings
from llmos.errors import LlmosError

if TYPE_CHECKING:
    from llmos.registry.views import VersionView

# --- registry commands ----------------------------------------------------------------------------------------------


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="Bundled model to register (smollm2, gemma3-270m), or a remote name.")],
    from_url: Annotated[
        str | None,
        typer.Option("--from", help="Fetch NAME (a model or dataset) from this llmos server.", show_default=False),
    ] = None,
    target: Annotated[str | None, typer.Option("--name", "-n", help="With --from: local name (default: same).")] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="With --from: the server's key (default LLMOS_REMOTE_API_KEY).")
    ] = None,
    allow_private: Annotated[
        bool, typer.Option("--allow-private", help="With --from: allow loopback / private-network servers.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --from: print the transfer report as JSON.")] = False,
) -> None:
    """Register a model that ships inside an installed Python package, or fetch one from another llmos server."""
    if from_url is not None:
        from llmos.cli.transfer import pull_from

        pull_from(name, from_url, target, api_key, allow_private, as_json)
        return
    if target or api_key or allow_private or as_json:
        from llmos.errors import InvalidInputError

        raise InvalidInputError("--name, --api-key, --allow-private and --json apply only with --from URL")
    from llmos.registry import sources

    registry = open_registry()
    with progress_bars() as progress:
        view = sources.pull(registry, name, progress=progress)
    record("model.pull", view.name)
    err.print(f"pulled [bold]{escape(view.name)}[/] {view.short_digest} ({human_size(view.size)})")


@app.command("import")
def import_(
    path: Annotated[
        Path,
        typer.Argument(
            help="A .gguf file, a .safetensors file, a Hugging Face model directory or an edge bundle (llmos export)."
        ),
    ],
    name: Annotated[
        str | None,
        typer.Option("--name", "-n", help="Name to register it under: [namespace/]name[:tag] (a bundle: its own)."),
    ] = None,
    chat_template: Annotated[
        Path | None, typer.Option("--chat-template", help="Jinja chat template file replacing the model's own.")
    ] = None,
    base: Annotated[
        str | None, typer.Option("--base", help="For a LoRA adapter: the registered model it was trained on.")
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Owning tenant (only it and admins see the model); default public.")
    ] = None,
) -> None:
    """Import a model file or directory (GGUF, safetensors, Hugging Face, peft LoRA, edge bundle) into the registry."""
    from llmos.edge.runner import is_bundle
    from llmos.registry.names import parse_ref

    if is_bundle(path):  # verified against its manifest before anything is registered
        from llmos.cli.edge import import_edge

        import_edge(path, name, tenant=tenant, chat_template=chat_template, base=base)
        return
    if name is None:  # a usage error (exit 2), like any other missing option
        raise typer.BadParameter(f"--name is required to import {path} (only an edge bundle names itself)")
    parse_ref(name)  # reject a bad name before reading anything
    template = _read_template(chat_template) if chat_template else None
    from llmos.cli.tenancy import open_security

    owner = open_security().tenant_id(tenant) if tenant else None
    registry = open_registry()
    with progress_bars() as progress:
        view = registry.import_path(
            path,
            name,
            progress=progress,
            base=base,
            tenant_id=owner,
            chat_template=template,
            params={"chat_template": str(chat_template)} if template is not None else None,
        )
    record("model.import", view.name)
    err.print(f"imported [bold]{escape(view.name)}[/] {view.short_digest} ({human_size(view.size)})")


def _read_template(path: Path) -> str:
    from llmos.errors import InvalidInputError

    try:
        if path.stat().st_size > 1_000_000:
            raise InvalidInputError(f"{path}: a chat template larger than 1 MB is not plausible")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read chat template {path}: {exc}") from exc


@app.command()
def convert(
    name: Annotated[str, typer.Argument(help="Registered model to convert, e.g. smollm2.")],
    to: Annotated[str, typer.Option("--to", help="Target format: safetensors, gguf or onnx.")] = "safetensors",
    target: Annotated[
        str | None,
        typer.Option("--name", "-n", help="Name of the result (default NAME:safetensors, NAME:gguf-TYPE, NAME:onnx)."),
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="safetensors: float32, bfloat16 or float16.")] = "float32",
    out_type: Annotated[
        str | None, typer.Option("--type", help="gguf: f16 (default), f32 or q8_0; `llmos quantize` goes lower.")
    ] = None,
) -> None:
    """Convert a model to another format as a new registry version with lineage.

    GGUF -> safetensors (for the PyTorch backend and training), safetensors / LoRA adapter -> GGUF (llama
    family; an adapter is merged into its base first) so llama.cpp serves it, or safetensors -> ONNX (a Llama-family
    decoder with a KV cache, or a sentence-transformers encoder) for the ONNX Runtime backend.
    """
    from llmos.registry.convert import convert as run_convert

    registry = open_registry()
    with progress_bars() as progress:
        view = run_convert(registry, name, to=to, target=target, dtype=dtype, out_type=out_type, progress=progress)
    record("model.convert", view.name)
    err.print(f"converted to [bold]{escape(view.name)}[/] {view.short_digest} ({human_size(view.size)})")


@app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """List registered models, one row per tag."""
    views = open_registry().list_versions()
    if as_json:
        print_json([v.to_dict() for v in views])
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "ID", "SIZE", "FORMAT", "QUANT", "PARAMS", "CREATED"):
        table.add_column(column)
    for v in views:
        table.add_row(
            escape(v.name),
            v.short_digest,
            human_size(v.size),
            v.format,
            v.quantization or "-",
            human_count(v.parameter_count),
            v.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    out.print(table)


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="Model reference: name[:tag] or name@sha256:<digest>.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    template: Annotated[bool, typer.Option("--template", help="Print only the chat template.")] = False,
) -> None:
    """Show a model version: format, architecture, size, files, tags, lineage and its batched kernel here."""
    from llmos.compression.quantize import batched_kernel
    from llmos.evaluation.compression import latest_report

    registry = open_registry()
    view = registry.show(name)
    if template:
        out.print(escape(view.chat_template or ""), highlight=False)
        return
    report = latest_report(registry, view.digest)
    kernel = batched_kernel(view.quantization, view.format, name, settings())
    if as_json:
        kernel_json = kernel.to_json() if kernel is not None else None
        print_json({**view.to_dict(full=True), "compression_report": report, "batched_kernel": kernel_json})
        return
    _print_view(view, kernel.detail if kernel is not None else None)
    if kernel is not None and kernel.advice:
        out.print(f"[yellow]note:[/] {escape(kernel.advice)}", highlight=False)
    if report is not None:
        _print_compression(report)


def _print_compression(report: dict[str, Any]) -> None:
    """The stored compression report of a version: it and its parent side by side, measured in one run."""

    def number(value: Any, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, int | float) else "-"

    table = Table(title=f"compression report ({report['created_at'][:19]})", box=None, header_style="bold")
    for column in ("", "SIZE", "RESIDENT", "PROMPT TOK/S", "DECODE TOK/S", "PERPLEXITY", "PARIS?"):
        table.add_column(column)
    for side in ("parent", "child"):
        item = report.get(side) or {}
        table.add_row(
            f"{side}: {escape(str(item.get('name')))}", human_size(item.get("size_bytes")),
            human_size(item.get("resident_bytes")), number(item.get("prompt_tokens_per_second"), ".1f"),
            number(item.get("decode_tokens_per_second"), ".1f"), number(item.get("perplexity"), ".3f"),
            "yes" if "Paris" in str(item.get("answer", "")) else "no",
        )  # fmt: skip
    metrics = report.get("metrics", {})
    out.print(table)
    out.print(
        f"size x{number(metrics.get('size_ratio'), '.2f')}, decode x{number(metrics.get('decode_speedup'), '.2f')},"
        f" perplexity {number(metrics.get('perplexity_delta_pct'), '+.2f')}% vs the parent"
    )


def _print_view(view: VersionView, kernel: str | None = None) -> None:
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("name", view.name),
        ("digest", view.digest),
        ("tags", ", ".join(view.tags)),
        ("format", view.format),
        ("architecture", view.architecture or "-"),
        ("parameters", f"{human_count(view.parameter_count)} ({view.parameter_count})"),
        ("quantization", view.quantization or "-"),
        *([("batched kernel", kernel)] if kernel else []),
        ("context length", str(view.context_length or "-")),
        ("size", f"{human_size(view.size)} ({view.size} bytes)"),
        ("tokenizer", ", ".join(f"{k}={v}" for k, v in view.tokenizer.items() if v is not None)),
        ("chat template", f"{len(view.chat_template)} characters" if view.chat_template else "none (ChatML used)"),
        ("created", view.created_at.isoformat(timespec="seconds")),
    ]
    for file in view.files:
        rows.append(("file", f"{file.path}  {file.digest}  {human_size(file.size)}"))
    for item in view.lineage:
        parent = f" from {item.parent_name} ({item.parent_digest})" if item.parent_digest else ""
        params = ", ".join(f"{k}: {v}" for k, v in item.params.items())
        rows.append(("lineage", f"{item.operation}{parent}  {params}"))
    for key, value in rows:
        table.add_row(key, escape(str(value)))
    out.print(table)


@app.command()
def tag(
    source: Annotated[str, typer.Argument(help="Existing model reference.")],
    target: Annotated[str, typer.Argument(help="New name[:tag] to point at the same version.")],
) -> None:
    """Point a (new or existing) tag at a model version."""
    view = open_registry().tag(source, target)
    record("model.tag", view.name)
    err.print(f"tagged {escape(view.name)} -> {view.short_digest}")


@app.command()
def rm(names: Annotated[list[str], typer.Argument(help="Tags or name@sha256:<digest> versions to remove.")]) -> None:
    """Remove tags (a version goes with its last tag; blobs go when no version uses them)."""
    registry = open_registry()
    for name in names:
        result = registry.remove(name)
        record("model.remove", name)
        for removed in result.removed_tags:
            err.print(f"removed {escape(removed)}")
        if result.deleted_blobs:
            err.print(f"freed {len(result.deleted_blobs)} blob(s)")


@app.command()
def verify(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """Re-hash every blob and manifest in the store and report corruption (exit 1 if any)."""
    registry = open_registry()
    with progress_bars() as progress:
        report = registry.verify(progress=progress)
    if as_json:
        print_json(
            {
                "ok": report.ok,
                "checked": report.checked,
                "corrupt": report.corrupt,
                "missing": report.missing,
                "bad_manifests": report.bad_manifests,
                "affected": report.affected,
            }
        )
    else:
        for digest in report.corrupt:
            err.print(f"[red]corrupt[/] {digest} used by {', '.join(report.affected[digest])}")
        for digest in report.missing:
            err.print(f"[red]missing[/] {digest} used by {', '.join(report.affected[digest])}")
        for name in report.bad_manifests:
            err.print(f"[red]manifest does not match its digest[/] {escape(name)}")
        status = "ok" if report.ok else "[red]FAILED[/]"
        err.print(f"verified {report.checked} blob(s): {status}")
    if not report.ok:
        raise typer.Exit(1)


# --- generation -----------------------------------------------------------------------------------------------------


@app.command()
def run(
    name: Annotated[str, typer.Argument(help="Model to run, e.g. smollm2.")],
    prompt: Annotated[str | None, typer.Argument(help="Prompt; omit for an interactive chat.")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.8,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-m", help="Most tokens to generate per answer.")] = 512,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for reproducible sampling.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Complete the prompt as is, without the chat template.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print token counts and speed.")] = False,
) -> None:
    """Stream a model's answer to a prompt, or chat interactively when no prompt is given."""
    import llmos.sdk as sdk

    options: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    with sdk.load_model(name, settings=settings()) as model:
        if prompt is not None:
            _stream_out(model.stream_text(prompt, raw=True if raw else None, system=system, **options))
            _print_stats(model, verbose)
            return
        _interactive(model, system, options, verbose)


def _stream_out(deltas: Iterator[str]) -> None:
    for delta in deltas:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _print_stats(model: Any, verbose: bool) -> None:
    stats = model.last_stats
    if verbose and stats is not None:
        err.print(
            f"[dim]prompt {stats.prompt_tokens} tok, {stats.prompt_tokens_per_second:.1f} tok/s; "
            f"answer {stats.completion_tokens} tok, {stats.decode_tokens_per_second:.1f} tok/s; "
            f"finish: {stats.finish_reason}[/]"
        )


def _interactive(model: Any, system: str | None, options: dict[str, Any], verbose: bool) -> None:
    from llmos.types import ChatMessage

    history: list[ChatMessage] = [ChatMessage("system", system)] if system else []
    err.print(f"[dim]chatting with {escape(model.name)}; /clear forgets the conversation, /bye or Ctrl-D exits[/]")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            err.print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/bye", "/exit", "/quit"):
            return
        if text == "/clear":
            history = history[:1] if system else []
            continue
        history.append(ChatMessage("user", line))
        pieces: list[str] = []

        def collect(deltas: Iterator[str], sink: list[str] = pieces) -> Iterator[str]:
            for delta in deltas:
                sink.append(delta)
                yield delta

        try:
            _stream_out(collect(model.stream_chat(history, **options)))
        except KeyboardInterrupt:
            err.print("[dim](interrupted)[/]")
        history.append(ChatMessage("assistant", "".join(pieces)))
        _print_stats(model, verbose)


# --- server ---------------------------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option("--host", help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port to listen on (default 8470).")] = None,
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="Model to load at startup (repeatable).")
    ] = None,
    pin: Annotated[
        list[str] | None, typer.Option("--pin", help="Model to keep loaded no matter what (repeatable).")
    ] = None,
    backend: Annotated[
        list[str] | None,
        typer.Option("--backend", help="NAME=BACKEND: run NAME on llama.cpp, torch, sentence-transformers or onnx."),
    ] = None,
    memory_budget: Annotated[
        str | None, typer.Option("--memory-budget", help="Memory for resident models, e.g. 8GB or 60%.")
    ] = None,
    keep_alive: Annotated[
        str | None, typer.Option("--keep-alive", help="Default idle time before a model is unloaded (5m, -1, 0).")
    ] = None,
    replicas: Annotated[
        list[str] | None, typer.Option("--replicas", help="NAME=N: run N engine instances of NAME (load balanced).")
    ] = None,
    auth: Annotated[bool, typer.Option("--auth", help="Require API keys even before any key exists.")] = False,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray", help="Run model replicas on this Ray cluster: host:port, or auto (`llmos cluster start`)."
        ),
    ] = None,
    ray_replicas: Annotated[
        str | None, typer.Option("--ray-replicas", help="MIN[:MAX] replicas per model on Ray (scaled by queue depth).")
    ] = None,
) -> None:
    """Serve the OpenAI-compatible HTTP API (and /health, /ready, /metrics, /admin/runtime)."""
    import importlib.util
    import logging

    from llmos.api import http_server
    from llmos.api.app import create_app
    from llmos.observability.logs import configure_logging, json_flag
    from llmos.registry.names import parse_ref
    from llmos.runtime.loader import parse_overrides, parse_replicas
    from llmos.runtime.memory import parse_size
    from llmos.runtime.residency import parse_keep_alive

    overrides: dict[str, Any] = {
        k: v
        for k, v in (("host", host), ("port", port), ("memory_budget", memory_budget), ("keep_alive", keep_alive))
        if v is not None
    }
    if auth:
        overrides["auth"] = True
    if ray is not None:
        overrides["ray_address"] = ray
    if ray_replicas is not None:
        from llmos.errors import InvalidInputError

        low, _, high = ray_replicas.partition(":")
        if not low.isdigit() or not (high or low).isdigit() or not 1 <= int(low) <= int(high or low) <= 64:
            raise InvalidInputError(f"--ray-replicas takes MIN or MIN:MAX between 1 and 64: {ray_replicas!r}")
        overrides["ray_min_replicas"], overrides["ray_max_replicas"] = int(low), int(high or low)
    effective = settings().model_copy(update=overrides)
    _refuse_open_bind_without_keys(effective)
    parse_size(effective.memory_budget)
    parse_keep_alive(effective.keep_alive)
    for name in [*(model or []), *(pin or [])]:
        parse_ref(name)
    backends = parse_overrides(backend or [])
    replica_counts = parse_replicas(replicas or [])
    configure_logging(effective.log_level, json_flag(effective.log_format))  # JSON lines unless stderr is a TTY
    open_registry().close()  # apply migrations and surface store errors before binding the port
    if importlib.util.find_spec("llama_cpp") is not None:
        from llmos.engine.backends.llamacpp import load_library

        load_library(effective)  # the llama.cpp CPU path (probed once per machine) is known before the first request
    app = create_app(
        effective,
        preload=[*(model or []), *(pin or [])],
        pinned=pin or [],
        backend_overrides=backends,
        replicas=replica_counts,
    )
    logging.getLogger("llmos.serve").info(  # a log record, so JSON logs stay one object per line
        "llmos serving on http://%s:%d (OpenAI API under /v1)", effective.host, effective.port
    )
    http_server.run(app, effective)  # uvicorn, with the head/body deadlines and connection caps in its parser


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _refuse_open_bind_without_keys(effective: Settings) -> None:
    """Secure by default: without any API key, the server only listens on loopback."""
    from llmos.errors import PermissionDeniedError
    from llmos.security.service import SecurityService

    if _is_loopback(effective.host):
        return
    security = SecurityService(effective)
    try:
        if not security.keys():
            raise PermissionDeniedError(
                f"refusing to listen on {effective.host} without authentication: no API key exists. Create an admin"
                " key first (`llmos tenants create default && llmos keys create --tenant default --role admin`)"
                " or serve on 127.0.0.1"
            )
    finally:
        security.close()


@app.command()
def ps(
    url: Annotated[str | None, typer.Option("--url", help="Server address (default from LLMOS_HOST/PORT).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show what a running server has loaded and is doing."""
    import httpx

    from llmos.errors import BackendUnavailableError

    base = server_url(url)
    try:
        response = httpx.get(f"{base}/admin/runtime", timeout=10)
    except httpx.HTTPError as exc:
        raise BackendUnavailableError(f"no llmos server answers at {base} ({type(exc).__name__})") from exc
    if response.status_code != 200:
        raise BackendUnavailableError(f"{base}/admin/runtime answered {response.status_code}")
    runtime = response.json()
    models = runtime["models"]
    if as_json:
        print_json(models)
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "ID", "BACKEND", "MEMORY", "IN FLIGHT", "RUNNING", "WAITING", "EXPIRES"):
        table.add_column(column)
    now = time.time()
    for m in models:
        expires = "never" if m["expires_at"] is None else f"in {max(0, int(m['expires_at'] - now))}s"
        running = f"{m['running']}/{m['slots']}" if "slots" in m else "-"
        table.add_row(
            escape(m["name"]),
            m["digest"].split(":", 1)[1][:12],
            m["backend"],
            human_size(m["memory"]),
            str(m["in_flight"]),
            running,
            str(m.get("waiting", "-")),
            "pinned" if m["pinned"] else expires,
        )
    out.print(table)
    err.print(
        f"[dim]memory: {human_size(runtime['used'])} of {human_size(runtime['budget'])} budget;"
        f" server RSS {human_size(runtime['rss'])}[/]"
    )


@app.command()
def stop(
    name: Annotated[str, typer.Argument(help="Model to unload from a running server.")],
    url: Annotated[str | None, typer.Option("--url", help="Server address (default from LLMOS_HOST/PORT).")] = None,
) -> None:
    """Unload a model from a running server as soon as it is idle."""
    import httpx

    from llmos.errors import BackendUnavailableError, ModelNotFoundError

    base = server_url(url)
    try:
        response = httpx.post(f"{base}/admin/runtime/unload", json={"model": name}, timeout=30)
    except httpx.HTTPError as exc:
        raise BackendUnavailableError(f"no llmos server answers at {base} ({type(exc).__name__})") from exc
    if response.status_code == 404:
        raise ModelNotFoundError(response.json()["error"]["message"])
    if response.status_code != 200:
        raise BackendUnavailableError(f"{base} answered {response.status_code}: {response.text[:200]}")
    state_text = "unloading" if response.json()["unloaded"] else "was not loaded"
    err.print(f"{escape(name)}: {state_text}")


@app.command()
def config(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """Print the effective settings (secrets masked) and the environment variable for each."""
    rows = settings().describe()
    if as_json:
        print_json({row["name"]: row["value"] for row in rows})
        return
    table = Table(box=None, header_style="bold")
    for column in ("SETTING", "VALUE", "ENV", "DESCRIPTION"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["name"], escape(str(row["value"])), row["env"], escape(row["description"]))
    out.print(table)


@app.command()
def version() -> None:
    """Print the versions of llmos, llama-cpp-python and the llama.cpp build in use."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    import llmos

    out.print(f"llmos {llmos.__version__}")
    try:
        out.print(f"llama-cpp-python {package_version('llama-cpp-python')}")
        from llmos.engine.backends.llamacpp import system_info

        out.print(f"llama.cpp: {escape(system_info())}", highlight=False)
    except PackageNotFoundError:
        out.print("llama-cpp-python not installed")


# registers `llmos data|jobs|train|eval|quantize`, `llmos tenants|keys|usage|audit`, `llmos pipeline|history|rollback`,
# `llmos prune|distill`, `llmos top`, `llmos push`, `llmos export` and `llmos doctor`
from llmos.cli import (  # noqa: E402,F401
    bench,
    cluster,
    compression,
    data,
    doctor,
    edge,
    jobs,
    lifecycle,
    pipelines,
    tenancy,
    top,
    transfer,
)

# --- entry point ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the app and turn every failure into one line and an exit code."""
    try:
        result = app(args=argv, standalone_mode=False)
    except USAGE_ERRORS as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            out.print(ctx.get_help(), highlight=False)
            sys.exit(0)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        err.print(f"[red]error:[/] {escape(message)}{hint}", highlight=False)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("[red]aborted[/]")
        sys.exit(130)
    except LlmosError as exc:
        if state.debug:
            raise
        err.print(f"[red]error:[/] {escape(exc.message)}", highlight=False)
        sys.exit(1)
    except Exception as exc:
        if state.debug:
            raise
        err.print(f"[red]internal error:[/] {escape(type(exc).__name__)}: {escape(str(exc))} (rerun with --debug)")
        sys.exit(70)
    sys.exit(result if isinstance(result, int) else 0)
