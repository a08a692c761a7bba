"""konstruct knowledge …: a tenant's documents (files, folders, URLs) that its agents answer from.

`add` and `sync` read files here and queue a job with their bytes; a worker extracts, splits, embeds and stores them,
and the command waits for it with a progress bar (`--no-wait` prints the job id instead).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from konstruct import inbox
from konstruct.agent.agents import get_agent
from konstruct.cli.common import (
    JsonOption,
    TenantOption,
    YesOption,
    actor,
    confirm_deletion,
    err,
    out,
    platform,
    print_fields,
    print_json,
    print_table,
    settings,
    tenant_for,
    with_database,
    with_tenant,
)
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.urls import resolve_urls
from konstruct.errors import QueueError, WorkerUnavailableError
from konstruct.knowledge import collect, dedicated
from konstruct.knowledge import search as retrieval
from konstruct.knowledge import sources as service
from konstruct.tenancy.tenants import TenantInfo
from konstruct.worker.queue import make_queue

app = typer.Typer(
    help="A tenant's documents its agents answer from: add, list, show, remove, sync, search; a large tenant's own indexes.",
    no_args_is_help=True,
)

NoWaitOption = typer.Option(False, "--no-wait", help="Queue the job and print its id; do not wait for the worker.")
TimeoutOption = typer.Option(600.0, "--timeout", help="Seconds to wait for the worker before giving up waiting (the job goes on).")
STYLE = {"added": "green", "replaced": "green", "unchanged": "dim", "removed": "yellow", "failed": "red", "skipped": "yellow"}


def queue_jobs(cfg: Settings, tenant: TenantInfo, jobs: Sequence[service.JobInfo]) -> None:
    """Ring the worker for each job that has work (a QueueError when the queue cannot be reached)."""
    pending = [job for job in jobs if not job.finished]
    if not pending:
        return
    queue = make_queue(cfg, resolve_urls(cfg))
    try:
        for job in pending:
            queue.enqueue_knowledge(tenant.id, job.id)
    finally:
        queue.close()


async def _submit(
    cfg: Settings, db: Database, tenant: TenantInfo, kind: str, found: collect.Collection, remove: Sequence[uuid.UUID]
) -> list[service.JobInfo]:
    jobs = await service.create_jobs(db, tenant, kind, found, actor=actor(), remove=remove)
    try:
        await asyncio.to_thread(queue_jobs, cfg, tenant, jobs)
    except QueueError as exc:
        for job in jobs:
            if not job.finished:
                await service.fail_job(db, tenant.id, job.id, str(exc))
        raise
    return jobs


async def _wait(
    cfg: Settings, db: Database, tenant: TenantInfo, jobs: list[service.JobInfo], timeout: float, bar: bool
) -> list[service.JobInfo]:
    """Each job read again until it finished, with a progress bar of chunks embedded when asked for one."""
    if any(not j.finished for j in jobs) and not await inbox.live_workers(db, within=cfg.worker.stale_after):
        ids = ", ".join(str(j.id) for j in jobs if not j.finished)
        raise WorkerUnavailableError(f"no worker is running: job {ids} stays queued until one does (`konstruct up` or `konstruct worker`)")
    deadline = time.monotonic() + timeout
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                  disable=not bar, transient=True) as progress:  # fmt: skip
        task = progress.add_task("reading", total=None)
        while True:
            jobs = [j if j.finished else await service.get_job(db, tenant, j.id) for j in jobs]
            total, done = sum(j.total for j in jobs), sum(j.done for j in jobs)
            progress.update(task, description="embedding" if total else "reading", total=total or None, completed=done)
            if all(j.finished for j in jobs):
                return jobs
            if time.monotonic() > deadline:
                raise WorkerUnavailableError(
                    f"job {', '.join(str(j.id) for j in jobs if not j.finished)} did not finish within {timeout:g}s; it goes on: "
                    f"`konstruct knowledge job ID --tenant {tenant.slug}`"
                )
            await asyncio.sleep(0.2)


def _run(ctx: typer.Context, tenant: str, kind: str, build: Any, no_wait: bool, timeout: float, as_json: bool) -> None:
    cfg = settings(ctx)

    async def go(db: Database, found: TenantInfo) -> list[service.JobInfo]:
        collection, remove = await build(db, found)
        jobs = await _submit(cfg, db, found, kind, collection, remove)
        return jobs if no_wait else await _wait(cfg, db, found, jobs, timeout, bar=not as_json and err.is_terminal)

    jobs = with_tenant(ctx, tenant, "knowledge.write", go)
    if no_wait:
        if as_json:
            print_json([{"id": str(j.id), "status": j.status} for j in jobs])
        else:
            for job in jobs:
                out.print(f"queued knowledge job {job.id}: `konstruct knowledge job {job.id} --tenant {tenant}`")
        return
    _summary(jobs, as_json)


def _summary(jobs: list[service.JobInfo], as_json: bool) -> None:
    results = [r for j in jobs for r in j.results]
    if as_json:
        print_json({"jobs": [j.as_json() for j in jobs], "results": results})
        return
    for job in jobs:
        if job.status == "failed":
            err.print(f"[red]job {job.id} failed:[/red] {escape(job.error or '')}")
    rows = [(f"[{STYLE.get(r['status'], '')}]{r['status']}[/]", escape(r["name"]), r.get("chunks") or "", escape(r.get("error") or ""))
            for r in results if r["status"] != "unchanged"]  # fmt: skip
    if rows:
        print_table(None, ["", "source", "chunks", "why"], rows)
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    chunks = sum(int(r.get("chunks") or 0) for r in results if r["status"] in ("added", "replaced"))
    told = ", ".join(f"{n} {status}" for status, n in counts.items()) or "nothing to do"
    out.print(f"{len(results)} sources: {told}; {chunks} chunks stored")


@app.command("add")
def add(
    ctx: typer.Context,
    targets: list[str] = typer.Argument(..., help="Files, folders (read recursively) and http(s) URLs.", metavar="PATH|URL..."),
    tenant: str = TenantOption,
    agents: list[str] | None = typer.Option(
        None, "--agent", "-a", help="Only this agent answers from them (repeat; default: every agent)."
    ),
    include: list[str] | None = typer.Option(None, "--include", help="In folders, only files matching this glob, e.g. '*.md' (repeat)."),
    exclude: list[str] | None = typer.Option(
        None, "--exclude", help="In folders, leave out files matching this glob, e.g. 'drafts/*' (repeat)."
    ),
    no_wait: bool = NoWaitOption,
    timeout: float = TimeoutOption,
    as_json: bool = JsonOption,
) -> None:
    """Add documents: Markdown, text, HTML and PDF files, folders and URLs. Unchanged ones are left as they are."""

    async def build(db: Database, found: TenantInfo) -> tuple[collect.Collection, list[uuid.UUID]]:
        ids = await service.agent_ids(db, found, agents or [])
        return collect.collect(targets, agent_ids=ids, include=include or [], exclude=exclude or []), []

    _run(ctx, tenant, "add", build, no_wait, timeout, as_json)


@app.command("sync")
def sync(ctx: typer.Context, tenant: str = TenantOption, no_wait: bool = NoWaitOption, timeout: float = TimeoutOption,
         as_json: bool = JsonOption) -> None:  # fmt: skip
    """Read every source again (files from this machine, URLs by the worker); remove those that disappeared."""

    async def build(db: Database, found: TenantInfo) -> tuple[collect.Collection, list[uuid.UUID]]:
        return service.sync_collection(await service.list_sources(db, found))

    _run(ctx, tenant, "sync", build, no_wait, timeout, as_json)


@app.command("list")
def list_(ctx: typer.Context, tenant: str = TenantOption, as_json: bool = JsonOption) -> None:
    """List a tenant's knowledge sources."""
    rows = with_tenant(ctx, tenant, "knowledge.read", service.list_sources)
    if as_json:
        print_json([s.as_json() for s in rows])
    elif not rows:
        out.print(f"tenant {tenant} has no knowledge: `konstruct knowledge add --tenant {tenant} PATH|URL …`")
    else:
        print_table(None, ["name", "kind", "chunks", "status", "agents", "updated", "uri"], [
            (escape(s.name), s.kind, s.chunks, s.status if not s.error else f"{s.status}: {escape(s.error)}",
             len(s.agent_ids) or "all", s.updated_at.strftime("%Y-%m-%d %H:%M"), escape(s.uri)) for s in rows])  # fmt: skip


@app.command("show")
def show(ctx: typer.Context, source: str = typer.Argument(..., help="The source's name, uri (path or URL) or id."),
         tenant: str = TenantOption, as_json: bool = JsonOption) -> None:  # fmt: skip
    """Show one source and the headings of its chunks."""

    async def go(db: Database, found: TenantInfo) -> tuple[service.SourceInfo, list[dict[str, Any]]]:
        info = await service.get_source(db, found, source)
        return info, await service.chunk_outline(db, found, info.id)

    info, chunks = with_tenant(ctx, tenant, "knowledge.read", go)
    if as_json:
        print_json({**info.as_json(), "chunk_list": chunks})
        return
    print_fields({"name": escape(info.name), "uri": escape(info.uri), "kind": info.kind, "status": info.status, "error": info.error,
                  "chunks": info.chunks, "bytes": info.bytes, "agents": ", ".join(map(str, info.agent_ids)) or "all",
                  "hash": info.content_hash, "updated": info.updated_at})  # fmt: skip
    if chunks:
        print_table(None, ["#", "heading", "characters", "starts"], [(c["ordinal"], escape(c["heading"]), c["characters"],
                                                                     escape(c["preview"])) for c in chunks])  # fmt: skip


@app.command("remove")
def remove(ctx: typer.Context, source: str = typer.Argument(..., help="The source's name, uri (path or URL) or id."),
           tenant: str = TenantOption, yes: bool = YesOption, as_json: bool = JsonOption) -> None:  # fmt: skip
    """Remove a source and its chunks (audited)."""
    confirm_deletion(yes, f"knowledge source {source}", "its chunks")
    info = with_tenant(ctx, tenant, "knowledge.write", lambda db, t: service.remove_source(db, t, source, actor=actor()))
    if as_json:
        print_json(info.as_json())
    else:
        out.print(f"[green]removed[/green] {escape(info.name)} ({info.chunks} chunks)")


@app.command("jobs")
def jobs(ctx: typer.Context, tenant: str = TenantOption, limit: int = typer.Option(20, "--limit", min=1, max=1000, help="At most this many."),
         as_json: bool = JsonOption) -> None:  # fmt: skip
    """The tenant's recent ingest jobs, newest first."""
    rows = with_tenant(ctx, tenant, "knowledge.read", lambda db, t: service.list_jobs(db, t, limit=limit))
    if as_json:
        print_json([j.as_json() for j in rows])
    elif not rows:
        out.print(f"tenant {tenant} has no knowledge jobs")
    else:
        print_table(None, ["id", "kind", "status", "progress", "outcome", "by", "created"], [
            (j.id, j.kind, j.status, f"{j.done}/{j.total}", ", ".join(f"{n} {s}" for s, n in j.counts().items()), j.created_by,
             j.created_at.strftime("%Y-%m-%d %H:%M:%S")) for j in rows])  # fmt: skip


@app.command("job")
def job(ctx: typer.Context, job_id: str = typer.Argument(..., help="The job's id (`knowledge jobs`)."), tenant: str = TenantOption,
        as_json: bool = JsonOption) -> None:  # fmt: skip
    """One ingest job: its state, progress and the outcome for each source."""
    info = with_tenant(ctx, tenant, "knowledge.read", lambda db, t: service.get_job(db, t, job_id))
    if as_json:
        print_json(info.as_json())
        return
    print_fields({"id": info.id, "kind": info.kind, "status": info.status, "progress": f"{info.done}/{info.total} chunks",
                  "attempts": _attempts(info.attempts), "error": info.error, "by": info.created_by, "created": info.created_at,
                  "finished": info.finished_at})  # fmt: skip
    if info.finished:
        _summary([info], False)


def _attempts(attempts: int) -> str:
    return f"{attempts} (re-queued after its worker died)" if attempts > 1 else str(attempts)


@app.command("search")
def search_(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="The question, as a person would ask it."),
    tenant: str = TenantOption,
    agent: str = typer.Option(..., "--agent", help="The agent whose view of the documents to search (sources can be limited to agents)."),
    limit: int | None = typer.Option(None, "--limit", "-k", min=1, max=50, help="How many passages (default: knowledge.passages)."),
    as_json: bool = JsonOption,
) -> None:
    """Show exactly what retrieval would put into the agent's prompt for a question, with its scores (a dry run)."""
    cfg = settings(ctx)
    k = limit or cfg.knowledge.passages

    async def go(db: Database, found: TenantInfo) -> tuple[list[Any], retrieval.Plan]:
        info = await get_agent(db, found, agent)
        return await retrieval.search(db, cfg, found.id, info.id, question, k)

    with out.status("searching (the embedding model loads first)…") if not as_json else nullcontext():
        passages, plan = with_tenant(ctx, tenant, "knowledge.read", go)
    if as_json:
        print_json({"question": question, "method": plan.method, "scope_chunks": plan.scope, "full_text_query": plan.words,
                    "passages": [p.as_json() for p in passages]})  # fmt: skip
        return
    if not passages:
        out.print(f"nothing to retrieve: agent {escape(agent)} of tenant {tenant} has no knowledge (`konstruct knowledge add`)")
        return
    out.print(f"[dim]{plan.method} search over {plan.scope} chunks; full text: {escape(plan.words) or '(no content words)'}[/dim]")
    print_table(None, ["#", "score", "vector", "distance", "text", "source", "heading", "starts"], [
        (n, f"{p.score:.4f}", p.vector_rank or "", "" if p.distance is None else f"{p.distance:.3f}", p.text_rank or "",
         escape(p.source), escape(p.heading), escape(" ".join(p.content.split())[:80])) for n, p in enumerate(passages, 1)])  # fmt: skip


@app.command("index")
def index(
    ctx: typer.Context,
    tenant: str = TenantOption,
    drop: bool = typer.Option(False, "--drop", help="Drop the tenant's own indexes instead (searches use the shared ones)."),
    memory: str | None = typer.Option(None, "--memory", help="maintenance_work_mem for the build, e.g. 2GB (the HNSW graph should fit)."),
    as_json: bool = JsonOption,
) -> None:
    """Give a large tenant its own full-text and vector indexes (partial GIN + HNSW on its rows), built concurrently.

    For a tenant holding a large share of all chunks (a tenth or more): its searches stop paying for other tenants'
    rows. Safe to run again; a build cut short is built again. Platform admins only (it changes the database)."""
    cfg = settings(ctx)

    async def go(db: Database) -> TenantInfo:
        await platform(db, "installation")
        return await tenant_for(db, tenant, "knowledge.write")

    found = with_database(ctx, go)
    urls = resolve_urls(cfg)
    if drop:
        names = dedicated.drop(urls, found.id)
        if as_json:
            print_json({"tenant": found.slug, "dropped": names})
        else:
            out.print(
                f"dropped {len(names)} index(es) of tenant {found.slug}" if names else f"tenant {found.slug} has no indexes of its own"
            )
        return
    with (
        out.status(f"building tenant {found.slug}'s indexes (minutes for a few hundred thousand chunks)…") if not as_json else nullcontext()
    ):
        done = dedicated.build(urls, found.id, memory=memory)
    if as_json:
        print_json({"tenant": found.slug, "indexes": [{"name": name, "result": what} for name, what in done]})
        return
    for name, what in done:
        out.print(f"[green]{what}[/green] {name}" if what != "present" else f"[dim]present[/dim] {name}")


@app.command("indexes")
def indexes(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """The tenants that have their own knowledge indexes (`knowledge index`), with each index's size and state."""
    cfg = settings(ctx)
    with_database(ctx, lambda db: platform(db, "installation"))
    found = dedicated.listing(resolve_urls(cfg))
    if as_json:
        print_json([i.as_json() for i in found])
        return
    if not found:
        out.print("no tenant has indexes of its own (`konstruct knowledge index --tenant T`)")
        return
    print_table(None, ["tenant id", "kind", "name", "state", "size"], [
        (str(i.tenant_id), "full text (GIN)" if i.kind == "tsv" else "vectors (HNSW)", i.name,
         "valid" if i.valid else "[red]invalid: run `knowledge index` again[/red]", f"{i.bytes / 2**20:,.1f} MB") for i in found])  # fmt: skip
