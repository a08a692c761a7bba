"""The agent pipeline: one inbound message in, one reply out, exactly once.

States of an inbox row: received → processing → replied | failed | ignored. No database connection
is held while the model thinks, so one worker can keep many conversations in flight.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from konstruct import audit
from konstruct.agent.agents import AgentInfo
from konstruct.agent.prompt import build_messages
from konstruct.channels.base import Channel, Reply, Target
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Agent, Conversation, InboundMessage, Message, Tenant
from konstruct.llm.client import LLMError, complete

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


@dataclass
class Pipeline:
    settings: Settings
    db: Database
    channels: dict[str, Channel]
    worker_id: str

    async def process(self, *, tenant_id: uuid.UUID, inbound_id: uuid.UUID) -> str | None:
        """Answer one inbox row. Returns its final state, or None when it was not ours to take."""
        async with self.db.tenant(tenant_id=tenant_id) as session:
            inbound = await session.scalar(
                update(InboundMessage)
                .where(InboundMessage.id == inbound_id, InboundMessage.status == "received")
                .values(
                    status="processing",
                    attempts=InboundMessage.attempts + 1,
                    worker_id=self.worker_id,
                    claimed_at=func.now(),
                )
                .returning(InboundMessage)
            )
            if inbound is None:
                return None  # a duplicate doorbell: another worker has it or it is finished
            context = (
                await session.execute(
                    select(Tenant.name, Tenant.status, Conversation.external_id, Agent)
                    .join(Conversation, Conversation.tenant_id == Tenant.id)
                    .join(Agent, Agent.id == Conversation.agent_id)
                    .where(Conversation.id == inbound.conversation_id)
                )
            ).one()
            agent = AgentInfo.from_row(context.Agent)
            previous = await session.scalar(select(Message).where(Message.inbound_id == inbound_id, Message.direction == "out"))
            history = (
                await session.execute(
                    select(Message.direction, Message.text)
                    .where(
                        Message.conversation_id == inbound.conversation_id,
                        Message.created_at <= inbound.received_at,
                        Message.status != "failed",
                    )
                    .order_by(Message.created_at.desc(), Message.direction.desc())
                    .limit(self.settings.agent.history_messages)
                )
            ).all()
            tenant_name, tenant_status = context.name, context.status
            conversation_id, conversation_key = inbound.conversation_id, context.external_id

        if tenant_status != "active":
            await self._finish(tenant_id, inbound_id, None, status="ignored", error=f"tenant is {tenant_status}")
            return "ignored"
        if inbound.attempts > self.settings.worker.max_attempts:
            # Every earlier attempt died mid-way (a crash, a bug): stop the loop, keep the row to look at.
            reason = f"gave up after {inbound.attempts - 1} attempts that did not finish"
            await self._finish(tenant_id, inbound_id, None, status="failed", error=reason)
            return "failed"
        channel = self.channels.get(inbound.channel)
        if channel is None:
            await self._finish(tenant_id, inbound_id, None, status="failed", error=f"no {inbound.channel!r} channel on this worker")
            return "failed"

        target = Target(tenant_id, conversation_id, conversation_key, inbound.external_id, dict(inbound.payload), inbound.reply_ref)
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
            messages = build_messages(agent, tenant_name, [(row.direction, row.text) for row in reversed(history)], parts)
            model = agent.model or self.settings.llm.model
            try:
                result = await complete(self.settings.llm, model=model, messages=messages)
                reply_text, latency, used_model = result.text, result.latency_ms, result.model
            except LLMError as exc:
                log.warning("message %s: the model failed: %s", inbound_id, exc)
                status, error = "failed", str(exc)
                reply_text, latency, used_model = self.settings.agent.apology, None, model
            reply_id = await self._store_reply(tenant_id, conversation_id, inbound_id, agent, reply_text, used_model, latency)
            if reply_id is None:
                return None  # someone else stored the reply first (unique per inbound message)

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
