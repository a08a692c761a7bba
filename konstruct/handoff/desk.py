"""The desk thread of an escalation: its card (who, where, why, the conversation so far, who has it) and the person's
messages mirrored into it, in order and exactly once.

Exactly once: each mirrored message is recorded in `desk_mirrors` (unique per history row) with the desk's id for it,
under a per-conversation advisory lock, so two workers never post the same message; and every post carries a marker
(`mirror:<message id>`), so an attempt that died after posting and before recording finds its post (`desk_markers`)
instead of posting again. In order: whoever holds the lock posts every message not mirrored yet, oldest first.
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct.db.engine import Database
from konstruct.db.models import Conversation, DeskMirror, Handoff, InboundMessage, Message
from konstruct.handoff.state import HUMAN
from konstruct.messaging import Channel, ChannelError, Desk, DeskCard, DeskFile, DeskThread, Target

log = logging.getLogger("konstruct.handoff")

_LOCK = text("SELECT pg_advisory_xact_lock(hashtext('desk:' || CAST(:conversation AS text)))")
SHOWN_TEXT = 2800  # characters of one message quoted on the desk (Slack's section text is at most 3,000)


def desk_of(channels: Mapping[str, Channel], handoff: Handoff) -> tuple[Desk, DeskThread] | None:
    """The handoff's desk channel and thread, once the thread is posted; None before, or for a target with no desk."""
    channel = channels.get(handoff.desk_kind or "")
    if not isinstance(channel, Desk) or not handoff.desk_ts or not handoff.desk_where:
        return None
    return channel, DeskThread(handoff.desk_team or "", handoff.desk_where, handoff.desk_ts)


async def person_target(session: AsyncSession, conversation: Conversation, inbound_external_id: str, *, retry: bool = False) -> Target:
    """Where a message to the person goes: the conversation's channel, with the facts of the person's latest message."""
    latest = await session.scalar(
        select(InboundMessage.payload)
        .where(InboundMessage.conversation_id == conversation.id, InboundMessage.channel == conversation.channel)
        .order_by(InboundMessage.received_at.desc())
        .limit(1)
    )
    return Target(conversation.tenant_id, conversation.id, conversation.external_id, inbound_external_id, dict(latest or {}), retry=retry)


def person_label(conversation: Conversation, payload: dict[str, Any]) -> str:
    name = payload.get("name")
    return f"{name} ({conversation.person})" if name else conversation.person


async def card_for(session: AsyncSession, handoff: Handoff, *, last_turns: int, link: str | None = None) -> DeskCard:
    """The desk card of a handoff as it stands."""
    conversation = await session.get(Conversation, handoff.conversation_id)
    assert conversation is not None
    payload = await session.scalar(
        select(InboundMessage.payload).where(InboundMessage.conversation_id == conversation.id, InboundMessage.channel == conversation.channel)
        .order_by(InboundMessage.received_at.desc()).limit(1)
    )  # fmt: skip
    rows = (
        await session.execute(
            select(Message.direction, Message.author, Message.text)
            .where(
                Message.conversation_id == conversation.id, Message.kind.in_(("message", HUMAN)), Message.created_at <= handoff.created_at
            )
            .order_by(Message.created_at.desc(), Message.direction.desc())
            .limit(last_turns)
        )
    ).all()
    turns = tuple(("Person" if r.direction == "in" else r.author, r.text[: SHOWN_TEXT // max(len(rows), 1)]) for r in reversed(rows))
    return DeskCard(handoff.id, person_label(conversation, dict(payload or {})), conversation.channel, conversation.escalation_category,
                    handoff.reason or conversation.escalation_reason or "", conversation.summary, turns, handoff.owner, handoff.outcome,
                    handoff.ended_by, link)  # fmt: skip


async def open_thread(
    db: Database, channels: Mapping[str, Channel], *, tenant_id: uuid.UUID, handoff_id: uuid.UUID, last_turns: int, link: str | None,
    search: bool,
) -> bool:  # fmt: skip
    """Post the handoff's desk thread (once: with search, an earlier attempt's card is found instead of posted again),
    then mirror what the person said meanwhile. False when the target has no desk (its channel only notifies)."""
    async with db.tenant(tenant_id=tenant_id) as session:
        handoff = await session.get(Handoff, handoff_id)
        if handoff is None or handoff.desk_ts or handoff.ended_at is not None:
            return handoff is not None
        channel = channels.get(handoff.desk_kind or "")
        card = await card_for(session, handoff, last_turns=last_turns, link=link)
        created = handoff.created_at.timestamp()
        conversation_id, where = handoff.conversation_id, handoff.desk_where or ""
    if not isinstance(channel, Desk):
        return False
    thread = await channel.open_desk(tenant_id, where, card, search_since=created - 5 if search else None)
    async with db.tenant(tenant_id=tenant_id) as session:
        await session.execute(
            update(Handoff).where(Handoff.id == handoff_id, Handoff.desk_ts.is_(None))
            .values(desk_team=thread.team, desk_where=thread.where, desk_ts=thread.ts)
        )  # fmt: skip
    await mirror(db, channels, tenant_id=tenant_id, conversation_id=conversation_id, search=search)
    return True


async def mirror(db: Database, channels: Mapping[str, Channel], *, tenant_id: uuid.UUID, conversation_id: uuid.UUID, search: bool) -> int:
    """Post every message of the person not mirrored yet into the open handoff's desk thread, oldest first; how many.
    search: look for posts of an attempt that died before recording them (also done whenever more than one is due)."""
    async with db.tenant(tenant_id=tenant_id) as session:
        await session.execute(_LOCK, {"conversation": str(conversation_id)})
        handoff = await session.scalar(select(Handoff).where(Handoff.conversation_id == conversation_id, Handoff.ended_at.is_(None)))
        found = desk_of(channels, handoff) if handoff is not None else None
        if handoff is None or found is None:
            return 0  # not escalated, or its thread is not posted yet (opening it mirrors what came meanwhile)
        desk, thread = found
        due = await _due(session, handoff)
        if not due:
            return 0
        conversation = await session.get(Conversation, conversation_id)
        assert conversation is not None
        known = await desk.desk_markers(tenant_id, thread) if search or len(due) > 1 else {}
        done = 0
        for message, inbound in due:
            marker = f"mirror:{message.id}"
            try:
                ts = known.get(marker) or await _post(desk, thread, channels, conversation, message, inbound, marker)
            except ChannelError as exc:
                log.warning("conversation %s: could not mirror a message to the desk: %s", conversation_id, exc)
                break  # the rest wait (in order) for the next message or the worker's periodic check
            session.add(DeskMirror(tenant_id=tenant_id, handoff_id=handoff.id, message_id=message.id, desk_ts=ts))
            await session.flush()
            done += 1
        return done


async def _due(session: AsyncSession, handoff: Handoff) -> list[tuple[Message, InboundMessage]]:
    """The person's messages since the handoff began that its thread does not show yet, oldest first."""
    mirrored = select(DeskMirror.id).where(DeskMirror.message_id == Message.id).exists()
    rows = await session.execute(
        select(Message, InboundMessage)
        .join(InboundMessage, InboundMessage.id == Message.inbound_id)
        .where(
            Message.conversation_id == handoff.conversation_id,
            Message.direction == "in",
            Message.created_at >= handoff.created_at,
            ~mirrored,
        )
        .order_by(Message.created_at, Message.id)
        .limit(50)
    )
    return [(m, i) for m, i in rows.tuples()]


async def _post(
    desk: Desk, thread: DeskThread, channels: Mapping[str, Channel], conversation: Conversation, message: Message,
    inbound: InboundMessage, marker: str,
) -> str:  # fmt: skip
    files, notes = await files_of(channels.get(conversation.channel), conversation, inbound)
    body = message.text[:SHOWN_TEXT] or ("" if files or notes else "(an empty message)")
    shown = "\n".join(part for part in (f"*{person_label(conversation, inbound.payload)}:* {body}".rstrip(), *notes) if part)
    return await desk.desk_post(conversation.tenant_id, thread, shown, marker=marker, files=files)


async def files_of(channel: Channel | None, conversation: Conversation, inbound: InboundMessage) -> tuple[list[DeskFile], list[str]]:
    """The files of the person's message for the desk: images as bytes to attach, links where the channel has them,
    and a note for what could not be read."""
    payload = dict(inbound.payload or {})
    links = [DeskFile(str(f.get("name") or "file"), str(f.get("mimetype") or ""), url=str(f["url_private"]))
             for f in payload.get("files") or [] if isinstance(f, dict) and f.get("url_private")]  # fmt: skip
    if channel is None or not (payload.get("media") or payload.get("files")) or links:
        return links, []
    target = Target(conversation.tenant_id, conversation.id, conversation.external_id, inbound.external_id, payload)
    try:
        parts = await channel.attachments(target)
    except Exception as exc:  # the words still reach the desk
        log.warning("conversation %s: the person's file could not be fetched for the desk: %s", conversation.id, type(exc).__name__)
        return [], ["_(a file the person sent could not be fetched)_"]
    files, notes = [], []
    for part in parts:
        url = part.get("image_url", {}).get("url", "") if part.get("type") == "image_url" else ""
        if url.startswith("data:") and ";base64," in url:
            mime, data = url[5:].split(";base64,", 1)
            files.append(DeskFile(f"image.{mime.rsplit('/', 1)[-1]}", mime, data=base64.b64decode(data)))
        elif part.get("type") == "text":
            notes.append(f"_{part['text']}_")
    return files, notes


async def redraw(db: Database, channels: Mapping[str, Channel], *, tenant_id: uuid.UUID, handoff_id: uuid.UUID, last_turns: int) -> bool:
    """Redraw a handoff's card if it changed (owner, end); True when it is drawn as it stands."""
    async with db.tenant(tenant_id=tenant_id) as session:
        handoff = await session.get(Handoff, handoff_id)
        found = desk_of(channels, handoff) if handoff is not None else None
        if handoff is None or found is None:
            return False
        card = await card_for(session, handoff, last_turns=last_turns)
        desk, thread = found
        await desk.update_card(tenant_id, thread, card)
        await session.execute(update(Handoff).where(Handoff.id == handoff_id).values(card_dirty=False))
    return True


async def post_line(db: Database, channels: Mapping[str, Channel], *, tenant_id: uuid.UUID, handoff_id: uuid.UUID, text_: str,
                    marker: str) -> str | None:  # fmt: skip
    """Post one line in the handoff's desk thread (a reminder, a failed delivery); its id, or None without a thread."""
    async with db.tenant(tenant_id=tenant_id) as session:
        handoff = await session.get(Handoff, handoff_id)
        found = desk_of(channels, handoff) if handoff is not None else None
    if found is None:
        return None
    desk, thread = found
    try:
        return await desk.desk_post(tenant_id, thread, text_, marker=marker)
    except ChannelError as exc:
        log.warning("handoff %s: could not post to the desk: %s", handoff_id, exc)
        return None
