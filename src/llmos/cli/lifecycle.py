"""``llmos train``, ``llmos eval`` and ``llmos quantize``: a model's life from the command line.

Contract: like every command, thin adapters over services; ``llmos train`` queues a job and returns its id at once,
or with ``--wait`` follows its progress until it ends (exit code 1 if it failed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from llmos.cli.common import JsonOption, app, err, human_size, open_registry, out, print_json, record, settings
from llmos.cli.jobs import follow_log, open_jobs
from llmos.errors import InvalidInputError, JobFailedError

if TYPE_CHECKING:
    from llmos.registry.views import VersionView

# --- train ----------------------------------------------------------------------------------------------------------


@app.command()
def train(
    base: Annotated[str | None, typer.Option("--base", help="Registered model to fine-tune.")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Dataset to train on.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Name of the result (model or adapter).")] = None,
    method: Annotated[str, typer.Option("--method", help="lora or full.")] = "lora",
    validation: Annotated[
        str | None, typer.Option("--validation", help="Validation dataset (default: the data's validation split).")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the data.")] = 3,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after this many steps.")] = None,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adamw, adam, sgd or rmsprop.")] = "adamw",
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (lora 2e-4, full 5e-5).")] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="Weight decay.")] = 0.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per step.")] = 1,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warmup steps.")] = 10,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine, linear or constant.")] = "cosine",
    seed: Annotated[int, typer.Option("--seed", help="Seed (data order, initialisation).")] = 0,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per example.")] = 256,
    lora_r: Annotated[int, typer.Option("--lora-r", help="LoRA rank.")] = 16,
    lora_alpha: Annotated[int, typer.Option("--lora-alpha", help="LoRA alpha.")] = 32,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between validations (0: each epoch).")] = 0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")] = 20,
    keep_checkpoints: Annotated[
        bool, typer.Option("--keep-checkpoints", help="Keep the (encrypted) checkpoints after the job succeeds.")
    ] = False,
    patience: Annotated[int | None, typer.Option("--patience", help="Early stop after N evals w/o gain.")] = None,
    precision: Annotated[str, typer.Option("--precision", help="auto, fp32 or bf16.")] = "auto",
    auto_resume: Annotated[
        bool, typer.Option("--auto-resume", help="Resume automatically after a crash (when the queue is dispatched).")
    ] = False,
    from_scratch: Annotated[
        Path | None, typer.Option("--from-scratch", help="JSON/YAML config of a model to train from scratch.")
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray", help="Train data-parallel on this Ray cluster: host:port, or auto (`llmos cluster start`)."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="DDP workers on Ray (global batch split over them; 2).")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends.")] = False,
) -> None:
    """Fine-tune a model on a dataset (LoRA or full) as a job; prints the job id (or follows it with --wait)."""
    from llmos.jobs.train import check_inputs, config_from_params

    jobs = open_jobs()
    if workers is not None and not ray:
        raise InvalidInputError("--workers needs --ray (data-parallel training runs on a Ray cluster)")
    if ray and from_scratch is not None:
        raise InvalidInputError("--ray trains --base models; --from-scratch runs in one process")
    if keep_checkpoints and from_scratch is not None:
        raise InvalidInputError("--keep-checkpoints applies to --base training; --from-scratch writes no checkpoints")
    if from_scratch is not None:
        params: dict[str, Any] = _scratch_params(from_scratch)
        kind = "scratch"
    else:
        missing = [flag for flag, value in (("--base", base), ("--data", data), ("--name", name)) if not value]
        if missing:
            raise InvalidInputError(f"llmos train needs {', '.join(missing)} (or --from-scratch CONFIG)")
        params = {
            "base": base, "data": data, "name": name, "method": method, "validation": validation, "epochs": epochs,
            "max_steps": max_steps, "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay,
            "batch_size": batch_size, "grad_accum": grad_accum, "warmup_steps": warmup_steps, "schedule": schedule,
            "seed": seed, "max_length": max_length, "lora_r": lora_r, "lora_alpha": lora_alpha,
            "eval_every": eval_every, "checkpoint_every": checkpoint_every, "patience": patience,
            "precision": precision,
        }  # fmt: skip
        if keep_checkpoints:
            params["keep_checkpoints"] = True
        if ray:
            from llmos.distributed.training import check_workers, resolve_address

            resolve_address(settings().home, ray, allow_remote=settings().ray_allow_remote)  # before queueing
            params.update(ray=ray, workers=check_workers(workers or 2))
        config_from_params(params)  # bad hyperparameters and inputs fail here, before anything is queued
        check_inputs(open_registry(), params)
        kind = "train"
    view = jobs.create(kind, params, resource="train", auto_resume=auto_resume)
    record("jobs.create", view.id)
    jobs.dispatch()
    if not wait:
        out.print(view.id)
        return
    err.print(f"job {view.id} queued; following its log (Ctrl-C stops following, not the job)")
    final = follow_log(jobs, view.id, True)
    if final.state != "succeeded":
        raise JobFailedError(f"job {view.id} {final.state}: {final.error or ''}".strip())
    out.print(json.dumps(final.result), markup=False, highlight=False)


def _scratch_params(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidInputError(f"{path} is not a file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml  # type: ignore[import-untyped]

            loaded = yaml.safe_load(text)
        else:
            loaded = json.loads(text)
    except Exception as exc:
        raise InvalidInputError(f"{path}: not valid JSON/YAML ({exc})") from exc
    if not isinstance(loaded, dict) or "data" not in loaded or "name" not in loaded:
        raise InvalidInputError(f"{path}: the config must be a mapping with at least 'data' and 'name'")
    return loaded


# --- eval -----------------------------------------------------------------------------------------------------------


def _metric_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}" if abs(value) < 1000 else f"{value:.1f}"
    return "-" if value is None else str(value)


def _print_report(report: Any) -> None:
    metrics, params = report.metrics, report.params
    if report.task == "perplexity":
        head = f"perplexity {metrics['perplexity']:.3f} over {metrics['tokens']} tokens"
    else:
        shown = ", ".join(f"{k} {_metric_text(v)}" for k, v in metrics.items() if k != "samples")
        head = f"{report.task}: {shown} over {metrics.get('samples')} rows"
    out.print(
        f"{escape(report.model)}: {escape(head)} of {escape(str(report.dataset))}"
        f" ({params['tokens_per_second']:.0f} tok/s, {params['backend']})"
    )
    for example in params.get("examples", [])[:2]:
        answer = example.get("prediction", example.get("picked"))
        expected = example.get("reference", example.get("answer"))
        out.print(f"  e.g. {escape(json.dumps(answer)[:120])} (expected {escape(json.dumps(expected)[:80])})")


def _ray_perplexity(ray: str | None, workers: int | None, task: str, detach: bool) -> Any:
    """The Ray perplexity runner `--ray` asks for (None without it); refuses what it cannot shard."""
    if not ray:
        if workers is not None:
            raise InvalidInputError("--workers needs --ray")
        return None
    if task != "perplexity" or detach:
        raise InvalidInputError("--ray shards the perplexity task of an inline `llmos eval` (not --detach)")
    from llmos.distributed.evaluation import RayPerplexity
    from llmos.distributed.training import resolve_address

    current = settings()
    address = resolve_address(current.home, ray, allow_remote=current.ray_allow_remote)
    return RayPerplexity(
        address, current.home / "ray" / "home", workers=workers or 2, allow_remote=current.ray_allow_remote
    )


def _eval_compare(names: list[str], task: str, as_json: bool) -> None:
    from llmos.evaluation.reports import comparison

    if not names:
        raise InvalidInputError("llmos eval compare needs at least one model")
    if task.endswith((".yaml", ".yml")):
        from llmos.evaluation.tasks import load_task_file

        task = load_task_file(Path(task)).name
    table_data = comparison(settings(), names, task)
    if as_json:
        print_json(table_data["rows"])
        return
    table = Table(box=None, header_style="bold", title=f"task: {escape(task)}", title_justify="left")
    columns = table_data["metrics"]
    for column in ("MODEL", *(c.upper() for c in columns), "DATASET", "BACKEND", "WHEN"):
        table.add_column(column)
    for row in table_data["rows"]:
        if "when" not in row:
            table.add_row(escape(row["model"]), "not evaluated", *["-"] * (len(columns) + 2))
            continue
        table.add_row(
            escape(row["model"]), *(_metric_text(row.get(c)) for c in columns), escape(str(row.get("dataset"))),
            escape(str(row.get("backend"))), str(row["when"]),
        )  # fmt: skip
    out.print(table)


@app.command("eval")
def eval_command(
    models: Annotated[list[str], typer.Argument(help="MODEL... to evaluate, or `compare MODEL MODEL...`.")],
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="perplexity, bleu, chrf, rouge, exact_match, multiple_choice, or a task YAML file (name, type,"
            " prompt, reference, metric, choices, max_tokens, stop, chat).",
        ),
    ] = "perplexity",
    data: Annotated[
        str | None,
        typer.Option("--data", help="Dataset to evaluate on (perplexity without it: llmos's held-out text)."),
    ] = None,
    split: Annotated[str | None, typer.Option("--split", help="Only this split of the dataset.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N rows (quick runs).")] = None,
    window: Annotated[int | None, typer.Option("--window", help="Tokens per scored window (default 1024).")] = None,
    stride: Annotated[int | None, typer.Option("--stride", help="Tokens the window advances (default half).")] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Generation tasks: most tokens per answer (default 64).")
    ] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="llama.cpp or torch (default: by format).")] = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="Run as a background job (one per model) and print the job id(s).")
    ] = False,
    ray: Annotated[
        str | None,
        typer.Option("--ray", help="Perplexity: shard the windows over Ray workers at host:port, or auto."),
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Ray workers for --ray (2).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Evaluate models through the llmos engine (perplexity with a sliding window, BLEU / chrF / ROUGE / exact match
    on generated answers, multiple-choice accuracy by log-likelihood, custom YAML tasks) and store the reports with
    the model and dataset versions; `llmos eval compare A B ... --task T` prints the latest reports side by side."""
    from llmos.evaluation.reports import evaluate

    if models[0] == "compare":
        _eval_compare(models[1:], task, as_json)
        return
    runner = _ray_perplexity(ray, workers, task, detach)
    if detach:
        from llmos.jobs.evaluate import eval_params

        registry = open_registry()
        raw = {"task": task, "data": data, "split": split, "limit": limit, "window": window, "stride": stride,
               "max_tokens": max_tokens, "backend": backend}  # fmt: skip
        checked = [eval_params(registry, {**raw, "model": name}) for name in models]  # all valid before any queues
        jobs = open_jobs()
        views = [jobs.create("eval", params, resource="eval") for params in checked]
        for view in views:
            record("jobs.create", view.id)
        jobs.dispatch()
        if as_json:
            print_json([v.to_dict() for v in views])
        else:
            for view in views:
                out.print(view.id)
        return
    results = []
    for name in models:
        report = evaluate(
            settings(), name, task=task, data=data, split=split, window=window, stride=stride, backend=backend,
            limit=limit, max_tokens=max_tokens, perplexity_runner=runner,
        )  # fmt: skip
        record("eval", report.model)
        results.append(report)
        if not as_json:
            _print_report(report)
    if as_json:
        print_json([r.to_dict() for r in results])


# --- compression ----------------------------------------------------------------------------------------------------


def _decode_speed(name: str) -> tuple[float, str]:
    """Decode tok/s of a greedy 64-token answer (after a warm-up), and the answer to the Paris question.

    Without speculative decoding: its gain depends on how well each model's own text repeats itself, and this
    compares what a model's weights cost per token.
    """
    from llmos.sdk import load_model

    model = load_model(name, settings=settings(), pull=False)
    try:
        answer = model.generate_text("What is the capital of France?", max_length=24)
        model.generate_text(
            "Write a long story about a lighthouse keeper and the sea.", max_length=64, speculative=False
        )
        stats = model.last_stats
        speed = stats.decode_tokens_per_second if stats is not None else float("nan")
    finally:
        model.close()
    return speed, answer


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="Registered model: GGUF, or safetensors / ONNX for int8.")],
    kind: Annotated[
        str,
        typer.Option("--type", help="GGUF: q8_0, q6_k, q5_k_m, q4_k_m, q4_0, q4_1, f16, ...; safetensors, ONNX: int8."),
    ],
    name: Annotated[str | None, typer.Option("--name", help="Name of the child (default MODEL:TYPE).")] = None,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Measure size, decode tok/s and perplexity vs the parent.")
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Quantize a model into a child version (lineage to its parent) and report what it cost.

    GGUF models are quantized by llama.cpp; safetensors models take int8 (int8 weights, dynamic int8 activations
    on the PyTorch backend), and so do ONNX models (ONNX Runtime's dynamic quantization). An embedding model's report
    gives embeddings per second and the cosine of its vectors to the parent's instead of perplexity.
    """
    from llmos.compression.quantize import check_type
    from llmos.evaluation.reports import evaluate
    from llmos.registry.convert import quantize as quantize_model

    check_type(kind)
    registry = open_registry()
    parent = registry.show(model)
    child = quantize_model(registry, model, kind=kind, target=name)
    record("quantize", child.name)
    if parent.details.get("task") == "embedding":
        _embedding_quantize_report(parent, child, report, as_json)
        return
    rows: list[dict[str, Any]] = []
    for view in (parent, child):
        row: dict[str, Any] = {"model": view.name, "quantization": view.quantization, "size": view.size}
        if report:
            row["perplexity"] = evaluate(settings(), view.name).metrics["perplexity"]
            row["decode_tok_s"], row["answer"] = _decode_speed(view.name)
        rows.append(row)
    if report:
        rows[1]["perplexity_delta_pct"] = (rows[1]["perplexity"] / rows[0]["perplexity"] - 1) * 100
    if as_json:
        print_json(rows)
        return
    table = Table(box=None, header_style="bold")
    for column in ("MODEL", "QUANT", "SIZE", "DECODE TOK/S", "PERPLEXITY", "PARIS?"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            escape(row["model"]), str(row["quantization"]), human_size(row["size"]),
            f"{row['decode_tok_s']:.1f}" if report else "-", f"{row['perplexity']:.3f}" if report else "-",
            ("yes" if "Paris" in row.get("answer", "") else "no") if report else "-",
        )  # fmt: skip
    out.print(table)


def _embedding_quantize_report(parent: VersionView, child: VersionView, report: bool, as_json: bool) -> None:
    rows: list[dict[str, Any]] = [
        {"model": view.name, "quantization": view.quantization, "size": view.size} for view in (parent, child)
    ]
    if report:
        from llmos.evaluation.compression import embedding_report

        for row, measured in zip(rows, embedding_report(settings(), parent.name, child.name), strict=True):
            row.update({k: v for k, v in measured.items() if k != "model"})
    if as_json:
        print_json(rows)
        return
    table = Table(box=None, header_style="bold")
    for column in ("MODEL", "QUANT", "SIZE", "EMBEDDINGS/S", "COSINE TO PARENT (MEAN / MIN)"):
        table.add_column(column)
    for row in rows:
        speed = row.get("embeddings_per_second")
        cosine = f"{row['cosine_mean']:.4f} / {row['cosine_min']:.4f}" if "cosine_mean" in row else "-"
        table.add_row(
            escape(row["model"]), str(row["quantization"]), human_size(row["size"]),
            f"{speed:.1f}" if speed else "-", cosine,
        )  # fmt: skip
    out.print(table)
