"""Users and their roles in tenants. Passwords are kept only as scrypt hashes (memory-hard)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct import audit
from konstruct.db.engine import Database
from konstruct.db.models import Membership, User
from konstruct.errors import ConflictError, NotFoundError, ValidationError
from konstruct.tenancy.access import ROLES
from konstruct.tenancy.tenants import EMAIL_RE, TenantInfo

MIN_PASSWORD = 10
# scrypt with N=2^15, r=8: 32 MiB of memory and ~0.1 s per guess on a server core.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 * 2**20, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, stored: str | None) -> bool:
    """Constant-time check of a password against a stored hash (False for no hash or a malformed one)."""
    if not stored:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), maxmem=64 * 2**20, dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def check_email(email: str) -> str:
    email = email.strip().lower()
    if not EMAIL_RE.match(email):
        raise ValidationError(f"{email!r} is not an email address")
    return email


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ValidationError(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > 1024:
        raise ValidationError("a password may have at most 1024 characters")
    return password


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValidationError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


@dataclass(frozen=True)
class MemberInfo:
    email: str
    name: str
    role: str
    has_password: bool
    platform_admin: bool
    since: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "email": self.email,
            "name": self.name,
            "role": self.role,
            "has_password": self.has_password,
            "platform_admin": self.platform_admin,
            "since": self.since.isoformat(),
        }


async def as_user(session: AsyncSession, user_id: uuid.UUID) -> None:
    """Let this transaction see (and write) the user's own row."""
    await session.execute(text("select set_config('app.current_user', :u, true)"), {"u": str(user_id)})


async def create_user(db: Database, *, email: str, name: str, password: str | None, platform_admin: bool, actor: str) -> uuid.UUID:
    """A user without any tenant (a platform admin, or someone to add to tenants later)."""
    email = check_email(email)
    async with db.system() as session:
        if (await session.execute(text("select id from konstruct_user_by_email(:e)"), {"e": email})).first() is not None:
            raise ConflictError(f"a user {email} exists already")
        user_id = uuid.uuid4()
        await as_user(session, user_id)
        await session.execute(
            pg_insert(User).values(
                id=user_id, email=email, name=name.strip()[:200],
                password_hash=hash_password(check_password(password)) if password else None,
            )
        )  # fmt: skip
    if platform_admin:
        await _set_platform_admin_as_owner(db, user_id, True)
    return user_id


async def _set_platform_admin_as_owner(db: Database, user_id: uuid.UUID, value: bool) -> None:
    """The app role may not change platform_admin (column grants, migration 0010): only the owner role,
    whose credentials the local operator's CLI holds and the gateway never uses for this."""
    import asyncio

    import psycopg

    def run() -> None:
        with psycopg.connect(db.urls.owner_dsn()) as conn:
            conn.execute("update users set platform_admin = %s, updated_at = now() where id = %s", (value, user_id))

    await asyncio.to_thread(run)


async def set_platform_admin(db: Database, email: str, value: bool) -> None:
    email = check_email(email)
    async with db.system() as session:
        row = (await session.execute(text("select id from konstruct_user_by_email(:e)"), {"e": email})).first()
        if row is None:
            raise NotFoundError(f"no user {email}: create one with `konstruct user create`")
    await _set_platform_admin_as_owner(db, row.id, value)


async def directory(db: Database) -> list[dict[str, Any]]:
    """Every user (for platform admins)."""
    async with db.system() as session:
        rows = await session.execute(text("select id, email, name, platform_admin, created_at from konstruct_user_directory()"))
        return [dict(row._mapping) for row in rows]


async def members(db: Database, tenant: TenantInfo) -> list[MemberInfo]:
    async with db.tenant(tenant_id=tenant.id) as session:
        rows = await session.execute(
            select(User.email, User.name, Membership.role, User.password_hash.is_not(None), User.platform_admin, Membership.created_at)
            .join(Membership, Membership.user_id == User.id)
            .order_by(User.email)
        )
        return [MemberInfo(*row) for row in rows]


async def member(db: Database, tenant: TenantInfo, email: str) -> MemberInfo:
    email = check_email(email)
    for info in await members(db, tenant):
        if info.email == email:
            return info
    raise NotFoundError(f"{email} is not a member of {tenant.slug}: see `konstruct user list --tenant {tenant.slug}`")


async def set_role(db: Database, tenant: TenantInfo, email: str, role: str, *, actor: str) -> MemberInfo:
    role = check_role(role)
    current = await member(db, tenant, email)
    async with db.tenant(tenant_id=tenant.id) as session:
        user_id = await session.scalar(select(User.id).where(User.email == current.email))
        await session.execute(update(Membership).where(Membership.user_id == user_id).values(role=role))
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="user.role_changed", target=current.email,
                           detail={"from": current.role, "to": role})  # fmt: skip
    return await member(db, tenant, email)


async def remove_member(db: Database, tenant: TenantInfo, email: str, *, actor: str) -> MemberInfo:
    """Take the user out of this tenant (the user and their other tenants stay)."""
    current = await member(db, tenant, email)
    async with db.tenant(tenant_id=tenant.id) as session:
        user_id = await session.scalar(select(User.id).where(User.email == current.email))
        await session.execute(delete(Membership).where(Membership.user_id == user_id))
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="user.removed", target=current.email,
                           detail={"role": current.role})  # fmt: skip
    return current


async def add_member(session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID, role: str, *, actor: str) -> None:
    """Give a user a role in the current tenant's transaction (a new role replaces an old one)."""
    await session.execute(
        pg_insert(Membership)
        .values(tenant_id=tenant_id, user_id=user_id, role=check_role(role), created_by=actor)
        .on_conflict_do_update(index_elements=[Membership.tenant_id, Membership.user_id], set_={"role": role})
    )
