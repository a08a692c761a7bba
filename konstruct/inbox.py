"""The inbox: store, then (or with) queue. The database row is the truth; the queue only a doorbell."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy import delete, func, select, text

from konstruct.db.batches import Batches, per_database
from konstruct.db.engine import Database
from konstruct.db.models import InboundMessage, WorkerHeartbeat
from konstruct.messaging import InboundMessage as NewMessage
from konstruct.messaging import Routing

log = logging.getLogger(__name__)

Enqueue = Callable[[uuid.UUID, uuid.UUID], None]


class Doorbell(Protocol):
    """The queue as the inbox needs it (konstruct.worker.queue.Queue)."""

    @property
    def tracked(self) -> bool: ...

    def enqueue(self, tenant_id: uuid.UUID, inbound_id: uuid.UUID, *, suspect: bool = False) -> None: ...

    def outbox(self, tenant_id: uuid.UUID, inbound_id: uuid.UUID, *, suspect: bool = False) -> OutboxTask | None: ...


@dataclass(frozen=True)
class OutboxTask:
    """A queue entry written in the same transaction as the inbox row (huey's Postgres storage)."""

    table: str
    queue: str
    data: bytes
    notify_channel: str


@dataclass(frozen=True)
class Stored:
    id: uuid.UUID
    tenant_id: uuid.UUID
    conversation_id: uuid.UUID
    status: str
    duplicate: bool
    queued: bool = False


# One statement per message: pick the agent, upsert the conversation, insert the inbox row (once), its history row
# and audit event, and (with the Postgres queue) the queue entry. Positional parameters (asyncpg's own protocol):
# $1 id, $2 tenant, $3 agent, $4 connection, $5 external channel, $6 may start, $7 channel, $8 conversation key,
# $9 external id, $10 sender, $11 text, $12 payload, $13 actor, $14 status[, $15 queue, $16 task, $17 notify channel].
_STORE = """
WITH existing AS (
    SELECT agent_id FROM conversations
    WHERE channel = $7 AND external_id = $8 AND ($3::uuid IS NULL OR agent_id = $3::uuid)
    ORDER BY created_at LIMIT 1
), chosen AS (
    SELECT coalesce(
        $3::uuid,
        (SELECT agent_id FROM existing),
        CASE WHEN $6::boolean THEN coalesce(
            (SELECT agent_id FROM channel_routes WHERE connection_id = $4::uuid AND external_channel = $5::text),
            (SELECT default_agent_id FROM channel_connections WHERE id = $4::uuid),
            (SELECT id FROM agents ORDER BY created_at, id LIMIT 1)
        ) END
    ) AS agent_id
), conv AS (
    INSERT INTO conversations (tenant_id, agent_id, channel, external_id, person)
    SELECT $2::uuid, agent_id, $7::text, $8::text, $10::text FROM chosen WHERE agent_id IS NOT NULL
    ON CONFLICT (tenant_id, channel, external_id, agent_id) DO UPDATE SET last_message_at = now()
    RETURNING id
), inb AS (
    INSERT INTO inbound_messages (id, tenant_id, conversation_id, channel, external_id, sender, text, payload, status)
    SELECT $1::uuid, $2::uuid, conv.id, $7::text, $9::text, $10::text, $11::text, $12::jsonb, $14::text
    FROM conv
    ON CONFLICT (tenant_id, channel, external_id) DO NOTHING
    RETURNING id, conversation_id
), hist AS (
    INSERT INTO messages (tenant_id, conversation_id, inbound_id, direction, author, text, status)
    SELECT $2::uuid, conversation_id, id, 'in', $10::text, $11::text, 'received' FROM inb
), aud AS (
    INSERT INTO audit_events (tenant_id, actor, action, target, detail)
    SELECT $2::uuid, $13::text, 'message.received', id::text,
           jsonb_build_object('channel', $7::text, 'external_id', $9::text, 'conversation_id', conversation_id::text)
    FROM inb
){queue_insert}
SELECT 1
"""
_QUEUE_INSERT = (
    ", queued AS (INSERT INTO {table} (queue, data, priority, inbound_id) SELECT $15::text, $16::bytea, 0, inb.id FROM inb "
    "WHERE $14::text = 'received' RETURNING pg_notify($17::text, ''))"
)
# What the batch's statements left: the rows stored now (by the ids given), then, for each message not among them, the
# row stored before (a redelivery) if any. Planned for each batch (plan_cache_mode): the prepared statement's generic
# plan, made from the statistics of a table that was small when the gateway started, ANDed in a bitmap of the tenant's
# index and read every row of the tenant (the look-up grew to 0.5-1 ms a message at 14,000 rows).
# The ids travel as text[]: asyncpg has no built-in codec for uuid[] and looks the type up on each new connection
# first (three round trips and a catalog query, ~6 ms inside the transaction), which every `chat --message` paid.
_STORED_NOW = "SELECT id, conversation_id, status FROM inbound_messages WHERE id = ANY($1::text[]::uuid[])"
_STORED_BEFORE = "SELECT id, conversation_id, status FROM inbound_messages WHERE channel = $1 AND external_id = $2"
_statements: dict[str | None, str] = {}


def _store_statement(queue_table: str | None) -> str:
    statement = _statements.get(queue_table)
    if statement is None:
        queue_insert = _QUEUE_INSERT.format(table=queue_table) if queue_table else ""
        statement = _statements[queue_table] = _STORE.format(queue_insert=queue_insert)
    return statement


@dataclass(frozen=True)
class _Message:
    """A message handed to the writer: what to store, and under which id."""

    message: NewMessage
    outbox: OutboxTask | None
    inbound_id: uuid.UUID

    def arguments(self) -> tuple[Any, ...]:
        message, routing = self.message, self.message.routing
        args: tuple[Any, ...] = (
            self.inbound_id, message.tenant_id, message.agent_id, routing.connection_id if routing else None,
            routing.external_channel if routing else None, routing.may_start if routing else True, message.channel,
            message.conversation_key, message.external_id, message.sender, message.text, json.dumps(message.payload),
            f"{message.channel}:{message.sender}", "received" if message.answer else "ignored",
        )  # fmt: skip
        if self.outbox:
            args += (self.outbox.queue, self.outbox.data, self.outbox.notify_channel)
        return args


class GroupCommit:
    """The inbox's writer in one process (konstruct.db.batches): messages that arrive while a write is in flight are
    stored together, one transaction per tenant and one round trip for all of its statements, and each caller gets its
    answer only once that transaction has committed."""

    MAX_ROWS = 200  # per transaction: bounds what one failure retries and how long the others wait

    def __init__(self, db: Database) -> None:
        self.db = db
        self._batches: Batches[_Message, Stored | None] = Batches(
            self.write, key=lambda m: (m.message.tenant_id, m.outbox.table if m.outbox else None), max_items=self.MAX_ROWS, what="messages"
        )

    async def store(self, message: NewMessage, outbox: OutboxTask | None, inbound_id: uuid.UUID) -> Stored | None:
        return await self._batches.submit(_Message(message, outbox, inbound_id))

    async def write(self, group: list[_Message]) -> list[Stored | None]:
        """Store one tenant's messages in one transaction (RLS for that tenant): what became of each, in order."""
        first = group[0]
        tenant_id = first.message.tenant_id
        async with self.db.tenant_driver(tenant_id=tenant_id) as conn:
            await conn.executemany(_store_statement(first.outbox.table if first.outbox else None), [w.arguments() for w in group])
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")  # the look-ups' plans from today's statistics
            now = {row["id"]: row for row in await conn.fetch(_STORED_NOW, [str(w.inbound_id) for w in group])}
            rows = [now.get(w.inbound_id) or await conn.fetchrow(_STORED_BEFORE, w.message.channel, w.message.external_id) for w in group]
        results: list[Stored | None] = []
        for waiting, row in zip(group, rows, strict=True):
            if row is None:  # no agent to answer it (or a thread the agent is not part of): nothing stored
                results.append(None)
                continue
            new = row["id"] == waiting.inbound_id
            queued = new and waiting.outbox is not None and row["status"] == "received"
            results.append(Stored(row["id"], tenant_id, row["conversation_id"], row["status"], duplicate=not new, queued=queued))
        return results


writer = per_database(GroupCommit)  # writer(db): the group-commit writer of this database's connections


async def store(db: Database, message: NewMessage, outbox: OutboxTask | None = None, inbound_id: uuid.UUID | None = None) -> Stored | None:
    """Store an inbound message once (unique per tenant, channel and external id) with its history row, committed
    (with other messages arriving at the same time: see GroupCommit) before this returns.

    None when nobody should answer it (no agent, or a thread the agent is not part of).
    """
    return await writer(db).store(message, outbox, inbound_id or uuid.uuid4())


async def accept(db: Database, queue: Doorbell, message: NewMessage) -> Stored | None:
    """Store, and ring the doorbell: in the same transaction when the queue lives in the database,
    else right after (a failure there is left to the sweeper). A duplicate is not queued again."""
    inbound_id = uuid.uuid4()
    outbox = queue.outbox(message.tenant_id, inbound_id)
    stored = await store(db, message, outbox, inbound_id)
    if stored is not None and stored.status == "received" and not stored.duplicate and not stored.queued:
        try:
            await asyncio.to_thread(queue.enqueue, stored.tenant_id, stored.id)
        except Exception as exc:  # the row is safe; the sweeper re-queues it after worker.received_grace
            log.error("stored message %s but could not queue it (%s); the sweeper will retry", stored.id, type(exc).__name__)
    return stored


async def warm(db: Database, queue: Doorbell, connections: int) -> None:
    """Run the store statement as a no-op (an unknown tenant, no agent, may not start) on as many pooled
    connections, so each has it parsed and planned before the first webhook waits on it."""
    nobody = uuid.uuid4()
    message = NewMessage(nobody, None, "warm-up", "warm-up", "warm-up", "warm-up", "", routing=Routing(nobody, "", may_start=False))
    group_commit = writer(db)
    await asyncio.gather(*(group_commit.write([_Message(message, queue.outbox(nobody, nobody), nobody)]) for _ in range(connections)))


def dead_local_workers(heartbeats: list[tuple[str, str, int]]) -> list[str]:
    """Workers on this host whose process is gone: their claims can be taken over at once."""
    import psutil  # here: only the worker's sweep needs it, and `chat` and the gateway import this module too

    host = socket.gethostname()
    me = os.getpid()
    return [wid for wid, hostname, pid in heartbeats if hostname == host and pid != me and not psutil.pid_exists(pid)]


TRACKED_GRACE = 2.0  # seconds: a tracked row older than this with no queue entry lost its doorbell


async def requeue_stuck(db: Database, queue: Doorbell, *, stale_after: float, received_grace: float) -> list[uuid.UUID]:
    """Put messages of dead or silent workers (on the suspect lane) and messages whose doorbell was lost back on the queue.

    With huey's Postgres storage the new queue entries are written in the same transaction, tagged with their
    inbox row, so a row that is still queued is never queued twice (a backlog does not grow by itself)."""
    tracked = queue.tracked
    async with db.system() as session:
        beats = (await session.execute(select(WorkerHeartbeat.worker_id, WorkerHeartbeat.hostname, WorkerHeartbeat.pid))).all()
        dead = dead_local_workers([(b.worker_id, b.hostname, b.pid) for b in beats])
        grace = min(received_grace, TRACKED_GRACE) if tracked else received_grace
        rows = (
            await session.execute(
                text("select id, tenant_id, suspect from konstruct_requeue_stuck(:dead, :stale, :grace, :tracked)"),
                {"dead": dead, "stale": timedelta(seconds=stale_after), "grace": timedelta(seconds=grace), "tracked": tracked},
            )
        ).all()
        if dead:
            await session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker_id.in_(dead)))
        if tracked and rows:
            await _ring(session, queue, [(row.tenant_id, row.id, row.suspect) for row in rows])
    if not tracked:
        for row in rows:
            await asyncio.to_thread(queue.enqueue, row.tenant_id, row.id, suspect=row.suspect)
    if rows:
        suspects = sum(1 for row in rows if row.suspect)
        log.warning("re-queued %d stuck message(s), %d of them to be answered alone", len(rows), suspects)
    return [row.id for row in rows]


async def ring_again(db: Database, queue: Doorbell, tenant_id: uuid.UUID, inbound_id: uuid.UUID, *, suspect: bool) -> None:
    """Ring the doorbell for a stored row once more (tagged with the row, when the queue lives in the database)."""
    if queue.tracked:
        async with db.system() as session:
            await _ring(session, queue, [(tenant_id, inbound_id, suspect)])
    else:
        await asyncio.to_thread(queue.enqueue, tenant_id, inbound_id, suspect=suspect)


async def _ring(session: Any, queue: Doorbell, rows: list[tuple[uuid.UUID, uuid.UUID, bool]]) -> None:
    entries = [queue.outbox(tenant_id, inbound_id, suspect=suspect) for tenant_id, inbound_id, suspect in rows]
    first = entries[0]
    assert first is not None
    await session.execute(
        text(f"INSERT INTO {first.table} (queue, data, priority, inbound_id) VALUES (:queue, :data, 0, :inbound_id)"),
        [{"queue": e.queue, "data": e.data, "inbound_id": inbound_id} for e, (_, inbound_id, _) in zip(entries, rows, strict=True) if e],
    )
    await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": first.notify_channel})


async def live_workers(db: Database, *, within: float) -> int:
    """How many workers have sent a heartbeat in the last `within` seconds."""
    async with db.system() as session:
        count = await session.scalar(
            select(func.count()).select_from(WorkerHeartbeat).where(WorkerHeartbeat.seen_at > func.now() - timedelta(seconds=within))
        )
    return int(count or 0)


# A message for an existing conversation that is not the person's (a human's reply from the desk): the inbox row and
# its queue entry, no history row (the worker writes what is delivered), unique on channel + external id as any other.
_STORE_FOR = """
WITH inb AS (
    INSERT INTO inbound_messages (id, tenant_id, conversation_id, channel, external_id, sender, text, payload, status)
    SELECT CAST(:id AS uuid), CAST(:tenant AS uuid), c.id, :channel, :external_id, :sender, :text, CAST(:payload AS jsonb), 'received'
    FROM conversations c WHERE c.id = CAST(:conversation AS uuid)
    ON CONFLICT (tenant_id, channel, external_id) DO NOTHING
    RETURNING id, conversation_id
), aud AS (
    INSERT INTO audit_events (tenant_id, actor, action, target, detail)
    SELECT CAST(:tenant AS uuid), :sender, 'message.received', id::text,
           jsonb_build_object('channel', :channel, 'external_id', :external_id, 'conversation_id', conversation_id::text)
    FROM inb
), queued AS (
    {queue_insert}
)
SELECT (SELECT id FROM inb) AS inbound_id, (SELECT count(*) FROM queued) AS queued
"""
_QUEUE_INSERT_FOR = (
    "INSERT INTO {table} (queue, data, priority, inbound_id) SELECT :queue, :task, 0, inb.id FROM inb RETURNING pg_notify(:notify, '')"
)
_NO_QUEUE = "SELECT 1 WHERE false"


async def accept_for(
    db: Database, queue: Doorbell, *, tenant_id: uuid.UUID, conversation_id: uuid.UUID, channel: str, external_id: str, sender: str,
    text_: str, payload: dict[str, Any],
) -> Stored:  # fmt: skip
    """Store a message for an existing conversation once and ring the doorbell (see _STORE_FOR): a redelivery (the same
    channel and external id) is found, not stored or queued again."""
    inbound_id = uuid.uuid4()
    outbox = queue.outbox(tenant_id, inbound_id)
    statement = text(_STORE_FOR.format(queue_insert=_QUEUE_INSERT_FOR.format(table=outbox.table) if outbox else _NO_QUEUE))
    params: dict[str, Any] = {"id": str(inbound_id), "tenant": str(tenant_id), "conversation": str(conversation_id), "channel": channel,
                              "external_id": external_id, "sender": sender, "text": text_, "payload": json.dumps(payload)}  # fmt: skip
    if outbox:
        params.update(queue=outbox.queue, task=outbox.data, notify=outbox.notify_channel)
    async with db.tenant(tenant_id=tenant_id) as session:
        row = (await session.execute(statement, params)).one()
        if row.inbound_id is None:
            existing = (await session.execute(select(InboundMessage.id, InboundMessage.status).where(
                InboundMessage.channel == channel, InboundMessage.external_id == external_id))).one()  # fmt: skip
            return Stored(existing.id, tenant_id, conversation_id, existing.status, duplicate=True)
    if not row.queued:
        try:
            await asyncio.to_thread(queue.enqueue, tenant_id, row.inbound_id)
        except Exception as exc:
            log.error("stored message %s but could not queue it (%s); the sweeper will retry", row.inbound_id, type(exc).__name__)
    return Stored(row.inbound_id, tenant_id, conversation_id, "received", duplicate=False, queued=bool(row.queued))
