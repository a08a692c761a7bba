"""Replying on WhatsApp from the worker: mark read, fetch media, send within the 24-hour window, pace, retry.

Free-form text may only go to a person who wrote in the last 24 hours (the customer-service window,
counted from their latest message in the conversation). Outside it the configured template goes
instead; with none configured the reply is recorded as failed with that reason, never silently lost.
The pipeline asks `window()` first and then does not ask the model at all; a reply that still meets a closed
window (Meta says so, or it closed meanwhile) is recorded as the template that went instead of it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct.channels.connections import SecretCache
from konstruct.channels.text import split_message
from konstruct.channels.whatsapp import delivery
from konstruct.channels.whatsapp.approvals import request_body
from konstruct.channels.whatsapp.graph import OUTSIDE_WINDOW, WHATSAPP_TEXT_LIMIT, Graph, GraphError
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import InboundMessage
from konstruct.messaging import ApprovalRequest, ChannelError, Reply, Sent, Target, Template, Window, mark_sent, record_template

log = logging.getLogger("konstruct.whatsapp")

WINDOW = 24 * 3600.0
OUTSIDE = "the last message from the person is more than 24 hours old"
ONLY_TEMPLATE = "so WhatsApp only allows a template"
NO_TEMPLATE = "and no [whatsapp] template_name is configured"
DESCRIBED = {"audio": "an audio message", "video": "a video", "document": "a document"}


def to_whatsapp(markdown: str) -> str:
    """The model's Markdown in WhatsApp's formatting: *bold*, _italic_, ~strike~, headings as bold lines."""
    out = re.sub(r"\*\*(.+?)\*\*", r"*\1*", markdown)
    out = re.sub(r"__(.+?)__", r"*\1*", out)
    out = re.sub(r"~~(.+?)~~", r"~\1~", out)
    out = re.sub(r"^#{1,6}\s+(.+)$", r"*\1*", out, flags=re.MULTILINE)
    return re.sub(r"\[([^\]]+)\]\((https?://[^)\s]+)\)", r"\1 (\2)", out)


def hex_digest(value: Any) -> str | None:
    """Meta sends a media file's sha256 as hex (and has sent base64): the hex form, or None."""
    if not isinstance(value, str) or not value:
        return None
    if re.fullmatch(r"[0-9a-fA-F]{64}", value):
        return value.lower()
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return raw.hex() if len(raw) == 32 else None


class MediaStore:
    """Content-addressed files under the data directory: media/ab/abcdef… (sha256)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def save(self, data: bytes) -> Path:
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            partial = path.with_name(f".{digest}.{uuid.uuid4().hex}")
            # Customers' files: readable by this user only, whatever the umask.
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(partial, path)  # whole or absent, also when two workers save the same file
        return path


class Pacer:
    """At most `rate` sends per second from one number, and `interval` seconds between two to one person."""

    def __init__(self, rate: float, interval: float) -> None:
        self.rate, self.interval = rate, interval
        self._number: dict[str, tuple[asyncio.Lock, list[float]]] = {}
        self._person: dict[tuple[str, str], tuple[asyncio.Lock, list[float]]] = {}
        self._pruned_at = float("-inf")

    async def wait(self, number: str, person: str) -> None:
        now = time.monotonic()
        if len(self._person) > 10_000 and now - self._pruned_at > max(self.interval, 1.0):  # keep memory bounded
            self._pruned_at = now
            for key, (lock_, last_) in list(self._person.items()):
                if not lock_.locked() and now - last_[0] > self.interval:
                    del self._person[key]
        lock, last = self._person.setdefault((number, person), (asyncio.Lock(), [float("-inf")]))
        async with lock:
            delay = last[0] + self.interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._number_slot(number)
            last[0] = time.monotonic()

    async def _number_slot(self, number: str) -> None:
        lock, last = self._number.setdefault(number, (asyncio.Lock(), [float("-inf")]))
        async with lock:
            delay = last[0] + 1.0 / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            last[0] = time.monotonic()


class WhatsAppChannel:
    name = "whatsapp"
    reports_delivery = True

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.config = settings.whatsapp
        self.db = db
        self.graph = Graph(settings.whatsapp)
        self.media = MediaStore(settings.data_dir / "media")
        self.pacer = Pacer(settings.whatsapp.number_rate, settings.whatsapp.recipient_interval)
        self.tokens = SecretCache(db, settings, "whatsapp", "access_token")
        self._templated: dict[str, Template] = {}  # wamid -> the template sent in a reply's place, until record_sent

    def template(self) -> Template | None:
        """The configured template, with the text the conversation records for it."""
        name = self.config.template_name
        if not name:
            return None
        return Template(name, self.config.template_text or f"[WhatsApp template {name!r} ({self.config.template_language})]")

    async def window(self, target: Target) -> Window:
        """Free-form text may go now when the person wrote in the last 24 hours; else only the template (if any)."""
        if await self._in_window(target):
            return Window(True)
        template = self.template()
        return Window(False, template, f"{OUTSIDE}, {ONLY_TEMPLATE}" + ("" if template else f", {NO_TEMPLATE}"))

    async def prepare(self, target: Target) -> str | None:
        """Mark the person's message read (blue ticks) with the typing indicator; nothing to replace later."""
        number, token = target.payload["phone_number_id"], await self._token(target)
        await self.graph.mark_read(number, token, target.payload.get("wamid") or target.inbound_external_id)
        return None

    async def working(self, target: Target, what: str) -> None:
        return None  # WhatsApp has the typing indicator prepare() started, and no way to say more

    async def attachments(self, target: Target) -> list[dict[str, Any]]:
        """Fetch the message's media into the media store; images become image parts, the rest a short description."""
        media = target.payload.get("media")
        if not media:
            return []
        kind, mime = media.get("kind", "file"), media.get("mime_type") or "application/octet-stream"
        caption = f' with the caption "{media["caption"]}"' if media.get("caption") else ""
        try:
            data = await self._fetch(target, media)
        except (GraphError, ChannelError) as exc:
            log.warning("WhatsApp media %s unavailable: %s", media.get("id"), exc)
            return [{"type": "text", "text": f"(The person sent {DESCRIBED.get(kind, 'a ' + kind)}{caption} that could not be read.)"}]
        if kind in ("image", "sticker") and mime.split(";")[0] in ("image/jpeg", "image/png", "image/webp", "image/gif"):
            url = f"data:{mime.split(';')[0]};base64,{base64.b64encode(data).decode()}"
            return [{"type": "image_url", "image_url": {"url": url}}]
        what = DESCRIBED.get(kind, f"a {kind}")
        name = f' named "{media["filename"]}"' if media.get("filename") else ""
        note = f"(The person sent {what}{name} ({mime}, {len(data):,} bytes){caption}; its content is not shown to you.)"
        return [{"type": "text", "text": note}]

    async def send(self, reply: Reply) -> str | None:
        """Text parts inside the window; the template outside it; Graph errors retried where that helps."""
        return (await self.deliver(reply)).external_id

    async def deliver(self, reply: Reply) -> Sent:
        """send(), saying what went out: the text, or (outside the 24-hour window) the template in its place."""
        target = reply.target
        number, person = target.payload["phone_number_id"], target.payload["wa_id"]
        token = await self._token(target)
        if not await self._in_window(target):
            return await self._template(number, person, token, OUTSIDE)
        first: str | None = None
        for part in split_message(to_whatsapp(reply.text), WHATSAPP_TEXT_LIMIT) or ["…"]:
            body = {"recipient_type": "individual", "to": person, "type": "text", "text": {"body": part, "preview_url": False}}
            try:
                wamid = await self._send(number, person, token, body)
            except GraphError as exc:
                if exc.code == OUTSIDE_WINDOW and first is None:
                    return await self._template(number, person, token, "WhatsApp says the 24-hour window is closed")
                raise ChannelError(f"WhatsApp refused the reply: {exc}") from None
            first = first or wamid
        return Sent(first, reply.text)

    async def _template(self, number: str, person: str, token: str, why: str) -> Sent:
        template = self.template()
        if template is None:
            raise ChannelError(f"not sent: {why}, {ONLY_TEMPLATE}, {NO_TEMPLATE}")
        name = template.name
        body = {"to": person, "type": "template", "template": {"name": name, "language": {"code": self.config.template_language}}}
        try:
            wamid = await self._send(number, person, token, body)
        except GraphError as exc:
            raise ChannelError(f"{why}; the template {name!r} was refused: {exc}") from None
        log.info("WhatsApp reply to %s…%s outside the window: sent the template %r instead", person[:3], person[-2:], name)
        while len(self._templated) >= 1000:  # bounded: entries are taken by record_sent right after the send
            self._templated.pop(next(iter(self._templated)))
        self._templated[wamid] = template
        return Sent(wamid, template.text, f"{why}: WhatsApp only allows a template, so the template {name!r} went instead")

    async def _send(self, number: str, person: str, token: str, body: dict[str, Any]) -> str:
        delay = self.config.retry_backoff
        for attempt in range(self.config.send_retries + 1):
            await self.pacer.wait(number, person)
            try:
                return await self.graph.send(number, token, body)
            except GraphError as exc:
                if not exc.retryable or attempt == self.config.send_retries:
                    raise
                log.warning("WhatsApp send failed (%s); retry %d in %.1f s", exc, attempt + 1, delay)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _in_window(self, target: Target) -> bool:
        """The person's latest message in this conversation (by WhatsApp's own timestamp) is less than 24 h old."""
        async with self.db.tenant(tenant_id=target.tenant_id) as session:
            latest = await session.scalar(
                select(func.max(InboundMessage.payload["timestamp"].as_integer())).where(
                    InboundMessage.conversation_id == target.conversation_id, InboundMessage.channel == "whatsapp"
                )
            )
        latest = max(int(latest or 0), int(target.payload.get("timestamp") or 0))
        return time.time() - latest < WINDOW

    async def _fetch(self, target: Target, media: dict[str, Any]) -> bytes:
        expected = hex_digest(media.get("sha256"))
        if media.get("sha256") and expected is None:
            raise ChannelError(f"media {media['id']} has an unreadable sha256")
        if expected and self.media.path(expected).exists():
            return self.media.path(expected).read_bytes()
        token = await self._token(target)
        data, _ = await self.graph.media(media["id"], token, self.config.max_media_bytes)
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise ChannelError(f"media {media['id']} failed its sha256 check")
        self.media.save(data)
        return data

    async def close(self) -> None:
        await self.graph.close()

    async def _token(self, target: Target) -> str:
        return await self.tokens.get(target.tenant_id, target.payload.get("phone_number_id", ""))

    def link(self, target: Target) -> str | None:
        person = target.payload.get("wa_id")
        return f"https://wa.me/{person}" if person else None

    async def notify(self, tenant_id: uuid.UUID, where: str, text: str) -> None:
        # A business may only start a WhatsApp conversation with an approved template, so there is no free-form notice.
        raise ChannelError("WhatsApp cannot carry a free-form notice: an escalation target is slack:CHANNEL or slack:USER")

    async def ask(self, request: ApprovalRequest, where: str | None) -> str | None:
        """The request as reply buttons to the person (inside the 24-hour window only); operators are not on WhatsApp."""
        if where is not None:
            raise ChannelError("WhatsApp cannot ask the tenant's operators: an escalation target is slack:CHANNEL")
        target = request.target
        if not await self._in_window(target):
            raise ChannelError("the 24-hour window is closed: WhatsApp allows no interactive message now")
        number, person = target.payload["phone_number_id"], target.payload["wa_id"]
        try:
            return await self._send(number, person, await self._token(target), request_body(request, person))
        except GraphError as exc:
            raise ChannelError(f"WhatsApp refused the approval request: {exc}") from None

    async def record_sent(self, session: AsyncSession, message_id: uuid.UUID, external_id: str | None) -> None:
        """The reply's wamid and status; where the template went in its place, the template is what is recorded."""
        if external_id:
            await delivery.record_sent(session, message_id, external_id)
            template = self._templated.pop(external_id, None)
            if template is not None:
                await record_template(session, message_id, template)
        else:
            await mark_sent(session, message_id, external_id)
