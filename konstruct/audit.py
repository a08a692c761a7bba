"""The append-only audit log: who did what, when, in which tenant.

Events are inserted plainly (nothing on the hot path waits for a lock); the database's sealer links them into
a per-tenant hash chain soon after (the worker every minute, `audit verify|tail|export` before reading)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct.db.models import AuditEvent

if TYPE_CHECKING:
    from konstruct.db.engine import Database


async def record(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    actor: str,
    action: str,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add one event inside the caller's (tenant-scoped) transaction."""
    await session.execute(insert(AuditEvent).values(tenant_id=tenant_id, actor=actor, action=action, target=target, detail=detail or {}))


async def latest(session: AsyncSession, *, limit: int = 50) -> list[AuditEvent]:
    """The newest events the session's tenant may see, newest first."""
    rows = await session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit))
    return list(rows)


_CHAIN = text("""
SELECT id, seq, prev_hash, hash,
       konstruct_audit_hash(prev_hash, tenant_id, seq, actor, action, target, detail, created_at) AS expected
FROM audit_events WHERE seq IS NOT NULL ORDER BY seq, id
""")
_SEAL = text("SELECT konstruct_audit_seal(:tenant)")
_SEAL_ALL = text("SELECT konstruct_audit_seal_all()")


async def seal(db: Database, tenant_id: uuid.UUID | None = None) -> int:
    """Link unsealed events into their tenant's chain (all tenants when none is given); returns how many."""
    async with db.system() as session:
        if tenant_id is None:
            return int(await session.scalar(_SEAL_ALL) or 0)
        return int(await session.scalar(_SEAL, {"tenant": str(tenant_id)}) or 0)


@dataclass(frozen=True)
class ChainReport:
    """What `audit verify` found in one tenant's chain."""

    events: int
    problems: list[str]

    @property
    def intact(self) -> bool:
        return not self.problems


async def verify(db: Database, tenant_id: uuid.UUID, *, max_problems: int = 20) -> ChainReport:
    """Walk the tenant's chain in order: every hash must match its row, every link the row before, no gaps.

    An edited row breaks its own hash; a deleted one leaves a gap and a broken link; reordered rows break
    the links. (Removing the newest rows leaves a shorter valid chain: compare `events` with an earlier run.)
    """
    problems: list[str] = []
    count, expected_seq, previous = 0, 1, None
    await seal(db, tenant_id)
    async with db.tenant(tenant_id=tenant_id) as session:
        result = await session.stream(_CHAIN)
        async for row in result:
            count += 1
            if row.seq != expected_seq:
                problems.append(f"events {expected_seq}..{row.seq - 1} are missing (found #{row.seq} next)")
            if bytes(row.hash) != bytes(row.expected):
                problems.append(f"event #{row.seq} (id {row.id}) was altered: its content no longer matches its hash")
            if (bytes(row.prev_hash) if row.prev_hash is not None else None) != previous:
                problems.append(f"event #{row.seq} (id {row.id}) does not follow the event before it: deleted or reordered")
            previous, expected_seq = bytes(row.hash), row.seq + 1
            if len(problems) >= max_problems:
                problems.append("… stopped after too many problems")
                break
    return ChainReport(count, problems)


async def events(db: Database, tenant_id: uuid.UUID, *, limit: int | None = None) -> list[AuditEvent]:
    """The tenant's events in chain order (the newest `limit` of them, when given), sealed first."""
    await seal(db, tenant_id)
    async with db.tenant(tenant_id=tenant_id) as session:
        if limit is None:
            return list(await session.scalars(select(AuditEvent).order_by(AuditEvent.seq)))
        newest = list(await session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(limit)))
        return newest[::-1]


def as_json(event: AuditEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "id": event.id,
        "tenant_id": str(event.tenant_id),
        "at": event.created_at.isoformat(),
        "actor": event.actor,
        "action": event.action,
        "target": event.target,
        "detail": event.detail,
        "prev_hash": event.prev_hash.hex() if event.prev_hash else None,
        "hash": event.hash.hex(),
    }
