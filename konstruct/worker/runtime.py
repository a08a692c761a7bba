"""The worker's engine room: one asyncio loop on which many conversations are in flight at once.

huey's threads only admit work (waiting for a free slot, which is the back-pressure); the LLM
calls run concurrently on the loop. A killed worker loses nothing: its claimed rows go back to
the queue through the sweeper, on the suspect lane, where each is answered alone so that only a
message that kills a worker by itself is charged for it. A message that fails here without finishing
(the database went away, an error) is given back and rung again once the database answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import uvloop
from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert

from konstruct import approvals, audit, inbox, mail
from konstruct.agent import memory
from konstruct.agent.embedding import embedder
from konstruct.agent.pipeline import Pipeline
from konstruct.channels import registry
from konstruct.config import Settings
from konstruct.db.engine import Database, unavailable
from konstruct.db.models import Conversation, InboundMessage, WorkerHeartbeat
from konstruct.db.urls import DatabaseURLs
from konstruct.handoff import sweep as handoff_sweep
from konstruct.knowledge import ingest, recovery, search
from konstruct.llm import probe
from konstruct.logs import Throttled
from konstruct.secrets import decrypt
from konstruct.tenancy import invitations
from konstruct.worker.queue import Queue

log = logging.getLogger("konstruct.worker")
outage_log = Throttled(log)
T = TypeVar("T")
MCP_CLIENT = "konstruct.agent.tools.mcp_client"
RETRY_INTERVAL = 0.5  # seconds between attempts to give back messages that failed here


class WorkerRuntime:
    def __init__(self, settings: Settings, urls: DatabaseURLs, queue: Queue) -> None:
        self.settings = settings
        self.urls = urls
        self.queue = queue
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="konstruct-loop", daemon=True)
        # Admission: at most `concurrency` in flight; a suspect message runs alone (nothing else in flight, nothing
        # admitted beside it) and waiting suspects go first, so the suspect lane is never starved.
        self._gate = threading.Condition()
        self.in_flight = 0
        self.done = 0
        self._solo = False
        self._suspects_waiting = 0
        self._retry: dict[uuid.UUID, tuple[uuid.UUID, bool]] = {}  # inbound id -> (tenant id, charge it)
        self._db_down = False
        self._heartbeat: Future[None] | None = None
        self._retrier: Future[None] | None = None
        self._desk: Future[None] | None = None
        self._expirer: Future[None] | None = None
        self.db: Database | None = None
        self.pipeline: Pipeline | None = None
        self.channels: registry.Channels | None = None
        self.stopping: Any = None  # the consumer's stop flag (a threading.Event), once it runs
        self.sees = _what_it_sees(settings)

    # -- life cycle (called from the consumer's main thread) --

    def start(self) -> None:
        self._thread.start()
        self._call(self._startup(), timeout=None)
        self._heartbeat = asyncio.run_coroutine_threadsafe(self._heartbeat_loop(), self.loop)
        self._retrier = asyncio.run_coroutine_threadsafe(self._retry_loop(), self.loop)
        self._desk = asyncio.run_coroutine_threadsafe(self._desk_loop(), self.loop)
        self._expirer = asyncio.run_coroutine_threadsafe(self._expiry_loop(), self.loop)
        self.sweep()

    def load_in_background(self, warm_up: Callable[[], None] | None) -> None:
        """Once ready, in threads: `warm_up` (konstruct.worker.main's: litellm, the MCP SDK and the channels' SDKs
        imported; None in a worker the spare forked, which has them already) and the embedding model loaded, seconds
        of CPU done now and not when the first person is waiting. Not during the start-up: on the GIL those threads
        took turns with it, and a worker `up` started was ready 0.25 s after its imports instead of 0.01 s."""

        def start() -> None:
            if warm_up is not None:
                self._warmup = asyncio.wrap_future(behind(warm_up))
            if self.settings.memory.enabled:
                self._model = asyncio.ensure_future(asyncio.to_thread(_load_embedding_model))

        self.loop.call_soon_threadsafe(start)

    def stop(self, timeout: float) -> None:
        """Let in-flight conversations finish (up to timeout), then close everything."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.in_flight:
            log.warning("stopping with %d message(s) in flight; the sweeper will re-queue them", self.in_flight)
        for task in (self._heartbeat, self._retrier, self._desk, self._expirer):
            if task is not None:
                task.cancel()
        if self._thread.is_alive():
            self._call(self._shutdown(), timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)

    # -- called from huey's threads --

    def admit(self, tenant_id: uuid.UUID, inbound_id: uuid.UUID, *, suspect: bool = False) -> None:
        """Start answering a message, waiting for a free slot when `worker.concurrency` are in flight.
        A suspect message waits until nothing else is in flight, and nothing is admitted beside it."""
        with self._gate:
            if suspect:
                self._suspects_waiting += 1
                try:
                    while self.in_flight or self._solo:
                        if self._stopping():
                            log.info("message %s left for after the restart", inbound_id)
                            return
                        self._gate.wait(0.25)
                finally:
                    self._suspects_waiting -= 1
                self._solo = True
            else:
                while self._solo or self._suspects_waiting or self.in_flight >= self.settings.worker.concurrency:
                    if self._stopping():
                        # Shutting down with every slot busy: leave it stored as received; the sweeper re-queues it.
                        log.info("message %s left for after the restart", inbound_id)
                        return
                    self._gate.wait(0.25)
            self.in_flight += 1
        future = asyncio.run_coroutine_threadsafe(self._process(tenant_id, inbound_id, solo=suspect), self.loop)
        future.add_done_callback(partial(self._finished, solo=suspect))

    def _stopping(self) -> bool:
        return self.stopping is not None and self.stopping.is_set()

    def sweep(self) -> None:
        try:
            self._call(self._sweep())
        except Exception as exc:
            if not unavailable(exc):
                raise
            outage_log.warning("sweep", "could not sweep for stuck messages: the database is unavailable")

    def remember(self, tenant_id: uuid.UUID, inbound_id: uuid.UUID) -> None:
        """Embed and store one message as a memory (the embedding runs in a thread, off the loop)."""
        self._call(self._remember(tenant_id, inbound_id), timeout=300)

    def ingest_knowledge(self, tenant_id: uuid.UUID, job_id: uuid.UUID) -> None:
        """Run one knowledge job on the loop (its embedding in a thread); it can take long, so no time limit here."""
        assert self.db is not None
        status = self._call(ingest.run_job(self.db, self.settings, tenant_id, job_id, self.worker_id), timeout=None)
        log.info("knowledge job %s %s", job_id, status)

    def notify_admins(self, tenant_id: uuid.UUID, kind: str, subject: str, body: str) -> None:
        assert self.db is not None
        self._call(mail.notify_admins(self.db, self.settings, tenant_id, kind=kind, subject=subject, body=body), timeout=120)

    def send_invitation(self, tenant_id: uuid.UUID, invitation_id: uuid.UUID, sealed_token: str) -> None:
        assert self.db is not None
        token = decrypt(self.settings, sealed_token.encode())
        sent = self._call(invitations.send(self.db, self.settings, tenant_id, invitation_id, token), timeout=120)
        if not sent:
            log.info("invitation %s is no longer pending: not sent", invitation_id)

    # -- on the loop --

    async def _remember(self, tenant_id: uuid.UUID, inbound_id: uuid.UUID) -> None:
        assert self.db is not None
        async with self.db.tenant(tenant_id=tenant_id) as session:
            row = (
                await session.execute(
                    select(InboundMessage.text, InboundMessage.sender, Conversation.agent_id)
                    .join(Conversation, Conversation.id == InboundMessage.conversation_id)
                    .where(InboundMessage.id == inbound_id)
                )
            ).first()
        if row is not None:  # gone: forgotten meanwhile
            await memory.remember(
                self.db, tenant_id=tenant_id, agent_id=row.agent_id, person=row.sender, content=row.text, inbound_id=inbound_id
            )

    async def _startup(self) -> None:
        self.db = Database(self.settings, self.urls)
        self.channels = registry.channels(self.settings, self.db)
        self.pipeline = Pipeline(
            self.settings,
            self.db,
            self.channels,
            self.worker_id,
            remember=self.queue.enqueue_memory,
            notify=self.queue.enqueue_notice,
            retrieve=search.retriever(self.db, self.settings),
        )
        while True:  # a worker started while the database is down waits for it rather than crash-looping
            try:
                await self._beat()
                return
            except Exception as exc:
                if not unavailable(exc):
                    raise
                outage_log.warning("startup", "waiting for the database before taking work")
                await asyncio.sleep(RETRY_INTERVAL)

    async def _shutdown(self) -> None:
        if self.db is None:
            return
        async with self.db.system() as session:
            await session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == self.worker_id))
        for channel in self.channels.built() if self.channels is not None else ():
            close = getattr(channel, "close", None)
            if close is not None:
                await close()
        warmup = getattr(self, "_warmup", None)
        if warmup is not None and not warmup.done():
            await asyncio.wait([warmup], timeout=10)  # a stop during the background imports: let them finish
        mcp = sys.modules.get(MCP_CLIENT)
        if mcp is not None and hasattr(mcp, "close_pool"):
            await mcp.close_pool()  # the worker's MCP connections (stdio servers stop)
        await self.db.dispose()

    async def _process(self, tenant_id: uuid.UUID, inbound_id: uuid.UUID, *, solo: bool = False) -> None:
        assert self.pipeline is not None
        try:
            status = await self.pipeline.process(tenant_id=tenant_id, inbound_id=inbound_id, solo=solo)
            if status:
                log.info("message %s %s", inbound_id, status)
        except Exception as exc:
            down = unavailable(exc)
            if down:
                outage_log.warning("process", f"message {inbound_id}: the database is unavailable; it is retried when it is back")
            else:
                log.exception("message %s: unexpected error; it is retried (counted towards worker.max_attempts)", inbound_id)
            # Given back and rung again by the retry loop: not when the database went away, but an error is the message's own.
            self._retry[inbound_id] = (tenant_id, not down)

    def _finished(self, _future: Future[None], *, solo: bool) -> None:
        with self._gate:
            self.in_flight -= 1
            self.done += 1
            if solo:
                self._solo = False
            self._gate.notify_all()

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(RETRY_INTERVAL)
            for inbound_id, (tenant_id, charge) in list(self._retry.items()):
                try:
                    await self._give_back(tenant_id, inbound_id, charge=charge)
                except Exception as exc:
                    if not unavailable(exc):
                        log.error("message %s: could not give it back (%s); the sweeper will", inbound_id, type(exc).__name__)
                        self._retry.pop(inbound_id, None)
                    break  # the database is still away: try again later
                self._retry.pop(inbound_id, None)

    async def _expiry_loop(self) -> None:
        """Deny the approvals nobody decided in time (every worker looks; each expires once): their turns resume."""
        assert self.db is not None
        while True:
            await asyncio.sleep(self.settings.approvals.check_interval)
            try:
                expired = await approvals.expire_due(self.db, self.queue)
            except Exception as exc:
                outage_log.warning("expiry", f"could not expire approvals: {type(exc).__name__}")
                continue
            if expired:
                log.info("%d approval(s) expired: denied, the model is told", expired)

    async def _give_back(self, tenant_id: uuid.UUID, inbound_id: uuid.UUID, *, charge: bool) -> None:
        """Put a message that failed here back to 'received' and ring for it again (a no-op claim if it finished)."""
        assert self.db is not None
        async with self.db.system() as session:
            row = (
                await session.execute(
                    text("select suspect from konstruct_release_claim(:id, :worker, :charge)"),
                    {"id": inbound_id, "worker": self.worker_id, "charge": charge},
                )
            ).first()
        await inbox.ring_again(self.db, self.queue, tenant_id, inbound_id, suspect=bool(row and row.suspect))

    async def _beat(self) -> None:
        assert self.db is not None
        async with self.db.system() as session:
            await session.execute(
                pg_insert(WorkerHeartbeat)
                .values(worker_id=self.worker_id, hostname=socket.gethostname(), pid=os.getpid(), in_flight=self.in_flight, **self.sees)
                .on_conflict_do_update(index_elements=["worker_id"], set_={"seen_at": func.now(), "in_flight": self.in_flight, **self.sees})
            )

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.worker.heartbeat_interval)
            try:
                await self._beat()
            except Exception as exc:
                self._db_down = True
                outage_log.warning("heartbeat", f"heartbeat failed: {type(exc).__name__}")
                continue
            if self._db_down:  # back after an outage: find what it left behind at once, not at the next minute
                self._db_down = False
                log.info("the database is back")
                try:
                    await self._sweep()
                except Exception as exc:
                    log.warning("sweep after the outage failed: %s", type(exc).__name__)

    async def _desk_loop(self) -> None:
        """The handoff check (konstruct.handoff.sweep) every escalation.check_interval seconds."""
        while True:
            await asyncio.sleep(self.settings.escalation.check_interval)
            assert self.db is not None and self.pipeline is not None
            try:
                await handoff_sweep.sweep(self.db, self.settings, self.pipeline.channels)
            except Exception as exc:
                outage_log.warning("handoff", f"handoff check failed: {type(exc).__name__}")

    async def _sweep(self) -> None:
        assert self.db is not None
        await inbox.requeue_stuck(
            self.db,
            self.queue,
            stale_after=self.settings.worker.stale_after,
            received_grace=self.settings.worker.received_grace,
        )
        await recovery.requeue_stuck(self.db, self.queue, self.settings)  # knowledge jobs, by the same rule
        try:  # the audit chain grows here, off the webhooks' path
            sealed = await audit.seal(self.db)
            if sealed:
                log.debug("sealed %d audit event(s) into their chains", sealed)
        except Exception as exc:
            log.warning("could not seal audit events: %s", type(exc).__name__)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def _what_it_sees(settings: Settings) -> dict[str, Any]:
    """For its heartbeat (and so `konstruct doctor`): whether this process can read the platform LLM key (a yes or
    no, never the key; None when none is configured) and when the config file it loaded was last changed."""
    has_key = probe.has_platform_key(settings) if probe.platform_key_configured(settings) else None
    try:
        mtime = datetime.fromtimestamp(settings.config_path.stat().st_mtime, UTC) if settings.config_path else None
    except OSError:
        mtime = None
    return {"has_platform_key": has_key, "config_mtime": mtime}


BEHIND_NICE = 10  # added to the nice value of the thread that runs the warm-up


def behind(work: Callable[[], None]) -> Future[None]:
    """`work` in a thread of its own at a lower CPU priority (BEHIND_NICE more), for the warm-up after ready.

    The warm-up is seconds of CPU (litellm's import alone is most of it) and a worker is ready before it, so a load that
    arrives at once (a restart under traffic) shares the cores with it. At a lower priority it takes the cores the
    gateway, PostgreSQL and the first answers leave. Linux keeps a nice value per thread, so only this thread is
    lowered; elsewhere (a thread id is not a process id there) it runs at the process's priority. It starts no thread
    (checked: litellm's, the MCP SDK's and the channels' imports start none), so nothing it leaves behind inherits the
    lower priority. The embedding model is not loaded here: ONNX Runtime starts its thread pool when the model opens,
    and those threads would keep it.

    The price: the first answers need litellm too, and wait for its import here (Python's lock on a module being
    imported), which at the lower priority takes longer on busy cores. bench/slack_events.py at 1,000/s with the worker
    starting as the load does, threads sampled from /proc: the worker's loop used no CPU for 2.7 s while this thread
    imported. Those messages wait stored and acknowledged; the acknowledgements are what cannot wait."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="konstruct-warm-up", initializer=_lower_priority)
    done = pool.submit(work)
    pool.shutdown(wait=False)  # the thread ends once `work` has run
    return done


def _lower_priority() -> None:
    """This thread BEHIND_NICE nice levels lower, on Linux (see `behind`)."""
    if sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BEHIND_NICE))
        except OSError as exc:  # a sandbox may refuse it: the warm-up still runs
            log.debug("warm-up at the process's priority: %s", exc)


def _load_embedding_model() -> None:
    embedder().load()
