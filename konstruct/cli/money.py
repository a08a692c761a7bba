"""konstruct key | secrets | usage | budget | billing: what the agents cost, and who pays."""

from __future__ import annotations

import csv
import sys
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn

from konstruct import secrets as master
from konstruct.billing import standing as billing_standing
from konstruct.billing import stripe_api
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
    secret_input,
    settings,
    tenant_for,
    tenants_for,
)
from konstruct.config import secret_key_in_environment
from konstruct.errors import ConfigError, ValidationError
from konstruct.llm import budget as budgets
from konstruct.llm import keys as llm_keys
from konstruct.llm import usage as usage_service
from konstruct.tenancy.tenants import directory

TenantOption = typer.Option(..., "--tenant", "-t", help="The tenant's slug.")
key_app = typer.Typer(help="Tenants' own LLM provider keys (bring your own key).", no_args_is_help=True)
secrets_app = typer.Typer(help="The master key that encrypts every stored secret.", no_args_is_help=True)
budget_app = typer.Typer(help="Monthly LLM budgets per tenant: alerts, and what happens at the limit.", no_args_is_help=True)
billing_app = typer.Typer(help="Stripe billing: checkout, the billing portal, subscription status.", no_args_is_help=True)


# -- keys --


@key_app.command("add")
def key_add(
    ctx: typer.Context,
    tenant: str = TenantOption,
    provider: str = typer.Option(..., "--provider", "-p", help="litellm's provider name: openai, anthropic, azure, gemini, …"),
    key_env: str | None = typer.Option(None, "--key-env", help="Environment variable holding the key (else it is asked for, hidden)."),
    api_base: str | None = typer.Option(None, "--api-base", help="The provider endpoint for this key (Azure, a proxy)."),
    as_json: bool = JsonOption,
) -> None:
    """Store a tenant's own API key for a provider (encrypted; replaces its earlier one)."""
    key = secret_input(key_env, f"{provider} API key", "API key", "--key-env")
    if api_base is not None and not api_base.startswith(("https://", "http://")):
        raise ValidationError("--api-base must be an http(s) URL")
    cfg = settings(ctx)
    name = llm_keys.check_provider(provider)

    async def go() -> tuple[llm_keys.KeyInfo, bool]:
        async with database(cfg) as db:
            return await llm_keys.add_key(
                db, cfg, await tenant_for(db, tenant, "key.write"), provider=name, key=key, api_base=api_base, actor=actor()
            )

    info, replaced = run(go())
    if as_json:
        print_json({**info.as_json(), "replaced": replaced})
    else:
        out.print(f"[green]{'replaced' if replaced else 'added'}[/green] {name} key {info.hint} for {tenant}")


@key_app.command("list")
def key_list(ctx: typer.Context, tenant: str = TenantOption, as_json: bool = JsonOption) -> None:
    """A tenant's keys: provider, hint (last four characters), who added it and when."""

    async def go() -> list[llm_keys.KeyInfo]:
        async with database(settings(ctx)) as db:
            return await llm_keys.list_keys(db, await tenant_for(db, tenant, "key.read"))

    rows = run(go())
    if as_json:
        print_json([k.as_json() for k in rows])
    elif not rows:
        out.print(f"{tenant} has no keys of its own: its agents use the platform's ([llm] in konstruct.toml)")
    else:
        print_table(
            None,
            ["provider", "key", "api base", "added by", "added"],
            [(k.provider, k.hint, k.api_base or "", k.added_by, k.created_at.strftime("%Y-%m-%d %H:%M")) for k in rows],
        )


@key_app.command("remove")
def key_remove(
    ctx: typer.Context,
    tenant: str = TenantOption,
    provider: str = typer.Option(..., "--provider", "-p", help="The provider whose key goes."),
    yes: bool = YesOption,
    as_json: bool = JsonOption,
) -> None:
    """Delete a tenant's key; its agents fall back to the platform key."""
    confirm_deletion(yes, f"{tenant}'s {provider} key", "the key (calls use the platform key from then on)")

    async def go() -> llm_keys.KeyInfo:
        async with database(settings(ctx)) as db:
            return await llm_keys.remove_key(
                db, await tenant_for(db, tenant, "key.write"), provider=provider.strip().lower(), actor=actor()
            )

    info = run(go())
    if as_json:
        print_json(info.as_json())
    else:
        out.print(f"[green]removed[/green] {info.provider} key {info.hint} of {tenant}")


# -- the master key --


async def _reencrypt(ctx: typer.Context) -> int:
    cfg = settings(ctx)
    async with database(cfg) as db:
        await platform(db, "secrets.rotate")
        tenants = await directory(db)
        return await llm_keys.rotate_secrets(db, cfg, [t.id for t in tenants])


@secrets_app.command("rotate")
def secrets_rotate(
    ctx: typer.Context,
    drop_old: bool = typer.Option(
        False, "--drop-old", help="Then remove the older keys from the key file (once every process has picked up the new one)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Make a new master key and re-encrypt every stored secret under it, without downtime.

    Running gateways and workers read the key file again when they meet a secret they cannot decrypt.
    The older keys stay in the file (newest first) until --drop-old, which re-encrypts once more
    (anything written meanwhile under an old key) and then keeps only the newest."""
    cfg = settings(ctx)
    if secret_key_in_environment():
        raise ConfigError(
            "the master key comes from KONSTRUCT_SECRET_KEY: set it to 'NEW,OLD' (make NEW with "
            "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`), "
            "restart, then run `konstruct secrets reencrypt`"
        )
    added = 0
    if not drop_old:
        added = master.add_master_key(cfg)
    rewritten = run(_reencrypt(ctx))
    dropped = master.drop_old_master_keys(cfg) if drop_old else 0
    result = {"keys_in_file": 1 if drop_old else added, "secrets_reencrypted": rewritten, "old_keys_dropped": dropped}
    if as_json:
        print_json(result)
    elif drop_old:
        out.print(f"[green]re-encrypted[/green] {rewritten} secrets; dropped {dropped} old master key(s)")
    else:
        out.print(
            f"[green]rotated[/green]: a new master key, {rewritten} secrets re-encrypted under it. The old key stays in "
            "the file for processes not yet restarted; remove it with `konstruct secrets rotate --drop-old`."
        )


@secrets_app.command("reencrypt")
def secrets_reencrypt(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Re-encrypt every stored secret under the first master key (after changing KONSTRUCT_SECRET_KEY to 'NEW,OLD')."""
    rewritten = run(_reencrypt(ctx))
    if as_json:
        print_json({"secrets_reencrypted": rewritten})
    else:
        out.print(f"[green]re-encrypted[/green] {rewritten} secrets under the newest master key")


# -- usage --


def _bar_chart(daily: dict[Any, Decimal], width: int = 40) -> None:
    top = max(daily.values(), default=Decimal(0))
    out.print("[bold]cost per day (USD)[/bold]")
    for day, cost in daily.items():
        filled = int(cost / top * width) if top else 0
        bar = "█" * filled or ("▏" if cost else "")
        out.print(f"{day:%m-%d}  {bar.ljust(width)}  ${cost:.4f}")


def usage(
    ctx: typer.Context,
    tenant: str | None = typer.Option(None, "--tenant", "-t", help="One tenant (default: every tenant)."),
    since: str = typer.Option("30d", "--since", help="How far back: 30d, 12h, 2w, or a date 2026-11-01."),
    by: str = typer.Option("model", "--by", help="Group by model, agent, day or tenant."),
    as_json: bool = JsonOption,
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV (one row per group) instead of a table."),
) -> None:
    """LLM calls, tokens, cost and latency, grouped; with a daily cost chart."""
    start = usage_service.parse_since(since)
    if by not in usage_service.GROUPS:
        raise ValidationError(f"--by must be one of {', '.join(usage_service.GROUPS)}")
    if as_json and as_csv:
        raise ValidationError("pick one of --json and --csv")

    async def go() -> usage_service.UsageReport:
        async with database(settings(ctx)) as db:
            tenants = [await tenant_for(db, tenant, "usage.read")] if tenant else await tenants_for(db, "usage.read")
            return await usage_service.report(db, tenants, since=start, by=by)

    report = run(go())
    if as_json:
        print_json(report.as_json())
        return
    rows = [*report.rows, report.total]
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([by, "calls", "failed", "prompt_tokens", "completion_tokens", "cost_usd", "avg_latency_ms"])
        for row in rows:
            writer.writerow(
                [row.key, row.calls, row.failed, row.prompt_tokens, row.completion_tokens, f"{row.cost_usd:.8f}", row.avg_latency_ms]
            )
        return
    scope = f"tenant {tenant}" if tenant else "all tenants"
    print_table(
        f"LLM usage of {scope} since {start:%Y-%m-%d %H:%M} UTC, by {by}",
        [by, "calls", "failed", "prompt tok", "completion tok", "cost (USD)", "avg latency"],
        [(r.key, r.calls, r.failed, r.prompt_tokens, r.completion_tokens, f"{r.cost_usd:.4f}", f"{r.avg_latency_ms} ms") for r in rows],
    )
    _bar_chart(report.daily)


# -- budgets --


def _print_budget(slug: str, info: budgets.BudgetInfo) -> None:
    if info.monthly_usd is None:
        out.print(f"{slug} has no budget: spending is not limited (spent ${info.spent_usd:.4f} in {info.month:%B %Y})")
        return
    percent = info.used_percent or 0.0
    print_fields(
        {
            "tenant": slug,
            "monthly limit": f"${info.monthly_usd:.2f}"
            + (f" (own ${info.own_usd:.2f}, plan ${info.plan_usd:.2f})" if info.own_usd is not None and info.plan_usd is not None else ""),
            "spent": f"${info.spent_usd:.4f} in {info.month:%B %Y} ({percent:.1f}%)",
            "in flight": f"${info.reserved_usd:.4f} held for calls in progress",
            "alerts at": ", ".join(f"{p}%" for p in info.alerts) or "none",
            "alerts sent": ", ".join(f"{p}%" for p in info.alerts_sent) or "none",
            "at the limit": info.action + (f" to {info.downgrade_model}" if info.action == "downgrade" and info.downgrade_model else ""),
        }
    )


@budget_app.command("set")
def budget_set(
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

    async def go() -> budgets.BudgetInfo:
        async with database(cfg) as db:
            return await budgets.set_budget(
                db, await tenant_for(db, tenant, "budget.write"), usd=usd, alerts=alert or [80], action=action,
                downgrade_model=downgrade_model, settings=cfg, actor=actor(),
            )  # fmt: skip

    info = run(go())
    if as_json:
        print_json(info.as_json())
    else:
        _print_budget(tenant, info)


@budget_app.command("show")
def budget_show(ctx: typer.Context, tenant: str = TenantOption, as_json: bool = JsonOption) -> None:
    """A tenant's budget and what it spent this month."""
    cfg = settings(ctx)

    async def go() -> budgets.BudgetInfo:
        async with database(cfg) as db:
            return await budgets.get_budget(db, await tenant_for(db, tenant, "budget.read"), cfg)

    info = run(go())
    if as_json:
        print_json(info.as_json())
    else:
        _print_budget(tenant, info)


@budget_app.command("clear")
def budget_clear(ctx: typer.Context, tenant: str = TenantOption, yes: bool = YesOption, as_json: bool = JsonOption) -> None:
    """Remove a tenant's own budget (a plan's included budget still applies)."""
    confirm_deletion(yes, f"{tenant}'s budget", "its spending limit")

    async def go() -> None:
        async with database(settings(ctx)) as db:
            await budgets.clear_budget(db, await tenant_for(db, tenant, "budget.write"), actor=actor())

    run(go())
    if as_json:
        print_json({"tenant": tenant, "budget": None})
    else:
        out.print(f"[green]cleared[/green] the budget of {tenant}")


# -- billing --


@billing_app.command("checkout")
def billing_checkout(
    ctx: typer.Context,
    tenant: str = TenantOption,
    plan: str = typer.Option(..., "--plan", help="A plan name from [billing] plans."),
    as_json: bool = JsonOption,
) -> None:
    """Print a Stripe Checkout link that subscribes the tenant to a plan."""
    cfg = settings(ctx)

    async def go() -> stripe_api.CheckoutLink:
        async with database(cfg) as db:
            return await stripe_api.checkout(db, cfg, await tenant_for(db, tenant, "billing.write"), plan, actor=actor())

    with Progress(SpinnerColumn(), TextColumn("asking Stripe for a checkout link…"), transient=True, console=out, disable=as_json):
        link = run(go())
    if as_json:
        print_json({"url": link.url, "session_id": link.session_id, "customer": link.customer_id})
    else:
        out.print(link.url)


@billing_app.command("portal")
def billing_portal(ctx: typer.Context, tenant: str = TenantOption, as_json: bool = JsonOption) -> None:
    """Print a Stripe Billing Portal link (payment method, invoices, cancelling)."""
    cfg = settings(ctx)

    async def go() -> str:
        async with database(cfg) as db:
            return await stripe_api.portal(db, cfg, await tenant_for(db, tenant, "billing.write"), actor=actor())

    url = run(go())
    if as_json:
        print_json({"url": url})
    else:
        out.print(url)


@billing_app.command("status")
def billing_status(
    ctx: typer.Context,
    tenant: str | None = typer.Option(None, "--tenant", "-t", help="One tenant (default: every tenant)."),
    as_json: bool = JsonOption,
) -> None:
    """Subscription state per tenant, and whether its agents are running."""
    cfg = settings(ctx)

    async def go() -> list[billing_standing.BillingStatus]:
        async with database(cfg) as db:
            tenants = [await tenant_for(db, tenant, "billing.read")] if tenant else await tenants_for(db, "billing.read")
            return [await billing_standing.status(db, cfg, t) for t in tenants]

    rows = run(go())
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


@billing_app.command("exempt")
def billing_exempt(
    ctx: typer.Context,
    tenant: str = TenantOption,
    off: bool = typer.Option(False, "--off", help="Make the tenant need a subscription again."),
    as_json: bool = JsonOption,
) -> None:
    """Let a tenant's agents run without a subscription (internal or invoiced customers)."""

    async def go() -> None:
        async with database(settings(ctx)) as db:
            await billing_standing.set_exempt(db, await tenant_for(db, tenant, "billing.exempt"), not off, actor=actor())

    run(go())
    if as_json:
        print_json({"tenant": tenant, "exempt": not off})
    else:
        out.print(f"[green]{tenant}[/green] {'needs a subscription again' if off else 'is exempt from billing'}")
