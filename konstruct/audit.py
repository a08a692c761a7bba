"""The append-only audit log: who did what, when, in which tenant."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct.db.models import AuditEvent


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
