"""``llmos push NAME URL`` and ``llmos pull NAME --from URL``: move models and datasets between llmos servers.

Contract: thin adapters over :mod:`llmos.registry.remote`. The local side is this store (``--home`` /
``LLMOS_HOME``); the other side is a running ``llmos serve`` reached over HTTP with a developer or admin key of *that*
server (``--api-key`` or ``LLMOS_REMOTE_API_KEY``). A name is a model or a dataset, never both, so the kind is found
from the name. Targets on loopback, private, link-local or otherwise non-public addresses are refused before any
connection unless ``--allow-private`` (or ``LLMOS_TRANSFER_ALLOW_PRIVATE``) says so. Transfers resume: running the
same command again after an interruption sends or fetches only what is missing. One summary line goes to stderr;
``--json`` prints the transfer report on stdout.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from llmos.cli.common import app, err, human_size, open_registry, print_json, progress_bars, record, settings

ApiKeyOption = Annotated[
    str | None,
    typer.Option("--api-key", help="Key of the other server (default LLMOS_REMOTE_API_KEY).", show_default=False),
]
AllowPrivateOption = Annotated[
    bool,
    typer.Option("--allow-private", help="Allow loopback / private-network targets (refused by default: no SSRF)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the transfer report as JSON.")]


def remote(url: str, api_key: str | None, allow_private: bool) -> Any:
    from llmos.registry.remote import Remote

    current = settings()
    key = api_key or (current.remote_api_key.get_secret_value() if current.remote_api_key else None)
    return Remote(url, api_key=key or None, allow_private=allow_private or current.transfer_allow_private)


def _summary(report: Any, where: str) -> None:
    moved = "sent" if report.direction == "push" else "received"
    details = [f"{moved} {human_size(report.bytes_transferred)} of {human_size(report.total_bytes)}"]
    if report.skipped:
        details.append(f"{report.skipped} of {report.blobs} blob(s) already there")
    if report.resumed:
        details.append(f"{report.resumed} resumed")
    arrow = "->" if report.direction == "push" else "<-"
    err.print(
        f"{report.direction}ed {report.kind} [bold]{escape(report.name)}[/] {report.digest.split(':', 1)[1][:12]}"
        f" {arrow} {escape(where)} ({', '.join(details)})",
        highlight=False,
    )


@app.command()
def push(
    name: Annotated[str, typer.Argument(help="Local model or dataset: name[:tag] or name@sha256:<digest>.")],
    url: Annotated[str, typer.Argument(help="The other llmos server, e.g. https://models.example.com:8470.")],
    target: Annotated[
        str | None, typer.Option("--name", "-n", help="Name to register it under there (default: the same).")
    ] = None,
    api_key: ApiKeyOption = None,
    allow_private: AllowPrivateOption = False,
    as_json: JsonOption = False,
) -> None:
    """Send a model or dataset to another llmos server (resumable; blobs it has are skipped, each one verified)."""
    from llmos.registry.remote import push as run_push

    registry = open_registry()
    with remote(url, api_key, allow_private) as server, progress_bars() as progress:
        report = run_push(registry, name, server, target=target, progress=progress)
        where = server.target.url
    record("model.push" if report.kind == "model" else "data.push", f"{report.name} -> {where}")
    if as_json:
        print_json(report.to_dict())
    _summary(report, where)


def pull_from(name: str, url: str, target: str | None, api_key: str | None, allow_private: bool, as_json: bool) -> None:
    """``llmos pull NAME --from URL`` (the ``pull`` command delegates here when ``--from`` is given)."""
    from llmos.registry.remote import pull as run_pull

    registry = open_registry()
    with remote(url, api_key, allow_private) as server, progress_bars() as progress:
        report = run_pull(registry, name, server, target=target, progress=progress)
        where = server.target.url
    record("model.pull" if report.kind == "model" else "data.pull", f"{report.name} <- {where}")
    if as_json:
        print_json(report.to_dict())
    _summary(report, where)
