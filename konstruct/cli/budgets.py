"""konstruct budget …: monthly LLM budgets per tenant, their alerts, and what happens at the limit."""

from __future__ import annotations

import typer

from konstruct.cli.common import (
    JsonOption,
    TenantOption,
    YesOption,
    actor,
    confirm_deletion,
    out,
    print_fields,
    print_json,
    settings,
    with_tenant,
)
from konstruct.llm import budget as service
from konstruct.money import usd

app = typer.Typer(help="Monthly LLM budgets per tenant: alerts, and what happens at the limit.", no_args_is_help=True)


def _print_budget(slug: str, info: service.BudgetInfo) -> None:
    if info.monthly_usd is None:
        out.print(f"{slug} has no budget: spending is not limited (spent {usd(info.spent_usd)} in {info.month:%B %Y})")
        return
    percent = info.used_percent or 0.0
    print_fields(
        {
            "tenant": slug,
            "monthly limit": usd(info.monthly_usd)
            + (f" (own {usd(info.own_usd)}, plan {usd(info.plan_usd)})" if info.own_usd is not None and info.plan_usd is not None else ""),
            "spent": f"{usd(info.spent_usd)} in {info.month:%B %Y} ({percent:.1f}%)",
            "in flight": f"{usd(info.reserved_usd)} held for calls in progress",
            "alerts at": ", ".join(f"{p}%" for p in info.alerts) or "none",
            "alerts sent": ", ".join(f"{p}%" for p in info.alerts_sent) or "none",
            "at the limit": info.action + (f" to {info.downgrade_model}" if info.action == "downgrade" and info.downgrade_model else ""),
        }
    )


@app.command("set")
def set_(
    ctx: typer.Context,
    tenant: str = TenantOption,
    usd: float = typer.Option(..., "--usd", help="The monthly limit in US dollars."),
    alert: list[int] | None = typer.Option(None, "--alert", help="Email the tenant's admins at this percentage (repeat; default 80)."),
    action: str = typer.Option("block", "--action", help="At the limit: block (agents say they are unavailable) or downgrade."),
    downgrade_model: str | None = typer.Option(None, "--downgrade-model", help="The cheaper model for --action downgrade."),
    as_json: bool = JsonOption,
) -> None:
    """Set a tenant's monthly LLM budget."""
    cfg = settings(ctx)
    info = with_tenant(ctx, tenant, "budget.write", lambda db, t: service.set_budget(
        db, t, usd=usd, alerts=alert or [80], action=action, downgrade_model=downgrade_model, settings=cfg, actor=actor()))  # fmt: skip
    if as_json:
        print_json(info.as_json())
    else:
        _print_budget(tenant, info)


@app.command("show")
def show(ctx: typer.Context, tenant: str = TenantOption, as_json: bool = JsonOption) -> None:
    """A tenant's budget and what it spent this month."""
    cfg = settings(ctx)
    info = with_tenant(ctx, tenant, "budget.read", lambda db, t: service.get_budget(db, t, cfg))
    if as_json:
        print_json(info.as_json())
    else:
        _print_budget(tenant, info)


@app.command("clear")
def clear(ctx: typer.Context, tenant: str = TenantOption, yes: bool = YesOption, as_json: bool = JsonOption) -> None:
    """Remove a tenant's own budget (a plan's included budget still applies)."""
    confirm_deletion(yes, f"{tenant}'s budget", "its spending limit")
    with_tenant(ctx, tenant, "budget.write", lambda db, t: service.clear_budget(db, t, actor=actor()))
    if as_json:
        print_json({"tenant": tenant, "budget": None})
    else:
        out.print(f"[green]cleared[/green] the budget of {tenant}")
