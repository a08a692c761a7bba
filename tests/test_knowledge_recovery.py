"""Knowledge jobs survive their worker, as inbox messages do: a worker SIGKILLed in the middle of a job (held on a URL
the test serves) is replaced and the new worker finishes it, every source stored once; a job whose doorbell was lost
is rung again by the sweeper; a re-run after partial progress reports each source once; a job whose worker keeps
dying is given up after worker.max_attempts."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import func, select, update

from konstruct import audit
from konstruct.agent.agents import create_agent
from konstruct.config import Settings, load_settings
from konstruct.db.engine import Database
from konstruct.db.models import KnowledgeChunk, KnowledgeJob, KnowledgeSource
from konstruct.db.urls import resolve_urls
from konstruct.knowledge import collect, recovery
from konstruct.knowledge import sources as service
from konstruct.tenancy.tenants import TenantInfo, create_tenant
from konstruct.worker.queue import make_queue
from tests import test_knowledge_ingest
from tests.fakes.server import LoopbackServer, QuietHandler, serve, shutdown
from tests.helpers import Proc, konstruct_in_process, wait_until
from tests.shared import SharedWorker, unique_slug


class Held(QuietHandler):
    """/slow is answered only once the test releases it (so a worker can be killed while it waits); /fast at once."""

    arrived: ClassVar[threading.Event] = threading.Event()
    release: ClassVar[threading.Event] = threading.Event()

    def do_GET(self) -> None:
        if self.path == "/slow":
            Held.arrived.set()
            Held.release.wait(60)
        title = self.path.strip("/")
        self.send_bytes(200, "text/html; charset=utf-8", f"<title>{title}</title><h1>{title}</h1><p>Page {title}.</p>".encode())


@pytest.fixture(scope="module")
def site_server() -> Iterator[LoopbackServer]:
    server = serve(Held, 0, "knowledge-held")
    yield server
    Held.release.set()
    shutdown(server)


# tests/test_knowledge_ingest.py's module worker (a worker of this module's own: the tests here kill and replace it).
worker = test_knowledge_ingest.worker


@pytest.fixture
async def acme(worker: SharedWorker) -> AsyncIterator[tuple[Settings, Database, TenantInfo]]:
    settings = load_settings(worker.config)
    db = Database(settings)
    try:
        tenant = await create_tenant(db, name="Acme", slug=unique_slug("acme"), actor="test")
        await create_agent(db, tenant, name="Ava", role="Support", persona="Helpful.", model=None, actor="test")
        configured = konstruct_in_process("tenant", "configure", tenant.slug, "--allowed-hosts", "127.0.0.1", config=worker.config)
        assert configured.returncode == 0, configured.stderr
        yield settings, db, tenant
    finally:
        await db.dispose()


async def job_row(db: Database, tenant: TenantInfo, job_id: uuid.UUID) -> KnowledgeJob:
    async with db.tenant(tenant_id=tenant.id) as session:
        row = await session.get(KnowledgeJob, job_id)
        assert row is not None
        return row


async def queue_job(db: Database, tenant: TenantInfo, targets: list[str], **state: Any) -> uuid.UUID:
    """A job written as `knowledge add` writes it, but never rung for (its doorbell lost), with the row state given."""
    found = collect.collect(targets)
    job = await service.create_job(db, tenant, "add", found, actor="test")
    if state:
        async with db.tenant(tenant_id=tenant.id) as session:
            await session.execute(update(KnowledgeJob).where(KnowledgeJob.id == job.id).values(**state))
    return job.id


async def stored_events(db: Database, tenant: TenantInfo) -> list[str]:
    return [str(e.target) for e in await audit.events(db, tenant.id) if e.action == "knowledge.stored"]


async def test_a_worker_killed_mid_job_is_replaced_and_the_job_finished_once(
    worker: SharedWorker, acme: tuple[Settings, Database, TenantInfo], site_server: LoopbackServer, tmp_path: Path
) -> None:
    _, db, tenant = acme
    (tmp_path / "a.md").write_text("# Alpha\n\nAlpha is the first letter.")
    (tmp_path / "empty.md").write_text("")
    slow = f"http://127.0.0.1:{site_server.server_address[1]}/slow"
    Held.arrived.clear()
    Held.release.clear()
    queued = konstruct_in_process("knowledge", "add", "--tenant", tenant.slug, "--no-wait", "--json", str(tmp_path / "a.md"),
                                  str(tmp_path / "empty.md"), slow, config=worker.config)  # fmt: skip
    assert queued.returncode == 0, queued.stderr
    job_id = uuid.UUID(json.loads(queued.stdout)[0]["id"])

    await wait_until(lambda: job_row(db, tenant, job_id), lambda j: Held.arrived.is_set() and j.status == "running", 60, "the fetch held")
    first = await job_row(db, tenant, job_id)
    claimed = first.heartbeat_at
    assert first.worker_id and first.attempts == 1 and claimed is not None
    # The claim stays fresh while the fetch hangs (heartbeat_interval 0.5 s in the tests' config).
    await wait_until(lambda: job_row(db, tenant, job_id), lambda j: bool(j.heartbeat_at and j.heartbeat_at > claimed), 10,
                     "a heartbeat during the fetch")  # fmt: skip

    worker.worker.kill()  # SIGKILL in the middle of the job
    Held.release.set()
    worker.worker = Proc("worker", ["worker"], config=worker.config, log_dir=tmp_path)
    worker.worker.wait_for_log(" ready: ")  # its start-up sweep finds the dead worker's job

    done = await wait_until(lambda: job_row(db, tenant, job_id), lambda j: j.status in ("done", "failed"), 120, "the job finished")
    assert done.status == "done" and done.attempts == 2 and done.worker_id != first.worker_id
    statuses = {r["uri"]: r["status"] for r in done.results}
    assert len(done.results) == 3 and statuses[slow] == "added" and "failed" in statuses.values() and "added" in statuses.values()
    assert sorted(await stored_events(db, tenant)) == sorted(r["uri"] for r in done.results if r["status"] == "added")
    async with db.tenant(tenant_id=tenant.id) as session:
        per_source = dict((await session.execute(select(KnowledgeSource.uri, func.count(KnowledgeChunk.id)).join(
            KnowledgeChunk, KnowledgeChunk.source_id == KnowledgeSource.id).group_by(KnowledgeSource.uri))).all())  # fmt: skip
    assert per_source[slow] == 1 and done.total == done.done == sum(per_source.values())
    shown = konstruct_in_process("knowledge", "job", str(job_id), "--tenant", tenant.slug, config=worker.config)
    assert "re-queued after its worker died" in shown.stdout, shown.stdout


async def test_a_job_whose_doorbell_was_lost_is_rung_again_by_the_sweeper(
    worker: SharedWorker, acme: tuple[Settings, Database, TenantInfo], tmp_path: Path
) -> None:
    settings, db, tenant = acme
    (tmp_path / "b.md").write_text("# Beta\n\nBeta comes second.")
    lost = await queue_job(db, tenant, [str(tmp_path / "b.md")], created_at=func.now() - func.make_interval(0, 0, 0, 0, 1))
    young = await queue_job(db, tenant, [str(tmp_path / "b.md")])  # within the grace: its doorbell may still ring
    queue = make_queue(settings, resolve_urls(settings))
    try:
        swept = await recovery.requeue_stuck(db, queue, settings)
    finally:
        queue.close()
    assert young not in swept.requeued
    done = await wait_until(lambda: job_row(db, tenant, lost), lambda j: j.status == "done", 120, "the lost job run")
    assert done.requeued_at is not None and done.attempts == 1 and [r["status"] for r in done.results] == ["added"]
    assert (await job_row(db, tenant, young)).status == "queued"


async def test_a_rerun_after_partial_progress_reports_each_source_once(
    worker: SharedWorker, acme: tuple[Settings, Database, TenantInfo], site_server: LoopbackServer, tmp_path: Path
) -> None:
    settings, db, tenant = acme
    Held.release.set()
    (tmp_path / "c.md").write_text("# Gamma\n\nGamma is third.")
    first = await queue_job(db, tenant, [str(tmp_path / "c.md")], created_at=func.now() - func.make_interval(0, 0, 0, 0, 1))
    queue = make_queue(settings, resolve_urls(settings))
    try:
        queue.enqueue_knowledge(tenant.id, first)
        stored = await wait_until(lambda: job_row(db, tenant, first), lambda j: j.status == "done", 120, "c.md stored")
        # What a run killed after storing c.md leaves: c.md's outcome saved, the URL not reached, the job re-queued.
        fast = f"http://127.0.0.1:{site_server.server_address[1]}/fast"
        rerun = await queue_job(db, tenant, [str(tmp_path / "c.md"), fast], results=stored.results, attempts=1, done=stored.done)
        queue.enqueue_knowledge(tenant.id, rerun)
        done = await wait_until(lambda: job_row(db, tenant, rerun), lambda j: j.status == "done", 120, "the re-run finished")
    finally:
        queue.close()
    assert [(r["uri"], r["status"]) for r in done.results] == [(stored.results[0]["uri"], "added"), (fast, "added")]
    assert done.total == done.done == stored.done + 1 and done.attempts == 2
    assert sorted(await stored_events(db, tenant)) == sorted([stored.results[0]["uri"], fast])


async def test_a_job_whose_worker_keeps_dying_is_given_up(
    worker: SharedWorker, acme: tuple[Settings, Database, TenantInfo], tmp_path: Path
) -> None:
    settings, db, tenant = acme
    (tmp_path / "d.md").write_text("# Delta\n\nDelta is fourth.")
    gone = {"status": "running", "worker_id": "elsewhere:1:dead00", "heartbeat_at": func.now()}  # a worker with no heartbeat row
    spent = await queue_job(db, tenant, [str(tmp_path / "d.md")], attempts=settings.worker.max_attempts, **gone)
    again = await queue_job(db, tenant, [str(tmp_path / "d.md")], attempts=1, **gone)
    queue = make_queue(settings, resolve_urls(settings))
    try:
        await recovery.requeue_stuck(db, queue, settings)
    finally:
        queue.close()
    given_up = await job_row(db, tenant, spent)
    assert given_up.status == "failed" and given_up.finished_at is not None
    assert given_up.error == f"gave up after {settings.worker.max_attempts} attempts whose worker died before the job finished"
    assert "knowledge.gave_up" in [e.action for e in await audit.events(db, tenant.id)]
    rerun = await wait_until(lambda: job_row(db, tenant, again), lambda j: j.status == "done", 120, "the other job re-run")
    assert rerun.attempts == 2
    shown = json.loads(konstruct_in_process("knowledge", "job", str(spent), "--tenant", tenant.slug, "--json", config=worker.config).stdout)
    assert shown["status"] == "failed" and shown["attempts"] == settings.worker.max_attempts and shown["error"].startswith("gave up")
