"""konstruct conversation …: conversations, and handing escalated ones back to the agent."""

from __future__ import annotations

import typer

from konstruct.agent import escalation as service
from konstruct.cli import handoff as handoff_cli
from konstruct.cli.common import JsonOption, TenantOption, actor, out, print_json, print_table, with_tenant
from konstruct.db.engine import Database
from konstruct.errors import ValidationError
from konstruct.tenancy.tenants import TenantInfo

app = typer.Typer(help="Conversations, and handling escalated ones: reply, take, release, close.", no_args_is_help=True)


@app.command("list")
def list_(
    ctx: typer.Context,
    tenant: str = TenantOption,
    escalated: bool = typer.Option(False, "--escalated", help="Only conversations waiting for a human, with owner and times."),
    ended: bool = typer.Option(False, "--ended", help="With --escalated: also the escalations that ended, with their outcomes."),
    as_json: bool = JsonOption,
) -> None:
    """The tenant's recent conversations (or the escalated ones)."""
    if escalated:
        handoff_cli.list_escalated(ctx, tenant, ended=ended, as_json=as_json)
        return
    rows = with_tenant(ctx, tenant, "conversation.read", lambda db, t: service.list_conversations(db, t, escalated_only=escalated))
    if as_json:
        print_json([c.as_json() for c in rows])
    elif not rows:
        out.print("no escalated conversations" if escalated else "no conversations yet")
    else:
        print_table(
            None,
            ["id", "channel", "person", "status", "escalated", "reason"],
            [
                (
                    str(c.conversation_id)[:8],
                    c.channel,
                    c.person,
                    c.status,
                    c.escalated_at.strftime("%Y-%m-%d %H:%M") if c.escalated_at else "",
                    c.reason or "",
                )
                for c in rows
            ],
        )


@app.command("release")
def release(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Conversation id (or its first 8 characters)."),
    tenant: str = TenantOption,
    note: str | None = typer.Option(None, "--note", help="A note the agent sees when it resumes (never sent to the person)."),
) -> None:
    """Hand an escalated conversation back to the agent."""

    async def go(db: Database, info: TenantInfo) -> bool:
        conversation_id = await service.find_conversation(db, info, ref)
        return await service.release(db, tenant_id=info.id, conversation_id=conversation_id, actor=actor(), note=note)

    if not with_tenant(ctx, tenant, "conversation.handle", go):
        raise ValidationError(f"conversation {ref} is not escalated")
    out.print(f"[green]released[/green] {ref}: the agent answers again")


handoff_cli.register(app)
