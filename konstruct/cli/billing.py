"""konstruct billing …: Stripe checkout, the billing portal, subscription status, exemptions."""

from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn

from konstruct.billing import standing, stripe_api
from konstruct.cli.common import (
    EveryTenantOption,
    JsonOption,
    TenantOption,
    actor,
    out,
    print_json,
    print_table,
    settings,
    tenants_for,
    with_database,
    with_tenant,
)
from konstruct.db.engine import Database

app = typer.Typer(help="Stripe billing: checkout, the billing portal, subscription status.", no_args_is_help=True)


@app.command("checkout")
def checkout(
    ctx: typer.Context,
    tenant: str = TenantOption,
    plan: str = typer.Option(..., "--plan", help="A plan name from [billing] plans."),
    as_json: bool = JsonOption,
) -> None:
    """Print a Stripe Checkout link that subscribes the tenant to a plan."""
    cfg = settings(ctx)
    with Progress(SpinnerColumn(), TextColumn("asking Stripe for a checkout link…"), transient=True, console=out, disable=as_json):
        link = with_tenant(ctx, tenant, "billing.write", lambda db, t: stripe_api.checkout(db, cfg, t, plan, actor=actor()))
    if as_json:
        print_json({"url": link.url, "session_id": link.session_id, "customer": link.customer_id})
    else:
        out.print(link.url)


@app.command("portal")
def portal(ctx: typer.Context, tenant: str = TenantOption, as_json: bool = JsonOption) -> None:
    """Print a Stripe Billing Portal link (payment method, invoices, cancelling)."""
    cfg = settings(ctx)
    url = with_tenant(ctx, tenant, "billing.write", lambda db, t: stripe_api.portal(db, cfg, t, actor=actor()))
    if as_json:
        print_json({"url": url})
    else:
        out.print(url)


@app.command("status")
def status(ctx: typer.Context, tenant: str | None = EveryTenantOption, as_json: bool = JsonOption) -> None:
    """Subscription state per tenant, and whether its agents are running."""
    cfg = settings(ctx)

    async def go(db: Database) -> list[standing.BillingStatus]:
        return [await standing.status(db, cfg, t) for t in await tenants_for(db, "billing.read", tenant)]

    rows = with_database(ctx, go)
    if as_json:
        print_json({"billing": "on" if cfg.billing.enabled else "off", "tenants": [r.as_json() for r in rows]})
        return
    if not cfg.billing.enabled:
        out.print("[yellow]billing is off[/yellow] ([billing] stripe_api_key is not set): every tenant's agents run")
    now = datetime.now(UTC)
    table = []
    for r in rows:
        sub = r.subscriptions[0] if r.subscriptions else {}
        running = r.standing.ok or not cfg.billing.enabled
        table.append((r.tenant, sub.get("plan") or "", sub.get("status") or "none", r.customer or "",
                      "[green]running[/green]" if running else "[red]paused[/red]", r.standing.reason))  # fmt: skip
    print_table(f"billing status at {now:%Y-%m-%d %H:%M} UTC", ["tenant", "plan", "subscription", "customer", "agents", "why"], table)


@app.command("exempt")
def exempt(
    ctx: typer.Context,
    tenant: str = TenantOption,
    off: bool = typer.Option(False, "--off", help="Make the tenant need a subscription again."),
    as_json: bool = JsonOption,
) -> None:
    """Let a tenant's agents run without a subscription (internal or invoiced customers)."""
    with_tenant(ctx, tenant, "billing.exempt", lambda db, t: standing.set_exempt(db, t, not off, actor=actor()))
    if as_json:
        print_json({"tenant": tenant, "exempt": not off})
    else:
        out.print(f"[green]{tenant}[/green] {'needs a subscription again' if off else 'is exempt from billing'}")
