"""``llmos prune`` and ``llmos distill``: smaller models from a registered one, as child versions with lineage.

Contract: thin adapters over :mod:`llmos.registry.compress` (pruning runs in the command and registers the child at
once) and the ``distill`` job kind (:mod:`llmos.jobs.distill`; queued, its id printed, or followed with
``--wait``). Arguments are checked before any work starts: a sparsity outside (0, 1), an unknown method, a GGUF or
non-Llama model, a missing dataset, a teacher and student with different tokenizers each end the command with one
error line and exit code 1. ``llmos prune --recover DATASET`` queues a short full fine-tune of the pruned child
through the ``train`` job kind and prints its id.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from llmos.cli.common import (
    JsonOption,
    app,
    err,
    human_count,
    human_size,
    open_registry,
    out,
    print_json,
    record,
    settings,
)
from llmos.cli.jobs import follow_log, open_jobs
from llmos.errors import InvalidInputError, JobFailedError


def _queue(kind: str, params: dict[str, Any]) -> Any:
    jobs = open_jobs()
    view = jobs.create(kind, params, resource="train")
    record("jobs.create", view.id)
    jobs.dispatch()
    return jobs, view


# --- prune --------------------------------------------------------------------------------------------------------


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="Registered safetensors (Hugging Face) Llama-family model.")],
    sparsity: Annotated[float, typer.Option("--sparsity", help="Fraction to remove, strictly between 0 and 1.")],
    method: Annotated[
        str, typer.Option("--method", help="magnitude (zero the smallest weights) or structured (drop MLP channels).")
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="Name of the child (default MODEL:pruned-METHOD-PERCENT).")
    ] = None,
    calibration: Annotated[
        str | None, typer.Option("--calibration", help="Dataset whose text ranks channels (structured).")
    ] = None,
    recover: Annotated[
        str | None, typer.Option("--recover", help="Dataset: queue a short full fine-tune of the child on it.")
    ] = None,
    recover_steps: Annotated[int, typer.Option("--recover-steps", help="Steps of the recovery fine-tune.")] = 50,
    recover_lr: Annotated[float, typer.Option("--recover-lr", help="Learning rate of the recovery.")] = 5e-5,
    report: Annotated[
        bool, typer.Option("--report", help="Measure and store a compression report (perplexity, tok/s) vs the parent.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Prune a model into a child version (lineage `prune`): magnitude zeroes weights, structured makes a smaller
    dense model; optionally queue a recovery fine-tune (`--recover DATASET`)."""
    from llmos.compression.prune import check_method, check_sparsity
    from llmos.registry.compress import prune as prune_model

    method = check_method(method)
    check_sparsity(sparsity)
    registry = open_registry()
    if recover is not None:
        from llmos.registry.datasets import show_dataset

        show_dataset(registry, recover)  # a missing dataset fails now, not after the pruning
        if recover_steps < 1:
            raise InvalidInputError("--recover-steps must be positive", param="recover_steps")
    parent = registry.show(model)
    child = prune_model(registry, model, method=method, sparsity=sparsity, target=name, calibration=calibration)
    record("prune", child.name)
    params = child.lineage[0].params
    rows: list[dict[str, Any]] = [
        {"model": view.name, "digest": view.digest, "parameters": count, "size": view.size}
        for view, count in ((parent, params["parameters_before"]), (child, params["parameters_after"]))
    ]
    if report:  # measured in one run and stored as the child's compression report (`llmos show CHILD`)
        from llmos.evaluation.compression import compression_report

        measured = compression_report(settings(), child.name, parent.name, log=lambda m: err.print(escape(m)))
        for row, side in zip(rows, ("parent", "child"), strict=True):
            row.update({k: measured[side].get(k) for k in ("perplexity", "decode_tokens_per_second", "answer")})
    rows[1].update({k: params[k] for k in ("method", "sparsity", "achieved_sparsity", "intermediate_size_after")})
    rows[0]["intermediate_size_after"] = params["intermediate_size_before"]
    job_id = None
    if recover is not None:
        from llmos.jobs.train import check_inputs, config_from_params

        tag = f"{child.tag or 'latest'}-recovered"
        train_params = {
            "base": child.name, "data": recover, "name": f"{child.repository}:{tag}", "method": "full",
            "max_steps": recover_steps, "lr": recover_lr, "warmup_steps": min(10, recover_steps),
            "checkpoint_every": max(recover_steps, 20),
        }  # fmt: skip
        config_from_params(train_params)
        check_inputs(registry, train_params)
        _, job = _queue("train", train_params)
        job_id = job.id
    if as_json:
        print_json({"parent": rows[0], "child": rows[1], "recover_job": job_id})
        return
    table = Table(box=None, header_style="bold")
    columns = ["MODEL", "PARAMS", "SIZE", "MLP WIDTH", "SPARSITY"]
    columns += ["PERPLEXITY", "DECODE TOK/S", "PARIS?"] if report else []
    for column in columns:
        table.add_column(column)
    for row in rows:
        cells = [
            escape(row["model"]), human_count(row["parameters"]), human_size(row["size"]),
            str(row["intermediate_size_after"]), f"{row['achieved_sparsity']:.3f}" if "method" in row else "-",
        ]  # fmt: skip
        if report:
            speed = row.get("decode_tokens_per_second")
            cells += [
                f"{row['perplexity']:.3f}", f"{speed:.1f}" if isinstance(speed, float) else "-",
                "yes" if "Paris" in str(row.get("answer") or "") else "no",
            ]  # fmt: skip
        table.add_row(*cells)
    out.print(table)
    if job_id is not None:
        err.print(f"recovery fine-tune queued (`llmos jobs logs -f {job_id}`):")
        out.print(job_id)


# --- distill ------------------------------------------------------------------------------------------------------


@app.command()
def distill(
    teacher: Annotated[str, typer.Option("--teacher", help="Registered model whose soft targets to learn.")],
    student: Annotated[
        str, typer.Option("--student", help="Registered model to train, or `new` (see --student-layers/-hidden).")
    ],
    data: Annotated[str, typer.Option("--data", help="Dataset to distil on.")],
    student_layers: Annotated[
        int | None, typer.Option("--student-layers", help="New student: layers (default: the teacher's).")
    ] = None,
    student_hidden: Annotated[
        int | None, typer.Option("--student-hidden", help="New student: hidden size (multiple of the head size).")
    ] = None,
    validation: Annotated[
        str | None, typer.Option("--validation", help="Validation dataset (default: the data's validation split).")
    ] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature T.")] = 2.0,
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of the KL term; 1 - alpha weighs the CE.")] = 0.5,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the data.")] = 1,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after this many steps.")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = 1e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per step.")] = 1,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per example.")] = 256,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warmup steps.")] = 10,
    schedule: Annotated[str, typer.Option("--schedule", help="cosine, linear or constant.")] = "cosine",
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between validations (0: each epoch).")] = 0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")] = 50,
    keep_checkpoints: Annotated[
        bool, typer.Option("--keep-checkpoints", help="Keep the (encrypted) checkpoints after the job succeeds.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed (data order, new student's initialisation).")] = 0,
    name: Annotated[str | None, typer.Option("--name", help="Name of the result (default STUDENT:distilled).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Distil a teacher into a student (KL on temperature-softened logits + cross-entropy) as a job; prints the
    job id, or follows it with --wait. The result is registered with lineage `distill` to teacher and student."""
    from llmos.jobs.distill import NEW_STUDENT, check_inputs, config_from_params
    from llmos.registry.names import parse_ref

    registry = open_registry()
    if student != NEW_STUDENT and (student_layers is not None or student_hidden is not None):
        raise InvalidInputError("--student-layers/--student-hidden apply only to --student new", param="student")
    if name is None:
        base = registry.show(teacher if student == NEW_STUDENT else student).repository
        name = f"{base}-student:distilled" if student == NEW_STUDENT else f"{base}:distilled"
    parse_ref(name)
    params: dict[str, Any] = {
        "teacher": teacher, "student": student, "student_layers": student_layers, "student_hidden": student_hidden,
        "data": data, "validation": validation, "name": name, "temperature": temperature, "alpha": alpha,
        "epochs": epochs, "max_steps": max_steps, "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum,
        "max_length": max_length, "warmup_steps": warmup_steps, "schedule": schedule, "eval_every": eval_every,
        "checkpoint_every": checkpoint_every, "seed": seed,
    }  # fmt: skip
    if keep_checkpoints:
        params["keep_checkpoints"] = True
    config_from_params(params)  # bad hyperparameters fail here, before anything is queued
    if student == NEW_STUDENT:
        from llmos.training.distill import student_shape

        teacher_view = registry.show(teacher)
        shape = teacher_view.details.get("shape") or {}
        if all(key in shape for key in ("layers", "embedding", "heads", "kv_heads", "head_dim")):
            teacher_config = {
                "num_hidden_layers": shape["layers"], "hidden_size": shape["embedding"],
                "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"],
                "head_dim": shape["head_dim"],
            }  # fmt: skip
            student_shape(teacher_config, student_layers, student_hidden)  # a bad width fails before queueing
    check_inputs(registry, params)
    jobs, view = _queue("distill", params)
    if not wait:
        if as_json:
            print_json({"job": view.id, "name": name})
        else:
            out.print(view.id)
        return
    err.print(f"job {view.id} queued; following its log (Ctrl-C stops following, not the job)")
    final = follow_log(jobs, view.id, True, console=err)
    if final.state != "succeeded":
        raise JobFailedError(f"job {view.id} {final.state}: {final.error or ''}".strip())
    if as_json:
        print_json({"job": view.id, **final.result})
    else:
        out.print(json.dumps(final.result), markup=False, highlight=False)
