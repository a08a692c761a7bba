"""The worker's side of a knowledge job: read each item (file bytes from the request, URLs through web_fetch's guarded
fetcher), extract its text, split it, embed the chunks in batches, and store each source in one transaction.

Idempotent by content: a source whose extracted text has the same sha256 as stored is left alone (only its agents
follow the request); a changed one has its chunks replaced in one transaction; an item that fails is reported with
why, and nothing of it is stored (a source that was good before keeps its last good chunks). Progress (``done`` of
``total`` chunks embedded) is written to the job row as it goes, so `knowledge add` can show a bar.

Crash-safe like the inbox: the claim records the worker (``worker_id``) and ``heartbeat_at``, refreshed with every
progress update and every ``worker.heartbeat_interval`` while a fetch or an embedding runs; konstruct.knowledge.recovery
(the sweeper) puts a job whose worker died back on the queue. Each item's outcome is saved in ``results`` as soon as it is
known, so a re-run skips what the killed run finished and reports every item once (a source stored before the kill
keeps its "added"); what it had not finished is done again, which is safe since each source is stored in one
transaction and an unchanged one is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from konstruct import audit
from konstruct.agent.embedding import BATCH_SIZE, embedder
from konstruct.agent.tools import web
from konstruct.agent.tools.registry import ToolContext, ToolError
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import KnowledgeChunk, KnowledgeJob, KnowledgeSource, Tenant
from konstruct.errors import KonstructError
from konstruct.knowledge import chunk as chunking
from konstruct.knowledge.collect import MAX_FILE_BYTES, collect
from konstruct.knowledge.extract import ExtractError, extract, kind_for
from konstruct.knowledge.sources import decode_data

log = logging.getLogger("konstruct.knowledge")
EMBED_BATCH = BATCH_SIZE * 4  # chunks per embedding call (and per progress update)
GONE = (404, 410)  # a URL answering this during sync has disappeared: its source is removed
STORED = ("added", "replaced")  # outcomes whose chunks count towards a job's progress


@dataclass
class Prepared:
    """An item read and split, ready to embed and store."""

    uri: str
    name: str
    kind: str
    size: int
    content_hash: str
    chunks: list[chunking.Chunk]
    agent_ids: list[uuid.UUID]
    vectors: list[list[float]] = field(default_factory=list)


class Gone(KonstructError):
    """A URL that answered 404 or 410 (during sync: the page was removed)."""


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prepare_bytes(uri: str, name: str, kind: str, data: bytes, agent_ids: Sequence[uuid.UUID], charset: str | None = None) -> Prepared:
    """Extract and split one document; ExtractError when it has no readable text."""
    document = extract(kind, data, charset)
    return Prepared(uri, name, kind, len(data), content_hash(document.text), chunking.split(kind, document.text), list(agent_ids))


async def fetch_item(url: str, ctx: ToolContext) -> tuple[bytes, str, str | None, str]:
    """(body, kind, charset, name) of a URL fetched under web_fetch's rules, with ingest's larger size limit."""
    page = await web.fetch(url, ctx, max_bytes=MAX_FILE_BYTES)
    if page.status in GONE:
        raise Gone(f"the page is gone (HTTP {page.status})")
    if not 200 <= page.status < 300:
        raise ExtractError(f"the server answered HTTP {page.status}")
    if page.truncated:
        raise ExtractError(f"larger than {MAX_FILE_BYTES // 1_000_000} MB")
    kind = kind_for(page.url, page.content_type)
    if kind is None:
        raise ExtractError(f"its content type {page.content_type or '(none)'!r} is not one Konstruct reads (HTML, Markdown, text, PDF)")
    return page.body, kind, page.charset, page.url


def fetch_context(settings: Settings, tenant_id: uuid.UUID, allowed_hosts: Sequence[str]) -> ToolContext:
    """web_fetch's rules for this tenant ([agent] web_fetch_* and the tenant's allowed hosts); no agent or conversation."""
    agent = settings.agent
    return ToolContext(
        tenant_id, uuid.UUID(int=0), uuid.UUID(int=0), "knowledge-ingest", tuple(allowed_hosts), allow_private=agent.web_fetch_private,
        private_networks=tuple(agent.web_fetch_private_networks), web_seconds=agent.web_fetch_seconds, ca_file=agent.web_fetch_ca_file,
    )  # fmt: skip


async def prepare_item(item: dict[str, Any], ctx: ToolContext) -> Prepared:
    """One request item read and split (a URL fetched first); ExtractError, Gone or ToolError when it cannot be."""
    agents = [uuid.UUID(a) for a in item.get("agent_ids") or []]
    if "url" not in item:
        return prepare_bytes(item["uri"], item["name"], item["kind"], decode_data(item), agents)
    body, kind, charset, final_url = await fetch_item(item["url"], ctx)
    prepared = prepare_bytes(item["uri"], item["uri"], kind, body, agents, charset)
    title = extract(kind, body, charset).title if kind in ("html", "pdf") else None
    prepared.name = (title or final_url)[:512]
    return prepared


# -- the job ------------------------------------------------------------------------------------------------------


class Job:
    """One knowledge job run by the worker: its rows are read and written in the tenant's transactions."""

    def __init__(self, db: Database, settings: Settings, tenant_id: uuid.UUID, job_id: uuid.UUID, worker_id: str = "worker") -> None:
        self.db, self.settings, self.tenant_id, self.job_id, self.worker_id = db, settings, tenant_id, job_id, worker_id
        self.results: list[dict[str, Any]] = []
        self.actor = "worker"
        self._saved = 0.0  # when the outcomes were last written to the job row (time.monotonic)

    async def run(self) -> str:
        """Run the job once (a job no longer queued is left alone); its final status."""
        request = await self._claim()
        if request is None:
            return "skipped"
        beating = asyncio.ensure_future(self._heartbeat_loop())
        try:
            await self._run(request)
        except Exception as exc:
            log.exception("knowledge job %s failed", self.job_id)
            await self._finish("failed", f"{type(exc).__name__}: {exc}")
            return "failed"
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
        await self._finish("done", None)
        return "done"

    async def _claim(self) -> dict[str, Any] | None:
        """Exactly-once: only a queued job is taken; the claim names this worker and counts an attempt."""
        async with self.db.tenant(tenant_id=self.tenant_id) as session:
            job = (
                await session.execute(
                    update(KnowledgeJob)
                    .where(KnowledgeJob.id == self.job_id, KnowledgeJob.status == "queued")
                    .values(status="running", started_at=func.coalesce(KnowledgeJob.started_at, func.now()), worker_id=self.worker_id,
                            heartbeat_at=func.now(), attempts=KnowledgeJob.attempts + 1)
                    .returning(KnowledgeJob.request, KnowledgeJob.created_by, KnowledgeJob.results)
                )
            ).first()  # fmt: skip
        if job is None:
            return None
        self.actor = job.created_by or "worker"
        self.results = list(job.results or [])  # what an earlier, killed run of this job finished
        return dict(job.request)

    async def _heartbeat_loop(self) -> None:
        """Keep the claim fresh while a long fetch or embedding runs (the sweeper takes a stale one back)."""
        while True:
            await asyncio.sleep(self.settings.worker.heartbeat_interval)
            try:
                await self._progress()
            except Exception as exc:
                log.warning("knowledge job %s: heartbeat failed: %s", self.job_id, type(exc).__name__)

    async def _run(self, request: dict[str, Any]) -> None:
        handled = {r["uri"] for r in self.results}
        if not self.results:
            self.results = list(request.get("skipped") or [])
        base = sum(int(r.get("chunks") or 0) for r in self.results if r["status"] in STORED)
        async with self.db.tenant(tenant_id=self.tenant_id) as session:
            hosts = await session.scalar(select(Tenant.allowed_hosts).where(Tenant.id == self.tenant_id))
            stored = {row.uri: row for row in await session.scalars(select(KnowledgeSource))}
        ctx = fetch_context(self.settings, self.tenant_id, list(hosts or []))
        ready = []
        for item in request.get("items") or []:
            if item["uri"] not in handled and (prepared := await self._read(item, ctx, stored)) is not None:
                ready.append(prepared)
            await self._checkpoint()
        await self._progress(total=base + sum(len(p.chunks) for p in ready), done=base)
        done = base
        for prepared in ready:
            done = await self._embed_and_store(prepared, stored.get(prepared.uri), done)
        for source_id in request.get("remove") or []:
            await self._remove(uuid.UUID(source_id), "removed: it no longer exists")

    async def _read(self, item: dict[str, Any], ctx: ToolContext, stored: dict[str, KnowledgeSource]) -> Prepared | None:
        """The item prepared when it needs storing; None when it is unchanged or failed (its result recorded)."""
        uri, name = item["uri"], item.get("name") or item["uri"]
        try:
            prepared = await prepare_item(item, ctx)
        except Gone as exc:
            if item.get("sync") and uri in stored:
                await self._remove(stored[uri].id, f"removed: {exc}")
            else:
                await self._failed(uri, name, item.get("kind") or "html", str(exc), stored.get(uri))
            return None
        except (ExtractError, ToolError) as exc:
            await self._failed(uri, name, item.get("kind") or "html", str(exc), stored.get(uri))
            return None
        existing = stored.get(uri)
        if existing is not None and existing.content_hash == prepared.content_hash and existing.status == "ready":
            await self._unchanged(existing, prepared)
            return None
        if not prepared.chunks:
            await self._failed(uri, prepared.name, prepared.kind, "no text found in it", existing)
            return None
        return prepared

    async def _embed_and_store(self, prepared: Prepared, existing: KnowledgeSource | None, done: int) -> int:
        texts = [chunking.embedding_text(c.heading, c.content) for c in prepared.chunks]
        try:
            for start in range(0, len(texts), EMBED_BATCH):
                prepared.vectors += (await embedder().aembed(texts[start : start + EMBED_BATCH])).tolist()
                await self._progress(done=done + len(prepared.vectors))
            await store(self.db, self.tenant_id, prepared, actor=self.actor)
        except Exception as exc:  # nothing of it was stored: the transaction rolled back
            log.warning("knowledge %s: %s: %s", prepared.uri, type(exc).__name__, exc)
            await self._failed(prepared.uri, prepared.name, prepared.kind, f"could not be stored: {type(exc).__name__}: {exc}", existing)
            await self._progress()
            return done + len(texts)
        self._result(prepared.uri, prepared.name, "replaced" if existing is not None and existing.status == "ready" else "added",
                     chunks=len(prepared.chunks))  # fmt: skip
        await self._progress()  # its outcome saved: a re-run after a crash does not store or report it again
        return done + len(texts)

    def _result(self, uri: str, name: str, status: str, *, chunks: int = 0, error: str | None = None) -> None:
        self.results.append({"uri": uri, "name": name, "status": status, "chunks": chunks, "error": error})

    async def _unchanged(self, existing: KnowledgeSource, prepared: Prepared) -> None:
        if sorted(existing.agent_ids or []) != sorted(prepared.agent_ids):
            async with self.db.tenant(tenant_id=self.tenant_id) as session:
                await session.execute(update(KnowledgeSource).where(KnowledgeSource.id == existing.id)
                                      .values(agent_ids=prepared.agent_ids, updated_at=func.now()))  # fmt: skip
                await audit.record(session, tenant_id=self.tenant_id, actor=self.actor, action="knowledge.agents_changed",
                                   target=existing.uri, detail={"agent_ids": [str(a) for a in prepared.agent_ids]})  # fmt: skip
        self._result(existing.uri, existing.name, "unchanged", chunks=existing.chunks)

    async def _failed(self, uri: str, name: str, kind: str, error: str, existing: KnowledgeSource | None) -> None:
        """Record a failure: a new source as a failed row without chunks, a stored one keeps its last good chunks."""
        self._result(uri, name, "failed", error=error)
        async with self.db.tenant(tenant_id=self.tenant_id) as session:
            if existing is not None:
                await session.execute(update(KnowledgeSource).where(KnowledgeSource.id == existing.id)
                                      .values(status="failed", error=error[:2000], updated_at=func.now()))  # fmt: skip
            else:
                await session.execute(insert(KnowledgeSource).values(tenant_id=self.tenant_id, uri=uri[:2048], name=name[:512] or uri[:512],
                                                                     kind=kind, status="failed", error=error[:2000]))  # fmt: skip
            await audit.record(
                session, tenant_id=self.tenant_id, actor=self.actor, action="knowledge.failed", target=uri, detail={"error": error}
            )

    async def _remove(self, source_id: uuid.UUID, why: str) -> None:
        async with self.db.tenant(tenant_id=self.tenant_id) as session:
            row = await session.scalar(delete(KnowledgeSource).where(KnowledgeSource.id == source_id).returning(KnowledgeSource))
            if row is None:
                return
            await audit.record(session, tenant_id=self.tenant_id, actor=self.actor, action="knowledge.removed", target=row.uri,
                               detail={"name": row.name, "chunks": row.chunks, "by": "sync"})  # fmt: skip
        self._result(row.uri, row.name, "removed", chunks=row.chunks, error=why)

    def _mine(self) -> Any:
        """The job row while this worker's claim holds (a claim the sweeper took back is another run's now)."""
        return update(KnowledgeJob).where(KnowledgeJob.id == self.job_id, KnowledgeJob.status == "running",
                                          KnowledgeJob.worker_id == self.worker_id)  # fmt: skip

    async def _checkpoint(self) -> None:
        """The outcomes so far saved, at most once a second (what a crash loses is read again, harmlessly)."""
        if time.monotonic() - self._saved >= 1.0:
            await self._progress()

    async def _progress(self, **values: int) -> None:
        """Progress, the outcomes so far and the claim's heartbeat, in one update."""
        async with self.db.tenant(tenant_id=self.tenant_id) as session:
            await session.execute(self._mine().values(results=self.results, heartbeat_at=func.now(), **values))
        self._saved = time.monotonic()

    async def _finish(self, status: str, error: str | None) -> None:
        async with self.db.tenant(tenant_id=self.tenant_id) as session:
            await session.execute(self._mine().values(status=status, error=error, results=self.results, finished_at=func.now()))


async def run_job(db: Database, settings: Settings, tenant_id: uuid.UUID, job_id: uuid.UUID, worker_id: str = "worker") -> str:
    """Run one queued knowledge job (the worker's task); 'done', 'failed', or 'skipped' when it is not queued."""
    return await Job(db, settings, tenant_id, job_id, worker_id).run()


async def store(db: Database, tenant_id: uuid.UUID, prepared: Prepared, *, actor: str) -> uuid.UUID:
    """Insert or update the source and replace all its chunks, in ONE transaction (audited); the source's id."""
    values = {"name": prepared.name[:512], "kind": prepared.kind, "agent_ids": prepared.agent_ids, "content_hash": prepared.content_hash,
              "bytes": prepared.size, "chunks": len(prepared.chunks), "status": "ready", "error": None}  # fmt: skip
    async with db.tenant(tenant_id=tenant_id) as session:
        source_id = await session.scalar(
            pg_insert(KnowledgeSource).values(tenant_id=tenant_id, uri=prepared.uri[:2048], **values)
            .on_conflict_do_update(index_elements=["tenant_id", "uri"], set_={**values, "updated_at": func.now()})
            .returning(KnowledgeSource.id)
        )  # fmt: skip
        assert source_id is not None
        await session.execute(delete(KnowledgeChunk).where(KnowledgeChunk.source_id == source_id))
        rows = [{"tenant_id": tenant_id, "source_id": source_id, "ordinal": n, "heading": c.heading, "content": c.content, "embedding": v}
                for n, (c, v) in enumerate(zip(prepared.chunks, prepared.vectors, strict=True))]  # fmt: skip
        for start in range(0, len(rows), 1000):
            await session.execute(insert(KnowledgeChunk), rows[start : start + 1000])
        await audit.record(session, tenant_id=tenant_id, actor=actor, action="knowledge.stored", target=prepared.uri,
                           detail={"name": prepared.name, "chunks": len(rows), "hash": prepared.content_hash})  # fmt: skip
    return source_id


# -- throughput -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """What an ingest of a corpus cost: files, chunks, characters, seconds (extract+split, embed, store) and chunks/s."""

    files: int
    chunks: int
    characters: int
    read_seconds: float
    embed_seconds: float
    store_seconds: float

    @property
    def seconds(self) -> float:
        return self.read_seconds + self.embed_seconds + self.store_seconds

    @property
    def chunks_per_second(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict[str, Any]:
        return {"files": self.files, "chunks": self.chunks, "characters": self.characters, "read_seconds": round(self.read_seconds, 3),
                "embed_seconds": round(self.embed_seconds, 3), "store_seconds": round(self.store_seconds, 3),
                "seconds": round(self.seconds, 3), "chunks_per_second": round(self.chunks_per_second, 1)}  # fmt: skip


async def measure_throughput(paths: Sequence[Path | str], *, db: Database | None = None, tenant_id: uuid.UUID | None = None) -> Throughput:
    """Ingest a real corpus (files and folders) with the real embedding model, timed (the model is loaded first, untimed).
    With ``db`` and ``tenant_id`` the sources are stored too, as the worker stores them."""
    embedder().load()
    started = time.perf_counter()
    found = collect([str(p) for p in paths])
    prepared = []
    for item in found.items:
        try:
            prepared.append(prepare_bytes(item["uri"], item["name"], item["kind"], decode_data(item), []))
        except ExtractError:
            continue
    read = time.perf_counter() - started
    started = time.perf_counter()
    for p in prepared:
        texts = [chunking.embedding_text(c.heading, c.content) for c in p.chunks]
        p.vectors = [] if not texts else embedder().embed(texts).tolist()
    embed = time.perf_counter() - started
    started = time.perf_counter()
    if db is not None and tenant_id is not None:
        for p in prepared:
            await store(db, tenant_id, p, actor="bench")
    stored = time.perf_counter() - started
    chunks = sum(len(p.chunks) for p in prepared)
    characters = sum(len(c.content) for p in prepared for c in p.chunks)
    return Throughput(len(prepared), chunks, characters, read, embed, stored)
