"""``llmos cluster start|stop|status``: the single-machine Ray cluster llmos uses, started the one safe way.

Contract: thin adapter over :class:`llmos.distributed.cluster.LocalCluster` for this home (loopback only, no
telemetry; see that module). ``start`` prints the address to pass to ``llmos serve --ray`` (or use ``auto``);
``stop`` stops only the cluster this home started.
"""

from __future__ import annotations

from typing import Annotated

import typer

from llmos.cli.common import app, out, print_json, settings

cluster_app = typer.Typer(
    help="A local Ray cluster on 127.0.0.1 for `serve --ray` and `train --ray`.", no_args_is_help=True
)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("start")
def cluster_start(
    port: Annotated[int | None, typer.Option("--port", help="GCS port (default: a free one).")] = None,
    cpus: Annotated[int, typer.Option("--cpus", min=1, help="CPUs the cluster offers to actors.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the cluster record as JSON.")] = False,
) -> None:
    """Start a Ray head on 127.0.0.1 owned by this home (does nothing if it already runs)."""
    from llmos.distributed.cluster import LocalCluster

    info = LocalCluster(settings().home).start(port=port, cpus=cpus)
    if as_json:
        print_json(info.__dict__)
    else:
        out.print(f"Ray cluster at {info.address} (pid {info.pid}); serve on it with `llmos serve --ray auto`")


@cluster_app.command("stop")
def cluster_stop() -> None:
    """Stop the Ray cluster this home started."""
    from llmos.distributed.cluster import LocalCluster

    stopped = LocalCluster(settings().home).stop()
    out.print("stopped" if stopped else "no cluster was running")


@cluster_app.command("status")
def cluster_status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the cluster record as JSON.")] = False,
) -> None:
    """Show the address and PID of this home's Ray cluster; exit 1 if none runs."""
    from llmos.distributed.cluster import LocalCluster

    info = LocalCluster(settings().home).info()
    if info is None:
        out.print("no cluster is running")
        raise typer.Exit(1)
    if as_json:
        print_json(info.__dict__)
    else:
        out.print(f"Ray cluster at {info.address} (pid {info.pid}, {info.cpus} CPUs)")
