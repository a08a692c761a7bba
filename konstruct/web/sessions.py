"""Status page sign-in: sessions by token hash, CSRF tokens, throttled attempts, impersonation."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from konstruct import audit
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.errors import KonstructError, PermissionDenied, ValidationError
from konstruct.tenancy.access import ADMIN, Principal, principal_for
from konstruct.tenancy.tenants import TenantInfo
from konstruct.tenancy.users import hash_password, verify_password

COOKIE = "konstruct_session"
LOGIN_CSRF_COOKIE = "konstruct_login_csrf"


class TooManyAttempts(KonstructError):
    http_status = 429


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def same(a: str, b: str) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True)
class WebSession:
    token_hash: bytes
    user_id: uuid.UUID
    email: str
    csrf: str
    expires_at: datetime
    impersonating: uuid.UUID | None
    impersonation_reason: str | None
    impersonation_until: datetime | None

    @property
    def impersonation_active(self) -> bool:
        return self.impersonating is not None and self.impersonation_until is not None and self.impersonation_until > datetime.now(UTC)


def client_address(peer: str | None, forwarded_for: str | None, trusted: list[str]) -> str:
    """The address a request comes from: the peer, unless it is a trusted proxy; then the right-most
    X-Forwarded-For entry that is not a trusted proxy (anything left of it is whatever the client wrote)."""
    networks = [ipaddress.ip_network(item, strict=False) for item in trusted]

    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in networks)

    address = peer or "unknown"
    if not networks or not is_trusted(address) or not forwarded_for:
        return address
    for hop in reversed([part.strip() for part in forwarded_for.split(",")][-20:]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return address  # a malformed chain: believe only the proxy we can see
        if not is_trusted(hop):
            return hop
        address = hop
    return address


def _dummy_hash() -> str:
    """A real scrypt hash of nothing anyone knows: checked for unknown emails, so they cost the same time."""
    global _DUMMY
    if _DUMMY is None:
        _DUMMY = hash_password(secrets.token_urlsafe(16))
    return _DUMMY


_DUMMY: str | None = None
_RESERVE = text("""
SELECT (SELECT count(*) FROM login_failures WHERE key = :pair AND failed_at > now() - make_interval(mins => :w)) AS pair,
       (SELECT extract(epoch FROM now() - max(failed_at)) FROM login_failures WHERE key = :pair) AS since,
       (SELECT count(*) FROM login_failures WHERE key = :ip AND failed_at > now() - make_interval(mins => :w)) AS ip
""")


async def _reserve(db: Database, settings: Settings, pair: str, ip: str) -> None:
    """Count this attempt as failed before checking it (so concurrent guesses cannot all slip under the
    limit), or raise TooManyAttempts. One lock per key makes the check and the count one step."""
    web = settings.web
    async with db.system() as session:
        await session.execute(text("select pg_advisory_xact_lock(hashtext(:k))"), {"k": pair})
        await session.execute(text("select pg_advisory_xact_lock(hashtext(:k))"), {"k": ip})
        row = (await session.execute(_RESERVE, {"pair": pair, "ip": ip, "w": web.login_window})).one()
        if row.ip >= web.address_attempts:
            raise TooManyAttempts(f"too many failed sign-ins from this address: try again in {web.login_window:g} minutes")
        over = row.pair - web.login_attempts
        if over >= 0:
            # Growing delays for one email from one address: 1 s, 2 s, 4 s… up to the window. Nobody else is slowed.
            wait = min(2.0**over, web.login_window * 60)
            if row.since is not None and float(row.since) < wait:
                raise TooManyAttempts(f"too many failed sign-ins: try again in {max(1, round(wait - float(row.since)))} seconds")
        await session.execute(text("insert into login_failures (key) values (:p), (:i)"), {"p": pair, "i": ip})


async def sign_in(db: Database, settings: Settings, email: str, password: str, address: str) -> tuple[str, WebSession]:
    """Check the password (throttled per email and address, and per address); a new session and its token on success."""
    email = email.strip().lower()[:320]
    pair, ip = f"pair:{address}:{email}", f"ip:{address}"
    web = settings.web
    await _reserve(db, settings, pair, ip)
    async with db.system() as session:
        row = (await session.execute(text("select id, email, password_hash from konstruct_user_by_email(:e)"), {"e": email})).first()
    stored = row.password_hash if row is not None and row.password_hash else await asyncio.to_thread(_dummy_hash)
    # scrypt takes ~0.1 s of CPU: in a thread, so webhooks on this event loop are not kept waiting.
    matched = await asyncio.to_thread(verify_password, password[:1024], stored)
    if row is None or not row.password_hash or not matched:
        raise ValidationError("wrong email or password")
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    expires = datetime.now(UTC) + timedelta(hours=web.session_hours)
    async with db.system() as session:
        await session.execute(text("delete from login_failures where key = :k"), {"k": pair})
        await session.execute(
            text(
                "delete from login_failures where ctid = (select ctid from login_failures where key = :k order by failed_at desc limit 1)"
            ),
            {"k": ip},
        )  # this attempt was counted against the address in advance; it succeeded
        await session.execute(text("delete from web_sessions where expires_at < now()"))
        await session.execute(
            text("insert into web_sessions (token_hash, user_id, email, csrf, expires_at) values (:h, :u, :e, :c, :x)"),
            {"h": digest(token), "u": row.id, "e": row.email, "c": csrf, "x": expires},
        )
    return token, WebSession(digest(token), row.id, row.email, csrf, expires, None, None, None)


async def load(db: Database, token: str | None) -> WebSession | None:
    if not token:
        return None
    async with db.system() as session:
        row = (
            await session.execute(
                text(
                    "select token_hash, user_id, email, csrf, expires_at, impersonating, impersonation_reason, impersonation_until "
                    "from web_sessions where token_hash = :h and expires_at > now()"
                ),
                {"h": digest(token)},
            )
        ).first()
    return WebSession(*row) if row is not None else None


async def sign_out(db: Database, web_session: WebSession) -> None:
    async with db.system() as session:
        await session.execute(text("delete from web_sessions where token_hash = :h"), {"h": web_session.token_hash})


async def principal(db: Database, web_session: WebSession) -> Principal:
    """Who the browser is: the user, or (while a platform admin impersonates) an admin view of one tenant."""
    user = await principal_for(db, web_session.email)
    if user.platform_admin and web_session.impersonation_active and web_session.impersonating is not None:
        return Principal(
            name=f"{user.name} viewing as a tenant", platform_admin=False, user_id=user.user_id, email=user.email,
            roles={web_session.impersonating: ADMIN},
        )  # fmt: skip
    return user


async def impersonate(db: Database, settings: Settings, web_session: WebSession, user: Principal, tenant: TenantInfo, reason: str) -> None:
    """A platform admin views the status page as a tenant, for a while, with a reason (audited in that tenant's log)."""
    user.require("impersonate")
    reason = " ".join(reason.split())
    if len(reason) < 5:
        raise ValidationError("say why (at least a few words): impersonation is audited")
    until = datetime.now(UTC) + timedelta(minutes=settings.web.impersonation_minutes)
    async with db.system() as session:
        await session.execute(
            text("update web_sessions set impersonating = :t, impersonation_reason = :r, impersonation_until = :u where token_hash = :h"),
            {"t": tenant.id, "r": reason[:500], "u": until, "h": web_session.token_hash},
        )
    async with db.tenant(tenant_id=tenant.id) as session:
        await audit.record(session, tenant_id=tenant.id, actor=f"user:{user.email}", action="impersonation.started", target=tenant.slug,
                           detail={"reason": reason[:500], "until": until.isoformat()})  # fmt: skip


async def stop_impersonating(db: Database, web_session: WebSession) -> None:
    if web_session.impersonating is None:
        raise PermissionDenied("not viewing as a tenant")
    async with db.system() as session:
        await session.execute(
            text(
                "update web_sessions set impersonating = null, impersonation_reason = null, impersonation_until = null where token_hash = :h"
            ),
            {"h": web_session.token_hash},
        )
    async with db.tenant(tenant_id=web_session.impersonating) as session:
        await audit.record(session, tenant_id=web_session.impersonating, actor=f"user:{web_session.email}", action="impersonation.ended",
                           target=str(web_session.impersonating))  # fmt: skip
