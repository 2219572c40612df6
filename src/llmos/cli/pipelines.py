"""``llmos pipeline``, ``llmos history`` and ``llmos rollback``: train → evaluate → gate → promote, and aliases.

Contract: ``llmos pipeline run RECIPE.yaml`` validates the recipe (every error before anything is queued), stores it
under its name and queues one ``pipeline`` job (``--wait`` follows its log; exit 1 when the gate fails or a step
fails). ``pipeline add`` only stores it; ``pipeline start NAME`` runs a stored one; ``pipeline list`` shows them.
``llmos history NAME:ALIAS`` lists the alias's moves; ``llmos rollback NAME:ALIAS`` moves it back one step (or
``--to`` a digest from its history). A running server follows an alias move at its next request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from llmos.cli.common import JsonOption, app, err, open_registry, out, print_json, record
from llmos.errors import InvalidInputError, JobFailedError

pipeline_app = typer.Typer(
    help="Pipelines: data → train → evaluate → gate → promote an alias (recipes in YAML).", no_args_is_help=True
)
app.add_typer(pipeline_app, name="pipeline")

WaitOption = Annotated[bool, typer.Option("--wait", help="Follow the run until it ends (exit 1 if it fails).")]


def _recipe(path: Path) -> Any:
    from llmos.jobs.pipeline import check_recipe, load_recipe_text, parse_recipe

    if not path.is_file():
        raise InvalidInputError(f"{path} is not a file")
    raw = load_recipe_text(path.read_text(encoding="utf-8"))
    if isinstance(raw.get("import"), str):  # a dataset file named relative to the recipe
        candidate = (path.parent / raw["import"]).resolve()
        raw["import"] = str(candidate if candidate.is_file() else Path(raw["import"]).resolve())
    recipe = parse_recipe(raw)
    check_recipe(open_registry(), recipe)
    return recipe


def _run(recipe: Any, wait: bool, as_json: bool) -> None:
    from llmos.cli.jobs import follow_log, open_jobs
    from llmos.jobs.pipeline import start

    jobs = open_jobs()
    view = start(jobs, recipe)
    record("pipeline.run", view.id)
    if not wait:
        print_json({"job": view.id, "pipeline": recipe.name}) if as_json else out.print(view.id)
        return
    err.print(f"pipeline {escape(recipe.name)}: job {view.id} queued; following its log")
    final = follow_log(jobs, view.id, True)
    if final.state != "succeeded":
        raise JobFailedError(f"pipeline job {view.id} {final.state}: {final.error or ''}".strip())
    out.print(json.dumps(final.result), markup=False, highlight=False)


@pipeline_app.command("run")
def pipeline_run(
    recipe_file: Annotated[Path, typer.Argument(help="Recipe (YAML or JSON).")],
    wait: WaitOption = False,
    as_json: JsonOption = False,
) -> None:
    """Store the recipe under its name and run it as a job; prints the job id (or follows it with --wait)."""
    from llmos.jobs.pipeline import save_pipeline

    recipe = _recipe(recipe_file)
    save_pipeline(open_registry(), recipe)
    _run(recipe, wait, as_json)


@pipeline_app.command("add")
def pipeline_add(
    recipe_file: Annotated[Path, typer.Argument(help="Recipe (YAML or JSON).")], as_json: JsonOption = False
) -> None:
    """Validate and store a recipe under its name without running it."""
    from llmos.jobs.pipeline import save_pipeline

    stored = save_pipeline(open_registry(), _recipe(recipe_file))
    record("pipeline.add", stored.name)
    print_json(stored.to_dict()) if as_json else out.print(f"stored pipeline {escape(stored.name)}")


@pipeline_app.command("start")
def pipeline_start(
    name: Annotated[str, typer.Argument(help="A stored pipeline.")],
    wait: WaitOption = False,
    as_json: JsonOption = False,
) -> None:
    """Run a stored pipeline by name."""
    from llmos.jobs.pipeline import check_recipe, get_pipeline, recipe_from_stored

    registry = open_registry()
    recipe = recipe_from_stored(get_pipeline(registry, name).recipe)
    check_recipe(registry, recipe)
    _run(recipe, wait, as_json)


@pipeline_app.command("list")
def pipeline_list(as_json: JsonOption = False) -> None:
    """The stored pipelines."""
    from llmos.jobs.pipeline import list_pipelines

    stored = list_pipelines(open_registry())
    if as_json:
        print_json([s.to_dict() for s in stored])
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "BASE", "DATA", "GATE", "PROMOTES", "UPDATED"):
        table.add_column(column)
    for item in stored:
        r = item.recipe
        promotes = f"{r.get('output')}:{r['promote']}" if r.get("promote") else "-"
        table.add_row(
            escape(item.name), escape(str(r.get("base"))), escape(str(r.get("data"))), escape(str(r.get("gate"))),
            escape(promotes), item.updated_at.strftime("%Y-%m-%d %H:%M"),
        )  # fmt: skip
    out.print(table)


@app.command()
def history(
    alias: Annotated[str, typer.Argument(help="NAME:TAG, e.g. support-bot:prod.")], as_json: JsonOption = False
) -> None:
    """Which version a tag (alias) named when, and why it moved (newest first)."""
    from llmos.registry.aliases import history as alias_history

    moves = alias_history(open_registry(), alias)
    if as_json:
        print_json([m.to_dict() for m in moves])
        return
    table = Table(box=None, header_style="bold")
    for column in ("WHEN", "VERSION", "FROM", "REASON", "IN STORE"):
        table.add_column(column)
    for move in moves:
        table.add_row(
            move.when.strftime("%Y-%m-%d %H:%M:%S"), move.digest[7:19], (move.previous_digest or "-")[7:19] or "-",
            escape(move.reason), "yes" if move.exists else "no",
        )  # fmt: skip
    out.print(table)


@app.command()
def rollback(
    alias: Annotated[str, typer.Argument(help="NAME:TAG to move back, e.g. support-bot:prod.")],
    to: Annotated[str | None, typer.Option("--to", help="A digest (prefix) from `llmos history`.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Move an alias back to the version it named before (or to --to DIGEST); a server follows at once."""
    from llmos.registry.aliases import rollback as alias_rollback

    view = alias_rollback(open_registry(), alias, to=to, reason="rollback (cli)")
    record("rollback", view.name)
    if as_json:
        print_json(view.to_dict())
        return
    out.print(f"{escape(view.name)} -> {view.digest[7:19]}")
