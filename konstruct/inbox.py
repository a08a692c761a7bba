"""The inbox: store first, then queue. The database row is the truth; the queue only a doorbell."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import psutil
from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert

from konstruct import audit
from konstruct.channels.base import InboundMessage as NewMessage
from konstruct.db.engine import Database
from konstruct.db.models import Conversation, InboundMessage, Message, WorkerHeartbeat

log = logging.getLogger(__name__)

Enqueue = Callable[[uuid.UUID, uuid.UUID], None]


@dataclass(frozen=True)
class Stored:
    id: uuid.UUID
    tenant_id: uuid.UUID
    conversation_id: uuid.UUID
    status: str
    duplicate: bool


async def store(db: Database, message: NewMessage) -> Stored:
    """Store an inbound message once (unique per tenant, channel and external id) with its history row."""
    async with db.tenant(tenant_id=message.tenant_id) as session:
        conversation_id = await session.scalar(
            pg_insert(Conversation)
            .values(
                tenant_id=message.tenant_id,
                agent_id=message.agent_id,
                channel=message.channel,
                external_id=message.conversation_key,
                person=message.sender,
            )
            .on_conflict_do_update(index_elements=["tenant_id", "channel", "external_id", "agent_id"], set_={"last_message_at": func.now()})
            .returning(Conversation.id)
        )
        assert conversation_id is not None
        inbound_id = await session.scalar(
            pg_insert(InboundMessage)
            .values(
                tenant_id=message.tenant_id,
                conversation_id=conversation_id,
                channel=message.channel,
                external_id=message.external_id,
                sender=message.sender,
                text=message.text,
                payload=message.payload,
            )
            .on_conflict_do_nothing(index_elements=["tenant_id", "channel", "external_id"])
            .returning(InboundMessage.id)
        )
        if inbound_id is None:
            existing = (
                await session.execute(
                    select(InboundMessage.id, InboundMessage.conversation_id, InboundMessage.status).where(
                        InboundMessage.channel == message.channel, InboundMessage.external_id == message.external_id
                    )
                )
            ).one()
            return Stored(existing.id, message.tenant_id, existing.conversation_id, existing.status, duplicate=True)
        await session.execute(
            pg_insert(Message).values(
                tenant_id=message.tenant_id,
                conversation_id=conversation_id,
                inbound_id=inbound_id,
                direction="in",
                author=message.sender,
                text=message.text,
                status="received",
            )
        )
        await audit.record(
            session,
            tenant_id=message.tenant_id,
            actor=f"{message.channel}:{message.sender}",
            action="message.received",
            target=str(inbound_id),
            detail={"channel": message.channel, "external_id": message.external_id, "conversation_id": str(conversation_id)},
        )
    return Stored(inbound_id, message.tenant_id, conversation_id, "received", duplicate=False)


async def accept(db: Database, enqueue: Enqueue, message: NewMessage) -> Stored:
    """Store, then ring the doorbell. A duplicate is not queued again; a queue failure is left to the sweeper."""
    stored = await store(db, message)
    if not stored.duplicate:
        try:
            await asyncio.to_thread(enqueue, stored.tenant_id, stored.id)
        except Exception as exc:  # the row is safe; the sweeper re-queues it after worker.received_grace
            log.error("stored message %s but could not queue it (%s); the sweeper will retry", stored.id, type(exc).__name__)
    return stored


def dead_local_workers(heartbeats: list[tuple[str, str, int]]) -> list[str]:
    """Workers on this host whose process is gone: their claims can be taken over at once."""
    host = socket.gethostname()
    me = os.getpid()
    return [wid for wid, hostname, pid in heartbeats if hostname == host and pid != me and not psutil.pid_exists(pid)]


async def requeue_stuck(db: Database, enqueue: Enqueue, *, stale_after: float, received_grace: float) -> list[uuid.UUID]:
    """Put messages of dead or silent workers, and unqueued ones, back on the queue."""
    async with db.system() as session:
        beats = (await session.execute(select(WorkerHeartbeat.worker_id, WorkerHeartbeat.hostname, WorkerHeartbeat.pid))).all()
        dead = dead_local_workers([(b.worker_id, b.hostname, b.pid) for b in beats])
        rows = (
            await session.execute(
                text("select id, tenant_id from konstruct_requeue_stuck(:dead, :stale, :grace)"),
                {"dead": dead, "stale": timedelta(seconds=stale_after), "grace": timedelta(seconds=received_grace)},
            )
        ).all()
        if dead:
            await session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker_id.in_(dead)))
    for row in rows:
        await asyncio.to_thread(enqueue, row.tenant_id, row.id)
    if rows:
        log.warning("re-queued %d stuck message(s)", len(rows))
    return [row.id for row in rows]


async def live_workers(db: Database, *, within: float) -> int:
    """How many workers have sent a heartbeat in the last `within` seconds."""
    async with db.system() as session:
        count = await session.scalar(
            select(func.count()).select_from(WorkerHeartbeat).where(WorkerHeartbeat.seen_at > func.now() - timedelta(seconds=within))
        )
    return int(count or 0)
