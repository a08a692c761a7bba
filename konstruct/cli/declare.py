"""konstruct plan | apply: tenants, agents, routes, budgets, invitations, knowledge and MCP servers declared in a TOML file."""

from __future__ import annotations

from pathlib import Path

import typer

from konstruct import declare
from konstruct.cli.common import JsonOption, actor, out, platform, print_json, print_table, settings, with_database
from konstruct.cli.invitations import queue_invitation_email
from konstruct.cli.knowledge import queue_jobs
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.tenancy import invitations

FileOption = typer.Option(None, "--file", "-f", help="The tenants file (default: [[tenants]] in konstruct.toml).", exists=False)
PruneOption = typer.Option(
    False,
    "--prune",
    help="Also delete what exists but is not declared (tenants, agents, routes, budgets, invitations, knowledge sources, MCP servers).",
)

SYMBOL = {"create": "[green]+[/green]", "change": "[yellow]~[/yellow]", "delete": "[red]-[/red]"}


def _show(changes: list[declare.Change]) -> None:
    if not changes:
        out.print("nothing to do: everything is as declared")
        return
    rows = []
    for c in changes:
        detail = ", ".join(f"{k}: {_short(v[0])} → {_short(v[1])}" for k, v in c.fields.items())
        rows.append((SYMBOL[c.action], c.kind, f"{c.tenant}" + (f"/{c.name}" if c.kind != "tenant" else ""), detail))
    print_table(None, ["", "what", "name", "changes"], rows)
    counts = {action: sum(1 for c in changes if c.action == action) for action in ("create", "change", "delete")}
    out.print(", ".join(f"{n} to {action}" for action, n in counts.items()))


def _short(value: object) -> str:
    text = "—" if value is None else str(value)
    return text if len(text) <= 40 else text[:39] + "…"


async def _planned(cfg: Settings, declaration: declare.Declaration, prune: bool, db: Database) -> list[declare.Change]:
    await platform(db, "apply")
    return await declare.plan(db, cfg, declaration, prune=prune)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)
    app.command("apply")(apply_command)


def plan_command(
    ctx: typer.Context,
    file: Path | None = FileOption,
    prune: bool = PruneOption,
    as_json: bool = JsonOption,
) -> None:
    """Show what `konstruct apply` would create, change and delete. Nothing is written."""
    cfg = settings(ctx)
    declaration = declare.load(file, cfg)
    changes = with_database(ctx, lambda db: _planned(cfg, declaration, prune, db))
    if as_json:
        print_json([c.as_json() for c in changes])
    else:
        _show(changes)


def apply_command(
    ctx: typer.Context,
    file: Path | None = FileOption,
    prune: bool = PruneOption,
    as_json: bool = JsonOption,
) -> None:
    """Make tenants, agents, routes, budgets, invitations, knowledge and MCP servers as declared (idempotent; audited)."""
    cfg = settings(ctx)
    declaration = declare.load(file, cfg)

    jobs: list[declare.Queued] = []

    async def go(db: Database) -> tuple[list[declare.Change], list[declare.Made]]:
        changes = await _planned(cfg, declaration, prune, db)
        return changes, await declare.apply(db, cfg, changes, actor=actor(), jobs=jobs)

    changes, made = with_database(ctx, go)
    emailed = [queue_invitation_email(cfg, info, tenant_id, token) for tenant_id, info, token in made]
    for tenant, job in jobs:
        queue_jobs(cfg, tenant, [job])
    if as_json:
        print_json({"changes": [c.as_json() for c in changes], "invitations": [
            {"email": info.email, "emailed": sent, **({} if sent else {"link": invitations.invite_url(cfg, token)})}
            for (_, info, token), sent in zip(made, emailed, strict=True)],
            "knowledge_jobs": [{"tenant": t.slug, "id": str(j.id), "status": j.status} for t, j in jobs]})  # fmt: skip
        return
    _show(changes)
    for tenant, job in jobs:
        out.print(f"queued knowledge job {job.id}: `konstruct knowledge job {job.id} --tenant {tenant.slug}`")
    for (_, info, token), sent in zip(made, emailed, strict=True):
        if not sent:
            out.print(f"no SMTP server configured: give {info.email} this link: {invitations.invite_url(cfg, token)}")
    if changes:
        out.print("[green]applied[/green]")
