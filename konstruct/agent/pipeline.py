"""The agent pipeline: one inbound message in, one reply out, exactly once.

States of an inbox row: received → processing → replied | failed | ignored. No database connection
is held while the model thinks, so one worker can keep many conversations in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from konstruct import audit
from konstruct.agent import escalation, memory
from konstruct.agent.agents import AgentInfo
from konstruct.agent.prompt import build_messages
from konstruct.agent.tools.registry import ToolContext, ToolResult, default_registry
from konstruct.billing.events import tenant_standing
from konstruct.billing.state import Standing
from konstruct.channels.base import Channel, Reply, Target
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Agent, Conversation, InboundMessage, Message, Tenant
from konstruct.llm.client import Completion, LLMError, supports_vision
from konstruct.llm.service import BudgetExhausted, CallContext, LLMService, Notice

log = logging.getLogger(__name__)

_LOCK_DELIVERY = text("SELECT pg_advisory_xact_lock(hashtext('delivery:' || CAST(:external_id AS text)))")
_SENT = text("""
UPDATE messages m SET external_id = CAST(:external_id AS text), status = coalesce(d.status, 'sent'),
                      status_at = coalesce(d.status_at, now()), error = d.error
FROM (SELECT 1) AS one LEFT JOIN LATERAL (
    SELECT status, status_at, error FROM delivery_statuses WHERE external_id = CAST(:external_id AS text)
    ORDER BY konstruct_delivery_rank(status) DESC LIMIT 1
) AS d ON true
WHERE m.id = :id
""")


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


NO_VISION = "(The person sent an image, but this model cannot see images: say so if it matters.)"


@dataclass
class Pipeline:
    settings: Settings
    db: Database
    channels: dict[str, Channel]
    worker_id: str
    remember: Callable[[uuid.UUID, uuid.UUID], None] | None = None  # queues embedding what the person said
    notify: Callable[[Notice], None] | None = None  # queues an email to a tenant's admins
    llm: LLMService = field(init=False)

    def __post_init__(self) -> None:
        self.llm = LLMService(self.settings, self.db, self.notify)

    async def process(self, *, tenant_id: uuid.UUID, inbound_id: uuid.UUID, solo: bool = False) -> str | None:
        """Answer one inbox row. Returns its final state, or None when it was not ours to take.
        solo: the worker runs nothing else meanwhile (the suspect lane); a suspect row is only taken that way."""
        async with self.db.tenant(tenant_id=tenant_id) as session:
            inbound = await session.scalar(
                update(InboundMessage)
                .where(InboundMessage.id == inbound_id, InboundMessage.status == "received", *([] if solo else [~InboundMessage.suspect]))
                .values(
                    status="processing",
                    attempts=InboundMessage.attempts + 1,
                    worker_id=self.worker_id,
                    claimed_at=func.now(),
                    solo=solo,
                )
                .returning(InboundMessage)
            )
            if inbound is None:
                return None  # a duplicate doorbell: another worker has it or it is finished
            context = (
                await session.execute(
                    select(
                        Tenant.name,
                        Tenant.status,
                        Tenant.allowed_hosts,
                        Conversation.external_id,
                        Conversation.status.label("state"),
                        Conversation.channel.label("conversation_channel"),
                        Conversation.summary,
                        Conversation.summary_until,
                        Agent,
                    )
                    .join(Conversation, Conversation.tenant_id == Tenant.id)
                    .join(Agent, Agent.id == Conversation.agent_id)
                    .where(Conversation.id == inbound.conversation_id)
                )
            ).one()
            agent = AgentInfo.from_row(context.Agent)
            previous = await session.scalar(select(Message).where(Message.inbound_id == inbound_id, Message.direction == "out"))
            summary, summary_until = context.summary, context.summary_until
            since = [Message.created_at > summary_until] if summary_until is not None else []
            history = (
                await session.execute(
                    select(Message.direction, Message.text, Message.created_at)
                    .where(
                        Message.conversation_id == inbound.conversation_id,
                        Message.created_at <= inbound.received_at,
                        Message.status != "failed",
                        *since,
                    )
                    .order_by(Message.created_at.desc(), Message.direction.desc())
                    .limit(MAX_UNSUMMARISED)
                )
            ).all()
            tenant_name, tenant_status = context.name, context.status
            billing: Standing | None = None
            if self.settings.billing.enabled:
                billing = await tenant_standing(session, self.settings, tenant_id)
            conversation_id, conversation_key = inbound.conversation_id, context.external_id
            rules = list(agent.settings.get("escalation_rules") or [])
            turns = 0
            if rules:  # `count` in a rule: the person's turns in this conversation
                turns = int(
                    await session.scalar(
                        select(func.count()).select_from(InboundMessage).where(InboundMessage.conversation_id == inbound.conversation_id)
                    )
                    or 0
                )

        if tenant_status != "active":
            await self._finish(tenant_id, inbound_id, None, status="ignored", error=f"tenant is {tenant_status}")
            return "ignored"
        channel = self.channels.get(inbound.channel)
        if channel is None:
            await self._finish(tenant_id, inbound_id, None, status="failed", error=f"no {inbound.channel!r} channel on this worker")
            return "failed"
        target = Target(tenant_id, conversation_id, conversation_key, inbound.external_id, dict(inbound.payload), inbound.reply_ref,
                        retry=inbound.attempts > 1)  # fmt: skip
        if inbound.crashes >= self.settings.worker.max_attempts and previous is None:
            # It took a worker down each time it ran alone (or raised): stop the loop, keep the row to look at,
            # and tell the person (in place of any placeholder) rather than leave them waiting.
            reason = f"gave up after {inbound.crashes} attempts that did not finish"
            log.error("message %s: %s", inbound_id, reason)
            if target.reply_ref is None and target.retry:  # an earlier attempt's placeholder becomes the apology
                target = await self._prepare(channel, target, inbound_id)
            apology_id = await self._store_reply(
                tenant_id, conversation_id, inbound_id, agent, self.settings.agent.apology, "gave-up", None
            )
            if apology_id is None:
                return None
            return await self._deliver(channel, target, inbound_id, apology_id, self.settings.agent.apology, "failed", reason)

        if context.state == "escalated" and previous is None:
            # A human has the conversation: the agent never talks over them. `/release` hands it back.
            if inbound.text.strip().lower() == escalation.RELEASE_COMMAND:
                await escalation.release(
                    self.db, tenant_id=tenant_id, conversation_id=conversation_id, actor=f"{inbound.channel}:{inbound.sender}"
                )
                await self._finish(tenant_id, inbound_id, None, status="ignored", error="released the conversation back to the agent")
            else:
                await self._finish(tenant_id, inbound_id, None, status="ignored", error="escalated: a human is handling this conversation")
            return "ignored"

        if billing is not None and not billing.ok and previous is None:
            # No active subscription: the agents are paused, and people are told so (no model is asked).
            notice_id = await self._store_reply(
                tenant_id, conversation_id, inbound_id, agent, self.settings.billing.paused, "billing", None
            )
            if notice_id is None:
                return None
            return await self._deliver(
                channel, target, inbound_id, notice_id, self.settings.billing.paused, "replied", f"paused: {billing.reason}"
            )
        fired = escalation.check(rules, inbound.text, turns) if rules and previous is None else None
        if fired is not None:
            rule, why = fired
            link = escalation.conversation_link(inbound.channel, target.payload, conversation_id)
            reason = f"rule {rule!r} fired: {'; '.join(why.reasons)}"
            await escalation.escalate(self.db, self.settings, tenant_id=tenant_id, conversation_id=conversation_id, reason=reason,
                                      actor=f"agent:{agent.name}", link=link)  # fmt: skip
            handoff_id = await self._store_reply(
                tenant_id, conversation_id, inbound_id, agent, self.settings.agent.handoff, "escalation", None
            )
            if handoff_id is None:
                return None
            return await self._deliver(channel, target, inbound_id, handoff_id, self.settings.agent.handoff, "replied", None)

        if target.reply_ref is None:
            target = await self._prepare(channel, target, inbound_id)

        status = "replied"
        error: str | None = None
        reply_id: uuid.UUID | None
        if previous is not None:
            # An earlier attempt stored the reply and died before finishing: deliver that one, don't ask again.
            reply_id, reply_text = previous.id, previous.text
        else:
            try:
                parts = await channel.attachments(target)
            except Exception as exc:  # the answer matters more than the picture: say it could not be read
                log.warning("message %s: attachments unavailable: %s", inbound_id, type(exc).__name__)
                parts = [{"type": "text", "text": "(The person attached files that could not be downloaded.)"}]
            model = agent.model or self.settings.llm.model
            if any(p.get("type") == "image_url" for p in parts) and not await asyncio.to_thread(supports_vision, model):
                parts = [p if p.get("type") != "image_url" else {"type": "text", "text": NO_VISION} for p in parts]
            memories: list[str] = []
            if self.settings.memory.enabled:
                try:
                    memories = await memory.recall(self.db, tenant_id=tenant_id, agent_id=agent.id, person=inbound.sender,
                                                   query=inbound.text, k=self.settings.memory.recall)  # fmt: skip
                except Exception as exc:  # an answer without memories beats no answer
                    log.warning("message %s: recall failed: %s", inbound_id, type(exc).__name__)
            window, older = split_history(history, self.settings.agent.history_messages, self.settings.agent.history_tokens)
            if older:
                summary = await self._summarise(tenant_id, conversation_id, agent, model, summary, older) or summary
            messages = build_messages(agent, tenant_name, [(row.direction, row.text) for row in window], parts, memories, summary)
            tools = ToolRun(self, agent, ToolContext(
                tenant_id, agent.id, conversation_id, inbound.sender, tuple(context.allowed_hosts or ()),
                allow_private=self.settings.agent.web_fetch_private,
            ), target, inbound.channel)  # fmt: skip
            try:
                result = await tools.answer(model, messages)
                reply_text, latency, used_model = result.text, result.latency_ms, result.model
            except BudgetExhausted as exc:
                # The operator has been told (once a month); the person hears the agent is unavailable.
                error = f"budget: {exc}"
                reply_text, latency, used_model = self.settings.budget.unavailable, None, "budget"
            except LLMError as exc:
                log.warning("message %s: the model failed: %s", inbound_id, exc)
                status, error = "failed", str(exc)
                reply_text, latency, used_model = self.settings.agent.apology, None, model
            reply_id = await self._store_reply(tenant_id, conversation_id, inbound_id, agent, reply_text, used_model, latency)
            if reply_id is None:
                return None  # someone else stored the reply first (unique per inbound message)

        outcome = await self._deliver(channel, target, inbound_id, reply_id, reply_text, status, error)
        if (
            self.remember is not None
            and self.settings.memory.enabled
            and memory.worth_remembering(inbound.text, self.settings.memory.min_words)
        ):
            try:  # fire and forget: the answer does not wait for the embedding
                await asyncio.to_thread(self.remember, tenant_id, inbound_id)
            except Exception as exc:
                log.warning("message %s: could not queue remembering it: %s", inbound_id, type(exc).__name__)
        return outcome

    async def _deliver(
        self, channel: Channel, target: Target, inbound_id: uuid.UUID, reply_id: uuid.UUID, reply_text: str, status: str, error: str | None
    ) -> str:
        tenant_id = target.tenant_id
        try:
            external_id = await channel.send(Reply(target, reply_text))
        except Exception as exc:
            log.error("message %s: delivery through %s failed: %s", inbound_id, channel.name, type(exc).__name__)
            await self._finish(
                tenant_id,
                inbound_id,
                reply_id,
                status="failed",
                error=f"delivery failed: {type(exc).__name__}: {exc}"[:500],
                delivered=False,
            )
            return "failed"
        await self._finish(tenant_id, inbound_id, reply_id, status=status, error=error, external_id=external_id)
        return status

    async def _summarise(
        self, tenant_id: uuid.UUID, conversation_id: uuid.UUID, agent: AgentInfo, model: str, summary: str | None, older: list[Any]
    ) -> str | None:
        """Fold the turns that no longer fit the prompt into the conversation's summary (by the model), and keep it."""
        turns = "\n".join(f"{'Person' if row.direction == 'in' else agent.name}: {row.text}" for row in older)
        prompt = [
            {"role": "system", "content": SUMMARY_INSTRUCTION},
            {"role": "user", "content": (f"Summary so far:\n{summary}\n\n" if summary else "") + f"Next turns:\n{turns}"},
        ]
        try:
            ctx = CallContext(tenant_id, agent.id, conversation_id, "summary", f"agent:{agent.name}")
            result = await self.llm.complete(ctx, model=model, messages=prompt, fallbacks=(agent.settings.get("fallbacks") or None))
        except LLMError as exc:
            log.warning("conversation %s: could not summarise older turns: %s", conversation_id, exc)
            return None
        async with self.db.tenant(tenant_id=tenant_id) as session:
            await session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id)
                .values(summary=result.text[:8000], summary_until=older[-1].created_at)
            )
        return result.text[:8000]

    async def _prepare(self, channel: Channel, target: Target, inbound_id: uuid.UUID) -> Target:
        """Let the channel show the agent is working; keep its reference so a retry reuses it."""
        try:
            ref = await channel.prepare(target)
        except Exception as exc:  # a missing placeholder must not cost the answer
            log.warning("message %s: %s could not show progress: %s", inbound_id, channel.name, exc)
            return target
        if ref is None:
            return target
        async with self.db.tenant(tenant_id=target.tenant_id) as session:
            await session.execute(update(InboundMessage).where(InboundMessage.id == inbound_id).values(reply_ref=ref))
        return replace(target, reply_ref=ref)

    async def _store_reply(
        self,
        tenant_id: uuid.UUID,
        conversation_id: uuid.UUID,
        inbound_id: uuid.UUID,
        agent: AgentInfo,
        reply_text: str,
        model: str,
        latency_ms: int | None,
    ) -> uuid.UUID | None:
        async with self.db.tenant(tenant_id=tenant_id) as session:
            return await session.scalar(
                pg_insert(Message)
                .values(
                    tenant_id=tenant_id,
                    conversation_id=conversation_id,
                    inbound_id=inbound_id,
                    direction="out",
                    author=agent.name,
                    text=reply_text,
                    status="sending",
                    model=model,
                    latency_ms=latency_ms,
                )
                .on_conflict_do_nothing()
                .returning(Message.id)
            )

    async def _finish(
        self,
        tenant_id: uuid.UUID,
        inbound_id: uuid.UUID,
        reply_id: uuid.UUID | None,
        *,
        status: str,
        error: str | None,
        external_id: str | None = None,
        delivered: bool = True,
    ) -> None:
        async with self.db.tenant(tenant_id=tenant_id) as session:
            if reply_id is not None and delivered and external_id:
                # The channel may already have reported this message delivered or read (a status webhook can
                # beat this transaction): start from what it reported, under the same lock the webhook takes.
                await session.execute(_LOCK_DELIVERY, {"external_id": external_id})
                await session.execute(_SENT, {"id": reply_id, "external_id": external_id})
            elif reply_id is not None:
                await session.execute(
                    update(Message)
                    .where(Message.id == reply_id)
                    .values(status="sent" if delivered else "failed", external_id=external_id, error=None if delivered else error)
                )
            conversation_id = await session.scalar(
                update(InboundMessage)
                .where(InboundMessage.id == inbound_id)
                .values(status=status, error=error, finished_at=func.now())
                .returning(InboundMessage.conversation_id)
            )
            await session.execute(update(Conversation).where(Conversation.id == conversation_id).values(last_message_at=func.now()))
            action = {"replied": "message.replied", "failed": "message.failed", "ignored": "message.ignored"}[status]
            await audit.record(
                session,
                tenant_id=tenant_id,
                actor=f"worker:{self.worker_id}",
                action=action,
                target=str(inbound_id),
                detail={"error": error} if error else {"reply_id": str(reply_id)},
            )


class ToolRun:
    """The bounded tool-call loop for one answer: the model may call the agent's tools for up to
    `agent.tool_steps` turns and `agent.tool_seconds` in all; each call is audited (arguments redacted)."""

    def __init__(self, pipeline: Pipeline, agent: AgentInfo, ctx: ToolContext, target: Target, channel: str) -> None:
        self.pipeline, self.agent, self.target, self.channel = pipeline, agent, target, channel
        self.names = list(agent.settings.get("tools") or [])
        self.registry = default_registry() if self.names else None
        services: dict[str, Callable[..., Awaitable[Any]]] = {"memory_search": self._memory_search, "escalate": self._escalate}
        self.ctx = replace(ctx, services=services)

    async def answer(self, model: str, messages: list[dict[str, Any]]) -> Completion:
        settings = self.pipeline.settings
        specs = self.registry.specs(self.names) if self.registry else []
        deadline = time.monotonic() + settings.agent.tool_seconds
        llm = self.pipeline.llm
        ctx = CallContext(self.ctx.tenant_id, self.agent.id, self.ctx.conversation_id, "reply", f"agent:{self.agent.name}")
        fallbacks = self.agent.settings.get("fallbacks") or None
        result = await llm.complete(ctx, model=model, messages=messages, tools=specs or None, fallbacks=fallbacks)
        steps = 0
        while result.tool_calls and self.registry is not None:
            steps += 1
            messages = [*messages, result.assistant_message()]
            for call in result.tool_calls:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    output = "error: the time for tools is up; answer with what you have"
                else:
                    outcome = await self.registry.call(call.name, call.arguments, self.ctx, timeout=remaining)
                    output = outcome.output
                    await self._audit(call.name, outcome)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": output})
            # Out of steps or time: one last turn without tools, so the model answers with what it has.
            exhausted = steps >= settings.agent.tool_steps or time.monotonic() >= deadline
            result = await llm.complete(ctx, model=model, messages=messages, tools=None if exhausted else specs, fallbacks=fallbacks)
            if exhausted:
                break
        return result

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

    async def _escalate(self, reason: str) -> bool:
        link = escalation.conversation_link(self.channel, self.target.payload, self.ctx.conversation_id)
        return await escalation.escalate(self.pipeline.db, self.pipeline.settings, tenant_id=self.ctx.tenant_id,
                                         conversation_id=self.ctx.conversation_id, reason=f"the agent asked: {reason}",
                                         actor=f"agent:{self.agent.name}", link=link)  # fmt: skip
