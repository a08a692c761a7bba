"""The sweeper's part for knowledge jobs: a job whose worker died, or whose doorbell was lost, goes back on the queue.

The rule is the inbox's (konstruct.inbox.requeue_stuck): a `running` job whose worker's process is gone (same host),
whose worker's heartbeat is older than `worker.stale_after`, or whose own `heartbeat_at` is, returns to `queued` and
is rung again; a `queued` job older than `worker.received_grace` is rung again, at most once per grace (the task may
have been dropped, or the queue was down). A job claimed `worker.max_attempts` times whose worker died once more is
failed ("gave up after N attempts ..."), so a document that kills its worker cannot loop forever.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from sqlalchemy import select, text

from konstruct import audit, inbox
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import WorkerHeartbeat

log = logging.getLogger("konstruct.knowledge")


class KnowledgeDoorbell(Protocol):
    """The queue as this sweep needs it (konstruct.worker.queue.Queue)."""

    def enqueue_knowledge(self, tenant_id: uuid.UUID, job_id: uuid.UUID) -> None: ...


@dataclass(frozen=True)
class Swept:
    requeued: list[uuid.UUID]
    failed: list[uuid.UUID]


async def requeue_stuck(db: Database, queue: KnowledgeDoorbell, settings: Settings) -> Swept:
    """Re-queue the knowledge jobs of dead workers and those whose doorbell was lost; fail those out of attempts."""
    worker = settings.worker
    async with db.system() as session:
        beats = (await session.execute(select(WorkerHeartbeat.worker_id, WorkerHeartbeat.hostname, WorkerHeartbeat.pid))).all()
        dead = inbox.dead_local_workers([(b.worker_id, b.hostname, b.pid) for b in beats])
        rows = (
            await session.execute(
                text("select id, tenant_id, status from konstruct_requeue_knowledge(:dead, :stale, :grace, :attempts)"),
                {"dead": dead, "stale": timedelta(seconds=worker.stale_after), "grace": timedelta(seconds=worker.received_grace),
                 "attempts": worker.max_attempts},
            )
        ).all()  # fmt: skip
    swept = Swept([r.id for r in rows if r.status == "queued"], [r.id for r in rows if r.status == "failed"])
    for row in rows:
        if row.status == "failed":
            await _gave_up(db, row.tenant_id, row.id)
        else:
            await _ring(queue, row.tenant_id, row.id)
    if swept.requeued or swept.failed:
        log.warning("knowledge jobs: re-queued %d, gave up on %d whose worker kept dying", len(swept.requeued), len(swept.failed))
    return swept


async def _ring(queue: KnowledgeDoorbell, tenant_id: uuid.UUID, job_id: uuid.UUID) -> None:
    try:
        await asyncio.to_thread(queue.enqueue_knowledge, tenant_id, job_id)
    except Exception as exc:  # still queued in the database: the next sweep after the grace rings again
        log.error("knowledge job %s: could not queue it again (%s); the sweeper will retry", job_id, type(exc).__name__)


async def _gave_up(db: Database, tenant_id: uuid.UUID, job_id: uuid.UUID) -> None:
    async with db.tenant(tenant_id=tenant_id) as session:
        await audit.record(session, tenant_id=tenant_id, actor="worker", action="knowledge.gave_up", target=str(job_id),
                           detail={"why": "its worker died on every attempt"})  # fmt: skip
