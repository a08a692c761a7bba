"""Escalation to a human: mark the conversation, tell the tenant's escalation target, stay silent until released."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update

from konstruct import audit
from konstruct.agent.rules import Explanation, Rule, first_match, parse
from konstruct.db import lookup
from konstruct.db.engine import Database
from konstruct.db.models import Conversation, Tenant
from konstruct.handoff import desk, state
from konstruct.messaging import Channel, ChannelError
from konstruct.tenancy.tenants import TenantInfo

log = logging.getLogger("konstruct.escalation")

RELEASE_COMMAND = "/release"

# Why a conversation went to a human (conversations.escalation_category; escalation_reason explains it):
PERSON_ASKED = "person_asked"  # the person asked for a human (the model's escalate_to_human tool)
RULE = "rule"  # one of the agent's escalation rules fired
TOOL_FAILURE = "tool_failure"  # the model escalated because a tool it needed failed
BUDGET = "budget"  # the tenant's monthly LLM budget is spent: a human answers instead
CATEGORIES = (PERSON_ASKED, RULE, TOOL_FAILURE, BUDGET)


@dataclass(frozen=True)
class EscalationInfo:
    conversation_id: uuid.UUID
    channel: str
    external_id: str
    person: str
    status: str
    escalated_at: datetime | None
    reason: str | None
    category: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.conversation_id),
            "channel": self.channel,
            "conversation": self.external_id,
            "person": self.person,
            "status": self.status,
            "escalated_at": self.escalated_at.isoformat() if self.escalated_at else None,
            "reason": self.reason,
            "category": self.category,
        }


@functools.lru_cache(maxsize=1024)
def _parsed(rule: str) -> Rule:
    return parse(rule)


def check(rules: list[str], message: str, count: int) -> tuple[str, Explanation] | None:
    """Which of an agent's rules fires for this message (the person's count-th turn), and why."""
    found = first_match([_parsed(r) for r in rules], message, count)
    return (found[0].text, found[1]) if found else None


async def escalate(
    db: Database,
    *,
    tenant_id: uuid.UUID,
    conversation_id: uuid.UUID,
    reason: str,
    category: str,
    actor: str,
    link: str,
    channels: Mapping[str, Channel],
    only_with_target: bool = False,
    last_turns: int = 8,
) -> bool:
    """Mark the conversation escalated (once: False when it already was) for `reason`, one of CATEGORIES, start its
    handoff, and open its desk thread in the tenant's target (`slack:C…`: a thread in that Slack channel); a target
    whose channel has no desk is notified.
    only_with_target: escalate only when the tenant has a target (someone to answer); False otherwise."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown escalation category {category!r}")  # a bug: every caller names one of CATEGORIES
    async with db.tenant(tenant_id=tenant_id) as session:
        target = await session.scalar(select(Tenant.escalation_target).where(Tenant.id == tenant_id))
        if only_with_target and not target:
            return False
        changed = await session.scalar(
            update(Conversation)
            .where(Conversation.id == conversation_id, Conversation.status != "escalated")
            .values(status="escalated", escalated_at=func.now(), escalation_reason=reason[:500], escalation_category=category)
            .returning(Conversation.id)
        )
        if changed is None:
            return False
        await audit.record(
            session, tenant_id=tenant_id, actor=actor, action="conversation.escalated", target=str(conversation_id),
            detail={"reason": reason[:500], "category": category, "notify": target},
        )  # fmt: skip
        handoff_id = await state.begin(session, tenant_id=tenant_id, conversation_id=conversation_id, reason=reason, target=target)
    try:
        if await desk.open_thread(db, channels, tenant_id=tenant_id, handoff_id=handoff_id, last_turns=last_turns, link=link, search=False):
            return True
    except ChannelError as exc:  # the worker's periodic check posts it later
        log.warning("tenant %s: could not open the desk thread in %s: %s", tenant_id, target, exc)
        return True
    if target:
        kind, _, where = target.partition(":")
        channel = channels.get(kind)
        if channel is None or not where:
            log.warning("tenant %s: escalation target %r names no channel this worker has", tenant_id, target)
            return True
        try:
            await channel.notify(tenant_id, where, f":rotating_light: A conversation needs a human ({category}): {reason}\n{link}")
        except ChannelError as exc:
            log.warning("tenant %s: could not notify %s: %s", tenant_id, target, exc)
    return True


async def release(db: Database, *, tenant_id: uuid.UUID, conversation_id: uuid.UUID, actor: str, note: str | None = None) -> bool:
    """Hand the conversation back to the agent (ending its handoff; a note is kept for the agent). False when it was not
    escalated."""
    async with db.tenant(tenant_id=tenant_id) as session:
        changed = await session.scalar(
            select(Conversation.id).where(Conversation.id == conversation_id, Conversation.status == "escalated").with_for_update()
        )
        if changed is not None:
            await state.end_in(session, tenant_id=tenant_id, conversation_id=conversation_id, how=state.HAND_BACK, actor=actor, note=note)
            await audit.record(session, tenant_id=tenant_id, actor=actor, action="conversation.released", target=str(conversation_id))
    return changed is not None


async def list_conversations(db: Database, tenant: TenantInfo, *, escalated_only: bool) -> list[EscalationInfo]:
    async with db.tenant(tenant_id=tenant.id) as session:
        query = select(Conversation).order_by(Conversation.last_message_at.desc()).limit(500)
        if escalated_only:
            query = query.where(Conversation.status == "escalated")
        rows = await session.scalars(query)
        return [
            EscalationInfo(r.id, r.channel, r.external_id, r.person, r.status, r.escalated_at, r.escalation_reason, r.escalation_category)
            for r in rows
        ]


async def find_conversation(db: Database, tenant: TenantInfo, ref: str) -> uuid.UUID:
    """A conversation by its id or the first 8+ characters of it."""
    return await lookup.by_id_prefix(db, tenant.id, tenant.slug, Conversation.id, ref, what="conversation",
                                     listing=f"konstruct conversation list --tenant {tenant.slug}")  # fmt: skip
