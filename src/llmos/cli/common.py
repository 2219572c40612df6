"""What every ``llmos`` command module shares: the Typer app, the consoles, the global options' state, and small
helpers (settings, the registry, the audit record, sizes, progress bars, JSON output, the server's address).

Contract: imports nothing of the command modules, so each of them and :mod:`llmos.cli` can import it without a
cycle.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from llmos.config import Settings

if TYPE_CHECKING:
    from llmos.registry.service import ProgressFactory, Registry


def _usage_error_types() -> tuple[type[Exception], ...]:
    """Typer >= 0.29 raises usage errors from its vendored click; older releases from click itself."""
    found: list[type[Exception]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(__import__(module, fromlist=["UsageError"]).UsageError)
        except ImportError:
            continue
    return tuple(found)


USAGE_ERRORS = _usage_error_types()

app = typer.Typer(
    name="llmos",
    help="llmos: run, manage and serve language models on your own machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

# Wide enough that digests and names are never cut when the output goes to a pipe or a file.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 240)


class State:
    settings: Settings | None = None
    debug: bool = False
    home: Path | None = None


state = State()


def settings() -> Settings:
    if state.settings is None:
        overrides: dict[str, Any] = {"home": state.home} if state.home else {}
        state.settings = Settings(**overrides)
    return state.settings


@app.callback()
def _global(
    home: Annotated[
        Path | None, typer.Option("--home", help="Store location (overrides LLMOS_HOME).", show_default=False)
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    state.home = home
    state.debug = debug
    state.settings = None


def record(action: str, target: str) -> None:
    """Append a registry-changing CLI action to the audit log (actor ``cli:<user>``)."""
    import getpass

    from llmos.security.service import SecurityService

    security = SecurityService(settings())
    security.audit(f"cli:{getpass.getuser()}", None, action, target, "ok")
    security.close()


def open_registry() -> Registry:
    from llmos.registry.service import Registry

    return Registry(settings())


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"  # pragma: no cover


def human_count(count: int | None) -> str:
    if count is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


@contextmanager
def progress_bars() -> Iterator[ProgressFactory | None]:
    """A rich progress bar per file when stderr is a terminal; nothing otherwise."""
    if not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
    ) as progress:

        def factory(label: str, total: int) -> Any:
            task = progress.add_task(label[:40], total=total)
            return lambda n: progress.advance(task, n)

        yield factory


def print_json(value: Any) -> None:
    out.print_json(json.dumps(value, default=str))


def server_url(url: str | None) -> str:
    """``url``, or the address of the server these settings describe."""
    return url or f"http://{settings().host}:{settings().port}"
