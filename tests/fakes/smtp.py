"""A loopback SMTP server (aiosmtpd) that records every mail it accepts.

`FakeSMTP().start()` listens on 127.0.0.1 (a free port unless told one) in its own thread. With
`username` and `password` set it advertises AUTH PLAIN and LOGIN without TLS and refuses MAIL FROM
before a successful login (530), like a submission server; without them it takes mail from anyone
and does not offer AUTH. `wait_for(n)` blocks until n mails arrived.
"""

from __future__ import annotations

import email
import email.policy
import hmac
import socket
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

HOSTNAME = "fake-smtp.test"  # what the server calls itself; also spares a getfqdn() lookup


@dataclass
class Mail:
    sender: str  # the envelope sender (MAIL FROM)
    recipients: list[str]  # the envelope recipients (RCPT TO)
    subject: str
    body: str  # the text/plain part, decoded ("" if none)
    raw: bytes
    html: str = ""  # the text/html part, decoded ("" if none)
    login: str | None = None  # who authenticated, if anyone

    @property
    def message(self) -> EmailMessage:
        """The parsed message, for headers and attachments."""
        parsed = email.message_from_bytes(self.raw.replace(b"\r\n", b"\n"), policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


def _part(message: EmailMessage, subtype: str) -> str:
    part = message.get_body(preferencelist=(subtype,))
    if part is None or part.get_content_type() != f"text/{subtype}":
        return ""
    return str(part.get_content())


def parse_mail(sender: str, recipients: list[str], raw: bytes, login: str | None = None) -> Mail:
    """A Mail from an envelope and the raw message (CRLF line ends read as newlines)."""
    message = email.message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return Mail(sender, list(recipients), str(message.get("Subject", "")), _part(message, "plain"), raw, _part(message, "html"), login)


class _Handler:
    """The aiosmtpd hooks (run on the server's event loop thread); kept apart from FakeSMTP, whose attributes
    aiosmtpd would otherwise scan for `auth_*` mechanisms and `handle_*` hooks."""

    def __init__(self, fake: FakeSMTP) -> None:
        self.fake = fake

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]) -> str:
        if self.fake.needs_login and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        login = session.auth_data.login.decode(errors="replace") if isinstance(session.auth_data, LoginPassword) else None
        self.fake.record(parse_mail(envelope.mail_from or "", envelope.rcpt_tos, raw, login))
        return "250 2.0.0 Message accepted for delivery"


@dataclass
class FakeSMTP:
    username: str | None = None
    password: str | None = None
    messages: list[Mail] = field(default_factory=list)
    failed_logins: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _controller: Controller | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        assert self._controller is not None, "not started"
        return int(self._controller.port)

    @property
    def needs_login(self) -> bool:
        return self.username is not None or self.password is not None

    def record(self, mail: Mail) -> None:
        with self._cond:
            self.messages.append(mail)
            self._cond.notify_all()

    def check_login(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any) -> AuthResult:
        """aiosmtpd's authenticator: the configured username and password, by PLAIN or LOGIN."""
        ok = (
            isinstance(auth_data, LoginPassword)
            and hmac.compare_digest(auth_data.login, (self.username or "").encode())
            and hmac.compare_digest(auth_data.password, (self.password or "").encode())
        )
        if not ok:
            with self._cond:
                self.failed_logins += 1
        return AuthResult(success=bool(ok), handled=False, auth_data=auth_data)

    def reset(self) -> None:
        with self._cond:
            self.messages.clear()
            self.failed_logins = 0

    def wait_for(self, count: int, timeout: float = 10) -> list[Mail]:
        """At least `count` mails (all that arrived), waiting up to `timeout` seconds; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    arrived = [(m.sender, m.recipients, m.subject) for m in self.messages]
                    raise AssertionError(f"wanted {count} mail(s) within {timeout}s, got {len(arrived)}: {arrived}")
                self._cond.wait(left)
            return list(self.messages)

    # --- lifecycle

    def start(self, port: int = 0) -> FakeSMTP:
        """Listen on 127.0.0.1:port; with 0, on a free port picked here."""
        assert self._controller is None, "already started"
        auth: dict[str, Any] = {"authenticator": self.check_login, "auth_require_tls": False} if self.needs_login else {}
        for attempt in range(5):
            chosen = port or _free_port()
            controller = Controller(
                _Handler(self), hostname="127.0.0.1", port=chosen, server_hostname=HOSTNAME, enable_SMTPUTF8=True, **auth
            )
            try:
                controller.start()
            except OSError:
                controller.loop.close()
                if port or attempt == 4:
                    raise
                continue
            self._controller = controller
            break
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller.loop.close()
            self._controller = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
