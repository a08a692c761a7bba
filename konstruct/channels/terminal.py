"""The terminal channel, used by `konstruct chat`.

Its transport is the database itself: the reply row committed by the pipeline is what the waiting
`konstruct chat` process reads. The message takes the same inbox → queue → worker path as Slack's.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct import inbox
from konstruct.db.engine import Database
from konstruct.db.models import InboundMessage as InboxRow
from konstruct.db.models import Message
from konstruct.errors import ConflictError, WorkerUnavailableError
from konstruct.messaging import ChannelError, InboundMessage, Reply, Target, mark_sent
from konstruct.tenancy.tenants import TenantInfo

FINAL = ("replied", "failed", "ignored")


class TerminalChannel:
    name = "terminal"

    async def prepare(self, target: Target) -> str | None:
        return None  # `konstruct chat` shows its own waiting state

    async def attachments(self, target: Target) -> list[dict[str, Any]]:
        return []  # the terminal sends text only

    async def send(self, reply: Reply) -> str | None:
        # Nothing leaves the machine: delivery is the committed message row (see module docstring).
        return None

    def link(self, target: Target) -> str | None:
        return None  # the conversation is in the database: `konstruct conversation list`

    async def notify(self, tenant_id: uuid.UUID, where: str, text: str) -> None:
        raise ChannelError("the terminal has nobody to notify: an escalation target is slack:CHANNEL or slack:USER")

    async def record_sent(self, session: AsyncSession, message_id: uuid.UUID, external_id: str | None) -> None:
        await mark_sent(session, message_id, external_id)


@dataclass(frozen=True)
class ChatResult:
    message_id: uuid.UUID
    status: str
    reply: str | None
    error: str | None
    duplicate: bool
    seconds: float


async def chat(
    db: Database,
    queue: inbox.Doorbell,
    tenant: TenantInfo,
    agent_id: uuid.UUID,
    *,
    text: str,
    person: str,
    conversation: str,
    message_id: str | None,
    timeout: float,
    worker_within: float,
) -> ChatResult:
    """Send one message through the inbox and wait for the worker's answer."""
    if tenant.status != "active":
        raise ConflictError(
            f"tenant {tenant.slug!r} is {tenant.status}: its agents do not answer (`konstruct tenant resume {tenant.slug}`)"
        )
    if await inbox.live_workers(db, within=worker_within) == 0:
        raise WorkerUnavailableError("no worker is running, so nobody would answer: start `konstruct up` or `konstruct worker`")
    started = time.perf_counter()
    stored = await inbox.accept(
        db,
        queue,
        InboundMessage(
            tenant_id=tenant.id,
            agent_id=agent_id,
            channel="terminal",
            external_id=message_id or uuid.uuid4().hex,
            conversation_key=conversation,
            sender=person,
            text=text,
        ),
    )
    assert stored is not None  # the agent was named, so someone answers
    deadline = started + timeout
    delay = 0.01
    while True:
        async with db.tenant(tenant_id=tenant.id) as session:
            row = (await session.execute(select(InboxRow.status, InboxRow.error).where(InboxRow.id == stored.id))).one()
            if row.status in FINAL:
                reply = await session.scalar(select(Message.text).where(Message.inbound_id == stored.id, Message.direction == "out"))
                return ChatResult(stored.id, row.status, reply, row.error, stored.duplicate, time.perf_counter() - started)
        if time.perf_counter() > deadline:
            raise WorkerUnavailableError(
                f"no answer within {timeout:g}s (message {stored.id} is {row.status}); it stays queued and will be answered — "
                "check `konstruct doctor` and the worker's log"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.2)
