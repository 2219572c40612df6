"""``llmos tenants``, ``llmos keys``, ``llmos usage`` and ``llmos audit``: the security model from the command line.

Contract: thin adapters over :class:`llmos.security.service.SecurityService` acting on the local store as the local
administrator; a key is printed once, on stdout, and only its prefix is ever shown again.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from llmos.cli.common import app, err, out, print_json, settings

tenants_app = typer.Typer(help="Manage tenants (the owners of keys, models and quotas).", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys (printed once, stored hashed).", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")

# --- security -------------------------------------------------------------------------------------------------------


def open_security() -> Any:
    from llmos.security.service import SecurityService

    return SecurityService(settings())


def _limits(rpm: int | None, tpm: int | None, budget: int | None, period: str) -> Any:
    from llmos.security.principal import Limits

    return Limits(rpm, tpm, budget, period)


RpmOption = Annotated[int | None, typer.Option("--rpm", help="Requests per minute.")]
TpmOption = Annotated[int | None, typer.Option("--tpm", help="Tokens per minute.")]
BudgetOption = Annotated[int | None, typer.Option("--budget", help="Token budget per period.")]
PeriodOption = Annotated[str, typer.Option("--period", help="Budget period: day, week or month.")]


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="Tenant name: a-z, 0-9, '.', '_', '-'.")],
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    budget: BudgetOption = None,
    period: PeriodOption = "month",
) -> None:
    """Create a tenant, optionally with limits shared by all its keys."""
    open_security().create_tenant(name, limits=_limits(rpm, tpm, budget, period), actor="cli")
    err.print(f"created tenant {escape(name)}")


@tenants_app.command("list")
def tenants_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """List tenants and their limits."""
    rows = [
        {"name": t.name, "rpm": t.requests_per_minute, "tpm": t.tokens_per_minute, "budget": t.token_budget,
         "period": t.budget_period}
        for t in open_security().tenants()
    ]  # fmt: skip
    if as_json:
        print_json(rows)
        return
    table = Table(box=None, header_style="bold")
    for column in ("TENANT", "RPM", "TPM", "BUDGET", "PERIOD"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(escape(str(row[k] if row[k] is not None else "-")) for k in row))
    out.print(table)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant the key belongs to.")],
    role: Annotated[str, typer.Option("--role", help="admin, developer or consumer.")],
    expires: Annotated[str | None, typer.Option("--expires", help="Lifetime, e.g. 30d, 12h, 90m.")] = None,
    models: Annotated[
        list[str] | None, typer.Option("--models", help="Models this key may use (repeatable; default all).")
    ] = None,
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    budget: BudgetOption = None,
    period: PeriodOption = "month",
) -> None:
    """Create an API key. The key is printed once, on stdout; only its prefix is ever shown again."""
    import re as _re
    from datetime import timedelta

    from llmos.errors import InvalidInputError

    lifetime = None
    if expires is not None:
        match = _re.fullmatch(r"(\d+)([dhm])", expires.strip())
        if match is None:
            raise InvalidInputError(f"--expires takes a number with d, h or m (30d, 12h, 90m), not {expires!r}")
        unit = {"d": "days", "h": "hours", "m": "minutes"}[match.group(2)]
        lifetime = timedelta(**{unit: int(match.group(1))})
    key, info = open_security().create_key(
        tenant, role, expires_in=lifetime, models=models, limits=_limits(rpm, tpm, budget, period)
    )
    sys.stdout.write(key + "\n")
    err.print(f"[dim]{info.role} key for tenant {escape(info.tenant)}, prefix {info.prefix}; store it now[/]")


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's keys.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List keys by prefix (never the key itself)."""
    keys = [k.to_dict() for k in open_security().keys(tenant)]
    if as_json:
        print_json(keys)
        return
    table = Table(box=None, header_style="bold")
    for column in ("PREFIX", "TENANT", "ROLE", "MODELS", "EXPIRES", "STATUS"):
        table.add_column(column)
    for k in keys:
        status = "active" if k["active"] else ("revoked" if k["revoked_at"] else "expired")
        table.add_row(k["prefix"], escape(k["tenant"]), k["role"], escape(",".join(k["models"] or ["*"])),
                      k["expires_at"] or "never", status)  # fmt: skip
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(prefix: Annotated[str, typer.Argument(help="Prefix of the key to revoke.")]) -> None:
    """Revoke a key; it stops working at once."""
    open_security().revoke_key(prefix)
    err.print(f"revoked key {escape(prefix)}")


@app.command()
def usage(
    by: Annotated[
        str, typer.Option("--by", help="Group by tenant, model, key and/or day, comma-separated.")
    ] = "tenant",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Report requests and tokens from the usage records."""
    rows = open_security().usage_report(by)
    if as_json:
        print_json(rows)
        return
    table = Table(box=None, header_style="bold")
    columns = list(rows[0]) if rows else [*by.split(","), "requests", "prompt_tokens", "completion_tokens"]
    for column in columns:
        table.add_column(column.upper())
    for row in rows:
        table.add_row(*(escape(str(row[c])) for c in columns))
    out.print(table)


@app.command()
def audit(
    limit: Annotated[int, typer.Option("--limit", help="Most recent events to show.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show the append-only audit log, newest first."""
    events = open_security().audit_events(limit)
    rows = [
        {"time": e.created_at.isoformat(timespec="seconds"), "actor": e.actor, "tenant": e.tenant or "-",
         "action": e.action, "target": e.target or "-", "outcome": e.outcome}
        for e in events
    ]  # fmt: skip
    if as_json:
        print_json(rows)
        return
    table = Table(box=None, header_style="bold")
    for column in ("TIME", "ACTOR", "TENANT", "ACTION", "TARGET", "OUTCOME"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(escape(str(v)) for v in row.values()))
    out.print(table)
