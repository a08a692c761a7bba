"""A tenant's knowledge sources and ingest jobs as the CLI sees them: list, show, remove, queue a job, read its state.

The worker does the ingesting (konstruct.knowledge.ingest); here a job is only written, with what the worker needs
in its request, and read back. Every change is audited in the tenant's transaction.
"""

from __future__ import annotations

import base64
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, update

from konstruct import audit
from konstruct.db.engine import Database
from konstruct.db.models import Agent, KnowledgeChunk, KnowledgeJob, KnowledgeSource
from konstruct.errors import NotFoundError, ValidationError
from konstruct.knowledge.collect import Collection, add_file, batches, is_url
from konstruct.tenancy.tenants import TenantInfo, agent_not_found

FINISHED = ("done", "failed")


@dataclass(frozen=True)
class SourceInfo:
    id: uuid.UUID
    uri: str
    name: str
    kind: str
    agent_ids: tuple[uuid.UUID, ...]
    content_hash: str | None
    bytes: int
    chunks: int
    status: str
    error: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: KnowledgeSource) -> SourceInfo:
        return cls(row.id, row.uri, row.name, row.kind, tuple(row.agent_ids or ()), row.content_hash, row.bytes, row.chunks, row.status,
                   row.error, row.created_at, row.updated_at)  # fmt: skip

    @property
    def is_url(self) -> bool:
        return is_url(self.uri)

    def as_json(self) -> dict[str, Any]:
        return {"id": str(self.id), "uri": self.uri, "name": self.name, "kind": self.kind, "agent_ids": [str(a) for a in self.agent_ids],
                "content_hash": self.content_hash, "bytes": self.bytes, "chunks": self.chunks, "status": self.status, "error": self.error,
                "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat()}  # fmt: skip


@dataclass(frozen=True)
class JobInfo:
    id: uuid.UUID
    kind: str
    status: str
    total: int
    done: int
    results: list[dict[str, Any]]
    error: str | None
    created_by: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int = 0  # claims by a worker: more than 1 when a worker died and the sweeper re-queued it

    @classmethod
    def from_row(cls, row: KnowledgeJob) -> JobInfo:
        return cls(row.id, row.kind, row.status, row.total, row.done, list(row.results or []), row.error, row.created_by, row.created_at,
                   row.started_at, row.finished_at, row.attempts or 0)  # fmt: skip

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def counts(self) -> dict[str, int]:
        """How many items ended in each outcome (added, replaced, unchanged, removed, failed, skipped)."""
        found: dict[str, int] = {}
        for result in self.results:
            found[result["status"]] = found.get(result["status"], 0) + 1
        return found

    def as_json(self) -> dict[str, Any]:
        return {"id": str(self.id), "kind": self.kind, "status": self.status, "total": self.total, "done": self.done,
                "chunks": sum(int(r.get("chunks") or 0) for r in self.results if r["status"] in ("added", "replaced")),
                "counts": self.counts(), "results": self.results, "error": self.error, "attempts": self.attempts, "created_by": self.created_by,
                "created_at": self.created_at.isoformat(), "started_at": self.started_at.isoformat() if self.started_at else None,
                "finished_at": self.finished_at.isoformat() if self.finished_at else None}  # fmt: skip


async def agent_ids(db: Database, tenant: TenantInfo, names: Sequence[str]) -> list[str]:
    """The ids of the named agents of the tenant (none named: every agent, an empty list)."""
    if not names:
        return []
    async with db.tenant(tenant_id=tenant.id) as session:
        agents = {row.name: row.id for row in await session.execute(select(Agent.name, Agent.id))}
    for name in names:
        if name not in agents:
            raise agent_not_found(tenant, name, list(agents))
    return [str(agents[name]) for name in dict.fromkeys(names)]


async def list_sources(db: Database, tenant: TenantInfo) -> list[SourceInfo]:
    async with db.tenant(tenant_id=tenant.id) as session:
        rows = await session.scalars(select(KnowledgeSource).order_by(KnowledgeSource.name, KnowledgeSource.uri))
        return [SourceInfo.from_row(row) for row in rows]


async def get_source(db: Database, tenant: TenantInfo, ref: str) -> SourceInfo:
    """A source by id, uri (a path is made absolute) or name; NotFoundError naming `knowledge list`."""
    refs = [ref, ref if is_url(ref) else str(Path(ref).expanduser().resolve())]
    condition = or_(KnowledgeSource.uri.in_(refs), KnowledgeSource.name == ref)
    with contextlib.suppress(ValueError):
        condition = or_(condition, KnowledgeSource.id == uuid.UUID(ref))
    async with db.tenant(tenant_id=tenant.id) as session:
        rows = list(await session.scalars(select(KnowledgeSource).where(condition)))
    if not rows:
        raise NotFoundError(
            f"tenant {tenant.slug!r} has no knowledge source {ref!r}: see `konstruct knowledge list --tenant {tenant.slug}`"
        )
    if len(rows) > 1:
        raise ValidationError(
            f"{len(rows)} sources are named {ref!r}: give the uri or id (`konstruct knowledge list --tenant {tenant.slug}`)"
        )
    return SourceInfo.from_row(rows[0])


async def chunk_outline(db: Database, tenant: TenantInfo, source_id: uuid.UUID) -> list[dict[str, Any]]:
    """A source's chunks in order: ordinal, heading, size and how each starts (for `knowledge show`)."""
    async with db.tenant(tenant_id=tenant.id) as session:
        rows = await session.execute(
            select(KnowledgeChunk.ordinal, KnowledgeChunk.heading, KnowledgeChunk.content)
            .where(KnowledgeChunk.source_id == source_id)
            .order_by(KnowledgeChunk.ordinal)
        )
        return [{"ordinal": r.ordinal, "heading": r.heading, "characters": len(r.content), "preview": " ".join(r.content.split())[:60]}
                for r in rows]  # fmt: skip


async def remove_source(db: Database, tenant: TenantInfo, ref: str, *, actor: str) -> SourceInfo:
    """Delete a source and its chunks (audited)."""
    source = await get_source(db, tenant, ref)
    async with db.tenant(tenant_id=tenant.id) as session:
        await session.execute(delete(KnowledgeSource).where(KnowledgeSource.id == source.id))
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="knowledge.removed", target=source.uri,
                           detail={"name": source.name, "chunks": source.chunks})  # fmt: skip
    return source


async def create_job(
    db: Database, tenant: TenantInfo, kind: str, collection: Collection, *, actor: str, remove: Sequence[uuid.UUID] = ()
) -> JobInfo:
    """Queue-ready job row: the items (file bytes included), what was skipped, and for sync the sources to remove."""
    request = {"items": collection.items, "skipped": collection.skipped, "remove": [str(r) for r in remove]}
    # Nothing for a worker to do (every file skipped): the job is finished as it is written, so nobody waits for a worker.
    empty = {} if collection.items or remove else {"status": "done", "results": collection.skipped, "finished_at": func.now()}
    async with db.tenant(tenant_id=tenant.id) as session:
        row = await session.scalar(
            insert(KnowledgeJob).values(tenant_id=tenant.id, kind=kind, request=request, created_by=actor, **empty).returning(KnowledgeJob)
        )
        assert row is not None
        await audit.record(session, tenant_id=tenant.id, actor=actor, action=f"knowledge.{kind}.queued", target=str(row.id),
                           detail={"items": [i["uri"] for i in collection.items][:100], "count": len(collection.items),
                                   "skipped": len(collection.skipped), "remove": len(remove)})  # fmt: skip
        return JobInfo.from_row(row)


async def create_jobs(
    db: Database, tenant: TenantInfo, kind: str, collection: Collection, *, actor: str, remove: Sequence[uuid.UUID] = ()
) -> list[JobInfo]:
    """``create_job`` for a collection of any size: one job per ``MAX_JOB_BYTES`` of files (the skipped and removals in one)."""
    groups = batches(collection.items)
    return [await create_job(db, tenant, kind, Collection(items, collection.skipped if n == 0 else []), actor=actor,
                             remove=remove if n == len(groups) - 1 else ()) for n, items in enumerate(groups)]  # fmt: skip


async def fail_job(db: Database, tenant_id: uuid.UUID, job_id: uuid.UUID, error: str) -> None:
    """Mark a job that could not be queued (or run) as failed, with why."""
    async with db.tenant(tenant_id=tenant_id) as session:
        await session.execute(
            update(KnowledgeJob).where(KnowledgeJob.id == job_id).values(status="failed", error=error, finished_at=func.now())
        )


async def get_job(db: Database, tenant: TenantInfo, job_id: str | uuid.UUID) -> JobInfo:
    try:
        wanted = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(job_id)
    except ValueError:
        raise ValidationError(f"{job_id!r} is not a job id: see `konstruct knowledge jobs --tenant {tenant.slug}`") from None
    async with db.tenant(tenant_id=tenant.id) as session:
        row = await session.get(KnowledgeJob, wanted)
        if row is None:
            raise NotFoundError(
                f"tenant {tenant.slug!r} has no knowledge job {job_id}: see `konstruct knowledge jobs --tenant {tenant.slug}`"
            )
        return JobInfo.from_row(row)


async def list_jobs(db: Database, tenant: TenantInfo, *, limit: int = 20) -> list[JobInfo]:
    """The newest jobs first (the request, with its file bytes, is not loaded)."""
    async with db.tenant(tenant_id=tenant.id) as session:
        rows = await session.scalars(select(KnowledgeJob).order_by(KnowledgeJob.created_at.desc()).limit(limit))
        return [JobInfo.from_row(row) for row in rows]


def sync_collection(sources: Sequence[SourceInfo]) -> tuple[Collection, list[uuid.UUID]]:
    """Every source read again: files from this machine (a missing one is to be removed), URLs for the worker to fetch."""
    found = Collection()
    gone: list[uuid.UUID] = []
    files = [s for s in sources if not s.is_url]
    if len(files) > 1 and not any(Path(s.uri).exists() for s in files):
        raise ValidationError(f"none of the {len(files)} files of this tenant's knowledge exists here: run sync where they were added")
    for source in sources:
        agents = [str(a) for a in source.agent_ids]
        if source.is_url:
            found.items.append({"uri": source.uri, "url": source.uri, "agent_ids": agents, "sync": True})
        elif Path(source.uri).is_file():
            add_file(found, Path(source.uri), source.name, agents)
        else:
            gone.append(source.id)
    return found, gone


def decode_data(item: dict[str, Any]) -> bytes:
    """A file item's bytes."""
    return base64.b64decode(item["data"])
