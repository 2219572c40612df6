"""``llmos data``, ``llmos jobs`` and ``llmos train``: datasets, the job queue and training from the command line.

Contract: like every command, thin adapters over services (:mod:`llmos.registry.datasets`, :mod:`llmos.data`,
:mod:`llmos.jobs.service`); each processing step registers a new dataset version with lineage and prints its report.
``llmos train`` queues a job and returns its id at once, or with ``--wait`` follows its progress until it ends
(exit code 1 if it failed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from llmos.cli.common import app, err, human_size, open_registry, out, print_json, record, settings
from llmos.errors import InvalidInputError, JobFailedError

data_app = typer.Typer(help="Import, clean, split, tokenize and augment versioned datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Follow and control long-running jobs (training, ...).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(jobs_app, name="jobs")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
OutName = Annotated[str, typer.Option("--name", help="Name of the new dataset version (name[:tag]).")]


def _print_step(view: Any, as_json: bool) -> None:
    report = view.details.get("report", {})
    if as_json:
        print_json({"name": view.name, "digest": view.digest, "rows": view.details.get("rows"), "report": report})
        return
    out.print(
        f"{escape(view.name)} ({view.short_digest}): {view.details.get('rows')} rows, {view.details.get('shape')}"
    )
    for key, value in report.items():
        out.print(f"  {key}: {escape(json.dumps(value) if isinstance(value, dict | list) else str(value))}")


# --- data -----------------------------------------------------------------------------------------------------------


@data_app.command("import")
def data_import(
    path: Annotated[Path, typer.Argument(help="JSONL, CSV, plain text or Parquet file.")],
    name: OutName,
    on_error: Annotated[
        str, typer.Option("--on-error", help="fail: refuse a file with malformed lines; skip: drop them, reported.")
    ] = "fail",
    text_mode: Annotated[
        str, typer.Option("--text-mode", help="Plain text: one row per line, paragraph or document.")
    ] = "line",
    as_json: JsonOption = False,
) -> None:
    """Import a file as a new dataset version (shape detected: text, prompt/completion or chat messages)."""
    from llmos.registry.datasets import import_dataset

    if not path.is_file():
        raise InvalidInputError(f"{path} is not a file")
    if on_error not in ("fail", "skip"):
        raise InvalidInputError("--on-error must be fail or skip", param="on_error")
    view = import_dataset(open_registry(), path, name, on_error=on_error, text_mode=text_mode)
    record("data.import", view.name)
    _print_step(view, as_json)


@data_app.command("list")
def data_list(as_json: JsonOption = False) -> None:
    """List datasets (one line per tag)."""
    views = open_registry().list_versions(kind="dataset")
    if as_json:
        print_json([v.to_dict(full=True) for v in views])
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "DIGEST", "ROWS", "SHAPE", "SPLITS", "SIZE", "CREATED"):
        table.add_column(column)
    for v in views:
        splits = ",".join(f"{k}={n}" for k, n in (v.details.get("splits") or {}).items()) or "-"
        table.add_row(
            escape(v.name), v.short_digest, str(v.details.get("rows")), str(v.details.get("shape")), splits,
            human_size(v.size), v.created_at.strftime("%Y-%m-%d %H:%M"),
        )  # fmt: skip
    out.print(table)


@data_app.command("show")
def data_show(name: Annotated[str, typer.Argument(help="Dataset name.")], as_json: JsonOption = False) -> None:
    """Show a dataset version: rows, shape, splits, the report of the step that made it, and its lineage."""
    from llmos.registry.datasets import show_dataset

    view = show_dataset(open_registry(), name)
    if as_json:
        print_json(view.to_dict(full=True))
        return
    out.print(f"{escape(view.name)}  {view.digest}")
    for key in ("rows", "shape", "fields", "splits"):
        out.print(f"  {key}: {escape(str(view.details.get(key)))}")
    out.print(f"  report: {escape(json.dumps(view.details.get('report', {})))}")
    for item in view.lineage:
        parent = f" from {item.parent_name}" if item.parent_name else ""
        out.print(f"  lineage: {escape(item.operation)}{escape(parent)} {escape(json.dumps(item.params))}")


@data_app.command("preview")
def data_preview(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    rows: Annotated[int, typer.Option("--rows", "-n", help="How many rows.")] = 5,
    split: Annotated[str | None, typer.Option("--split", help="Only rows of this split.")] = None,
) -> None:
    """Print the first rows of a dataset as JSON lines."""
    from llmos.registry.datasets import load_rows, rows_of_split

    _, all_rows = load_rows(open_registry(), name)
    for row in rows_of_split(all_rows, split)[: max(rows, 0)]:
        out.print(escape(json.dumps(row, ensure_ascii=False)), highlight=False)


@data_app.command("rm")
def data_rm(name: Annotated[str, typer.Argument(help="Dataset name[:tag].")]) -> None:
    """Remove a dataset tag (its data goes when no version references it)."""
    from llmos.registry.datasets import show_dataset

    registry = open_registry()
    show_dataset(registry, name)
    result = registry.remove(name)
    record("data.rm", name)
    err.print(f"removed {escape(name)}" + (f"; freed {len(result.deleted_blobs)} blob(s)" if result else ""))


def _step(source: str, name: str, operation: str, transform: Any, params: dict[str, Any], as_json: bool) -> None:
    from llmos.registry.datasets import load_rows, parent_of, store_rows

    registry = open_registry()
    parent, rows = load_rows(registry, source)
    new_rows, report = transform(rows)
    if not new_rows:
        raise InvalidInputError(f"{operation} left no rows: {json.dumps(report)}")
    view = store_rows(
        registry, new_rows, name, operation=operation, report=report, parents=[parent_of(parent)], params=params
    )
    record(f"data.{operation}", view.name)
    _print_step(view, as_json)


@data_app.command("clean")
def data_clean(
    source: Annotated[str, typer.Argument(help="Dataset to clean.")],
    name: OutName,
    html: Annotated[bool, typer.Option("--html/--no-html", help="Strip HTML.")] = True,
    dedup_near: Annotated[bool, typer.Option("--near-dedup/--no-near-dedup", help="Drop near-duplicates.")] = True,
    near_threshold: Annotated[float, typer.Option("--near-threshold", help="Jaccard similarity.")] = 0.8,
    pii: Annotated[bool, typer.Option("--pii/--no-pii", help="Redact emails, phone numbers, keys.")] = True,
    min_chars: Annotated[int, typer.Option("--min-chars", help="Drop shorter rows.")] = 1,
    max_chars: Annotated[int, typer.Option("--max-chars", help="Drop longer rows.")] = 100_000,
    languages: Annotated[
        list[str] | None, typer.Option("--language", help="Keep only these languages (repeatable), e.g. en.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Clean a dataset: HTML/control characters, Unicode and whitespace, duplicates, length, language, PII."""
    from llmos.data.cleaning import CleanOptions, clean

    options = CleanOptions(
        strip_html=html, dedup_near=dedup_near, near_threshold=near_threshold, redact_pii=pii, min_chars=min_chars,
        max_chars=max_chars, languages=tuple(languages) if languages else None,
    )  # fmt: skip
    params = {k: v for k, v in options.__dict__.items()}
    _step(source, name, "clean", lambda rows: clean(rows, options), params, as_json)


@data_app.command("split")
def data_split(
    source: Annotated[str, typer.Argument(help="Dataset to split.")],
    name: OutName,
    train: Annotated[float, typer.Option("--train", help="Fraction for training.")] = 0.8,
    validation: Annotated[float, typer.Option("--validation", help="Fraction for validation.")] = 0.1,
    test: Annotated[float, typer.Option("--test", help="Fraction for testing.")] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the deterministic assignment.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Deterministic train / validation / test split; each row gets a ``split`` field."""
    from llmos.data.split import split, tag_splits

    fractions = {k: v for k, v in {"train": train, "validation": validation, "test": test}.items() if v > 0}

    def transform(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        parts, report = split(
            [{k: v for k, v in r.items() if k != "split"} for r in rows], fractions=fractions, seed=seed
        )
        return tag_splits(parts), report

    _step(source, name, "split", transform, {"fractions": fractions, "seed": seed}, as_json)


@data_app.command("tokenize")
def data_tokenize(
    source: Annotated[str, typer.Argument(help="Dataset to tokenize.")],
    name: OutName,
    model: Annotated[str, typer.Option("--model", help="Model whose tokenizer to use.")] = "smollm2",
    keep_ids: Annotated[bool, typer.Option("--ids/--no-ids", help="Store the token ids in each row.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Tokenize with a model's tokenizer: adds num_tokens (and input_ids) per row, with token-count statistics."""
    from llmos.data.tokenize import tokenize
    from llmos.sdk import load_model

    loaded = load_model(model, settings=settings(), pull=False)
    try:
        params = {"model": loaded.info.name, "model_digest": loaded.info.digest, "keep_ids": keep_ids}
        _step(
            source, name, "tokenize", lambda rows: tokenize(rows, loaded.tokenize, keep_ids=keep_ids), params, as_json
        )
    finally:
        loaded.close()


@data_app.command("augment")
def data_augment(
    source: Annotated[str, typer.Argument(help="Dataset to augment.")],
    name: OutName,
    template: Annotated[
        list[str] | None,
        typer.Option("--template", help="Rule: rewrite prompts with this template, e.g. 'Q: {prompt}'."),
    ] = None,
    paraphrase_model: Annotated[
        str | None, typer.Option("--paraphrase-with", help="Model that writes paraphrased prompts (batched).")
    ] = None,
    variants: Annotated[int, typer.Option("--variants", help="Paraphrases per row.")] = 1,
    as_json: JsonOption = False,
) -> None:
    """Augment prompts: rule-based templates and/or paraphrases generated by a model through the llmos engine."""
    from llmos.data.augment import augment_rules, paraphrase

    if not template and not paraphrase_model:
        raise InvalidInputError("give --template and/or --paraphrase-with MODEL")

    def transform(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        report: dict[str, Any] = {"rows_in": len(rows)}
        if template:
            rows, report["rules"] = augment_rules(rows, templates=list(template))
        if paraphrase_model:
            from llmos.sdk import load_model

            model = load_model(paraphrase_model, settings=settings(), pull=False)
            try:
                generate = lambda prompts: model.generate_many(prompts, max_length=64, temperature=0.7, seed=1)  # noqa: E731
                rows, report["paraphrase"] = paraphrase(rows, generate, variants=variants)
            finally:
                model.close()
        report["rows_out"] = len(rows)
        return rows, report

    params = {"templates": template or [], "paraphrase_with": paraphrase_model, "variants": variants}
    _step(source, name, "augment", transform, params, as_json)


# --- jobs -----------------------------------------------------------------------------------------------------------


def open_jobs() -> Any:
    from llmos.jobs.service import JobService

    return JobService(settings())


def _job_row(job: Any) -> list[str]:
    progress = job.progress or {}
    step = f"{progress.get('step', 0)}/{progress.get('total', '?')}" if progress else "-"
    metrics = progress.get("metrics") or {}
    loss = f"{metrics['loss']:.4f}" if isinstance(metrics.get("loss"), float) else "-"
    eta = progress.get("eta_seconds")
    eta_text = f"{eta:.0f}s" if isinstance(eta, float | int) and job.state == "running" else "-"
    result = job.result.get("model") or (job.error or "")[:60] or "-"
    return [job.id, job.kind, job.state, step, loss, eta_text, job.created_at.strftime("%Y-%m-%d %H:%M"), result]


@jobs_app.command("list")
def jobs_list(
    state_filter: Annotated[str | None, typer.Option("--state", help="Only jobs in this state.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first (running jobs whose process is gone are marked interrupted first)."""
    jobs = open_jobs()
    jobs.reconcile()
    views = jobs.list_jobs(state=state_filter)
    if as_json:
        print_json([v.to_dict() for v in views])
        return
    table = Table(box=None, header_style="bold")
    for column in ("ID", "KIND", "STATE", "STEP", "LOSS", "ETA", "CREATED", "RESULT"):
        table.add_column(column)
    for view in views:
        table.add_row(*(escape(c) for c in _job_row(view)))
    out.print(table)


@jobs_app.command("show")
def jobs_show(job_id: Annotated[str, typer.Argument(help="Job id.")], as_json: JsonOption = False) -> None:
    """Show a job: state, parameters, progress, result or error."""
    jobs = open_jobs()
    jobs.reconcile()
    view = jobs.get(job_id)
    data = view.to_dict()
    if as_json:
        data["loss_curve"] = jobs.metrics(job_id)
        print_json(data)
        return
    for key in ("id", "kind", "state", "attempts", "created_at", "started_at", "finished_at", "error"):
        out.print(f"{key:>12}: {escape(str(data[key]))}")
    out.print(f"{'params':>12}: {escape(json.dumps(data['params']))}")
    out.print(f"{'progress':>12}: {escape(json.dumps(data['progress']))}")
    out.print(f"{'result':>12}: {escape(json.dumps(data['result']))}")


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
) -> None:
    """Print a job's log (with -f, follow it until the job ends)."""
    jobs = open_jobs()
    jobs.get(job_id)
    _follow_log(jobs, job_id, follow)


def _follow_log(jobs: Any, job_id: str, follow: bool) -> Any:
    path = jobs.log_path(job_id)
    position = 0
    while True:
        if path.exists():
            with path.open("rb") as handle:
                handle.seek(position)
                chunk = handle.read()
                position += len(chunk)
            if chunk:
                out.print(escape(chunk.decode("utf-8", "replace")), end="", highlight=False)
        if not follow:
            return jobs.get(job_id)
        jobs.reconcile()
        view = jobs.get(job_id)
        if view.state not in ("queued", "running"):
            if path.exists() and path.stat().st_size > position:
                continue
            return view
        time.sleep(0.5)


@jobs_app.command("cancel")
def jobs_cancel(job_id: Annotated[str, typer.Argument(help="Job id.")]) -> None:
    """Cancel a queued job, or ask a running one to stop (it stops at its next step)."""
    view = open_jobs().cancel(job_id)
    record("jobs.cancel", job_id)
    err.print(f"{job_id}: {view.state}" + (" (stop requested)" if view.state == "running" else ""))


@jobs_app.command("resume")
def jobs_resume(job_id: Annotated[str, typer.Argument(help="Job id.")]) -> None:
    """Queue an interrupted, failed or cancelled job again; it continues from its last checkpoint."""
    view = open_jobs().resume(job_id)
    record("jobs.resume", job_id)
    err.print(f"{job_id}: {view.state}")


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
    final = _follow_log(jobs, view.id, True)
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
    model: Annotated[str, typer.Argument(help="Registered model: GGUF, or safetensors for int8.")],
    kind: Annotated[
        str, typer.Option("--type", help="GGUF: q8_0, q6_k, q5_k_m, q4_k_m, q4_0, q4_1, f16, ...; safetensors: int8.")
    ],
    name: Annotated[str | None, typer.Option("--name", help="Name of the child (default MODEL:TYPE).")] = None,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Measure size, decode tok/s and perplexity vs the parent.")
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Quantize a model into a child version (lineage to its parent) and report what it cost.

    GGUF models are quantized by llama.cpp; safetensors models take int8 (int8 weights, dynamic int8 activations
    on the PyTorch backend).
    """
    from llmos.compression.quantize import check_type
    from llmos.evaluation.reports import evaluate
    from llmos.registry.convert import quantize as quantize_model

    check_type(kind)
    registry = open_registry()
    parent = registry.show(model)
    child = quantize_model(registry, model, kind=kind, target=name)
    record("quantize", child.name)
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
