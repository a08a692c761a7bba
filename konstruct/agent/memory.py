"""Long-term memory: what people tell an agent, embedded (all-MiniLM-L6-v2) and recalled in later conversations.

Memories belong to tenant + agent + person. Recall is an exact nearest-neighbour scan over that narrow,
btree-indexed scope, so it returns every match the tenant has whatever other tenants store (row-level
security filters would otherwise apply after an approximate index scan and lose rows).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text

from konstruct import audit
from konstruct.db.engine import Database
from konstruct.db.models import Conversation, InboundMessage, Memory, Message
from konstruct.tenancy.tenants import TenantInfo

_RECALL = text("""
SELECT content FROM memories
WHERE tenant_id = :tenant AND agent_id = :agent AND person = :person
ORDER BY embedding <=> CAST(:query AS vector) LIMIT :k
""")


@dataclass(frozen=True)
class MemoryInfo:
    id: int
    agent_id: uuid.UUID
    person: str
    content: str
    created_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "agent_id": str(self.agent_id), "person": self.person, "content": self.content,
                "created_at": self.created_at.isoformat()}  # fmt: skip


def worth_remembering(message: str, min_words: int) -> bool:
    """Statements are remembered ("I'm allergic to nuts"); questions, greetings and commands are not."""
    words = re.findall(r"\w+", message)
    return len(words) >= min_words and not message.rstrip().endswith("?") and not message.lstrip().startswith("/")


def _vector(values: Any) -> str:
    return "[" + ",".join(f"{float(v):.7g}" for v in values) + "]"


async def remember(db: Database, *, tenant_id: uuid.UUID, agent_id: uuid.UUID, person: str, content: str, inbound_id: uuid.UUID) -> None:
    """Embed one statement and store it (once per inbound message)."""
    from konstruct.agent.embedding import embedder

    vector = (await embedder().aembed([content]))[0]
    async with db.tenant(tenant_id=tenant_id) as session:
        exists = await session.scalar(select(Memory.id).where(Memory.inbound_id == inbound_id).limit(1))
        if exists is None:
            session.add(Memory(tenant_id=tenant_id, agent_id=agent_id, person=person, content=content,
                               embedding=vector.tolist(), inbound_id=inbound_id))  # fmt: skip


async def recall(db: Database, *, tenant_id: uuid.UUID, agent_id: uuid.UUID, person: str, query: str, k: int) -> list[str]:
    """The k memories of this person closest to the query; nothing is embedded when there are none."""
    async with db.tenant(tenant_id=tenant_id) as session:
        has_any = await session.scalar(
            select(Memory.id).where(Memory.tenant_id == tenant_id, Memory.agent_id == agent_id, Memory.person == person).limit(1)
        )
    if has_any is None:
        return []
    from konstruct.agent.embedding import embedder

    vector = (await embedder().aembed([query or " "]))[0]
    async with db.tenant(tenant_id=tenant_id) as session:
        rows = await session.execute(
            _RECALL, {"tenant": str(tenant_id), "agent": str(agent_id), "person": person, "query": _vector(vector), "k": k}
        )
        return [row.content for row in rows]


async def list_memories(db: Database, tenant: TenantInfo, person: str) -> list[MemoryInfo]:
    async with db.tenant(tenant_id=tenant.id) as session:
        rows = await session.scalars(select(Memory).where(Memory.person == person).order_by(Memory.created_at))
        return [MemoryInfo(r.id, r.agent_id, r.person, r.content, r.created_at) for r in rows]


async def forget(db: Database, tenant: TenantInfo, person: str, *, actor: str) -> tuple[int, int]:
    """The right to be forgotten: the person's memories and conversations (with every message) are deleted.
    Returns (memories, conversations) deleted. The audit event records that it happened, not what was said."""
    async with db.tenant(tenant_id=tenant.id) as session:
        memories = await session.scalar(
            select(func.count()).select_from(delete(Memory).where(Memory.person == person).returning(Memory.id).cte())
        )
        conversations = await session.scalar(
            select(func.count()).select_from(delete(Conversation).where(Conversation.person == person).returning(Conversation.id).cte())
        )
        # Their words in conversations others started (a Slack thread) go too.
        await session.execute(delete(Message).where(Message.direction == "in", Message.author == person))
        await session.execute(delete(InboundMessage).where(InboundMessage.sender == person))
        await audit.record(
            session, tenant_id=tenant.id, actor=actor, action="memory.forgotten", target=person,
            detail={"memories": int(memories or 0), "conversations": int(conversations or 0)},
        )  # fmt: skip
    return int(memories or 0), int(conversations or 0)
