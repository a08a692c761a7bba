"""konstruct tenant …: the customer organisations on this installation."""

from __future__ import annotations

import typer

from konstruct.cli.common import (
    JsonOption,
    YesOption,
    actor,
    confirm_deletion,
    database,
    out,
    platform,
    print_fields,
    print_json,
    print_table,
    run,
    settings,
    tenant_for,
    tenants_for,
)
from konstruct.tenancy import tenants as service

app = typer.Typer(help="Create, list, suspend and delete tenants.", no_args_is_help=True)


@app.command("create")
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The organisation's name, e.g. 'Acme Inc'."),
    slug: str | None = typer.Option(None, "--slug", help="Short id used in commands (default: made from the name)."),
    as_json: bool = JsonOption,
) -> None:
    """Create a tenant."""

    async def go() -> service.TenantInfo:
        async with database(settings(ctx)) as db:
            await platform(db, "tenant.create")
            return await service.create_tenant(db, name=name, slug=slug, actor=actor())

    tenant = run(go())
    if as_json:
        print_json(tenant.as_json())
    else:
        out.print(f"[green]created[/green] tenant {tenant.slug} ({tenant.name})")


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """List every tenant."""

    async def go() -> list[service.TenantInfo]:
        async with database(settings(ctx)) as db:
            return await tenants_for(db, "tenant.read")

    tenants = run(go())
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

    async def go() -> tuple[service.TenantInfo, dict[str, int]]:
        async with database(settings(ctx)) as db:
            tenant = await tenant_for(db, slug, "tenant.read")
            return tenant, await service.tenant_stats(db, tenant)

    tenant, stats = run(go())
    if as_json:
        print_json({**tenant.as_json(), **stats})
    else:
        print_fields(
            {"slug": tenant.slug, "name": tenant.name, "status": tenant.status, "id": tenant.id, "created": tenant.created_at, **stats}
        )


def _set_status(ctx: typer.Context, slug: str, status: str, as_json: bool) -> None:
    async def go() -> service.TenantInfo:
        async with database(settings(ctx)) as db:
            await tenant_for(db, slug, "tenant.suspend")
            return await service.set_status(db, slug, status, actor=actor())

    tenant = run(go())
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

    async def go() -> service.TenantInfo:
        async with database(settings(ctx)) as db:
            await tenant_for(db, slug, "tenant.delete")
            return await service.delete_tenant(db, slug, actor=actor())

    tenant = run(go())
    out.print(f"[green]deleted[/green] tenant {tenant.slug}")
