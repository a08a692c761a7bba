"""What the channels and the agent share: a normalised inbound message, a reply target, and the Channel protocol.

It sits below both: `konstruct.agent` never imports a channel, and a channel never imports the agent.
Everything channel-specific (delivering, linking to a conversation, notifying a person, keeping a sent
message's delivery status) is behind `Channel`; the worker hands the pipeline a name → Channel map.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct.bodies import clean, clean_text
from konstruct.db.models import Message


@dataclass(frozen=True)
class Routing:
    """Let the database pick the agent: the conversation's own, else the channel's route, the connection's
    default, the tenant's first agent. may_start=False only continues a conversation that exists."""

    connection_id: uuid.UUID
    external_channel: str
    may_start: bool


@dataclass(frozen=True)
class InboundMessage:
    """A message from a person, normalised, with its tenant resolved (and its agent, or how to route it)."""

    tenant_id: uuid.UUID
    agent_id: uuid.UUID | None
    channel: str  # "terminal", "slack", "whatsapp"
    external_id: str  # the channel's id for this message: the dedupe key
    conversation_key: str  # the channel's id for the conversation (thread, DM, wa_id, terminal session)
    sender: str  # the person, in the channel's terms
    text: str
    payload: dict[str, Any] = field(default_factory=dict)  # channel facts the reply needs (ids, files)
    routing: Routing | None = None  # when agent_id is None
    answer: bool = True  # False: kept in the conversation's history (a reaction), not answered


def clean_message(message: InboundMessage) -> InboundMessage:
    """The message with its text, ids and payload made storable (see konstruct.bodies.clean_text)."""
    return replace(
        message,
        external_id=clean_text(message.external_id),
        conversation_key=clean_text(message.conversation_key),
        sender=clean_text(message.sender),
        text=clean_text(message.text),
        payload=clean(message.payload),
    )


@dataclass(frozen=True)
class Target:
    """Where the answer to one inbound message goes."""

    tenant_id: uuid.UUID
    conversation_id: uuid.UUID
    conversation_key: str
    inbound_external_id: str
    payload: dict[str, Any]
    reply_ref: str | None = None  # what prepare() returned on this or an earlier attempt
    retry: bool = False  # an earlier attempt may have shown progress (e.g. posted a placeholder) without recording it
    question: str = ""  # what the person said (e.g. to title a new thread with)


@dataclass(frozen=True)
class Reply:
    target: Target
    text: str


@dataclass(frozen=True)
class ApprovalRequest:
    """A yes/no question to whoever may approve one tool call (konstruct.approvals): shown with two buttons where the
    channel has them. A click names the approval by `approval_id`; the channel hands it to konstruct.approvals.decide."""

    approval_id: uuid.UUID
    target: Target  # the conversation the call is for
    agent: str
    tool: str
    arguments: dict[str, Any]  # redacted
    approver: str  # person | operators
    expires_minutes: float

    def question(self) -> str:
        """One line: who wants to call what, with which arguments."""
        shown = ", ".join(f"{key}={value!r}" for key, value in self.arguments.items())
        return f"{self.agent} wants to call {self.tool}({shown[:600]})"


class ChannelError(Exception):
    """Delivery through a channel failed; the message says why, without secrets."""


class Channel(Protocol):
    """How the worker talks back. A channel is handed what to say; it knows nothing of agents."""

    name: str
    # Whether the channel reports delivery statuses (sent, delivered, read) that record_sent must keep; without, a
    # reply is recorded sent by the worker itself, in the statement that closes the turn.
    reports_delivery: bool

    async def prepare(self, target: Target) -> str | None:
        """Show the person the agent is working (e.g. a placeholder); return a reference send() can use.
        On a retry, reuse what an earlier attempt showed rather than showing it twice."""
        ...

    async def working(self, target: Target, what: str) -> None:
        """Tell the person what the agent is doing now, e.g. "calling calculator…" (after prepare(), before send()).
        Best effort: a channel with nowhere to show it does nothing; the caller ignores any error."""
        ...

    async def attachments(self, target: Target) -> list[dict[str, Any]]:
        """The inbound message's media as model content parts (image_url parts, or text notes)."""
        ...

    async def send(self, reply: Reply) -> str | None:
        """Deliver the reply; return the channel's id for it, if it has one."""
        ...

    def link(self, target: Target) -> str | None:
        """Where a human finds this conversation in the channel's own app; None when it has no such place."""
        ...

    async def notify(self, tenant_id: uuid.UUID, where: str, text: str) -> None:
        """Post a notice to one of the tenant's people or rooms in this channel (an escalation target's part
        after the colon). Raise ChannelError when it cannot be delivered."""
        ...

    async def record_sent(self, session: AsyncSession, message_id: uuid.UUID, external_id: str | None) -> None:
        """Mark the stored reply sent, under the channel's id for it, in the transaction that finishes the
        turn; a channel that reports delivery statuses keeps whatever it reported already."""
        ...

    async def ask(self, request: ApprovalRequest, where: str | None) -> str | None:
        """Ask for an approval: in the request's conversation (where=None), or in one of the tenant's rooms (an
        escalation target's part after the colon, for operators). Returns a reference to what was shown (None: the
        channel shows nothing itself, e.g. the terminal, whose `konstruct chat` asks). ChannelError when it cannot."""
        ...


class StreamSink(Protocol):
    """One answer being shown as the model writes it (see Streaming)."""

    async def append(self, text: str) -> str | None:
        """Show more of the answer (buffered; sent at a bounded rate). Returns the channel's reference for the message
        when this append started it, once, so a retry can finish or replace it; None otherwise. Never raises: a
        failing stream stops showing text, and finish() delivers the reply another way."""
        ...

    async def finish(self, reply: Reply) -> str | None:
        """Make what the person sees exactly the reply's full text (which may differ from what was appended) and
        close the message; return the channel's id for it, as send() does."""
        ...


@runtime_checkable
class Streaming(Protocol):
    """A channel that can show an answer while it is written: optional, on top of Channel."""

    async def stream(self, target: Target) -> StreamSink | None:
        """A sink for this target's answer, or None where it cannot be streamed (then send() delivers it)."""
        ...


@dataclass(frozen=True)
class Template:
    """A message a channel may send where free-form text may not go (WhatsApp outside its 24-hour window)."""

    name: str
    text: str  # what the person sees, as the conversation records it


@dataclass(frozen=True)
class Window:
    """Whether free-form text may go to the person now; where it may not, the template that goes instead (None: none is
    configured, so nothing can be sent) and why."""

    open: bool
    template: Template | None = None
    why: str = ""


@runtime_checkable
class Windowed(Protocol):
    """A channel that may only send free-form text within a window (WhatsApp's 24 hours): optional, on top of Channel.
    Where the window is closed, the agent is not asked: the template is what is sent, and what is recorded."""

    async def window(self, target: Target) -> Window:
        """May free-form text go to this target's person now? (Read from what the channel knows of the conversation.)"""
        ...


async def record_template(session: AsyncSession, message_id: uuid.UUID, template: Template) -> None:
    """The stored reply did not go out: the template went instead. The conversation records the template as what was
    sent (a notice, never shown to the model as the agent's words); its delivery status is recorded as any reply's."""
    await session.execute(
        update(Message).where(Message.id == message_id).values(text=template.text, kind="notice", model=f"template:{template.name}")
    )


async def mark_sent(session: AsyncSession, message_id: uuid.UUID, external_id: str | None) -> None:
    """record_sent for a channel without delivery statuses."""
    await session.execute(update(Message).where(Message.id == message_id).values(status="sent", external_id=external_id, error=None))


@dataclass(frozen=True)
class Sent:
    """What a channel's `deliver` put out: its id, the text the person actually received (a template's name when only
    a template could go), and a note for the humans when that differs from what was asked."""

    external_id: str | None
    text: str
    note: str | None = None


@runtime_checkable
class Delivering(Protocol):
    """A channel that may deliver something other than the text it is handed (WhatsApp outside its 24-hour window):
    optional, on top of Channel; `send` stands in for it elsewhere."""

    async def deliver(self, reply: Reply) -> Sent:
        """Deliver the reply and say what went out; raise ChannelError when nothing could."""
        ...


async def deliver(channel: Channel, reply: Reply) -> Sent:
    """The reply through the channel, saying what went out (see Delivering)."""
    if isinstance(channel, Delivering):
        return await channel.deliver(reply)
    return Sent(await channel.send(reply), reply.text)


# The human desk (issue 17): a thread per escalation in a channel humans work in (Slack), where the person's messages
# are mirrored and from which humans answer. Built by konstruct.handoff; drawn by the channel.


@dataclass(frozen=True)
class DeskThread:
    """A desk thread: the workspace, the room (the escalation target's part after the colon) and its root message."""

    team: str
    where: str
    ts: str


@dataclass(frozen=True)
class DeskCard:
    """The root message of a desk thread: who, where, why, the conversation so far, and who has it now."""

    handoff_id: uuid.UUID
    person: str
    channel: str
    category: str | None
    reason: str
    summary: str | None
    turns: tuple[tuple[str, str], ...]  # (who, what), oldest first
    owner: str | None = None
    outcome: str | None = None
    ended_by: str | None = None
    link: str | None = None


@dataclass(frozen=True)
class DeskFile:
    """A file the person sent, for the desk: its bytes to upload, or a link to it."""

    name: str
    mime_type: str
    data: bytes | None = None
    url: str | None = None


@runtime_checkable
class Desk(Protocol):
    """A channel humans answer escalated conversations from: optional, on top of Channel (Slack has it)."""

    async def open_desk(self, tenant_id: uuid.UUID, where: str, card: DeskCard, *, search_since: float | None) -> DeskThread:
        """Post the card as a new thread's root; with search_since (a Unix time) first look for the card an earlier
        attempt posted since then, and return that thread instead of posting again. ChannelError when it cannot."""
        ...

    async def update_card(self, tenant_id: uuid.UUID, thread: DeskThread, card: DeskCard) -> None:
        """Redraw the thread's root (its owner, its end)."""
        ...

    async def desk_post(self, tenant_id: uuid.UUID, thread: DeskThread, text: str, *, marker: str, files: Sequence[DeskFile] = ()) -> str:
        """Post in the thread (the files after the text), tagged with `marker`; return the posted message's id."""
        ...

    async def desk_markers(self, tenant_id: uuid.UUID, thread: DeskThread) -> dict[str, str]:
        """The markers of what was posted in the thread so far, with each message's id (to not post anything twice)."""
        ...

    async def desk_edit(self, tenant_id: uuid.UUID, thread: DeskThread, ts: str, text: str) -> None:
        """Replace the text of a message posted in the thread (a status line)."""
        ...
