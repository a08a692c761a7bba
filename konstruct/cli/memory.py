"""konstruct memory …: what agents remember about people, and the right to be forgotten."""

from __future__ import annotations

import typer

from konstruct.agent import memory as service
from konstruct.cli.common import JsonOption, TenantOption, YesOption, actor, confirm_deletion, out, print_json, print_table, with_tenant

app = typer.Typer(help="What agents remember about people; the right to be forgotten.", no_args_is_help=True)


@app.command("list")
def list_(
    ctx: typer.Context,
    tenant: str = TenantOption,
    person: str = typer.Option(..., "--person", help="The person: Slack user id, WhatsApp number, terminal name."),
    as_json: bool = JsonOption,
) -> None:
    """What the tenant's agents remember about one person."""
    rows = with_tenant(ctx, tenant, "memory.read", lambda db, t: service.list_memories(db, t, person))
    if as_json:
        print_json([m.as_json() for m in rows])
    elif not rows:
        out.print(f"nothing remembered about {person}")
    else:
        print_table(None, ["id", "when", "memory"], [(m.id, m.created_at.strftime("%Y-%m-%d %H:%M"), m.content) for m in rows])


@app.command("forget")
def forget(
    ctx: typer.Context,
    tenant: str = TenantOption,
    person: str = typer.Option(..., "--person", help="The person to forget."),
    yes: bool = YesOption,
    as_json: bool = JsonOption,
) -> None:
    """Delete everything about one person: memories, conversations and messages (audited)."""
    confirm_deletion(yes, f"everything {tenant} holds about {person}", "their memories, conversations and messages")
    removed, conversations = with_tenant(ctx, tenant, "memory.forget", lambda db, t: service.forget(db, t, person, actor=actor()))
    if as_json:
        print_json({"person": person, "memories": removed, "conversations": conversations})
    else:
        out.print(f"[green]forgotten[/green] {person}: {removed} memories, {conversations} conversations")
