"""The agent pipeline: one inbound message in, one reply out, exactly once.

A turn goes through small named steps over one `Turn`:

    claim → load → gates → (prepare) → compose → answer → store → deliver → finish

Where the channel streams (the optional `Streaming` capability), `answer` shows the model's text as it comes and
`deliver` makes the shown message exactly the stored reply; elsewhere `deliver` sends it whole.

Each gate (see GATES) looks at the loaded turn and either lets it go on (None) or decides its
`Outcome`: finish without a reply (a suspended tenant, an escalated conversation) or send a fixed one
(billing paused, a rule handing over to a human, a message given up on). Everything channel-specific
(showing progress, media, delivery, links, notices, delivery statuses) is behind `Channel`.

States of an inbox row: received → processing → replied | failed | ignored, and processing → waiting → received
while a tool call waits for a human's approval (konstruct.agent.approval). No database connection is held while the
model thinks, so one worker can keep many conversations in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
from sqlalchemy import update

from konstruct import approvals, audit
from konstruct.agent import approval, escalation, grounding, memory
from konstruct.agent.agents import AgentInfo
from konstruct.agent.prompt import build_messages
from konstruct.agent.tools import policy
from konstruct.agent.tools.registry import (
    ProviderRequest,
    ToolContext,
    ToolError,
    ToolResult,
    default_registry,
    parse_arguments,
    redact,
    validate,
)
from konstruct.billing.standing import tenant_standing
from konstruct.billing.state import Standing
from konstruct.config import Settings
from konstruct.db.engine import Database, unavailable
from konstruct.db.models import Conversation, InboundMessage, Message
from konstruct.handoff import desk, replies
from konstruct.handoff import state as handoff
from konstruct.llm.client import Completion, LLMError, ToolCall, supports_vision
from konstruct.llm.service import BudgetExhausted, CallContext, LLMService
from konstruct.mail import Notice
from konstruct.messaging import Channel, Reply, Streaming, StreamSink, Target, Windowed

log = logging.getLogger(__name__)

MAX_UNSUMMARISED = 500
SUMMARY_INSTRUCTION = (
    "Summarise this conversation for your own later reference: who the person is, what they asked, what was decided or "
    "promised, what is still open. Keep every fact that may matter later; at most 200 words."
)


def split_history(newest_first: Sequence[Any], max_messages: int, max_tokens: int) -> tuple[list[Any], list[Any]]:
    """(the recent window that fits the prompt, the older turns to summarise), both oldest first.
    Tokens are estimated at four characters each."""
    window: list[Any] = []
    used = 0
    for row in newest_first:
        cost = len(row.text) // 4 + 4
        if window and (len(window) >= max_messages or used + cost > max_tokens):
            break
        window.append(row)
        used += cost
    return window[::-1], list(newest_first[len(window) :])[::-1]


# Kinds of history rows (messages.kind): what someone said, or a fixed text sent in the agent's place, which
# people see but the model is never shown as its own words.
MESSAGE, NOTICE = "message", "notice"


def as_turn(row: Any) -> tuple[str, str]:
    """A history row as the prompt has it: the person ('in'), the agent ('out'), or what a human colleague said to the
    person or noted for the agent while they had the conversation (shown to the model as such, never as its own words)."""
    if row.kind == handoff.HUMAN:
        return "human", f"While the conversation was with a human colleague, {row.author} wrote to the person: {row.text}"
    if row.kind == handoff.NOTE:
        return "human", f"{row.author}, a human colleague, handed the conversation back to you with this note: {row.text}"
    return row.direction, row.text


NO_VISION = "(The person sent an image, but this model cannot see images: say so if it matters.)"


@dataclass
class Turn:
    """One inbox row on its way to an answer: everything the steps after `load` read, loaded in one transaction."""

    inbound: InboundMessage  # the claimed row
    agent: AgentInfo
    tenant_name: str
    tenant_status: str
    allowed_hosts: tuple[str, ...]
    state: str  # the conversation's: open | escalated
    summary: str | None
    summary_until: datetime | None
    history: Sequence[Any]  # (direction, text, created_at) rows, newest first
    previous: Message | None  # a reply an earlier attempt stored and did not finish delivering
    billing: Standing | None  # None when billing is off
    rules: list[str]  # the agent's escalation rules
    turns: int  # the person's turns in this conversation (only counted when there are rules)
    channel: Channel | None
    target: Target
    resume: approval.Resume | None = None  # the turn paused on an approval before: its decisions and where to go on
    has_memories: bool = True  # the person has memories with this agent (False: recall has nothing to look for)
    has_knowledge: bool = True  # the agent may read documents with chunks (False: nothing to look up)
    passages: list[grounding.Passage] = field(default_factory=list)  # what was retrieved from the documents for it

    @property
    def tenant_id(self) -> uuid.UUID:
        return self.inbound.tenant_id

    @property
    def inbound_id(self) -> uuid.UUID:
        return self.inbound.id

    @property
    def conversation_id(self) -> uuid.UUID:
        return self.inbound.conversation_id

    @property
    def through(self) -> Channel:
        """The channel the answer goes through (the no_channel gate stops a turn without one)."""
        if self.channel is None:
            raise LookupError(f"no {self.inbound.channel!r} channel on this worker")
        return self.channel

    @property
    def link(self) -> str:
        """Where a human finds this conversation."""
        return self.through.link(self.target) or f"konstruct conversation list --escalated (conversation {self.conversation_id})"


@dataclass(frozen=True)
class Outcome:
    """What a gate decided: the row's final state, and a fixed reply to send instead of asking the model (if any)."""

    status: str  # replied | failed | ignored
    error: str | None = None
    reply: str | None = None
    model: str = ""  # what the stored fixed reply records as its model: billing, escalation, gave-up, template:NAME
    prepare: bool = False  # show progress first, so an earlier attempt's placeholder becomes this reply


@dataclass(frozen=True)
class Answer:
    text: str
    model: str
    latency_ms: int | None
    status: str = "replied"
    error: str | None = None
    kind: str = MESSAGE  # NOTICE when a fixed text stands in for the model's answer


Gate = Callable[["Pipeline", Turn], Awaitable[Outcome | None]]


async def tenant_inactive(pipeline: Pipeline, turn: Turn) -> Outcome | None:
    """A suspended (or deleted) tenant's agents do not answer."""
    return Outcome("ignored", f"tenant is {turn.tenant_status}") if turn.tenant_status != "active" else None


async def desk_reply(pipeline: Pipeline, turn: Turn) -> Outcome | None:
    """A human's answer from the desk (not the person's message): delivered to the person; the agent stays silent."""
    if turn.inbound.channel != handoff.DESK:
        return None
    status, error = await replies.deliver_reply(pipeline.db, pipeline.channels, turn.inbound, retry=turn.target.retry)
    return Outcome(status, error)


async def no_channel(pipeline: Pipeline, turn: Turn) -> Outcome | None:
    return Outcome("failed", f"no {turn.inbound.channel!r} channel on this worker") if turn.channel is None else None


async def gave_up(pipeline: Pipeline, turn: Turn) -> Outcome | None:
    """It took a worker down each time it ran alone (or raised): stop the loop, keep the row to look at,
    and tell the person (in place of any placeholder) rather than leave them waiting."""
    if turn.inbound.crashes < pipeline.settings.worker.max_attempts or turn.previous is not None:
        return None
    reason = f"gave up after {turn.inbound.crashes} attempts that did not finish"
    log.error("message %s: %s", turn.inbound_id, reason)
    prepare = turn.target.reply_ref is None and turn.target.retry  # an earlier attempt's placeholder becomes the apology
    return Outcome("failed", reason, reply=pipeline.settings.agent.apology, model="gave-up", prepare=prepare)


async def escalated(pipeline: Pipeline, turn: Turn) -> Outcome | None:
    """A human has the conversation: the agent never talks over them. `/release` hands it back."""
    if turn.state != "escalated" or turn.previous is not None:
        return None
    if turn.inbound.text.strip().lower() != escalation.RELEASE_COMMAND:
        try:  # the humans see it in the desk thread (in order, once); the agent does not answer
            await desk.mirror(pipeline.db, pipeline.channels, tenant_id=turn.tenant_id, conversation_id=turn.conversation_id,
                              search=turn.target.retry)  # fmt: skip
        except Exception as exc:  # the worker's periodic check mirrors it later
            log.warning("message %s: not mirrored to the desk yet: %s", turn.inbound_id, type(exc).__name__)
        return Outcome("ignored", "escalated: a human is handling this conversation")
    actor = f"{turn.inbound.channel}:{turn.inbound.sender}"
    await escalation.release(pipeline.db, tenant_id=turn.tenant_id, conversation_id=turn.conversation_id, actor=actor)
    return Outcome("ignored", "released the conversation back to the agent")


async def billing_paused(pipeline: Pipeline, turn: Turn) -> Outcome | None:
    """No active subscription: the agents are paused, and people are told so (no model is asked)."""
    if turn.billing is None or turn.billing.ok or turn.previous is not None:
        return None
    return Outcome("replied", f"paused: {turn.billing.reason}", reply=pipeline.settings.billing.paused, model="billing")


async def escalation_rule(pipeline: Pipeline, turn: Turn) -> Outcome | None:
    """One of the agent's rules hands the conversation to a human: escalate, and say so."""
    fresh = turn.previous is None and turn.resume is None  # a resumed turn passed its rules before it paused
    fired = escalation.check(turn.rules, turn.inbound.text, turn.turns) if turn.rules and fresh else None
    if fired is None:
        return None
    rule, why = fired
    await pipeline.escalate(turn, f"rule {rule!r} fired: {'; '.join(why.reasons)}", escalation.RULE)
    return Outcome("replied", reply=pipeline.settings.agent.handoff, model="escalation")


async def window_closed(pipeline: Pipeline, turn: Turn) -> Outcome | None:
    """Where the channel may only send a template now (WhatsApp outside its 24-hour window), the model is not asked:
    the template is the reply, and what the conversation records. With no template nothing can go out."""
    channel = turn.channel
    if turn.previous is not None or not isinstance(channel, Windowed):
        return None
    window = await channel.window(turn.target)
    if window.open:
        return None
    if window.template is None:
        return Outcome("failed", f"not answered: {window.why}")
    template = window.template
    return Outcome("replied", f"window closed: {window.why}", reply=template.text, model=f"template:{template.name}")


GATES: tuple[Gate, ...] = (tenant_inactive, desk_reply, no_channel, gave_up, escalated, billing_paused, escalation_rule, window_closed)


_INBOUND_COLUMNS = ", ".join(InboundMessage.__table__.columns.keys())
_MESSAGE_COLUMNS = ", ".join(Message.__table__.columns.keys())
_CLAIM = f"""
UPDATE inbound_messages SET status = 'processing', attempts = attempts + 1, worker_id = $2::text, claimed_at = now(), solo = $3::boolean
WHERE id = $1::uuid AND status = 'received' AND ($3::boolean OR NOT suspect)
RETURNING {_INBOUND_COLUMNS}
"""
# What the steps after the claim read about its conversation, agent and tenant, and whether there is anything to recall
# (the person's memories) or to look up (documents the agent may read): without, neither step costs a transaction.
_CONTEXT = """
SELECT t.name AS tenant_name, t.status AS tenant_status, t.allowed_hosts, c.external_id AS conversation_external_id, c.status AS state,
       c.summary, c.summary_until, a.id, a.tenant_id, a.name, a.role, a.persona, a.model, a.settings, a.created_at, a.updated_at,
       a.suggested_prompts,
       EXISTS (SELECT 1 FROM memories m WHERE m.agent_id = a.id AND m.person = $2::text) AS has_memories,
       EXISTS (SELECT 1 FROM knowledge_sources k WHERE k.chunks > 0 AND (k.agent_ids = '{}' OR a.id = ANY(k.agent_ids))) AS has_knowledge
FROM conversations c JOIN tenants t ON t.id = c.tenant_id JOIN agents a ON a.id = c.agent_id
WHERE c.id = $1::uuid
"""
_PREVIOUS = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE inbound_id = $1::uuid AND direction = 'out'"
# The conversation's unsummarised history, newest first: $4 the summary's end (NULL: none).
_HISTORY = """
SELECT direction, text, created_at, kind, author FROM messages
WHERE conversation_id = $1::uuid AND created_at <= $2::timestamptz AND status <> 'failed' AND kind = ANY($3::text[])
  AND ($4::timestamptz IS NULL OR created_at > $4::timestamptz)
ORDER BY created_at DESC, direction DESC LIMIT $5::int
"""
_TURNS = "SELECT count(*) FROM inbound_messages WHERE conversation_id = $1::uuid AND channel <> $2::text"


class HistoryRow(NamedTuple):
    direction: str
    text: str
    created_at: datetime
    kind: str
    author: str


def _json(value: Any) -> Any:
    """A json/jsonb value as the driver's own connection returns it (text) decoded."""
    return json.loads(value) if isinstance(value, str) else value


async def claim(conn: asyncpg.Connection, inbound_id: uuid.UUID, worker_id: str, *, solo: bool) -> InboundMessage | None:
    """Take the row (received → processing), or None when it is not ours: another worker has it, it is
    finished, or it is a suspect only the suspect lane (solo) may take."""
    row = await conn.fetchrow(_CLAIM, inbound_id, worker_id, solo)
    if row is None:
        return None
    return InboundMessage(**{**dict(row), "payload": _json(row["payload"])})


# The reply, kept before it is sent (once per inbound message: NULL when another attempt stored it first).
_STORE_REPLY = """
INSERT INTO messages (tenant_id, conversation_id, inbound_id, direction, author, text, status, kind, model, latency_ms)
VALUES ($1::uuid, $2::uuid, $3::uuid, 'out', $4::text, $5::text, 'sending', $6::text, $7::text, $8::int)
ON CONFLICT DO NOTHING RETURNING id
"""
# The row closed, the conversation's last activity, the reply's record (sent under the channel's id, or failed; $10 NULL:
# none, or the channel records it itself) and the audit entry: one statement, one round trip.
_FINISH = """
WITH inbound AS (
    UPDATE inbound_messages SET status = $2::text, error = $3::text, finished_at = now() WHERE id = $1::uuid
), conversation AS (
    UPDATE conversations SET last_message_at = now() WHERE id = $4::uuid
), reply AS (
    UPDATE messages SET status = $11::text, external_id = coalesce($12::text, external_id), error = $13::text WHERE id = $10::uuid
)
INSERT INTO audit_events (tenant_id, actor, action, target, detail) VALUES ($5::uuid, $6::text, $7::text, $8::text, $9::text::jsonb)
"""


@dataclass
class Pipeline:
    settings: Settings
    db: Database
    channels: Mapping[str, Channel]
    worker_id: str
    remember: Callable[[uuid.UUID, uuid.UUID], None] | None = None  # queues embedding what the person said
    notify: Callable[[Notice], None] | None = None  # queues an email to a tenant's admins
    retrieve: grounding.Retrieve | None = None  # searches the tenant's documents (konstruct.knowledge.search)
    gates: tuple[Gate, ...] = GATES
    llm: LLMService = field(init=False)

    def __post_init__(self) -> None:
        self.llm = LLMService(self.settings, self.db, self.notify)

    async def process(self, *, tenant_id: uuid.UUID, inbound_id: uuid.UUID, solo: bool = False) -> str | None:
        """Answer one inbox row. Returns its final state, or None when it was not ours to take.
        solo: the worker runs nothing else meanwhile (the suspect lane); a suspect row is only taken that way."""
        async with self.db.tenant_driver(tenant_id=tenant_id) as conn:
            inbound = await claim(conn, inbound_id, self.worker_id, solo=solo)
            if inbound is None:
                return None  # a duplicate doorbell: another worker has it or it is finished
            turn = await self.load(conn, inbound)
        if self.settings.billing.enabled or (inbound.attempts > 1 and turn.previous is None):
            async with self.db.tenant(tenant_id=tenant_id) as session:
                if self.settings.billing.enabled:
                    turn.billing = await tenant_standing(session, self.settings, inbound.tenant_id)
                if inbound.attempts > 1 and turn.previous is None:
                    turn.resume = await approval.load_resume(session, inbound.id)
        for gate in self.gates:
            decided = await gate(self, turn)
            if decided is not None:
                return await self.conclude(turn, decided)
        if turn.resume is not None and turn.resume.pending and await approval.wait_again(self, turn):
            return approval.WAITING  # still undecided: parked again (a decision rings for it)
        if turn.target.reply_ref is None:
            await self.prepare(turn)
        if turn.previous is not None:
            # An earlier attempt stored the reply and died before finishing: deliver that one, don't ask again.
            answer = Answer(turn.previous.text, turn.previous.model or "", turn.previous.latency_ms)
            reply_id, sink = turn.previous.id, None  # delivered whole: nothing is streamed again
        else:
            model, messages = await self.compose(turn) if turn.resume is None else (turn.resume.state.model, [])
            sink = await self.open_stream(turn)
            answer = await self.answer(turn, model, messages, sink)
            if answer.status == approval.WAITING:
                return approval.WAITING  # parked on an approval: the worker slot is free; a decision resumes it
            answer = await self.cite(turn, answer, sink)
            stored = await self.store(turn, answer.text, answer.model, answer.latency_ms, kind=answer.kind)
            if stored is None:
                return None  # someone else stored the reply first (unique per inbound message)
            reply_id = stored
        status = await self.deliver(turn, reply_id, answer.text, answer.status, answer.error, sink)
        await self.remember_later(turn)
        return status

    async def load(self, conn: asyncpg.Connection, inbound: InboundMessage) -> Turn:
        """Everything the later steps read, in the claim's transaction (the billing standing and an approval's resume
        state, when they matter, are read by `process` right after it)."""
        context = await conn.fetchrow(_CONTEXT, inbound.conversation_id, inbound.sender)
        assert context is not None  # the conversation, its agent and tenant: foreign keys of the row just claimed
        agent = AgentInfo(
            context["id"], context["tenant_id"], context["name"], context["role"], context["persona"], context["model"],
            dict(_json(context["settings"]) or {}), context["created_at"], context["updated_at"],
            tuple(_json(context["suggested_prompts"]) or ()),
        )  # fmt: skip
        found = await conn.fetchrow(_PREVIOUS, inbound.id)
        previous = Message(**dict(found)) if found is not None else None
        kinds = [MESSAGE, handoff.HUMAN, handoff.NOTE]  # an apology or a notice is not the agent's own words
        rows = await conn.fetch(_HISTORY, inbound.conversation_id, inbound.received_at, kinds, context["summary_until"], MAX_UNSUMMARISED)
        history = [HistoryRow(*row) for row in rows]
        rules = list(agent.settings.get("escalation_rules") or [])
        # `count` in a rule: the person's turns in this conversation
        turns = int(await conn.fetchval(_TURNS, inbound.conversation_id, handoff.DESK) or 0) if rules else 0
        target = Target(inbound.tenant_id, inbound.conversation_id, context["conversation_external_id"], inbound.external_id,
                        dict(inbound.payload), inbound.reply_ref, retry=inbound.attempts > 1, question=inbound.text)  # fmt: skip
        return Turn(
            inbound, agent, context["tenant_name"], context["tenant_status"], tuple(context["allowed_hosts"] or ()), context["state"],
            context["summary"], context["summary_until"], history, previous, None, rules, turns, self.channels.get(inbound.channel),
            target, has_memories=context["has_memories"], has_knowledge=context["has_knowledge"],
        )  # fmt: skip

    async def conclude(self, turn: Turn, outcome: Outcome) -> str | None:
        """Carry out a gate's decision."""
        if outcome.reply is None:
            await self.finish(turn, None, status=outcome.status, error=outcome.error)
            return outcome.status
        if outcome.prepare:
            await self.prepare(turn)
        reply_id = await self.store(turn, outcome.reply, outcome.model, None, kind=NOTICE)  # a gate's fixed reply
        if reply_id is None:
            return None
        return await self.deliver(turn, reply_id, outcome.reply, outcome.status, outcome.error)

    async def prepare(self, turn: Turn) -> None:
        """Let the channel show the agent is working; keep its reference so a retry reuses it."""
        try:
            ref = await turn.through.prepare(turn.target)
        except Exception as exc:  # a missing placeholder must not cost the answer
            log.warning("message %s: %s could not show progress: %s", turn.inbound_id, turn.through.name, exc)
            return
        if ref is not None:
            await self.keep_ref(turn, ref)

    async def keep_ref(self, turn: Turn, ref: str) -> None:
        """Record what the channel showed (a placeholder, a stream's message) before going on: a retry reuses it."""
        async with self.db.tenant(tenant_id=turn.tenant_id) as session:
            await session.execute(update(InboundMessage).where(InboundMessage.id == turn.inbound_id).values(reply_ref=ref))
        turn.target = replace(turn.target, reply_ref=ref)

    async def open_stream(self, turn: Turn) -> StreamSink | None:
        """A sink to stream the answer into, when the channel streams this target; None: it is sent whole."""
        channel = turn.through
        if not isinstance(channel, Streaming):
            return None
        try:
            return await channel.stream(turn.target)
        except Exception as exc:  # streaming is a nicety: the answer still goes out whole
            log.warning("message %s: %s cannot stream: %s", turn.inbound_id, channel.name, type(exc).__name__)
            return None

    async def working(self, turn: Turn, what: str) -> None:
        """Let the channel say what the agent is doing (best effort: it never costs the answer)."""
        try:
            await turn.through.working(turn.target, what)
        except Exception as exc:
            log.warning("message %s: %s could not show %r: %s", turn.inbound_id, turn.through.name, what, type(exc).__name__)

    async def compose(self, turn: Turn) -> tuple[str, list[dict[str, Any]]]:
        """The model to ask and the messages to send it: persona, memories, summary, recent history, the message."""
        inbound, agent = turn.inbound, turn.agent
        try:
            parts = await turn.through.attachments(turn.target)
        except Exception as exc:  # the answer matters more than the picture: say it could not be read
            log.warning("message %s: attachments unavailable: %s", turn.inbound_id, type(exc).__name__)
            parts = [{"type": "text", "text": "(The person attached files that could not be downloaded.)"}]
        model = agent.model or self.settings.llm.model
        if any(p.get("type") == "image_url" for p in parts) and not await asyncio.to_thread(supports_vision, model):
            parts = [p if p.get("type") != "image_url" else {"type": "text", "text": NO_VISION} for p in parts]
        memories = await self.recall(turn)
        turn.passages = await self.look_up(turn, inbound.text, self.settings.knowledge.passages)
        knowledge = grounding.prompt_section(turn.tenant_name, turn.passages)
        window, older = split_history(turn.history, self.settings.agent.history_messages, self.settings.agent.history_tokens)
        summary = turn.summary
        if older:
            summary = await self.summarise(turn, model, older) or summary
        history = [as_turn(row) for row in window]
        return model, build_messages(agent, turn.tenant_name, history, parts, memories, summary, knowledge)

    async def recall(self, turn: Turn) -> list[str]:
        """What this person told the agent before, closest to the message (none when memory is off or fails)."""
        if not self.settings.memory.enabled or not turn.has_memories:
            return []
        try:
            return await memory.recall(self.db, tenant_id=turn.tenant_id, agent_id=turn.agent.id, person=turn.inbound.sender,
                                       query=turn.inbound.text, k=self.settings.memory.recall)  # fmt: skip
        except Exception as exc:  # an answer without memories beats no answer
            log.warning("message %s: recall failed: %s", turn.inbound_id, type(exc).__name__)
            return []

    async def look_up(self, turn: Turn, question: str, k: int) -> list[grounding.Passage]:
        """The passages of the tenant's documents that best answer `question` (none without knowledge, or on failure)."""
        if self.retrieve is None or not self.settings.knowledge.enabled or not turn.has_knowledge or not question.strip():
            return []
        try:
            return list(await self.retrieve(turn.tenant_id, turn.agent.id, question, k))
        except Exception as exc:  # an answer without the documents beats no answer
            log.warning("message %s: knowledge retrieval failed: %s", turn.inbound_id, type(exc).__name__)
            return []

    async def cite(self, turn: Turn, answer: Answer, sink: StreamSink | None) -> Answer:
        """The model's answer with its sources footer, when it used the documents (stored and sent with it, and
        streamed after the answer's text where that streams, so the streamed message ends exactly as stored)."""
        if answer.kind != MESSAGE or answer.status != "replied" or not turn.passages or not self.settings.knowledge.footer:
            return answer
        text = grounding.with_sources(answer.text, turn.passages)
        if sink is not None and text != answer.text and text.startswith(answer.text):
            await self.stream_text(turn, sink, text[len(answer.text) :])
        return replace(answer, text=text)

    async def stream_text(self, turn: Turn, sink: StreamSink, text: str) -> None:
        ref = await sink.append(text)
        if ref is not None:  # the stream's message exists now: a retry must find it
            await self.keep_ref(turn, ref)

    async def answer(self, turn: Turn, model: str, messages: list[dict[str, Any]], sink: StreamSink | None = None) -> Answer:
        """Ask the model (with the agent's tools), streaming its text into `sink` if any; a spent budget or a failing
        model still gives the person an answer."""
        show: Callable[[str], Awaitable[None]] | None = None
        if sink is not None:

            async def show(text: str) -> None:
                await self.stream_text(turn, sink, text)

        try:
            result = await self.run_tools(turn, model, messages, show)
        except approval.Waiting:
            return Answer("", model, None, status=approval.WAITING)
        except BudgetExhausted as exc:
            # The operator has been told (once a month); the person hears the agent is unavailable, and where the tenant
            # has an escalation target a human answers instead.
            await self.escalate(turn, f"the monthly LLM budget is spent: {exc}", escalation.BUDGET, only_with_target=True)
            return Answer(self.settings.budget.unavailable, "budget", None, error=f"budget: {exc}", kind=NOTICE)
        except LLMError as exc:
            log.warning("message %s: the model failed: %s", turn.inbound_id, exc)
            return Answer(self.settings.agent.apology, model, None, status="failed", error=str(exc), kind=NOTICE)
        return Answer(result.text, result.model, result.latency_ms)

    async def run_tools(
        self, turn: Turn, model: str, messages: list[dict[str, Any]], show: Callable[[str], Awaitable[None]] | None
    ) -> Completion:
        """The tool loop; a call waiting for approval pauses the turn (approval.Waiting), unless it was decided at once."""
        while True:
            try:
                return await ToolRun(self, turn).answer(model, messages, show)
            except approval.Paused as paused:
                if await approval.pause(self, turn, paused):
                    raise approval.Waiting from None
                # decided before the row was parked: go on from the stored state with the decision (turn.resume)

    async def summarise(self, turn: Turn, model: str, older: list[Any]) -> str | None:
        """Fold the turns that no longer fit the prompt into the conversation's summary (by the model), and keep it."""
        agent = turn.agent
        turns = "\n".join(f"{'Person' if row.direction == 'in' else agent.name}: {row.text}" for row in older)
        summary = turn.summary
        prompt = [
            {"role": "system", "content": SUMMARY_INSTRUCTION},
            {"role": "user", "content": (f"Summary so far:\n{summary}\n\n" if summary else "") + f"Next turns:\n{turns}"},
        ]
        try:
            ctx = CallContext(turn.tenant_id, agent.id, turn.conversation_id, "summary", f"agent:{agent.name}")
            result = await self.llm.complete(ctx, model=model, messages=prompt, fallbacks=(agent.settings.get("fallbacks") or None))
        except LLMError as exc:
            log.warning("conversation %s: could not summarise older turns: %s", turn.conversation_id, exc)
            return None
        async with self.db.tenant(tenant_id=turn.tenant_id) as session:
            await session.execute(
                update(Conversation)
                .where(Conversation.id == turn.conversation_id)
                .values(summary=result.text[:8000], summary_until=older[-1].created_at)
            )
        return result.text[:8000]

    async def escalate(self, turn: Turn, reason: str, category: str, *, only_with_target: bool = False) -> bool:
        """Hand the conversation to a human for `reason` (one of escalation.CATEGORIES)."""
        return await escalation.escalate(self.db, tenant_id=turn.tenant_id, conversation_id=turn.conversation_id, reason=reason,
                                         category=category, actor=f"agent:{turn.agent.name}", link=turn.link, channels=self.channels,
                                         only_with_target=only_with_target, last_turns=self.settings.escalation.last_turns)  # fmt: skip

    async def store(self, turn: Turn, text: str, model: str, latency_ms: int | None, *, kind: str) -> uuid.UUID | None:
        """Keep the reply before sending it (unique per inbound message: None when another attempt stored one).
        kind: MESSAGE for the model's answer, NOTICE for a fixed text in its place (left out of later prompts)."""
        async with self.db.tenant_driver(tenant_id=turn.tenant_id) as conn:
            stored: uuid.UUID | None = await conn.fetchval(
                _STORE_REPLY, turn.tenant_id, turn.conversation_id, turn.inbound_id, turn.agent.name, text, kind, model, latency_ms
            )
        return stored

    async def deliver(
        self, turn: Turn, reply_id: uuid.UUID, text: str, status: str, error: str | None, sink: StreamSink | None = None
    ) -> str:
        """Send the stored reply (or make the streamed message exactly it), then finish the turn."""
        try:
            reply = Reply(turn.target, text)
            external_id = await (sink.finish(reply) if sink is not None else turn.through.send(reply))
        except Exception as exc:
            if unavailable(exc):
                # The channels read the database (the workspace's token, the window, the feedback block) before anything
                # goes out: nothing was sent. Not the message's failure: the worker gives it back and a later attempt
                # delivers the stored reply (turn.previous), without asking the model again.
                raise
            log.error("message %s: delivery through %s failed: %s", turn.inbound_id, turn.through.name, type(exc).__name__)
            error = f"delivery failed: {type(exc).__name__}: {exc}"[:500]
            await self.finish(turn, reply_id, status="failed", error=error, delivered=False)
            return "failed"
        await self.finish(turn, reply_id, status=status, error=error, external_id=external_id)
        return status

    async def finish(
        self,
        turn: Turn,
        reply_id: uuid.UUID | None,
        *,
        status: str,
        error: str | None,
        external_id: str | None = None,
        delivered: bool = True,
    ) -> None:
        """Close the row (and the reply's delivery record) in one transaction, with its audit entry: one statement, unless
        the channel reports delivery statuses (it records the reply sent itself, keeping what it reported already)."""
        own_record = reply_id is not None and delivered and turn.through.reports_delivery
        reply: tuple[Any, ...] = (None, None, None, None)  # the reply's record left to the channel, or there is none
        if reply_id is not None and not own_record:
            reply = (reply_id, "sent", external_id, None) if delivered else (reply_id, "failed", None, error)
        action = {"replied": "message.replied", "failed": "message.failed", "ignored": "message.ignored"}[status]
        args = (
            turn.inbound_id, status, error, turn.conversation_id, turn.tenant_id, f"worker:{self.worker_id}", action, str(turn.inbound_id),
            json.dumps({"error": error} if error else {"reply_id": str(reply_id)}), *reply,
        )  # fmt: skip
        if own_record:
            assert reply_id is not None
            async with self.db.tenant(tenant_id=turn.tenant_id) as session:
                await turn.through.record_sent(session, reply_id, external_id)
                raw: asyncpg.Connection = (await (await session.connection()).get_raw_connection()).driver_connection  # type: ignore[assignment]
                await raw.execute(_FINISH, *args)  # the same transaction
            return
        async with self.db.tenant_driver(tenant_id=turn.tenant_id) as conn:
            await conn.execute(_FINISH, *args)

    async def remember_later(self, turn: Turn) -> None:
        """Queue embedding what the person said, when it is worth remembering (fire and forget)."""
        if self.remember is None or not self.settings.memory.enabled:
            return
        if not memory.worth_remembering(turn.inbound.text, self.settings.memory.min_words):
            return
        try:
            await asyncio.to_thread(self.remember, turn.tenant_id, turn.inbound_id)
        except Exception as exc:
            log.warning("message %s: could not queue remembering it: %s", turn.inbound_id, type(exc).__name__)


KNOWLEDGE_SEARCH = "knowledge_search"


def _has_documents(turn: Turn) -> bool:
    """Whether the agent read passages for this turn (or, resumed after an approval, had the search offered then)."""
    if turn.passages:
        return True
    return turn.resume is not None and any(call.name == KNOWLEDGE_SEARCH for call in turn.resume.state.calls)


class ToolRun:
    """The bounded tool-call loop for one answer: the model may call the agent's tools for up to
    `agent.tool_steps` turns and `agent.tool_seconds` in all; each call is audited (arguments redacted).
    A tool with policy `deny` is never offered nor run; one with `ask` runs only once approved (approval.Paused
    otherwise), and a turn that paused goes on from where it stopped (`turn.resume`)."""

    def __init__(self, pipeline: Pipeline, turn: Turn) -> None:
        self.pipeline, self.turn, self.agent = pipeline, turn, turn.agent
        self.names = list(self.agent.settings.get("tools") or [])
        if KNOWLEDGE_SEARCH not in self.names and _has_documents(turn):
            self.names.append(KNOWLEDGE_SEARCH)  # offered whenever the agent has documents (policy `deny` turns it off)
        self.registry = default_registry() if self.names else None
        self._choose()
        self.decisions = dict(turn.resume.decisions) if turn.resume else {}
        services: dict[str, Callable[..., Awaitable[Any]]] = {
            "memory_search": self._memory_search, "escalate": self._escalate, KNOWLEDGE_SEARCH: self._knowledge_search,
        }  # fmt: skip
        self.failed: list[str] = []  # the tools that failed in this answer, in order
        self.ctx = ToolContext(
            turn.tenant_id, self.agent.id, turn.conversation_id, turn.inbound.sender, turn.allowed_hosts,
            allow_private=pipeline.settings.agent.web_fetch_private, services=services,
            private_networks=tuple(pipeline.settings.agent.web_fetch_private_networks),
            web_seconds=pipeline.settings.agent.web_fetch_seconds, ca_file=pipeline.settings.agent.web_fetch_ca_file,
        )  # fmt: skip

    def _choose(self) -> None:
        """Each of the agent's tools' policy (its own choice or the tool's default), and the tools the model is offered
        (all but `deny`); again once the MCP servers' tools joined for the turn."""
        self.policies = policy.policies(self.registry, self.names, self.agent.settings) if self.registry else {}
        self.offered = [name for name, chosen in self.policies.items() if chosen.mode != policy.DENY]

    async def answer(self, model: str, messages: list[dict[str, Any]], show: Callable[[str], Awaitable[None]] | None = None) -> Completion:
        """The final answer; `show` receives the model's text as it streams, every turn's (tool-call turns' too)."""
        settings = self.pipeline.settings
        if self.registry is not None:  # the agent's MCP servers' tools join the built-ins for this turn
            request = ProviderRequest(tuple(self.names), self.ctx, self.agent.name, settings, self.pipeline.db)
            self.registry, self.names = await self.registry.for_turn(self.names, request)
            self._choose()
        specs = self.registry.specs(self.offered) if self.registry else []
        deadline = time.monotonic() + settings.agent.tool_seconds
        llm = self.pipeline.llm
        ctx = CallContext(self.ctx.tenant_id, self.agent.id, self.ctx.conversation_id, "reply", f"agent:{self.agent.name}")
        fallbacks = self.agent.settings.get("fallbacks") or None
        resumed = self.turn.resume
        if resumed is not None:
            messages, steps, calls = list(resumed.state.messages), resumed.state.steps, list(resumed.state.calls)
        else:
            result = await llm.complete(ctx, model=model, messages=messages, tools=specs or None, fallbacks=fallbacks, on_text=show)
            if not result.tool_calls or self.registry is None:
                return result
            messages, steps, calls = await self._next(messages, result, show), 1, list(result.tool_calls)
        while True:
            for index, call in enumerate(calls):
                output = await self._output(call, deadline, approval.LoopState(model, messages, steps, calls[index:]))
                messages.append({"role": "tool", "tool_call_id": call.id, "content": output})
            # Out of steps or time: one last turn without tools, so the model answers with what it has.
            exhausted = steps >= settings.agent.tool_steps or time.monotonic() >= deadline
            tools = None if exhausted else specs
            result = await llm.complete(ctx, model=model, messages=messages, tools=tools, fallbacks=fallbacks, on_text=show)
            if exhausted or not result.tool_calls:
                return result
            messages, steps, calls = await self._next(messages, result, show), steps + 1, list(result.tool_calls)

    @staticmethod
    async def _next(
        messages: list[dict[str, Any]], result: Completion, show: Callable[[str], Awaitable[None]] | None
    ) -> list[dict[str, Any]]:
        if show is not None and result.text:
            await show("\n\n")  # what the model said before calling tools stands apart from what follows
        return [*messages, result.assistant_message()]

    async def _output(self, call: ToolCall, deadline: float, state: approval.LoopState) -> str:
        """What one call gives the model: its result, or why it was not made. Raises approval.Paused for an `ask`
        call without a decision (`state`: where the loop stands, this call first)."""
        remaining = deadline - time.monotonic()
        if call.name not in self.offered or self.registry is None:
            return f"error: there is no tool named {call.name!r}"
        if remaining <= 0:
            return "error: the time for tools is up; answer with what you have"
        chosen = self.policies[call.name]
        if chosen.mode == policy.ASK:
            refused = self._unapproved(call, chosen, state)
            if refused is not None:
                return refused
        await self.pipeline.working(self.turn, f"calling {call.name}…")
        outcome = await self.registry.call(call.name, call.arguments, self.ctx, timeout=remaining)
        if not outcome.ok:
            self.failed.append(call.name)
        await self._audit(call.name, outcome)
        return outcome.output

    def _unapproved(self, call: ToolCall, chosen: policy.Policy, state: approval.LoopState) -> str | None:
        """None when the call was approved; the error for the model when it was denied, expired or malformed."""
        decided = self.decisions.get(call.id)
        if decided == approvals.APPROVED:
            return None
        if decided is not None:
            return approval.refusal(decided, call.name, self.pipeline.settings.approvals.expire_after)
        tool = self.registry.get(call.name) if self.registry else None
        assert tool is not None
        try:  # nobody is asked about a call that could not run anyway
            arguments = parse_arguments(call.arguments)
        except ToolError as exc:
            return f"error: {exc}"
        problems = validate(dict(arguments), tool.parameters)
        if problems:
            return "error: invalid arguments: " + "; ".join(problems)
        raise approval.Paused(call, chosen, arguments, redact(arguments, tool.secret_args), state)

    async def _audit(self, name: str, outcome: ToolResult) -> None:
        async with self.pipeline.db.tenant(tenant_id=self.ctx.tenant_id) as session:
            await audit.record(
                session, tenant_id=self.ctx.tenant_id, actor=f"agent:{self.agent.name}", action="tool.called", target=name,
                detail={"arguments": outcome.redacted_arguments, "ok": outcome.ok, "ms": outcome.duration_ms,
                        "conversation_id": str(self.ctx.conversation_id), **({} if outcome.ok else {"error": outcome.output[:300]})},
            )  # fmt: skip

    async def _memory_search(self, query: str, limit: int = 5) -> list[str]:
        return await memory.recall(self.pipeline.db, tenant_id=self.ctx.tenant_id, agent_id=self.agent.id, person=self.ctx.person,
                                   query=query, k=limit)  # fmt: skip

    async def _knowledge_search(self, query: str, limit: int | None = None) -> list[grounding.Passage]:
        """The model searching the documents again; what it finds can be cited (and footed) like the first passages."""
        found = await self.pipeline.look_up(self.turn, query, limit or self.pipeline.settings.knowledge.passages)
        known = {p.chunk_id for p in self.turn.passages}
        self.turn.passages.extend(p for p in found if p.chunk_id not in known)
        return found

    async def _escalate(self, reason: str, category: str | None = None) -> bool:
        """The model's escalate_to_human: its category if it gave one, else tool_failure after a tool failed in this
        answer, else person_asked."""
        if category is None:
            category = escalation.TOOL_FAILURE if self.failed else escalation.PERSON_ASKED
        failed = f" (after {', '.join(dict.fromkeys(self.failed))} failed)" if self.failed and category == escalation.TOOL_FAILURE else ""
        return await self.pipeline.escalate(self.turn, f"the agent asked: {reason}{failed}", category)
