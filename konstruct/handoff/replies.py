"""A human's answer to an escalated person: stored in the inbox like any message (so nothing is lost and a redelivery
is found, not sent again), then delivered by the worker on the person's channel from the tenant's own connection.

It is kept in the conversation as a `human` message (direction out, author who), so the agent sees what was said when
it resumes; under it the desk thread gets a status line (sent, delivered, read, failed) that the worker's periodic
check keeps up to date. `/release` from the desk hands the conversation back instead of being sent.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from konstruct import audit, inbox
from konstruct.db.engine import Database
from konstruct.db.models import Conversation, DeskMirror, Handoff, Message
from konstruct.db.models import InboundMessage as InboxRow
from konstruct.errors import ConflictError
from konstruct.handoff import desk, state
from konstruct.messaging import Channel, ChannelError, Reply, deliver

log = logging.getLogger("konstruct.handoff")

RELEASE_COMMAND = "/release"
STATUS_MARK = {"sending": "…", "sent": "✓ sent", "delivered": "✓✓ delivered", "read": "✓✓ read", "failed": "⚠ failed"}


async def store_reply(
    db: Database, queue: inbox.Doorbell, *, tenant_id: uuid.UUID, conversation_id: uuid.UUID, author: str, text: str, external_id: str,
    origin: dict[str, Any],
) -> inbox.Stored:  # fmt: skip
    """Keep a human's answer in the inbox and queue it (once per external id). ConflictError when the conversation is
    not escalated (then it is the agent's, and nobody is waiting for a human)."""
    async with db.tenant(tenant_id=tenant_id) as session:
        status = await session.scalar(select(Conversation.status).where(Conversation.id == conversation_id))
    if status != "escalated":
        raise ConflictError(
            f"conversation {str(conversation_id)[:8]} is not escalated: the agent answers it (see `konstruct conversation list --escalated`)"
        )
    return await inbox.accept_for(db, queue, tenant_id=tenant_id, conversation_id=conversation_id, channel=state.DESK,
                                  external_id=external_id, sender=author, text_=text, payload={"origin": origin})  # fmt: skip


def status_line(person_channel: str, status: str) -> str:
    return f"↳ to the person on {person_channel}: {STATUS_MARK.get(status, status)}"


async def deliver_reply(db: Database, channels: Mapping[str, Channel], row: InboxRow, *, retry: bool) -> tuple[str, str | None]:
    """The worker's part for a human's answer (an inbox row of channel `desk`): the row's final state and error."""
    text = row.text.strip()
    if text.lower() == RELEASE_COMMAND:
        await state.end(db, tenant_id=row.tenant_id, conversation_id=row.conversation_id, how=state.HAND_BACK, actor=row.sender)
        return "ignored", "released the conversation back to the agent"
    prepared = await _prepare(db, row, retry=retry)
    if isinstance(prepared, str):
        return "ignored", prepared
    message_id, handoff_id, conversation_channel, target = prepared
    if message_id is None:
        return "replied", None  # an earlier attempt delivered it
    channel = channels.get(conversation_channel)
    try:
        if channel is None:
            raise ChannelError(f"no {conversation_channel!r} channel on this worker")
        sent = await deliver(channel, Reply(target, text))
    except ChannelError as exc:
        await _failed(db, row, message_id, str(exc))
        await desk.post_line(db, channels, tenant_id=row.tenant_id, handoff_id=handoff_id, marker=f"status:{message_id}",
                             text_=f":warning: Not delivered to the person: {exc}")  # fmt: skip
        return "failed", f"delivery failed: {exc}"[:500]
    async with db.tenant(tenant_id=row.tenant_id) as session:
        await channel.record_sent(session, message_id, sent.external_id)
        if sent.text != text:  # what the person received (a template), not what was asked; still the human's turn
            await session.execute(update(Message).where(Message.id == message_id).values(text=sent.text, kind="human"))
    await _status_line(db, channels, row, handoff_id, message_id, conversation_channel)
    return "replied", None


async def _prepare(db: Database, row: InboxRow, *, retry: bool) -> tuple[uuid.UUID | None, uuid.UUID, str, Any] | str:
    """Store the human message (once per inbox row) and mark the handoff answered; (its id, or None when an earlier
    attempt sent it, the handoff, the person's channel, the target), or why there is nothing to deliver."""
    async with db.tenant(tenant_id=row.tenant_id) as session:
        conversation = await session.get(Conversation, row.conversation_id)
        handoff = await state.open_handoff(session, row.conversation_id, lock=True)
        if conversation is None or handoff is None:
            return "the conversation is no longer escalated: not sent"
        earlier = await session.scalar(select(Message).where(Message.inbound_id == row.id, Message.direction == "out"))
        if earlier is not None and earlier.status != "sending":
            return None, handoff.id, conversation.channel, None
        message_id = earlier.id if earlier is not None else await session.scalar(
            pg_insert(Message).values(tenant_id=row.tenant_id, conversation_id=row.conversation_id, inbound_id=row.id, direction="out",
                                      author=row.sender, text=row.text.strip(), status="sending", kind=state.HUMAN)
            .returning(Message.id)
        )  # fmt: skip
        now = datetime.now().astimezone()
        await session.execute(
            update(Handoff).where(Handoff.id == handoff.id).values(
                first_human_reply_at=func.coalesce(Handoff.first_human_reply_at, now), owner=func.coalesce(Handoff.owner, row.sender),
                taken_at=func.coalesce(Handoff.taken_at, now), card_dirty=Handoff.owner.is_(None) | Handoff.card_dirty)
        )  # fmt: skip
        await audit.record(session, tenant_id=row.tenant_id, actor=row.sender, action="conversation.human_reply",
                           target=str(row.conversation_id), detail={"message_id": str(message_id)})  # fmt: skip
        target = await desk.person_target(session, conversation, row.external_id, retry=retry)
        assert message_id is not None
        return message_id, handoff.id, conversation.channel, target


async def _failed(db: Database, row: InboxRow, message_id: uuid.UUID, error: str) -> None:
    async with db.tenant(tenant_id=row.tenant_id) as session:
        await session.execute(update(Message).where(Message.id == message_id).values(status="failed", error=error[:500]))


def line_text(inbound: InboxRow, message: Message, person_channel: str) -> str:
    """The status line under a human's answer in the desk thread: how its delivery stands, what went out instead of the
    text (a template), and the answer itself when it was given elsewhere (the CLI), since the thread does not show it."""
    quoted = (
        ""
        if (inbound.payload or {}).get("origin", {}).get("kind") == "slack"
        else f"*{inbound.sender}* answered the person: {inbound.text.strip()}\n"
    )
    instead = (
        f"\n_The person could not be sent this text; what went out instead: {message.text}_" if message.text != inbound.text.strip() else ""
    )
    return quoted + status_line(person_channel, message.status) + instead


async def _status_line(db: Database, channels: Mapping[str, Channel], row: InboxRow, handoff_id: uuid.UUID, message_id: uuid.UUID,
                       person_channel: str) -> None:  # fmt: skip
    async with db.tenant(tenant_id=row.tenant_id) as session:
        message = await session.get(Message, message_id)
    assert message is not None
    ts = await desk.post_line(db, channels, tenant_id=row.tenant_id, handoff_id=handoff_id, marker=f"status:{message_id}",
                              text_=line_text(row, message, person_channel))  # fmt: skip
    if ts is None:
        return
    async with db.tenant(tenant_id=row.tenant_id) as session:
        await session.execute(
            pg_insert(DeskMirror).values(tenant_id=row.tenant_id, handoff_id=handoff_id, message_id=message_id, desk_ts=ts,
                                         shown_status=message.status)
            .on_conflict_do_nothing()
        )  # fmt: skip
