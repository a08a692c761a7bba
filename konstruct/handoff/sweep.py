"""The worker's periodic handoff check (every `escalation.check_interval` seconds, on every worker; each piece of work
is claimed in the database, so two workers never do it twice):

- desk threads that could not be posted when the conversation escalated are posted (found, if an attempt that died
  posted them) and catch up with what the person said;
- nobody took or answered within `escalation.answer_within` minutes: the person gets `escalation.waiting_message` and
  the thread is reminded, once (claimed by setting reminded_at first: at most once);
- cards whose owner or end changed are redrawn; status lines under humans' answers follow their delivery statuses.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from datetime import timedelta

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Conversation, DeskMirror, Handoff, Message
from konstruct.db.models import InboundMessage as InboxRow
from konstruct.handoff import desk, replies
from konstruct.messaging import Channel, ChannelError, Reply, deliver

log = logging.getLogger("konstruct.handoff")

OPEN_GRACE = timedelta(seconds=20)  # the escalating worker posts the thread itself; the check steps in after this


async def sweep(db: Database, settings: Settings, channels: Mapping[str, Channel]) -> None:
    """One pass over every tenant with handoff work; a tenant's failure is logged and does not stop the others."""
    async with db.system() as session:
        tenants = list(await session.scalars(text("select tenant_id from konstruct_handoff_tenants()")))
    for tenant_id in tenants:
        try:
            await sweep_tenant(db, settings, channels, tenant_id)
        except Exception as exc:
            log.warning("tenant %s: handoff check failed: %s: %s", tenant_id, type(exc).__name__, exc)


async def sweep_tenant(db: Database, settings: Settings, channels: Mapping[str, Channel], tenant_id: uuid.UUID) -> None:
    last = settings.escalation.last_turns
    async with db.tenant(tenant_id=tenant_id) as session:
        unposted = list(await session.scalars(select(Handoff.id).where(
            Handoff.ended_at.is_(None), Handoff.desk_ts.is_(None), Handoff.created_at < func.now() - OPEN_GRACE)))  # fmt: skip
        posted = list(
            await session.scalars(select(Handoff.conversation_id).where(Handoff.ended_at.is_(None), Handoff.desk_ts.is_not(None)))
        )
    for handoff_id in unposted:
        await desk.open_thread(db, channels, tenant_id=tenant_id, handoff_id=handoff_id, last_turns=last, link=None, search=True)
    for conversation_id in posted:
        await desk.mirror(db, channels, tenant_id=tenant_id, conversation_id=conversation_id, search=True)  # left behind: look first
    await remind_overdue(db, settings, channels, tenant_id)
    await redraw_cards(db, channels, tenant_id, last)
    await follow_statuses(db, channels, tenant_id)


async def remind_overdue(db: Database, settings: Settings, channels: Mapping[str, Channel], tenant_id: uuid.UUID) -> int:
    """Tell each person nobody answered in time, and remind the desk; once per handoff."""
    within = timedelta(minutes=settings.escalation.answer_within)
    async with db.tenant(tenant_id=tenant_id) as session:
        due = list(await session.scalars(
            update(Handoff)
            .where(Handoff.ended_at.is_(None), Handoff.reminded_at.is_(None), Handoff.taken_at.is_(None),
                   Handoff.first_human_reply_at.is_(None), Handoff.created_at < func.now() - within)
            .values(reminded_at=func.now(), card_dirty=True)
            .returning(Handoff.id)
        ))  # fmt: skip
    for handoff_id in due:
        await _remind(db, settings, channels, tenant_id, handoff_id)
    return len(due)


async def _remind(db: Database, settings: Settings, channels: Mapping[str, Channel], tenant_id: uuid.UUID, handoff_id: uuid.UUID) -> None:
    text_ = settings.escalation.waiting_message
    async with db.tenant(tenant_id=tenant_id) as session:
        handoff = await session.get(Handoff, handoff_id)
        assert handoff is not None
        conversation = await session.get(Conversation, handoff.conversation_id)
        assert conversation is not None
        message_id = await session.scalar(
            pg_insert(Message).values(tenant_id=tenant_id, conversation_id=conversation.id, direction="out", author="escalation",
                                      text=text_, status="sending", kind="notice", model="escalation").returning(Message.id)
        )  # fmt: skip
        assert message_id is not None
        target = await desk.person_target(session, conversation, f"reminder:{handoff_id}")
    channel = channels.get(conversation.channel)
    told = "the person was told"
    try:
        if channel is None:
            raise ChannelError(f"no {conversation.channel!r} channel on this worker")
        sent = await deliver(channel, Reply(target, text_))
        async with db.tenant(tenant_id=tenant_id) as session:
            await channel.record_sent(session, message_id, sent.external_id)
    except ChannelError as exc:
        told = f"the person could not be told ({exc})"
        async with db.tenant(tenant_id=tenant_id) as session:
            await session.execute(update(Message).where(Message.id == message_id).values(status="failed", error=str(exc)[:500]))
    minutes = f"{settings.escalation.answer_within:g}"
    await desk.post_line(db, channels, tenant_id=tenant_id, handoff_id=handoff_id, marker=f"reminder:{handoff_id}",
                         text_=f"<!here> :hourglass: Nobody has taken or answered this in {minutes} minutes; {told}: “{text_}”")  # fmt: skip


async def redraw_cards(db: Database, channels: Mapping[str, Channel], tenant_id: uuid.UUID, last_turns: int) -> None:
    async with db.tenant(tenant_id=tenant_id) as session:
        dirty = list(await session.scalars(select(Handoff.id).where(Handoff.card_dirty, Handoff.desk_ts.is_not(None)).limit(100)))
    for handoff_id in dirty:
        try:
            await desk.redraw(db, channels, tenant_id=tenant_id, handoff_id=handoff_id, last_turns=last_turns)
        except ChannelError as exc:
            log.warning("handoff %s: could not redraw its desk card: %s", handoff_id, exc)


async def follow_statuses(db: Database, channels: Mapping[str, Channel], tenant_id: uuid.UUID) -> None:
    """Update the status line under each human answer whose delivery status moved (WhatsApp's webhook reports them)."""
    async with db.tenant(tenant_id=tenant_id) as session:
        rows = (await session.execute(
            select(DeskMirror, Message, InboxRow, Handoff, Conversation.channel)
            .join(Message, Message.id == DeskMirror.message_id).join(InboxRow, InboxRow.id == Message.inbound_id)
            .join(Handoff, Handoff.id == DeskMirror.handoff_id).join(Conversation, Conversation.id == Message.conversation_id)
            .where(Message.kind == "human", Message.status != func.coalesce(DeskMirror.shown_status, ""),
                   Message.created_at > func.now() - timedelta(days=7))
            .limit(100)
        )).tuples().all()  # fmt: skip
    for mirror, message, inbound, handoff, person_channel in rows:
        found = desk.desk_of(channels, handoff)
        if found is None:
            continue
        channel, thread = found
        try:
            await channel.desk_edit(tenant_id, thread, mirror.desk_ts, replies.line_text(inbound, message, person_channel))
        except ChannelError as exc:
            log.warning("handoff %s: could not update a status line: %s", handoff.id, exc)
            continue
        async with db.tenant(tenant_id=tenant_id) as session:
            await session.execute(update(DeskMirror).where(DeskMirror.id == mirror.id).values(shown_status=message.status))
