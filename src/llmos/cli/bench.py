"""``llmos bench``: llmos side by side with its peers (serving, runtime, training, evaluation, security, formats)
and the compression table, each printing the CPU it ran on (speeds compare only within one run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from llmos.cli.common import app, err, open_registry, out, settings, state
from llmos.errors import LlmosError


def _safetensors_copy(registry: Any, model: str) -> Any:
    """The resolved safetensors copy of ``model`` (``MODEL:safetensors``, converted once) for the torch-side suites."""
    from llmos.registry.convert import convert as convert_model

    target = f"{model}:safetensors" if ":" not in model else model
    try:
        registry.show(target)
    except LlmosError:
        convert_model(registry, model, target=target)
    return registry.resolve(target, verify=True)


@app.command()
def bench(
    ctx: typer.Context,
    suite: Annotated[
        str,
        typer.Option(
            "--suite",
            help="serving (llmos serve vs llama_cpp.server), runtime (torch backend, ...), security (auth cost,"
            " tenant fairness), training (llmos LoRA training vs a transformers + peft loop), eval (llmos eval"
            " perplexity throughput vs a transformers loop), compression (size, speed and perplexity of the"
            " comma-separated --model versions), observability (16 streaming clients with /metrics scraped every"
            " second and the console's runtime poll, vs neither; --repeats pairs of runs, at least 3), ray (one"
            " local engine vs Ray replicas at 16 clients, with a scaling projection), multiturn (time to first token"
            " of 6-turn chats under a ~900-token system prompt, 1 and 4 conversations at once, and 16 clients"
            " sharing one system prompt with llmos's prefix cache on and off; vs llama_cpp.server), speculative"
            " (decode tok/s of 1 client on prompts that copy from themselves and on chat, llmos with and without"
            " speculative decoding vs llama_cpp.server), batch (raw llama_decode throughput of 1, 4, 8, 16"
            " sequences vs llmos and llama_cpp.server serving as many clients), constrained (decode tok/s of"
            " tool_choice required and json_schema output vs free text, at 1 and 16 clients) or formats (MiniLM"
            " embeddings/s on ONNX Runtime vs sentence-transformers, and decode tok/s of --model at 1 and 16 streams"
            " on ONNX Runtime, the PyTorch backend and llama.cpp; converts the :onnx and :safetensors versions it"
            " lacks). --max-tokens and --levels keep each suite's own defaults unless given.",
        ),
    ] = "serving",
    model: Annotated[str, typer.Option("--model", help="Registered GGUF model to serve.")] = "smollm2",
    levels: Annotated[str, typer.Option("--levels", help="Comma-separated client counts.")] = "1,4,16,64",
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Output tokens per request.")] = 128,
    peer: Annotated[bool, typer.Option("--peer/--no-peer", help="Also run llama_cpp.server.")] = True,
    repeats: Annotated[int, typer.Option("--repeats", help="Turns per server and level (alternating order).")] = 2,
    log_dir: Annotated[Path, typer.Option("--log-dir", help="Where server logs go.")] = Path("bench-logs"),
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address", help="ray: use this running cluster (e.g. several nodes) instead of starting one."
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="security: also run the secured server with its store on this database (e.g. postgresql://...),"
            " compared with SQLite.",
        ),
    ] = None,
) -> None:
    """Benchmark llmos against peers: `serving` (llama_cpp.server, streaming chat at several client counts),
    `runtime` (torch backend vs transformers generate, model switch time, memory per model) or `security`
    (throughput with auth, quotas and usage records on vs off; one tenant's latency while another floods); --suite
    lists them all (multiturn, speculative and batch are issue 18's prefix cache, speculative decoding and batch
    efficiency; formats is issue 22's ONNX Runtime against PyTorch and llama.cpp)."""
    from llmos.bench.serving import format_table, run_benchmark
    from llmos.errors import InvalidInputError

    if suite == "runtime":
        from llmos.bench import runtime as runtime_bench

        err.print(f"CPU: {_cpu_name()}")
        for line in runtime_bench.run(settings(), gguf=model, max_tokens=max_tokens):
            out.print(line, highlight=False)
        return
    if suite == "training":
        from llmos.bench import training as training_bench

        err.print(f"CPU: {_cpu_name()}")
        registry = open_registry()
        resolved = _safetensors_copy(registry, model)
        with registry.loadable_dir(resolved) as base_dir:
            for line in training_bench.run(base_dir, resolved.view.chat_template, repeats=repeats):
                out.print(line, highlight=False)
        return
    if suite == "eval":
        from llmos.bench import evaluation as eval_bench

        err.print(f"CPU: {_cpu_name()}")
        registry = open_registry()
        resolved = _safetensors_copy(registry, model)
        gguf = model if registry.show(model).format == "gguf" else None
        with registry.loadable_dir(resolved) as model_dir:
            lines = eval_bench.run(
                settings().home, model_dir, resolved.view.name, gguf, repeats=repeats, threads=settings().threads
            )
        for line in lines:
            out.print(line, highlight=False)
        return
    if suite == "compression":
        from llmos.bench import compression as compression_bench

        err.print(f"CPU: {_cpu_name()}")
        for line in compression_bench.run(settings(), [m.strip() for m in model.split(",") if m.strip()]):
            out.print(line, highlight=False, markup=False)
        return
    if suite in ("security", "ray"):
        import importlib
        import tempfile

        suite_module = importlib.import_module(f"llmos.bench.{suite}")  # both own private stores under a work dir
        err.print(f"CPU: {_cpu_name()}")
        log_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=log_dir) as work_dir:
            extra: dict[str, str] = {}
            if suite == "security" and database_url:
                extra["database_url"] = database_url
            if suite == "ray" and ray_address:
                extra["ray_address"] = ray_address
            for line in suite_module.run(model, Path(work_dir), max_tokens=max_tokens, repeats=repeats, **extra):
                out.print(line, highlight=False)
        return
    if suite == "observability":
        import tempfile

        from llmos.bench import observability as observability_bench

        registry = open_registry()
        resolved = registry.resolve(model, verify=True)
        err.print(f"CPU: {_cpu_name()}; model {resolved.view.name}")
        log_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=log_dir) as work_dir, registry.loadable_dir(resolved) as model_dir:
            resolved.primary_path  # noqa: B018 -- refuses a model of several files
            weights = model_dir / resolved.view.files[0].path
            lines = observability_bench.run(
                resolved.view.name, weights, Path(work_dir), max_tokens=max_tokens, pairs=max(3, repeats)
            )
        for line in lines:
            out.print(line, highlight=False, markup=False)
        return
    if suite in ("multiturn", "speculative", "batch", "constrained"):
        given = _given(ctx, "max_tokens", "levels")  # a flag the user did not give keeps the suite's own workload
        _issue18_suite(
            suite,
            model,
            max_tokens=max_tokens if given["max_tokens"] else None,
            levels=_levels(levels) if given["levels"] else None,
            peer=peer,
            repeats=repeats,
            log_dir=log_dir,
        )
        return
    if suite == "formats":
        given = _given(ctx, "max_tokens", "levels")
        _formats_suite(
            model,
            max_tokens=max_tokens if given["max_tokens"] else None,
            levels=_levels(levels) if given["levels"] else None,
            repeats=repeats,
        )
        return
    if suite != "serving":
        raise InvalidInputError(
            "--suite must be serving, runtime, security, training, eval, compression, observability, ray,"
            f" multiturn, speculative, batch, constrained or formats, not {suite!r}"
        )
    try:
        counts = [int(x) for x in levels.split(",") if x.strip()]
    except ValueError as exc:
        raise InvalidInputError(f"--levels must be comma-separated integers, got {levels!r}") from exc
    registry = open_registry()
    resolved = registry.resolve(model, verify=True)
    registry.close()
    log_dir.mkdir(parents=True, exist_ok=True)
    effective = settings()
    from rich.markup import escape

    from llmos.compression.quantize import batched_kernel

    kernel = batched_kernel(resolved.view.quantization, resolved.view.format, model, effective)
    kernel_note = f"; {escape(kernel.line)}" if kernel is not None else ""
    err.print(f"CPU: {_cpu_name()}; threads {effective.threads}; model {resolved.view.name}{kernel_note}")
    sides = run_benchmark(
        resolved.view.name,
        resolved.primary_path,
        counts,
        max_tokens,
        effective.threads,
        effective.context_length,
        state.home,
        log_dir,
        peer=peer,
        repeats=repeats,
    )
    out.print(format_table(sides), highlight=False)


def _given(ctx: typer.Context, *names: str) -> dict[str, bool]:
    """Which of the options ``names`` the user gave (on the command line or through the environment)."""
    return {
        name: getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")
        for name in names
    }


def _levels(levels: str) -> list[int]:
    from llmos.errors import InvalidInputError

    try:
        counts = [int(x) for x in levels.split(",") if x.strip()]
    except ValueError as exc:
        raise InvalidInputError(f"--levels must be comma-separated integers, got {levels!r}") from exc
    if not counts or min(counts) < 1:
        raise InvalidInputError(f"--levels must be positive integers, got {levels!r}")
    return counts


def _issue18_suite(
    suite: str, model: str, *, max_tokens: int | None, levels: list[int] | None, peer: bool, repeats: int,
    log_dir: Path,
) -> None:  # fmt: skip
    """``multiturn``, ``speculative``, ``batch`` or ``constrained``: llmos serve (and llama_cpp.server, except for
    constrained) on the model's GGUF in one run (``max_tokens`` / ``levels`` None: the suite's own workload)."""
    from llmos.bench import batch, constrained, multiturn, speculative

    effective = settings()
    registry = open_registry()
    try:
        resolved = registry.resolve(model, verify=True)
        resolved.primary_path  # noqa: B018 -- refuses a model of several files
        cpu = _cpu_name()
        err.print(f"CPU: {cpu}; threads {effective.threads}; model {resolved.view.name}")
        log_dir.mkdir(parents=True, exist_ok=True)
        name, threads, context, home = resolved.view.name, effective.threads, effective.context_length, state.home
        with registry.loadable_dir(resolved) as model_dir:
            gguf = model_dir / resolved.view.files[0].path
            if suite == "multiturn":
                lines = multiturn.format_report(
                    multiturn.measure(
                        name, gguf, threads=threads, context=context, home=home, log_dir=log_dir, cpu=cpu, peer=peer,
                        max_tokens=max_tokens or multiturn.ANSWER_TOKENS, repeats=repeats,
                    )
                )  # fmt: skip
            elif suite == "speculative":
                lines = speculative.format_report(
                    speculative.measure(
                        name, gguf, threads=threads, context=context, home=home, log_dir=log_dir, cpu=cpu, peer=peer,
                        max_tokens=max_tokens or speculative.ANSWER_TOKENS, repeats=repeats,
                    )
                )  # fmt: skip
            elif suite == "constrained":
                lines = constrained.format_report(
                    constrained.measure(
                        name, gguf, threads=threads, context=context, home=home, log_dir=log_dir, cpu=cpu,
                        levels=levels or constrained.LEVELS, max_tokens=max_tokens or constrained.ANSWER_TOKENS,
                        repeats=repeats,
                    )
                )  # fmt: skip
            else:
                lines = batch.format_report(
                    batch.measure(
                        effective, registry, resolved, model_dir, gguf=gguf, home=home, log_dir=log_dir, cpu=cpu,
                        levels=levels or batch.LEVELS, max_tokens=max_tokens or batch.ANSWER_TOKENS, repeats=repeats,
                        peer=peer,
                    )
                )  # fmt: skip
    finally:
        registry.close()
    for line in lines:
        out.print(line, highlight=False, markup=False)


def _formats_suite(model: str, *, max_tokens: int | None, levels: list[int] | None, repeats: int) -> None:
    """``formats``: MiniLM and the GGUF ``model`` with their ONNX and safetensors versions (made where missing),
    measured in this process (``max_tokens`` / ``levels`` None: the suite's own workload)."""
    from llmos.bench import formats

    effective = settings()
    cpu = _cpu_name()
    err.print(f"CPU: {cpu}; threads {effective.threads}")
    names = formats.Names.for_model(model)
    registry = open_registry()
    try:
        formats.prepare(registry, names)
        result = formats.measure(
            effective,
            registry,
            cpu=cpu,
            names=names,
            levels=levels,
            max_tokens=max_tokens or formats.ANSWER_TOKENS,
            repeats=repeats,
        )
    finally:
        registry.close()
    for line in formats.format_report(result):
        out.print(line, highlight=False, markup=False)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# --- system ---------------------------------------------------------------------------------------------------------
