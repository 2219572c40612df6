"""``llmos cluster start|join|stop|status``: the Ray node of this home, started the one safe way.

Contract: thin adapter over :class:`llmos.distributed.cluster.LocalCluster` for this home (loopback unless
``--node-ip`` names another address of this machine, no telemetry; see that module). ``start`` starts a head and
prints the address to pass to ``llmos serve --ray`` (or use ``auto``) and to ``join``; ``join`` starts a worker node
that joins a head; ``stop`` stops only the node this home started.
"""

from __future__ import annotations

from typing import Annotated

import typer

from llmos.cli.common import app, out, print_json, settings

cluster_app = typer.Typer(
    help="A Ray cluster for `serve --ray` and `train --ray`: a head on 127.0.0.1, or nodes of several machines.",
    no_args_is_help=True,
)

NodeIp = Annotated[
    str,
    typer.Option(
        "--node-ip",
        help="This node's address, one of this machine's own (default 127.0.0.1: a single-machine cluster).",
    ),
]
Cpus = Annotated[int, typer.Option("--cpus", min=0, help="CPUs this node offers to actors (0: it hosts none).")]
ObjectStore = Annotated[
    int, typer.Option("--object-store-mb", min=80, help="Size of this node's Ray object store in MB.")
]
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("start")
def cluster_start(
    port: Annotated[int | None, typer.Option("--port", help="GCS port (default: a free one).")] = None,
    cpus: Cpus = 2,
    node_ip: NodeIp = "127.0.0.1",
    object_store_mb: ObjectStore = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print the cluster record as JSON.")] = False,
) -> None:
    """Start a Ray head owned by this home on 127.0.0.1 or --node-ip (does nothing if it already runs)."""
    from llmos.distributed.cluster import LocalCluster

    info = LocalCluster(settings().home).start(
        port=port, cpus=cpus, node_ip=node_ip, object_store_bytes=object_store_mb * 1_000_000
    )
    if as_json:
        print_json(info.__dict__)
    else:
        out.print(f"Ray cluster at {info.address} (pid {info.pid}); serve on it with `llmos serve --ray auto`")
        if info.node_ip != "127.0.0.1":
            out.print(f"add a machine with `llmos cluster join {info.address} --node-ip ITS_ADDRESS`")


@cluster_app.command("join")
def cluster_join(
    address: Annotated[str, typer.Argument(help="The head's address (HOST:PORT) that `cluster start` printed.")],
    node_ip: Annotated[str, typer.Option("--node-ip", help="This node's address, one of this machine's own.")],
    cpus: Cpus = 2,
    object_store_mb: ObjectStore = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print the node record as JSON.")] = False,
) -> None:
    """Start a Ray worker node owned by this home on --node-ip that joins the head at ADDRESS; returns once the
    head lists it. Replicas placed on it keep the blobs they fetch in this home."""
    from llmos.distributed.cluster import LocalCluster

    info = LocalCluster(settings().home).start(
        head_address=address, cpus=cpus, node_ip=node_ip, object_store_bytes=object_store_mb * 1_000_000
    )
    if as_json:
        print_json(info.__dict__)
    else:
        out.print(f"Ray worker node on {info.node_ip} (pid {info.pid}) joined the cluster at {info.address}")


@cluster_app.command("stop")
def cluster_stop() -> None:
    """Stop the Ray node (head or worker) this home started."""
    from llmos.distributed.cluster import LocalCluster

    stopped = LocalCluster(settings().home).stop()
    out.print("stopped" if stopped else "no cluster was running")


@cluster_app.command("status")
def cluster_status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the cluster record as JSON.")] = False,
) -> None:
    """Show the address and PID of this home's Ray node; exit 1 if none runs."""
    from llmos.distributed.cluster import LocalCluster

    info = LocalCluster(settings().home).info()
    if info is None:
        out.print("no cluster is running")
        raise typer.Exit(1)
    if as_json:
        print_json(info.__dict__)
    else:
        where = f"{info.role} on {info.node_ip} of the cluster at {info.address}"
        out.print(f"Ray {where} (pid {info.pid}, {info.cpus} CPUs)")
