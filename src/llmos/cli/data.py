"""``llmos data``: import, clean, split, tokenize and augment versioned datasets from the command line.

Contract: thin adapters over :mod:`llmos.registry.datasets` and :mod:`llmos.data`; each processing step registers a
new dataset version with lineage and prints its report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from llmos.cli.common import JsonOption, app, err, human_size, open_registry, out, print_json, record, settings
from llmos.errors import InvalidInputError

data_app = typer.Typer(help="Import, clean, split, tokenize and augment versioned datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

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
