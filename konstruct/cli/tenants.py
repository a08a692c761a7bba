"""konstruct tenant …: the customer organisations on this installation."""

from __future__ import annotations

import re

import typer

from konstruct.channels.registry import validate_escalation_target
from konstruct.cli.common import (
    JsonOption,
    YesOption,
    actor,
    confirm_deletion,
    out,
    platform,
    print_fields,
    print_json,
    print_table,
    tenants_for,
    with_database,
    with_tenant,
)
from konstruct.db.engine import Database
from konstruct.errors import ValidationError
from konstruct.knowledge import dedicated
from konstruct.tenancy import tenants as service
from konstruct.tenancy.tenants import TenantInfo

app = typer.Typer(help="Create, list, suspend and delete tenants.", no_args_is_help=True)


async def create_tenant(db: Database, name: str, slug: str | None) -> TenantInfo:
    """Create a tenant as the acting user, who must be a platform admin (the wizard does the same)."""
    await platform(db, "tenant.create")
    return await service.create_tenant(db, name=name, slug=slug, actor=actor())


def report_created(tenant: TenantInfo) -> None:
    out.print(f"[green]created[/green] tenant {tenant.slug} ({tenant.name})")


@app.command("create")
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The organisation's name, e.g. 'Acme Inc'."),
    slug: str | None = typer.Option(None, "--slug", help="Short id used in commands (default: made from the name)."),
    as_json: bool = JsonOption,
) -> None:
    """Create a tenant."""
    tenant = with_database(ctx, lambda db: create_tenant(db, name, slug))
    if as_json:
        print_json(tenant.as_json())
    else:
        report_created(tenant)


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """List every tenant."""
    tenants = with_database(ctx, lambda db: tenants_for(db, "tenant.read"))
    if as_json:
        print_json([t.as_json() for t in tenants])
    elif not tenants:
        out.print("no tenants yet: `konstruct tenant create NAME`")
    else:
        print_table(
            None, ["slug", "name", "status", "created"], [(t.slug, t.name, t.status, f"{t.created_at:%Y-%m-%d %H:%M}") for t in tenants]
        )


@app.command("show")
def show(ctx: typer.Context, slug: str = typer.Argument(..., help="The tenant's slug."), as_json: bool = JsonOption) -> None:
    """Show one tenant with counts of its agents, conversations and messages."""

    async def with_stats(db: Database, tenant: TenantInfo) -> tuple[TenantInfo, dict[str, int]]:
        return tenant, await service.tenant_stats(db, tenant)

    tenant, stats = with_tenant(ctx, slug, "tenant.read", with_stats)
    if as_json:
        print_json({**tenant.as_json(), **stats})
    else:
        print_fields(
            {"slug": tenant.slug, "name": tenant.name, "status": tenant.status, "id": tenant.id, "created": tenant.created_at, **stats}
        )


@app.command("configure")
def configure(
    ctx: typer.Context,
    slug: str = typer.Argument(..., help="The tenant's slug."),
    escalation_target: str | None = typer.Option(
        None, "--escalation-target", help="Where escalations are announced: slack:CHANNEL_ID or slack:USER_ID ('' for none)."
    ),
    allowed_hosts: str | None = typer.Option(None, "--allowed-hosts", help="Hosts web_fetch may reach, comma-separated ('' for none)."),
    contact_email: str | None = typer.Option(
        None, "--contact-email", help="Where budget alerts and billing notices are emailed ('' for none)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Set a tenant's escalation target, web_fetch allow-list and contact email."""
    target = validate_escalation_target(escalation_target) if escalation_target else escalation_target
    hosts = None
    if allowed_hosts is not None:
        hosts = [h.strip().lower() for h in allowed_hosts.split(",") if h.strip()]
        bad = [h for h in hosts if not re.fullmatch(r"(\*\.)?[a-z0-9.-]+(:\d+)?", h)]
        if bad:
            raise ValidationError(f"not a host name: {', '.join(bad)} (e.g. docs.example.com or *.example.com)")
    values = with_tenant(ctx, slug, "tenant.configure", lambda db, t: service.update_settings(
        db, t, escalation_target=target, allowed_hosts=hosts, actor=actor(), contact_email=contact_email))  # fmt: skip
    if as_json:
        print_json(values)
    else:
        out.print(f"[green]updated[/green] {slug}: " + ", ".join(f"{k} = {v}" for k, v in values.items()))


def _set_status(ctx: typer.Context, slug: str, status: str, as_json: bool) -> None:
    async def go(db: Database, _: TenantInfo) -> TenantInfo:
        return await service.set_status(db, slug, status, actor=actor())

    tenant = with_tenant(ctx, slug, "tenant.suspend", go)
    if as_json:
        print_json(tenant.as_json())
    else:
        out.print(f"tenant {tenant.slug} is now [bold]{tenant.status}[/bold]")


@app.command("suspend")
def suspend(ctx: typer.Context, slug: str = typer.Argument(..., help="The tenant's slug."), as_json: bool = JsonOption) -> None:
    """Suspend a tenant: its agents stop answering until it is resumed."""
    _set_status(ctx, slug, "suspended", as_json)


@app.command("resume")
def resume(ctx: typer.Context, slug: str = typer.Argument(..., help="The tenant's slug."), as_json: bool = JsonOption) -> None:
    """Resume a suspended tenant."""
    _set_status(ctx, slug, "active", as_json)


@app.command("delete")
def delete(
    ctx: typer.Context,
    slug: str = typer.Argument(..., help="The tenant's slug."),
    yes: bool = YesOption,
) -> None:
    """Delete a tenant with its agents, conversations and messages (its audit log stays)."""
    confirm_deletion(yes, f"tenant {slug!r}", "all its agents, conversations and messages")

    async def go(db: Database, _: TenantInfo) -> TenantInfo:
        gone = await service.delete_tenant(db, slug, actor=actor())
        await dedicated.deleted_tenant(db.urls, gone.id)  # its own knowledge indexes, if it had any
        return gone

    tenant = with_tenant(ctx, slug, "tenant.delete", go)
    out.print(f"[green]deleted[/green] tenant {tenant.slug}")
