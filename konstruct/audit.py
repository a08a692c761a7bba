"""The append-only audit log: who did what, when, in which tenant.

Events are inserted plainly (nothing on the hot path waits for a lock); the database's sealer links them into
a per-tenant hash chain soon after (the worker every minute, `audit verify|tail|export` before reading)."""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
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


_HEAD = text("SELECT seq, hash FROM audit_events WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1")
CHECKPOINTS = "audit-checkpoints.json"


def _checkpoint_path(db: Database) -> Path:
    return db.settings.data_dir / CHECKPOINTS


def read_checkpoints(db: Database) -> dict[str, dict[str, Any]]:
    """Each tenant's last known chain head ({tenant id: {"seq", "hash"}}), kept outside the database."""
    try:
        data = json.loads(_checkpoint_path(db).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_checkpoints(db: Database, heads: dict[str, tuple[int, str]]) -> None:
    """Raise the stored heads (never lower them), under a file lock, written 0600 and atomically."""
    path = _checkpoint_path(db)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stored = read_checkpoints(db)
        for tenant, (seq, digest) in heads.items():
            if int(stored.get(tenant, {}).get("seq", 0)) < seq:
                stored[tenant] = {"seq": seq, "hash": digest}
        partial = path.with_name(f".{CHECKPOINTS}.{os.getpid()}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(stored, out, indent=1, sort_keys=True)
        os.replace(partial, path)


async def _heads(db: Database, tenant_ids: list[uuid.UUID]) -> dict[str, tuple[int, str]]:
    heads: dict[str, tuple[int, str]] = {}
    for tenant_id in tenant_ids:
        async with db.tenant(tenant_id=tenant_id) as session:
            row = (await session.execute(_HEAD)).first()
        if row is not None:
            heads[str(tenant_id)] = (int(row.seq), bytes(row.hash).hex())
    return heads


async def seal(db: Database, tenant_id: uuid.UUID | None = None) -> int:
    """Link unsealed events into their tenant's chain (all tenants when none is given); returns how many.
    Each sealed chain's head is then checkpointed in the data directory (see verify)."""
    async with db.system() as session:
        if tenant_id is None:
            sealed = int(await session.scalar(_SEAL_ALL) or 0)
        else:
            sealed = int(await session.scalar(_SEAL, {"tenant": str(tenant_id)}) or 0)
    if sealed:
        ids = [tenant_id] if tenant_id is not None else await _tenant_ids(db)
        _write_checkpoints(db, await _heads(db, ids))
    return sealed


async def _tenant_ids(db: Database) -> list[uuid.UUID]:
    """Every tenant, through the narrow SECURITY DEFINER directory (audit sits below konstruct.tenancy)."""
    async with db.system() as session:
        return list((await session.scalars(text("select id from konstruct_tenant_directory()"))).all())


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
    the links. Removing the newest rows leaves a shorter valid chain: the checkpoint of the head (kept in the
    data directory by the sealer and by verify) catches that.
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
        checkpoint = read_checkpoints(db).get(str(tenant_id))
        if checkpoint and not problems:
            seq, digest = int(checkpoint.get("seq", 0)), str(checkpoint.get("hash", ""))
            last = expected_seq - 1
            if last < seq:
                problems.append(f"the chain ends at #{last} but reached #{seq} before: the newest events were deleted")
            else:
                at = await session.scalar(text("SELECT hash FROM audit_events WHERE seq = :s"), {"s": seq})
                if at is None or bytes(at).hex() != digest:
                    problems.append(f"event #{seq} is not the one checkpointed: the chain was rewritten")
    if not problems and previous is not None:
        _write_checkpoints(db, {str(tenant_id): (expected_seq - 1, previous.hex())})
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
