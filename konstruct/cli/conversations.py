"""konstruct conversation …: conversations, and handing escalated ones back to the agent."""

from __future__ import annotations

import typer
from rich.markup import escape

from konstruct import transcript as transcripts
from konstruct.agent import escalation as service
from konstruct.cli import handoff as handoff_cli
from konstruct.cli.common import JsonOption, TenantOption, actor, out, print_fields, print_json, print_table, with_tenant
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
            ["id", "channel", "person", "status", "escalated", "category", "reason"],
            [
                (
                    str(c.conversation_id)[:8],
                    c.channel,
                    c.person,
                    c.status,
                    c.escalated_at.strftime("%Y-%m-%d %H:%M") if c.escalated_at else "",
                    c.category or "",
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


ROLE_STYLE = {"person": "cyan", "agent": "green", "notice": "yellow", "human": "magenta"}


@app.command("show")
def show(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Conversation id (or its first 8 characters)."),
    tenant: str = TenantOption,
    limit: int = typer.Option(500, "--limit", min=1, max=transcripts.MAX_ENTRIES, help="Show at most this many of the latest entries."),
    as_json: bool = JsonOption,
) -> None:
    """The conversation's transcript: the person's messages, the agent's replies, notices and human turns, with who and when."""

    async def go(db: Database, info: TenantInfo) -> transcripts.Transcript:
        conversation_id = await service.find_conversation(db, info, ref)
        return await transcripts.read(db, info, conversation_id, actor=actor(), via="cli", limit=limit)

    found = with_tenant(ctx, tenant, "conversation.read", go)
    if as_json:
        print_json(found.as_json())
        return
    fields = {"conversation": str(found.id), "channel": f"{found.channel} {found.external_id}", "person": found.person,
              "agent": found.agent, "status": found.status}  # fmt: skip
    if found.escalated_at is not None:
        fields["escalated"] = f"{found.escalated_at:%Y-%m-%d %H:%M} {found.category or ''}: {found.reason or ''}"
    if found.owner:
        fields["owner"] = found.owner
    print_fields({key: escape(value) for key, value in fields.items()})  # what people wrote is text, never markup
    if found.earlier:
        out.print(f"[dim]… earlier entries left out: --limit {limit} shows the latest {limit}[/dim]")
    for entry in found.entries:
        style = ROLE_STYLE.get(entry.role, "white")
        status = f" [dim]({entry.status})[/dim]" if entry.role != "person" and entry.status not in ("sent", "delivered", "read") else ""
        out.print(
            f"[dim]{entry.at:%Y-%m-%d %H:%M:%S}[/dim] [{style}]{escape(entry.who)} ({entry.role})[/{style}]{status}: {escape(entry.text)}"
        )
    if not found.entries:
        out.print("no messages yet")


handoff_cli.register_in_conversation(app)
