"""Invitations: a single-use token that expires, emailed by a worker task; only its SHA-256 is stored.
Accepting it (CLI or `{public_url}/invite/TOKEN`) sets a name and password and gives the role."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from konstruct import audit, mail
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Invitation, User
from konstruct.errors import ConflictError, NotFoundError, ValidationError
from konstruct.tenancy.tenants import TenantInfo
from konstruct.tenancy.users import add_member, as_user, check_email, check_password, check_role, hash_password

DEFAULT_DAYS = 7.0


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.strip().encode()).digest()


def invite_url(settings: Settings, token: str) -> str:
    return f"{settings.gateway.public_url.rstrip('/')}/invite/{token}"


@dataclass(frozen=True)
class InvitationInfo:
    id: uuid.UUID
    email: str
    role: str
    state: str  # pending | accepted | revoked | expired
    expires_at: datetime
    created_by: str
    created_at: datetime
    sent_at: datetime | None

    @classmethod
    def from_row(cls, row: Invitation, now: datetime) -> InvitationInfo:
        if row.accepted_at:
            state = "accepted"
        elif row.revoked_at:
            state = "revoked"
        elif row.expires_at <= now:
            state = "expired"
        else:
            state = "pending"
        return cls(row.id, row.email, row.role, state, row.expires_at, row.created_by, row.created_at, row.sent_at)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "email": self.email,
            "role": self.role,
            "state": self.state,
            "expires_at": self.expires_at.isoformat(),
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
            "sent_at": self.sent_at.isoformat() if self.sent_at else None,
        }


def new_token() -> str:
    """A random invitation token that never starts with "-": it is pasted as an argument (`konstruct invite accept
    TOKEN`), where a leading dash would be read as an option."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


async def create(
    db: Database, tenant: TenantInfo, *, email: str, role: str, days: float = DEFAULT_DAYS, actor: str
) -> tuple[InvitationInfo, str]:
    """A new invitation and its token (returned once: only its hash is stored). An earlier pending
    invitation of the same email to the same tenant is revoked."""
    email, role = check_email(email), check_role(role)
    if not 0 < days <= 90:
        raise ValidationError("an invitation is valid for more than 0 and at most 90 days")
    token = new_token()
    now = datetime.now(UTC)
    async with db.tenant(tenant_id=tenant.id) as session:
        await session.execute(
            update(Invitation)
            .where(Invitation.email == email, Invitation.accepted_at.is_(None), Invitation.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        invitation = await session.scalar(
            pg_insert(Invitation)
            .values(
                tenant_id=tenant.id,
                email=email,
                role=role,
                token_hash=token_hash(token),
                expires_at=now + timedelta(days=days),
                created_by=actor,
            )
            .returning(Invitation)
        )
        assert invitation is not None
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="invite.created", target=email,
                           detail={"role": role, "expires_at": invitation.expires_at.isoformat(), "id": str(invitation.id)})  # fmt: skip
    return InvitationInfo.from_row(invitation, now), token


async def list_invitations(db: Database, tenant: TenantInfo) -> list[InvitationInfo]:
    now = datetime.now(UTC)
    async with db.tenant(tenant_id=tenant.id) as session:
        rows = (await session.scalars(select(Invitation).order_by(Invitation.created_at.desc()))).all()
    return [InvitationInfo.from_row(r, now) for r in rows]


async def _find(db: Database, tenant: TenantInfo, ref: str) -> Invitation:
    """An invitation by id (or its first characters) or by email (the newest)."""
    async with db.tenant(tenant_id=tenant.id) as session:
        rows = (await session.scalars(select(Invitation).order_by(Invitation.created_at.desc()))).all()
    ref = ref.strip().lower()
    found = [r for r in rows if str(r.id).startswith(ref)] if len(ref) >= 6 and "@" not in ref else [r for r in rows if r.email == ref][:1]
    if not found:
        raise NotFoundError(f"no invitation {ref!r} in {tenant.slug}: see `konstruct invite list --tenant {tenant.slug}`")
    if len(found) > 1:
        raise ValidationError(f"{ref!r} matches {len(found)} invitations: give more of the id")
    return found[0]


async def revoke(db: Database, tenant: TenantInfo, ref: str, *, actor: str) -> InvitationInfo:
    row = await _find(db, tenant, ref)
    now = datetime.now(UTC)
    state = InvitationInfo.from_row(row, now).state
    if state != "pending":
        raise ConflictError(f"the invitation for {row.email} is {state} already")
    async with db.tenant(tenant_id=tenant.id) as session:
        await session.execute(update(Invitation).where(Invitation.id == row.id).values(revoked_at=now))
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="invite.revoked", target=row.email, detail={"id": str(row.id)})
    row.revoked_at = now
    return InvitationInfo.from_row(row, now)


async def resend(db: Database, tenant: TenantInfo, ref: str, *, days: float = DEFAULT_DAYS, actor: str) -> tuple[InvitationInfo, str]:
    """A fresh token (the old link stops working) and a new expiry for a pending or expired invitation."""
    row = await _find(db, tenant, ref)
    state = InvitationInfo.from_row(row, datetime.now(UTC)).state
    if state in ("accepted", "revoked"):
        raise ConflictError(f"the invitation for {row.email} is {state}: create a new one with `konstruct invite create`")
    return await create(db, tenant, email=row.email, role=row.role, days=days, actor=actor)


async def mark_sent(db: Database, tenant_id: uuid.UUID, invitation_id: uuid.UUID) -> Invitation | None:
    async with db.tenant(tenant_id=tenant_id) as session:
        return await session.scalar(
            update(Invitation).where(Invitation.id == invitation_id).values(sent_at=datetime.now(UTC)).returning(Invitation)
        )


@dataclass(frozen=True)
class Pending:
    tenant_id: uuid.UUID
    tenant_name: str
    invitation: Invitation
    has_password: bool  # the email has an account already: accepting only adds the role


async def look_up(db: Database, token: str) -> Pending:
    """The pending invitation for a token; a clear error for unknown, expired, revoked or used ones."""
    digest = token_hash(token)
    async with db.system() as session:
        tenant_id = await session.scalar(text("select konstruct_invitation_tenant(:h)"), {"h": digest})
    if tenant_id is None:
        raise NotFoundError("this invitation link is not valid: ask for a new invitation")
    async with db.tenant(tenant_id=tenant_id) as session:
        row = await session.scalar(select(Invitation).where(Invitation.token_hash == digest))
        name = await session.scalar(text("select name from tenants"))
    assert row is not None
    state = InvitationInfo.from_row(row, datetime.now(UTC)).state
    if state == "accepted":
        raise ConflictError("this invitation was used already: sign in, or ask for a new invitation")
    if state == "revoked":
        raise ConflictError("this invitation was revoked: ask for a new invitation")
    if state == "expired":
        raise ConflictError(f"this invitation expired on {row.expires_at:%Y-%m-%d %H:%M} UTC: ask for it to be resent")
    async with db.system() as session:
        existing = (await session.execute(text("select id from konstruct_user_by_email(:e)"), {"e": row.email})).first()
    return Pending(tenant_id, str(name), row, existing is not None)


async def accept(db: Database, token: str, *, name: str, password: str | None) -> tuple[str, str, str]:
    """Accept an invitation: create the user (or only add the role to an existing one). Returns (email, role, tenant name).
    The invitation is used exactly once, even when accepted twice at the same moment."""
    pending = await look_up(db, token)
    invitation = pending.invitation
    async with db.system() as session:
        existing = (
            await session.execute(text("select id, password_hash from konstruct_user_by_email(:e)"), {"e": invitation.email})
        ).first()
    if existing is None:
        if not name.strip():
            raise ValidationError("a name is needed to accept the invitation")
        password = check_password(password or "")
    now = datetime.now(UTC)
    async with db.tenant(tenant_id=pending.tenant_id) as session:
        used = await session.scalar(
            update(Invitation)
            .where(
                Invitation.id == invitation.id,
                Invitation.accepted_at.is_(None),
                Invitation.revoked_at.is_(None),
                Invitation.expires_at > now,
            )
            .values(accepted_at=now)
            .returning(Invitation.id)
        )
        if used is None:
            raise ConflictError("this invitation was used already: sign in, or ask for a new invitation")
        user_id = existing.id if existing is not None else uuid.uuid4()
        await as_user(session, user_id)
        if existing is None:
            await session.execute(
                pg_insert(User).values(
                    id=user_id, email=invitation.email, name=name.strip()[:200], password_hash=hash_password(password or "")
                )
            )
        # An existing account only gains the role: whoever holds the link must never set its password (nor
        # its name), also when it has none yet (an invitation would otherwise claim a passwordless account).
        await add_member(session, pending.tenant_id, user_id, invitation.role, actor=f"user:{invitation.email}")
        await session.execute(update(Invitation).where(Invitation.id == invitation.id).values(accepted_by=user_id))
        await audit.record(session, tenant_id=pending.tenant_id, actor=f"user:{invitation.email}", action="invite.accepted",
                           target=invitation.email, detail={"role": invitation.role, "id": str(invitation.id)})  # fmt: skip
    return invitation.email, invitation.role, pending.tenant_name


async def send(db: Database, settings: Settings, tenant_id: uuid.UUID, invitation_id: uuid.UUID, token: str) -> bool:
    """Email the invitation link (the worker's task). False when it is no longer pending (revoked, resent, used)."""
    async with db.tenant(tenant_id=tenant_id) as session:
        row = await session.get(Invitation, invitation_id)
        name = await session.scalar(text("select name from tenants"))
    if row is None or InvitationInfo.from_row(row, datetime.now(UTC)).state != "pending":
        return False
    role = "an admin" if row.role == "customer_admin" else "an operator"
    body = (
        f"You are invited to join {name} on Konstruct as {role}.\n\n"
        f"Open this link to set your name and password:\n{invite_url(settings, token)}\n\n"
        f"The link works once and expires on {row.expires_at:%Y-%m-%d %H:%M} UTC.\n"
    )
    await asyncio.to_thread(mail.send, settings, to=[row.email], subject=f"[Konstruct] You are invited to {name}", body=body)
    await mark_sent(db, tenant_id, invitation_id)
    async with db.tenant(tenant_id=tenant_id) as session:
        await audit.record(session, tenant_id=tenant_id, actor="konstruct", action="invite.sent", target=row.email,
                           detail={"id": str(invitation_id)})  # fmt: skip
    return True
