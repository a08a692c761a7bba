"""The terminal channel, used by `konstruct chat`.

Its transport is the database itself: the reply row committed by the pipeline is what the waiting
`konstruct chat` process reads. The message takes the same inbox → queue → worker path as Slack's.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct import approvals, inbox
from konstruct.db.engine import Database
from konstruct.db.models import Conversation, Message
from konstruct.db.models import InboundMessage as InboxRow
from konstruct.errors import ConflictError, ValidationError, WorkerUnavailableError
from konstruct.handoff.state import HUMAN, NOTE
from konstruct.messaging import ApprovalRequest, ChannelError, InboundMessage, Reply, Target, mark_sent
from konstruct.tenancy.tenants import TenantInfo

FINAL = ("replied", "failed", "ignored")
# Looking for the answer: every 5 ms while a quick one may come (an instant model answers in 35-45 ms), then less and
# less often. From 10 ms growing by half each time, an answer ready at 48 ms was seen at 81 ms.
POLL_FIRST, POLL_FIRST_FOR, POLL_MOST = 0.005, 0.5, 0.2

# What a terminal sends besides text: CSI (arrow keys, "\x1b[D"), OSC (titles, "\x1b]0;…\x07"), SS3 (F1, "\x1bOP"),
# other two-byte escapes, a lone ESC, and C0/C1 control characters except tab and newline.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC, ended by BEL or ST
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"  # DCS, SOS, PM, APC strings
    r"|\x1bO."  # SS3
    r"|\x1b[ -~]?"  # any other escape, or a lone ESC
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
)


def clean_input(text: str) -> str:
    """What a person typed, without the escape sequences and control characters a terminal may have put in it
    (an arrow key pressed where there is no line editing arrives as "\x1b[D"): text only, tabs and newlines kept."""
    return _ESCAPES.sub("", text).strip()


@dataclass(frozen=True)
class PastTurn:
    """One row of a conversation as the person saw it: what they said ('in') or what they were told ('out')."""

    direction: str
    text: str
    at: datetime
    author: str = ""
    human: bool = False  # a human colleague's answer while the conversation was escalated (konstruct.handoff)


async def recent_turns(db: Database, tenant: TenantInfo, agent_id: uuid.UUID, conversation: str, *, exchanges: int) -> list[PastTurn]:
    """The last `exchanges` messages of the person in this terminal conversation and what they were told, oldest
    first (notices included: the person saw them). Empty for a conversation that has not started."""
    async with db.tenant(tenant_id=tenant.id) as session:
        ours = (
            select(Conversation.id)
            .where(Conversation.channel == "terminal", Conversation.external_id == conversation, Conversation.agent_id == agent_id)
            .scalar_subquery()
        )
        since = await session.scalar(
            select(Message.created_at)
            .where(Message.conversation_id == ours, Message.direction == "in")
            .order_by(Message.created_at.desc())
            .offset(max(exchanges - 1, 0))
            .limit(1)
        )
        if since is None and exchanges > 0:
            since = await session.scalar(select(Message.created_at).where(Message.conversation_id == ours).order_by(Message.created_at))
        if since is None:
            return []
        rows = await session.execute(
            select(Message.direction, Message.text, Message.created_at, Message.author, Message.kind)
            .where(Message.conversation_id == ours, Message.created_at >= since, Message.status != "failed", Message.kind != NOTE)
            .order_by(Message.created_at, Message.direction)
        )
        return [PastTurn(r.direction, r.text, r.created_at, r.author, r.kind == HUMAN) for r in rows]


async def human_answers(
    db: Database, tenant: TenantInfo, agent_id: uuid.UUID, conversation: str, *, after: datetime | None
) -> list[PastTurn]:
    """What human colleagues answered in this terminal conversation after `after` (while it was escalated), oldest first:
    they come when they come, not as the answer to a message, so `konstruct chat` shows them as they arrive."""
    async with db.tenant(tenant_id=tenant.id) as session:
        rows = await session.execute(
            select(Message.text, Message.created_at, Message.author)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(Conversation.channel == "terminal", Conversation.external_id == conversation, Conversation.agent_id == agent_id,
                   Message.kind == HUMAN, Message.status != "failed", *([Message.created_at > after] if after else []))
            .order_by(Message.created_at)
        )  # fmt: skip
        return [PastTurn("out", r.text, r.created_at, r.author, True) for r in rows]


class TerminalChannel:
    name = "terminal"
    reports_delivery = False

    async def prepare(self, target: Target) -> str | None:
        return None  # `konstruct chat` shows its own waiting state

    async def working(self, target: Target, what: str) -> None:
        return None  # nowhere to show it: `konstruct chat` waits for the reply row

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

    async def ask(self, request: ApprovalRequest, where: str | None) -> str | None:
        if where is not None:
            raise ChannelError("the terminal cannot ask the tenant's operators: an escalation target is slack:CHANNEL")
        return None  # `konstruct chat` sees its message waiting and asks y/n itself


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
    on_approval: Callable[[approvals.ApprovalInfo], Awaitable[None]] | None = None,
) -> ChatResult:
    """Send one message through the inbox and wait for the worker's answer (escape sequences taken out of it).
    When the turn waits for an approval, `on_approval` is called once for it (to ask y/n and decide)."""
    text = clean_input(text)
    if not text:
        raise ValidationError("the message is empty: type some text")
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
    delay = POLL_FIRST
    asked: set[uuid.UUID] = set()
    while True:
        async with db.tenant(tenant_id=tenant.id) as session:
            row = (await session.execute(select(InboxRow.status, InboxRow.error).where(InboxRow.id == stored.id))).one()
            if row.status in FINAL:
                reply = await session.scalar(select(Message.text).where(Message.inbound_id == stored.id, Message.direction == "out"))
                return ChatResult(stored.id, row.status, reply, row.error, stored.duplicate, time.perf_counter() - started)
        if row.status == approvals.WAITING and on_approval is not None:
            pending = await approvals.pending_for(db, tenant.id, stored.id)
            if pending is not None and pending.id not in asked:
                asked.add(pending.id)
                await on_approval(pending)
                deadline = time.perf_counter() + timeout  # the wait for a human is not the worker's: the answer gets its own
                continue
        if time.perf_counter() > deadline:
            raise WorkerUnavailableError(
                f"no answer within {timeout:g}s (message {stored.id} is {row.status}); it stays queued and will be answered — "
                "check `konstruct doctor` and the worker's log"
            )
        await asyncio.sleep(delay)
        if time.perf_counter() - started > POLL_FIRST_FOR:
            delay = min(delay * 1.5, POLL_MOST)
