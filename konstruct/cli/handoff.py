"""konstruct conversation reply|take|close (and release --note): handling an escalated conversation without Slack.

A reply goes the way a reply from the desk thread goes: stored in the inbox, delivered by the worker on the person's
channel, kept as a human turn. Customer operators may (`conversation.handle`); every action is audited.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import typer
from rich.markup import escape
from sqlalchemy import select

from konstruct.agent import escalation as service
from konstruct.cli.common import JsonOption, TenantOption, actor, err, out, print_json, print_table, settings, with_tenant
from konstruct.db.engine import Database
from konstruct.db.models import InboundMessage, Message
from konstruct.db.urls import resolve_urls
from konstruct.handoff import replies, state
from konstruct.tenancy.tenants import TenantInfo
from konstruct.worker.queue import make_queue

RefArgument = typer.Argument(..., help="Conversation id (or its first 8 characters).")
FINAL = ("replied", "failed", "ignored")


def register_in_conversation(app: typer.Typer) -> None:
    """`konstruct conversation reply|take|close` (cli/conversations.py adds them to its group)."""
    app.command("reply")(reply)
    app.command("take")(take)
    app.command("close")(close)


def reply(
    ctx: typer.Context,
    ref: str = RefArgument,
    text: str = typer.Argument(..., help="What to send the person, on their channel, from the tenant's own connection."),
    tenant: str = TenantOption,
    wait: float = typer.Option(30.0, "--wait", min=0, help="Seconds to wait for the worker to deliver it (0: do not wait)."),
    as_json: bool = JsonOption,
) -> None:
    """Answer the person of an escalated conversation as a human (the agent sees it when it resumes)."""
    if not text.strip():
        raise typer.BadParameter("the reply is empty: give the text to send")
    cfg = settings(ctx)

    async def go(db: Database, info: TenantInfo) -> tuple[str, str | None, str | None]:
        conversation_id = await service.find_conversation(db, info, ref)
        queue = make_queue(cfg, resolve_urls(cfg))
        try:
            stored = await replies.store_reply(db, queue, tenant_id=info.id, conversation_id=conversation_id, author=actor(), text=text.strip(),
                                               external_id=f"cli:{uuid.uuid4().hex}", origin={"kind": "cli"})  # fmt: skip
        finally:
            queue.close()
        return await _delivered(db, info.id, stored.id, wait)

    status, error, delivery = with_tenant(ctx, tenant, "conversation.handle", go)
    if as_json:
        print_json({"status": status, "delivery": delivery, "error": error})
    elif status == "received":
        out.print(f"[yellow]queued[/yellow]: no worker delivered it within {wait:g}s; it is sent when one runs")
    elif status == "replied":
        out.print(f"[green]sent[/green] to the person ({delivery})")
    else:
        raise typer.Exit(_failed(error))


def _failed(error: str | None) -> int:
    err.print(f"[red]Not delivered:[/red] {escape(error or 'unknown error')}")
    return 1


async def _delivered(db: Database, tenant_id: uuid.UUID, inbound_id: uuid.UUID, wait: float) -> tuple[str, str | None, str | None]:
    """(the inbox row's state, its error, the reply's delivery status) once the worker is done, or after `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        async with db.tenant(tenant_id=tenant_id) as session:
            row = (await session.execute(select(InboundMessage.status, InboundMessage.error).where(InboundMessage.id == inbound_id))).one()
            delivery = await session.scalar(select(Message.status).where(Message.inbound_id == inbound_id, Message.direction == "out"))
        if row.status in FINAL or time.monotonic() >= deadline:
            return row.status, row.error, delivery
        await asyncio.sleep(0.1)


def take(ctx: typer.Context, ref: str = RefArgument, tenant: str = TenantOption) -> None:
    """Become the owner of an escalated conversation (one owner; shown in its desk thread)."""

    async def go(db: Database, info: TenantInfo) -> tuple[str, str]:
        conversation_id = await service.find_conversation(db, info, ref)
        me = actor()
        return me, await state.take(db, tenant_id=info.id, conversation_id=conversation_id, who=me)

    me, owner = with_tenant(ctx, tenant, "conversation.handle", go)
    if owner == me:
        out.print(f"[green]taken[/green]: {ref} is yours")
    else:
        out.print(f"[yellow]already taken[/yellow]: {escape(owner)} has {ref}")


def close(ctx: typer.Context, ref: str = RefArgument, tenant: str = TenantOption) -> None:
    """Close an escalated conversation's handoff (resolved by a human, or closed); the agent answers what comes next."""

    async def go(db: Database, info: TenantInfo) -> str:
        conversation_id = await service.find_conversation(db, info, ref)
        return await state.end(db, tenant_id=info.id, conversation_id=conversation_id, how=state.CLOSE, actor=actor())

    outcome = with_tenant(ctx, tenant, "conversation.handle", go)
    out.print(f"[green]closed[/green] {ref}: {outcome.replace('_', ' ')}")


def list_escalated(ctx: typer.Context, tenant: str, *, ended: bool, as_json: bool) -> None:
    """`conversation list --escalated`: the open escalations (and, with ended, the finished ones), owner, times, outcome."""
    rows = with_tenant(ctx, tenant, "conversation.read", lambda db, t: state.list_handoffs(db, t.id, ended=ended))
    if as_json:
        print_json([r.as_json() for r in rows])
        return
    if not rows:
        out.print("no escalated conversations")
        return
    print_table(
        None,
        ["id", "channel", "person", "escalated", "why", "owner", "to take", "to answer", "outcome"],
        [(str(r.conversation_id)[:8], r.channel, r.person, r.escalated_at.strftime("%Y-%m-%d %H:%M"),
          f"{r.category + ': ' if r.category else ''}{r.reason or ''}"[:60], r.owner or ("— (reminded)" if r.reminded else "—"),
          _duration(r.seconds_to_take), _duration(r.seconds_to_answer), (r.outcome or "open").replace("_", " ")) for r in rows],
    )  # fmt: skip


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}min"
