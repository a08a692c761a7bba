"""The worker's engine room: one asyncio loop on which many conversations are in flight at once.

huey's threads only admit work (waiting for a free slot, which is the back-pressure); the LLM
calls run concurrently on the loop. A killed worker loses nothing: its claimed rows go back to
the queue through the sweeper.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import uvloop
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from konstruct import audit, inbox, mail
from konstruct.agent import memory
from konstruct.agent.pipeline import Pipeline
from konstruct.channels.registry import channels
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Conversation, InboundMessage, WorkerHeartbeat
from konstruct.db.urls import DatabaseURLs
from konstruct.llm.client import load_litellm
from konstruct.secrets import decrypt
from konstruct.tenancy import invitations
from konstruct.worker.queue import Queue

log = logging.getLogger("konstruct.worker")
T = TypeVar("T")


class WorkerRuntime:
    def __init__(self, settings: Settings, urls: DatabaseURLs, queue: Queue) -> None:
        self.settings = settings
        self.urls = urls
        self.queue = queue
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="konstruct-loop", daemon=True)
        self._slots = threading.BoundedSemaphore(settings.worker.concurrency)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.done = 0
        self._heartbeat: Future[None] | None = None
        self.db: Database | None = None
        self.pipeline: Pipeline | None = None
        self.stopping: Any = None  # the consumer's stop flag (a threading.Event), once it runs

    # -- life cycle (called from the consumer's main thread) --

    def start(self) -> None:
        self._thread.start()
        self._call(self._startup())
        self._heartbeat = asyncio.run_coroutine_threadsafe(self._heartbeat_loop(), self.loop)
        self.sweep()

    def stop(self, timeout: float) -> None:
        """Let in-flight conversations finish (up to timeout), then close everything."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.in_flight:
            log.warning("stopping with %d message(s) in flight; the sweeper will re-queue them", self.in_flight)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._thread.is_alive():
            self._call(self._shutdown(), timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)

    # -- called from huey's threads --

    def admit(self, tenant_id: uuid.UUID, inbound_id: uuid.UUID) -> None:
        """Start answering a message, waiting for a free slot when `worker.concurrency` are in flight."""
        while not self._slots.acquire(timeout=0.25):
            if self.stopping is not None and self.stopping.is_set():
                # Shutting down with every slot busy: leave it stored as received; the sweeper re-queues it.
                log.info("message %s left for after the restart", inbound_id)
                return
        with self._lock:
            self.in_flight += 1
        future = asyncio.run_coroutine_threadsafe(self._process(tenant_id, inbound_id), self.loop)
        future.add_done_callback(self._finished)

    def sweep(self) -> None:
        self._call(self._sweep())

    def remember(self, tenant_id: uuid.UUID, inbound_id: uuid.UUID) -> None:
        """Embed and store one message as a memory (the embedding runs in a thread, off the loop)."""
        self._call(self._remember(tenant_id, inbound_id), timeout=300)

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
        self.pipeline = Pipeline(
            self.settings,
            self.db,
            channels(self.settings, self.db),
            self.worker_id,
            remember=self.queue.enqueue_memory,
            notify=self.queue.enqueue_notice,
        )
        # Import litellm (seconds) in the background now, not when the first person is waiting.
        self._warmup = asyncio.ensure_future(asyncio.to_thread(load_litellm))
        await self._beat()

    async def _shutdown(self) -> None:
        if self.db is None:
            return
        async with self.db.system() as session:
            await session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == self.worker_id))
        for channel in self.pipeline.channels.values() if self.pipeline else ():
            close = getattr(channel, "close", None)
            if close is not None:
                await close()
        await self.db.dispose()

    async def _process(self, tenant_id: uuid.UUID, inbound_id: uuid.UUID) -> None:
        assert self.pipeline is not None
        try:
            status = await self.pipeline.process(tenant_id=tenant_id, inbound_id=inbound_id)
            if status:
                log.info("message %s %s", inbound_id, status)
        except Exception:
            # Left in 'processing': the sweeper hands it to a live worker once this one stops beating.
            log.exception("message %s: unexpected error", inbound_id)

    def _finished(self, _future: Future[None]) -> None:
        with self._lock:
            self.in_flight -= 1
            self.done += 1
        self._slots.release()

    async def _beat(self) -> None:
        assert self.db is not None
        async with self.db.system() as session:
            await session.execute(
                pg_insert(WorkerHeartbeat)
                .values(worker_id=self.worker_id, hostname=socket.gethostname(), pid=os.getpid(), in_flight=self.in_flight)
                .on_conflict_do_update(index_elements=["worker_id"], set_={"seen_at": func.now(), "in_flight": self.in_flight})
            )

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.worker.heartbeat_interval)
            try:
                await self._beat()
            except Exception as exc:
                log.error("heartbeat failed: %s", type(exc).__name__)

    async def _sweep(self) -> None:
        assert self.db is not None
        await inbox.requeue_stuck(
            self.db,
            self.queue.enqueue,
            stale_after=self.settings.worker.stale_after,
            received_grace=self.settings.worker.received_grace,
        )
        try:  # the audit chain grows here, off the webhooks' path
            sealed = await audit.seal(self.db)
            if sealed:
                log.debug("sealed %d audit event(s) into their chains", sealed)
        except Exception as exc:
            log.warning("could not seal audit events: %s", type(exc).__name__)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)
