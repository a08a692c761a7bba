"""The WhatsApp webhook in the gateway: the verification handshake, then signed deliveries stored and acked.

A delivery is authenticated with the app secret of the number it names (X-Hub-Signature-256 over the
raw body), its messages are stored in the inbox (one row per wamid, so a redelivery is a no-op) and its
delivery statuses recorded, then Meta gets its 200. The answer is the worker's job.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from konstruct import inbox
from konstruct.bodies import parse_json, read_body
from konstruct.channels.connections import ResolveCache, Resolved, single_mode_candidates, unseal
from konstruct.channels.whatsapp import approvals, delivery, normalize
from konstruct.channels.whatsapp.graph import signature_ok
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.errors import DatabaseUnavailable
from konstruct.messaging import InboundMessage, Routing, clean_message

log = logging.getLogger("konstruct.whatsapp")

_SIGNATURE = re.compile(r"sha256=[0-9a-fA-F]{64}")


class WhatsAppWebhook:
    """GET and POST /whatsapp/webhook."""

    def __init__(self, settings: Settings, db: Database, queue: inbox.Doorbell) -> None:
        self.settings = settings
        self.db = db
        self.queue = queue
        self.connections = ResolveCache(db, settings)
        self._all: tuple[float, list[dict[str, str]]] = (float("-inf"), [])

    async def verify(self, request: Request) -> Response:
        """Meta's subscription handshake: echo hub.challenge when hub.verify_token is one of ours."""
        params = request.query_params
        token = params.get("hub.verify_token") or ""
        if params.get("hub.mode") != "subscribe" or not token:
            return PlainTextResponse("forbidden", status_code=403)
        candidates = [c.get("verify_token") or "" for c in await self._all_credentials()]
        if self.settings.whatsapp.verify_token:
            candidates.append(self.settings.whatsapp.verify_token.get_secret_value())
        # Compare with every candidate (no early exit), in constant time.
        matched = [hmac.compare_digest(token.encode(), c.encode()) for c in candidates if c]
        if not any(matched):
            return PlainTextResponse("forbidden", status_code=403)
        return PlainTextResponse(params.get("hub.challenge") or "")

    async def receive(self, request: Request) -> Response:
        body = await read_body(request)
        if body is None:
            return JSONResponse({"error": "payload too large"}, status_code=413)
        signature = request.headers.get("x-hub-signature-256")
        if not signature:
            return JSONResponse({"error": "missing X-Hub-Signature-256"}, status_code=403)
        if not _SIGNATURE.fullmatch(signature):
            return JSONResponse({"error": "invalid signature"}, status_code=403)
        payload = parse_json(body, allow_nan=True)  # a NaN coordinate spoils one field, not the delivery
        values = normalize.changes(payload) if isinstance(payload, dict) else []
        accepted: list[tuple[Resolved, dict[str, Any]]] = []
        verified_any = False
        for value in values:
            number = normalize.phone_number_id(value)
            entry = await self.connections.get("whatsapp", number) if number else None
            if entry is None:
                continue
            resolved, credentials = entry
            if not signature_ok(credentials.get("app_secret", ""), body, signature):
                continue
            verified_any = True
            if resolved.status == "connected":
                accepted.append((resolved, value))
        if not verified_any and not await self._signed_by_any(body, signature):
            # Unknown number or wrong secret: nothing is stored, and nothing is said about why.
            return JSONResponse({"error": "invalid signature"}, status_code=403)
        for resolved, value in accepted:
            for message in normalize.messages(value):
                await self._store(resolved, value, message)
        # Messages are safe; a failure recording statuses must not make Meta re-deliver the messages for days.
        for resolved, value in accepted:
            try:
                await self._statuses(resolved, normalize.statuses(value))
            except DatabaseUnavailable:
                raise  # a 503: Meta delivers again, the stored messages dedupe, and the statuses land then
            except Exception as exc:
                log.error("could not record WhatsApp statuses for %s: %s", resolved.id, type(exc).__name__)
        return JSONResponse({"ok": True})

    async def _signed_by_any(self, body: bytes, signature: str) -> bool:
        """Deliveries that name no number of ours (account updates, unknown fields) are checked against every app secret."""
        return any(signature_ok(c.get("app_secret", ""), body, signature) for c in await self._all_credentials())

    async def _all_credentials(self) -> list[dict[str, str]]:
        now = time.monotonic()
        if now - self._all[0] > self.settings.gateway.cache_ttl:
            blobs = await single_mode_candidates(self.db, "whatsapp")
            self._all = (now, [unseal(self.settings, blob) for _, _, blob in blobs])
        return self._all[1]

    async def _store(self, resolved: Resolved, value: dict[str, Any], message: normalize.Normalized) -> None:
        number = normalize.phone_number_id(value) or ""
        if await approvals.decide_tap(self.db, self.queue, resolved.tenant_id, number, message.wa_id, message.button_id):
            return  # a tap on Approve/Deny: a decision, not a message for the agent
        media = message.media
        # Cleaned, so a NUL byte or a lone surrogate is stored as text instead of failing the insert.
        await inbox.accept(
            self.db,
            self.queue,
            clean_message(
                InboundMessage(
                    tenant_id=resolved.tenant_id,
                    agent_id=None,
                    routing=Routing(resolved.id, message.wa_id, may_start=True),
                    channel="whatsapp",
                    external_id=message.wamid,
                    conversation_key=f"{number}:{message.wa_id}",
                    sender=message.wa_id,
                    text=message.text,
                    answer=message.answer,
                    payload={
                        "phone_number_id": number,
                        "wa_id": message.wa_id,
                        "wamid": message.wamid,
                        "name": message.name,
                        "kind": message.kind,
                        "timestamp": message.timestamp,
                        "reply_to": message.reply_to,
                        "media": None
                        if media is None
                        else {
                            "id": media.id,
                            "kind": media.kind,
                            "mime_type": media.mime_type,
                            "sha256": media.sha256,
                            "caption": media.caption,
                            "filename": media.filename,
                        },
                        "received": time.time(),
                    },
                )
            ),
        )

    async def _statuses(self, resolved: Resolved, statuses: list[normalize.Status]) -> None:
        if not statuses:
            return
        furthest: dict[str, normalize.Status] = {}
        for status in statuses:  # one row per wamid per statement: keep the furthest of this delivery
            seen = furthest.get(status.wamid)
            if seen is None or delivery.RANK[status.status] > delivery.RANK[seen.status]:
                furthest[status.wamid] = status
        reports = [
            (wamid, s.status, datetime.fromtimestamp(s.timestamp, UTC) if s.timestamp else None, s.error) for wamid, s in furthest.items()
        ]
        async with self.db.tenant(tenant_id=resolved.tenant_id) as session:
            await delivery.record_statuses(session, resolved.tenant_id, reports)
