"""Channel connections: which Slack workspace (or WhatsApp number) belongs to which tenant.

Credentials are one Fernet-encrypted JSON object per connection; only key hints are ever shown.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct import audit
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Agent, ChannelConnection, ChannelRoute
from konstruct.errors import ConflictError, NotFoundError
from konstruct.messaging import ChannelError
from konstruct.secrets import decrypt, encrypt
from konstruct.tenancy.tenants import TenantInfo, agent_not_found


@dataclass(frozen=True)
class ConnectionInfo:
    id: uuid.UUID
    tenant_id: uuid.UUID
    kind: str
    external_id: str
    name: str
    mode: str
    status: str
    default_agent_id: uuid.UUID | None
    details: dict[str, Any]
    created_by: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: ChannelConnection) -> ConnectionInfo:
        return cls(
            row.id, row.tenant_id, row.kind, row.external_id, row.name, row.mode, row.status,
            row.default_agent_id, dict(row.details), row.created_by, row.created_at, row.updated_at,
        )  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "tenant_id": str(self.tenant_id),
            "kind": self.kind,
            "external_id": self.external_id,
            "name": self.name,
            "mode": self.mode,
            "status": self.status,
            "default_agent_id": str(self.default_agent_id) if self.default_agent_id else None,
            "details": self.details,
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True)
class Resolved:
    """A connection found by its channel id before the tenant was known."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    status: str
    mode: str
    credentials: bytes
    details: dict[str, Any]


def seal(settings: Settings, credentials: dict[str, str]) -> bytes:
    return encrypt(settings, json.dumps(credentials, sort_keys=True))


def unseal(settings: Settings, blob: bytes) -> dict[str, str]:
    data: dict[str, str] = json.loads(decrypt(settings, bytes(blob)))
    return data


async def resolve(db: Database, kind: str, external_id: str) -> Resolved | None:
    """Find the tenant of a workspace or number through the narrow SECURITY DEFINER look-up."""
    async with db.system() as session:
        row = (
            await session.execute(
                text("select id, tenant_id, status, mode, credentials, details from konstruct_resolve_connection(:k, :e)"),
                {"k": kind, "e": external_id},
            )
        ).first()
    return Resolved(row.id, row.tenant_id, row.status, row.mode, bytes(row.credentials), dict(row.details)) if row else None


MAX_CACHED = 10_000


class ResolveCache:
    """Resolved connections (credentials decrypted) kept for a few seconds in the gateway's memory:
    a webhook burst from one workspace costs one look-up and one decryption."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings, self.ttl = db, settings, settings.gateway.cache_ttl
        self._entries: dict[tuple[str, str], tuple[float, tuple[Resolved, dict[str, str]] | None]] = {}

    async def get(self, kind: str, external_id: str) -> tuple[Resolved, dict[str, str]] | None:
        key = (kind, external_id)
        now = time.monotonic()
        cached = self._entries.get(key)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        found = await resolve(self.db, kind, external_id)
        entry = (found, unseal(self.settings, found.credentials)) if found else None
        if len(self._entries) >= MAX_CACHED:  # ids come from unauthenticated requests: bound the memory
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = (now, entry)
        return entry

    def forget(self, kind: str, external_id: str) -> None:
        self._entries.pop((kind, external_id), None)


class SecretCache:
    """One secret of a tenant's connection (a bot token, an access token) kept for a minute in a worker:
    the decryption and look-up happen once, and a disconnected connection is refused."""

    def __init__(self, db: Database, settings: Settings, kind: str, field: str, ttl: float = 60.0) -> None:
        self.db, self.settings, self.kind, self.field, self.ttl = db, settings, kind, field, ttl
        self._entries: dict[tuple[uuid.UUID, str], tuple[float, str]] = {}

    async def get(self, tenant_id: uuid.UUID, external_id: str) -> str:
        cached = self._entries.get((tenant_id, external_id))
        if cached and time.monotonic() - cached[0] < self.ttl:
            return cached[1]
        connection, credentials = await credentials_for(self.db, self.settings, tenant_id, self.kind, external_id)
        if connection.status != "connected":
            raise ChannelError(f"the {self.kind} connection {connection.name} is disconnected: connect it again")
        self._entries[(tenant_id, external_id)] = (time.monotonic(), credentials[self.field])
        return credentials[self.field]


async def single_mode_candidates(db: Database, kind: str) -> list[tuple[uuid.UUID, uuid.UUID, bytes]]:
    async with db.system() as session:
        rows = await session.execute(text("select id, tenant_id, credentials from konstruct_single_connections(:k)"), {"k": kind})
        return [(row.id, row.tenant_id, bytes(row.credentials)) for row in rows]


async def connect(
    db: Database,
    settings: Settings,
    tenant: TenantInfo,
    *,
    kind: str,
    external_id: str,
    name: str,
    mode: str,
    credentials: dict[str, str],
    details: dict[str, Any],
    default_agent: str | None,
    actor: str,
) -> tuple[ConnectionInfo, bool]:
    """Create the connection, or update it when the same workspace is connected again. Returns (info, created)."""
    existing = await resolve(db, kind, external_id)
    if existing is not None and existing.tenant_id != tenant.id:
        # Said without confirming that it exists elsewhere: a customer must not learn about other tenants.
        raise ConflictError(f"this {kind} {external_id} cannot be connected here: if it is yours, ask the platform operator")
    sealed = seal(settings, credentials)
    async with db.tenant(tenant_id=tenant.id) as session:
        agent_id = await _agent_id(session, tenant, default_agent) if default_agent else None
        values: dict[str, Any] = {
            "name": name,
            "mode": mode,
            "status": "connected",
            "credentials": sealed,
            "details": details,
            "updated_at": func.now(),
        }
        if agent_id is not None:
            values["default_agent_id"] = agent_id
        row = await session.scalar(
            pg_insert(ChannelConnection)
            .values(
                tenant_id=tenant.id,
                kind=kind,
                external_id=external_id,
                created_by=actor,
                **{k: v for k, v in values.items() if k != "updated_at"},
            )
            .on_conflict_do_update(index_elements=["kind", "external_id"], set_=values)
            .returning(ChannelConnection)
        )
        assert row is not None
        action = f"channel.{'connected' if existing is None else 'reconnected'}"
        await audit.record(
            session, tenant_id=tenant.id, actor=actor, action=action, target=f"{kind}:{external_id}",
            detail={"mode": mode, "name": name, **{k: v for k, v in details.items() if k.endswith("_hint")}},
        )  # fmt: skip
        return ConnectionInfo.from_row(row), existing is None


async def list_connections(db: Database, tenant: TenantInfo) -> list[ConnectionInfo]:
    async with db.tenant(tenant_id=tenant.id) as session:
        rows = await session.scalars(select(ChannelConnection).order_by(ChannelConnection.kind, ChannelConnection.name))
        return [ConnectionInfo.from_row(row) for row in rows]


async def get_connection(db: Database, tenant: TenantInfo, ref: str) -> ConnectionInfo:
    """By external id (team id, phone-number id) or by connection id (or its first 8 characters)."""
    for connection in await list_connections(db, tenant):
        if ref in (connection.external_id, str(connection.id)) or (len(ref) >= 8 and str(connection.id).startswith(ref)):
            return connection
    raise NotFoundError(f"tenant {tenant.slug!r} has no channel connection {ref!r}: see `konstruct channel list --tenant {tenant.slug}`")


async def set_status(db: Database, tenant_id: uuid.UUID, connection_id: uuid.UUID, status: str, *, actor: str, reason: str) -> None:
    async with db.tenant(tenant_id=tenant_id) as session:
        target = await session.scalar(
            update(ChannelConnection)
            .where(ChannelConnection.id == connection_id, ChannelConnection.status != status)
            .values(status=status, updated_at=func.now())
            .returning(ChannelConnection.kind + ":" + ChannelConnection.external_id)
        )
        if target is not None:
            await audit.record(
                session, tenant_id=tenant_id, actor=actor, action=f"channel.{status}", target=target, detail={"reason": reason}
            )


async def credentials_for(
    db: Database, settings: Settings, tenant_id: uuid.UUID, kind: str, external_id: str
) -> tuple[ConnectionInfo, dict[str, str]]:
    async with db.tenant(tenant_id=tenant_id) as session:
        row = await session.scalar(
            select(ChannelConnection).where(ChannelConnection.kind == kind, ChannelConnection.external_id == external_id)
        )
        if row is None:
            raise NotFoundError(f"no {kind} connection {external_id}")
        return ConnectionInfo.from_row(row), unseal(settings, row.credentials)


async def set_route(db: Database, tenant: TenantInfo, connection: ConnectionInfo, channel: str, agent: str, *, actor: str) -> None:
    async with db.tenant(tenant_id=tenant.id) as session:
        agent_id = await _agent_id(session, tenant, agent)
        await session.execute(
            pg_insert(ChannelRoute)
            .values(tenant_id=tenant.id, connection_id=connection.id, external_channel=channel, agent_id=agent_id)
            .on_conflict_do_update(index_elements=["connection_id", "external_channel"], set_={"agent_id": agent_id})
        )
        await audit.record(
            session,
            tenant_id=tenant.id,
            actor=actor,
            action="channel.routed",
            target=f"{connection.kind}:{channel}",
            detail={"agent": agent},
        )


async def remove_route(db: Database, tenant: TenantInfo, connection: ConnectionInfo, channel: str, *, actor: str) -> bool:
    async with db.tenant(tenant_id=tenant.id) as session:
        result = await session.execute(
            delete(ChannelRoute)
            .where(ChannelRoute.connection_id == connection.id, ChannelRoute.external_channel == channel)
            .returning(ChannelRoute.id)
        )
        removed = result.first() is not None
        if removed:
            await audit.record(session, tenant_id=tenant.id, actor=actor, action="channel.unrouted", target=f"{connection.kind}:{channel}")
        return removed


async def list_routes(db: Database, tenant: TenantInfo, connection: ConnectionInfo) -> list[tuple[str, str]]:
    async with db.tenant(tenant_id=tenant.id) as session:
        rows = await session.execute(
            select(ChannelRoute.external_channel, Agent.name)
            .join(Agent, Agent.id == ChannelRoute.agent_id)
            .where(ChannelRoute.connection_id == connection.id)
            .order_by(ChannelRoute.external_channel)
        )
        return [(row.external_channel, row.name) for row in rows]


async def _agent_id(session: AsyncSession, tenant: TenantInfo, name: str) -> uuid.UUID:
    agent_id = await session.scalar(select(Agent.id).where(Agent.name == name))
    if agent_id is None:
        raise agent_not_found(tenant, name, list(await session.scalars(select(Agent.name))))
    return agent_id
