"""Email over SMTP ([smtp] in the config): notifications to a tenant's admins, sent by a worker task."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import uuid
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid

from sqlalchemy import select

from konstruct import audit
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Tenant
from konstruct.errors import KonstructError


@dataclass(frozen=True)
class Notice:
    """Something the tenant's admins should hear about (an email the worker sends)."""

    tenant_id: uuid.UUID
    kind: str  # budget.alert | budget.exhausted
    subject: str
    body: str


class MailError(KonstructError):
    """The SMTP server could not be reached or refused the message."""


def send(settings: Settings, *, to: list[str], subject: str, body: str) -> str:
    """Send one plain-text email; returns its Message-ID. MailError on any failure (no password in it)."""
    smtp = settings.smtp
    if not smtp.host:
        raise MailError("no SMTP server configured: set [smtp] host in konstruct.toml")
    message = EmailMessage()
    message["From"] = smtp.sender
    message["To"] = ", ".join(to)
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain=smtp.sender.rpartition("@")[2] or "konstruct")
    message.set_content(body)
    try:
        if smtp.security == "tls":
            server: smtplib.SMTP = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout, context=ssl.create_default_context())
        else:
            server = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout)
        with server:
            if smtp.security == "starttls":
                server.starttls(context=ssl.create_default_context())
            if smtp.username:
                server.login(smtp.username, smtp.password.get_secret_value() if smtp.password else "")
            server.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        raise MailError(f"SMTP {smtp.host}:{smtp.port}: {type(exc).__name__}: {str(exc)[:200]}") from None
    return str(message["Message-ID"])


async def admin_addresses(db: Database, tenant_id: uuid.UUID) -> list[str]:
    """Who hears about a tenant's budget and billing: its contact address."""
    async with db.tenant(tenant_id=tenant_id) as session:
        contact = await session.scalar(select(Tenant.contact_email).where(Tenant.id == tenant_id))
    return [contact] if contact else []


async def notify_admins(db: Database, settings: Settings, tenant_id: uuid.UUID, *, kind: str, subject: str, body: str) -> int:
    """Email the tenant's admins and audit it. Returns how many it was sent to (0: nobody to tell, or no SMTP).
    MailError when the server fails (the task retries)."""
    to = await admin_addresses(db, tenant_id)
    why = None
    if not to:
        why = "no contact email: set one with `konstruct tenant configure --contact-email`"
    elif not settings.smtp.host:
        why = "no SMTP server: set [smtp] host in konstruct.toml"
    else:
        await asyncio.to_thread(send, settings, to=to, subject=f"[Konstruct] {subject}", body=body)
    async with db.tenant(tenant_id=tenant_id) as session:
        await audit.record(
            session, tenant_id=tenant_id, actor="konstruct", action="notification.skipped" if why else "notification.sent", target=kind,
            detail={"recipients": 0 if why else len(to), "subject": subject, **({"why": why} if why else {})},
        )  # fmt: skip
    return 0 if why else len(to)
