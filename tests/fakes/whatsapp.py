"""A loopback fake of Meta's Graph API for the WhatsApp Cloud API, and builders of the webhooks Meta sends.

`FakeGraph` is a real HTTP server on 127.0.0.1; its `url` is what `graph_url` points at, and any API
version prefix (`/v23.0/...`) is accepted. It serves media to registered access tokens (the media
object first, then the bytes from the short-lived URL in it, which needs the bearer token too), takes
sends and read receipts, records every call, and fails the next sends with a Graph error when told to.

Like Graph: a bad or missing token is HTTP 401 with error code 190, an unknown object is code 100,
and every error is `{"error": {"message", "type", "code", "error_data", "fbtrace_id"}}`.

The builders below (`webhook`, `text`, `image`, ..., `status`, `sign`) make the bodies Meta POSTs to our
webhook, shaped like Meta's own.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.server import QuietHandler, serve, shutdown

SEND_KINDS = ("text", "template", "interactive")
TEXT_LIMIT = 4096  # characters in text.body

# code -> (title, details), as Meta words them
ERRORS: dict[int, tuple[str, str]] = {
    1: ("API Unknown", "Invalid request or possible server error."),
    2: ("API Service", "Temporary due to downtime or due to being overloaded."),
    100: ("Invalid parameter", "Invalid parameter."),
    190: ("Access token has expired", "Error validating access token."),
    130429: ("Rate limit hit", "Cloud API message throughput has been reached."),
    131000: ("Something went wrong", "Message failed to send due to an unknown error."),
    131026: ("Message undeliverable", "Unable to deliver message."),
    131047: (
        "Re-engagement message",
        "Message failed to send because more than 24 hours have passed since the customer last replied to this number.",
    ),
    131051: ("Message type unknown", "Message type is currently not supported."),
    131056: (
        "(Business Account, Consumer Account) pair rate limit hit",
        "Message failed to send because there were too many messages sent from this phone number to the same phone number "
        "in a short period of time.",
    ),
}


@dataclass
class Call:
    method: str
    path: str
    token: str | None
    body: dict[str, Any] | None
    at: float
    status: int = 200
    error_code: int | None = None

    @property
    def failed(self) -> bool:
        return self.status >= 400


@dataclass
class Sent:
    wamid: str
    phone_number_id: str
    to: str
    kind: str
    body: dict[str, Any]
    at: float


@dataclass
class StoredMedia:
    data: bytes
    mime_type: str
    sha256: str
    token: str | None


@dataclass
class Failure:
    code: int
    status: int
    message: str
    details: str
    kinds: tuple[str, ...]
    times: int


@dataclass
class Answer:
    status: int
    payload: dict[str, Any]


def graph_error(status: int, code: int, message: str | None = None, details: str | None = None) -> Answer:
    """A Graph API error answer; message and details default to Meta's words for the code."""
    title, default_details = ERRORS.get(code, ("Graph error", ""))
    error: dict[str, Any] = {
        "message": message or (f"(#{code}) {title}" if code != 190 else "Invalid OAuth access token - Cannot parse access token"),
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": f"A{secrets.token_urlsafe(16)}",
    }
    if code != 190:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details or default_details or title}
    return Answer(status, {"error": error})


def _digits(number: str) -> str:
    return "".join(ch for ch in number if ch.isdigit())


def _wamid(wa_id: str, tag: str) -> str:
    """A wamid shaped like Meta's: base64 of a small record holding the number and a hex id."""
    digits = (_digits(wa_id) or "0")[:200]
    raw = b"\x1c\x18" + bytes([len(digits)]) + digits.encode() + b"\x15\x02\x00\x12\x18\x14" + tag.encode() + b"\x00"
    return f"wamid.{base64.b64encode(raw).decode()}"


def new_wamid(wa_id: str) -> str:
    """A fresh, unique, realistic wamid for a message from (or to) wa_id."""
    return _wamid(wa_id, secrets.token_hex(10).upper())


@dataclass
class FakeGraph:
    numbers: dict[str, str] = field(default_factory=dict)  # phone_number_id -> access token
    media: dict[str, StoredMedia] = field(default_factory=dict)
    corrupt_media: set[str] = field(default_factory=set)  # media ids whose download does not match the sha256
    calls: list[Call] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    media_fetches: list[tuple[str, str | None]] = field(default_factory=list)  # (media id, bearer) of every GET /vX/{media id}
    downloads: list[tuple[str, str | None]] = field(default_factory=list)  # (media id, bearer) of every download
    failures: list[Failure] = field(default_factory=list)
    _links: dict[str, str] = field(default_factory=dict)  # download signature -> media id
    _seq: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The origin, for `graph_url`."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def reset(self) -> None:
        """Forget everything but the wamid counter, so wamids stay unique across tests."""
        with self._lock:
            self.numbers.clear()
            self.media.clear()
            self.corrupt_media.clear()
            self.calls.clear()
            self.sent.clear()
            self.media_fetches.clear()
            self.downloads.clear()
            self.failures.clear()
            self._links.clear()

    def add_number(self, phone_number_id: str, token: str) -> None:
        """Register a business number and the access token allowed to use it."""
        with self._lock:
            self.numbers[phone_number_id] = token

    def add_media(self, media_id: str, data: bytes, mime_type: str, *, token: str | None = None) -> str:
        """Store media; any registered token (or `token`) may fetch it. Returns the hex sha256 of data."""
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            self.media[media_id] = StoredMedia(data, mime_type, digest, token)
        return digest

    def fail_next(
        self,
        code: int,
        *,
        times: int = 1,
        status: int = 400,
        message: str | None = None,
        details: str | None = None,
        kinds: Iterable[str] = SEND_KINDS,
    ) -> None:
        """Answer the next `times` sends of these kinds with a Graph error (read receipts are never failed)."""
        if times < 1:
            return
        title, default_details = ERRORS.get(code, ("Graph error", ""))
        failure = Failure(code, status, message or f"(#{code}) {title}", details or default_details or title, tuple(kinds), times)
        with self._lock:
            self.failures.append(failure)

    def next_wamid(self, to: str) -> str:
        """The wamid the next successful send (to `to`) will get: for a status that overtakes the send's answer."""
        with self._lock:
            return _wamid(to, f"{self._seq + 1:020X}")

    def messages_to(self, wa_id: str) -> list[dict[str, Any]]:
        """The bodies of the text and template messages sent to wa_id, in order."""
        with self._lock:
            return [s.body for s in self.sent if _digits(s.to) == _digits(wa_id) and s.kind in SEND_KINDS]

    def read_receipts(self) -> list[str]:
        """The message ids marked read, in order."""
        with self._lock:
            return [
                str(call.body["message_id"])
                for call in self.calls
                if call.method == "POST" and not call.failed and call.body is not None and call.body.get("status") == "read"
            ]

    # The API. Called with the lock held.

    def _authorized(self, token: str | None, media: StoredMedia | None = None) -> bool:
        return token is not None and (token in self.numbers.values() or (media is not None and token == media.token))

    def _phone_number(self, phone_number_id: str, token: str | None) -> Answer:
        """GET /vX/{phone-number-id}: what `channel connect whatsapp` checks the token with."""
        if token is None or token != self.numbers[phone_number_id]:
            return graph_error(401, 190)
        display = f"+1 555 {phone_number_id[-7:-4]} {phone_number_id[-4:]}"
        return Answer(200, {"display_phone_number": display, "verified_name": "Acme Support", "id": phone_number_id})

    def _media_object(self, media_id: str, token: str | None) -> Answer:
        self.media_fetches.append((media_id, token))
        stored = self.media.get(media_id)
        if not self._authorized(token, stored):
            return graph_error(401, 190)
        if stored is None:
            return graph_error(404, 100, f"Unsupported get request. Object with ID '{media_id}' does not exist")
        signature = secrets.token_urlsafe(12)
        self._links[signature] = media_id
        return Answer(
            200,
            {
                "messaging_product": "whatsapp",
                "url": f"{self.url}/media-download/{media_id}?sig={signature}",
                "mime_type": stored.mime_type,
                "sha256": stored.sha256,
                "file_size": len(stored.data),
                "id": media_id,
            },
        )

    def _download(self, media_id: str, signature: str, token: str | None) -> tuple[int, str, bytes]:
        self.downloads.append((media_id, token))
        stored = self.media.get(media_id)
        if not self._authorized(token, stored):
            return 401, "text/plain", b"unauthorized"
        if stored is None or self._links.get(signature) != media_id:
            return 404, "text/plain", b"not found"
        data = stored.data
        if media_id in self.corrupt_media:
            data = bytes(byte ^ 0xFF for byte in data) or b"\x00"
        return 200, stored.mime_type, data

    def _messages(self, phone_number_id: str, token: str | None, body: dict[str, Any] | None) -> Answer:
        if token is None:
            return graph_error(401, 190)
        if phone_number_id not in self.numbers:
            return graph_error(400, 100, f"Unsupported post request. Object with ID '{phone_number_id}' does not exist")
        if token != self.numbers[phone_number_id]:
            return graph_error(401, 190)
        if body is None:
            return graph_error(400, 100, "(#100) Invalid JSON")
        if body.get("messaging_product") != "whatsapp":
            return graph_error(400, 100, "(#100) The parameter messaging_product is required.")
        if body.get("status") == "read":
            if not isinstance(body.get("message_id"), str) or not body["message_id"]:
                return graph_error(400, 100, "(#100) The parameter message_id is required.")
            return Answer(200, {"success": True})
        kind, to = body.get("type", "text"), body.get("to")
        if not isinstance(to, str) or not _digits(to):
            return graph_error(400, 100, "(#100) The parameter to is required.")
        if not isinstance(kind, str) or not isinstance(body.get(kind), dict):
            return graph_error(400, 100, f"(#100) The parameter {kind} is required.")
        problem = self._invalid(kind, body[kind])
        if problem:
            return graph_error(400, 100, "(#100) Invalid parameter", problem)
        for failure in self.failures:
            if kind in failure.kinds:
                failure.times -= 1
                if failure.times <= 0:
                    self.failures.remove(failure)
                return graph_error(failure.status, failure.code, failure.message, failure.details)
        self._seq += 1
        wamid = _wamid(to, f"{self._seq:020X}")
        self.sent.append(Sent(wamid, phone_number_id, to, kind, body, time.time()))
        message: dict[str, Any] = {"id": wamid}
        if kind == "template":
            message["message_status"] = "accepted"
        return Answer(200, {"messaging_product": "whatsapp", "contacts": [{"input": to, "wa_id": _digits(to)}], "messages": [message]})

    @staticmethod
    def _invalid(kind: str, content: dict[str, Any]) -> str | None:
        if kind == "text":
            text = content.get("body")
            if not isinstance(text, str) or not text:
                return "The parameter text['body'] is required."
            if len(text) > TEXT_LIMIT:
                return f"Param text['body'] must be at most {TEXT_LIMIT} characters long."
        if kind == "interactive":
            return FakeGraph._invalid_interactive(content)
        if kind == "template":
            language = content.get("language")
            if not isinstance(content.get("name"), str) or not isinstance(language, dict) or not isinstance(language.get("code"), str):
                return "The parameters template['name'] and template['language']['code'] are required."
        return None

    @staticmethod
    def _invalid_interactive(content: dict[str, Any]) -> str | None:
        """Reply buttons as Meta takes them: body.text of 1-1,024 characters, 1-3 buttons of type reply, each with a
        unique id of at most 256 characters and a unique title of 1-20."""
        if content.get("type") != "button":
            return "interactive['type'] must be button (the fake implements reply buttons only)."
        body = content.get("body")
        if not isinstance(body, dict) or not isinstance(body.get("text"), str) or not 0 < len(body["text"]) <= 1024:
            return "The parameter interactive['body']['text'] is required and at most 1024 characters."
        buttons = (content.get("action") or {}).get("buttons") if isinstance(content.get("action"), dict) else None
        if not isinstance(buttons, list) or not 0 < len(buttons) <= 3:
            return "interactive['action']['buttons'] must hold 1 to 3 buttons."
        replies = [b.get("reply") if isinstance(b, dict) and b.get("type") == "reply" else None for b in buttons]
        if not all(isinstance(r, dict) for r in replies):
            return "Each button must be of type reply with a reply object."
        ids = [r.get("id") for r in replies if isinstance(r, dict)]
        titles = [r.get("title") for r in replies if isinstance(r, dict)]
        if not all(isinstance(i, str) and 0 < len(i) <= 256 for i in ids) or len(set(ids)) != len(ids):
            return "Button ids must be unique, 1 to 256 characters."
        if not all(isinstance(t, str) and 0 < len(t) <= 20 for t in titles) or len(set(titles)) != len(titles):
            return "Button titles must be unique, 1 to 20 characters."
        return None

    def _answer(self, method: str, path: str, token: str | None, body: dict[str, Any] | None) -> Answer:
        call = Call(method, path, token, body, time.time())
        self.calls.append(call)
        answer = self._route(method, path, token, body)
        call.status = answer.status
        error = answer.payload.get("error")
        call.error_code = error.get("code") if isinstance(error, dict) else None
        return answer

    def _route(self, method: str, path: str, token: str | None, body: dict[str, Any] | None) -> Answer:
        match = re.fullmatch(r"/v\d+\.\d+/([^/]+)(/messages)?/?", path)
        if match is None:
            return graph_error(404, 100, f"Unknown path components: {path}")
        if method == "GET" and match[2] is None and match[1] in self.numbers:
            return self._phone_number(match[1], token)
        if method == "GET" and match[2] is None:
            return self._media_object(match[1], token)
        if method == "POST" and match[2] is not None:
            return self._messages(match[1], token, body)
        return graph_error(400, 100, f"Unsupported {method.lower()} request.")

    def start(self, port: int = 0) -> FakeGraph:
        fake = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def _handle(self) -> None:
                raw = self.read_body()
                parts = urlsplit(self.path)
                scheme, _, value = (self.headers.get("Authorization") or "").strip().partition(" ")
                token = value.strip() if scheme.lower() == "bearer" and value.strip() else None
                download = re.fullmatch(r"/media-download/([^/]+)", parts.path)
                if download and self.command == "GET":
                    signature = (parse_qs(parts.query).get("sig") or [""])[0]
                    with fake._lock:
                        fake.calls.append(Call("GET", parts.path, token, None, time.time()))
                        status, content_type, data = fake._download(download[1], signature, token)
                        fake.calls[-1].status = status
                    self.send_bytes(status, content_type, data)
                    return
                body = self._json(raw)
                with fake._lock:
                    answer = fake._answer(self.command, parts.path, token, body)
                self.send_bytes(answer.status, "application/json; charset=utf-8", json.dumps(answer.payload).encode())

            @staticmethod
            def _json(raw: bytes) -> dict[str, Any] | None:
                try:
                    body = json.loads(raw) if raw.strip() else None
                except ValueError:
                    return None
                return body if isinstance(body, dict) else None

        self._server = serve(Handler, port, "fake-graph")
        return self

    def stop(self) -> None:
        shutdown(self._server)


# Webhook payloads, shaped like Meta's.


def sign(body: bytes, app_secret: str) -> str:
    """The `X-Hub-Signature-256` header value for body."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def sha256_base64(data: bytes) -> str:
    """The sha256 of data in base64, the encoding real webhooks have used for media."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def webhook(
    phone_number_id: str,
    *,
    messages: Sequence[dict[str, Any]] = (),
    statuses: Sequence[dict[str, Any]] = (),
    contacts: Sequence[dict[str, Any]] = (),
    display_phone_number: str = "15550001111",
    waba_id: str = "WABA1",
) -> dict[str, Any]:
    """A whole webhook body with one change; empty lists are left out, as Meta does."""
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": display_phone_number, "phone_number_id": phone_number_id},
    }
    for key, items in (("contacts", contacts), ("messages", messages), ("statuses", statuses)):
        if items:
            value[key] = list(items)
    return {"object": "whatsapp_business_account", "entry": [{"id": waba_id, "changes": [{"field": "messages", "value": value}]}]}


def contact(wa_id: str, name: str) -> dict[str, Any]:
    """An entry of `value.contacts`: who sent the messages."""
    return {"profile": {"name": name}, "wa_id": wa_id}


def _message(wa_id: str, kind: str, content: Any, wamid: str | None, timestamp: int | str | None) -> dict[str, Any]:
    return {
        "from": wa_id,
        "id": wamid or new_wamid(wa_id),
        "timestamp": str(int(time.time()) if timestamp is None else timestamp),
        "type": kind,
        kind: content,
    }


def _media(media_id: str, mime_type: str, sha256: str, **extra: Any) -> dict[str, Any]:
    return {**{k: v for k, v in extra.items() if v is not None}, "mime_type": mime_type, "sha256": sha256, "id": media_id}


def in_reply_to(message: dict[str, Any], message_id: str, *, sender: str = "15550001111") -> dict[str, Any]:
    """A copy of message that quotes message_id (a message sender wrote: by default, the business)."""
    return {**copy.deepcopy(message), "context": {"from": sender, "id": message_id}}


def text(wa_id: str, body: str, *, wamid: str | None = None, timestamp: int | str | None = None) -> dict[str, Any]:
    return _message(wa_id, "text", {"body": body}, wamid, timestamp)


def image(
    wa_id: str,
    media_id: str,
    *,
    mime_type: str = "image/jpeg",
    sha256: str,
    caption: str | None = None,
    wamid: str | None = None,
    timestamp: int | str | None = None,
) -> dict[str, Any]:
    return _message(wa_id, "image", _media(media_id, mime_type, sha256, caption=caption), wamid, timestamp)


def audio(
    wa_id: str,
    media_id: str,
    *,
    mime_type: str = "audio/ogg; codecs=opus",
    sha256: str,
    voice: bool = True,
    wamid: str | None = None,
    timestamp: int | str | None = None,
) -> dict[str, Any]:
    return _message(wa_id, "audio", {**_media(media_id, mime_type, sha256), "voice": voice}, wamid, timestamp)


def video(
    wa_id: str,
    media_id: str,
    *,
    mime_type: str = "video/mp4",
    sha256: str,
    caption: str | None = None,
    wamid: str | None = None,
    timestamp: int | str | None = None,
) -> dict[str, Any]:
    return _message(wa_id, "video", _media(media_id, mime_type, sha256, caption=caption), wamid, timestamp)


def document(
    wa_id: str,
    media_id: str,
    *,
    filename: str,
    mime_type: str = "application/pdf",
    sha256: str,
    caption: str | None = None,
    wamid: str | None = None,
    timestamp: int | str | None = None,
) -> dict[str, Any]:
    return _message(wa_id, "document", _media(media_id, mime_type, sha256, caption=caption, filename=filename), wamid, timestamp)


def sticker(
    wa_id: str, media_id: str, *, sha256: str, animated: bool = False, wamid: str | None = None, timestamp: int | str | None = None
) -> dict[str, Any]:
    return _message(wa_id, "sticker", {**_media(media_id, "image/webp", sha256), "animated": animated}, wamid, timestamp)


def location(
    wa_id: str,
    latitude: float,
    longitude: float,
    *,
    name: str | None = None,
    address: str | None = None,
    wamid: str | None = None,
    timestamp: int | str | None = None,
) -> dict[str, Any]:
    content: dict[str, Any] = {"latitude": latitude, "longitude": longitude}
    content.update({k: v for k, v in (("name", name), ("address", address)) if v is not None})
    return _message(wa_id, "location", content, wamid, timestamp)


def contact_card(formatted_name: str, *phones: str, on_whatsapp: bool = True) -> dict[str, Any]:
    """One shared contact, as in a contacts message: a name and phones (with their wa_id when on WhatsApp)."""
    first, _, last = formatted_name.partition(" ")
    name = {"formatted_name": formatted_name, "first_name": first, **({"last_name": last} if last else {})}
    numbers = [{"phone": phone, "type": "CELL", **({"wa_id": _digits(phone)} if on_whatsapp else {})} for phone in phones]
    return {"name": name, "phones": numbers}


def contacts_message(
    wa_id: str, contacts: list[dict[str, Any]], *, wamid: str | None = None, timestamp: int | str | None = None
) -> dict[str, Any]:
    return _message(wa_id, "contacts", copy.deepcopy(contacts), wamid, timestamp)


def button_reply(wa_id: str, reply_id: str, title: str, *, wamid: str | None = None, timestamp: int | str | None = None) -> dict[str, Any]:
    content = {"type": "button_reply", "button_reply": {"id": reply_id, "title": title}}
    return _message(wa_id, "interactive", content, wamid, timestamp)


def list_reply(
    wa_id: str,
    reply_id: str,
    title: str,
    description: str | None = None,
    *,
    wamid: str | None = None,
    timestamp: int | str | None = None,
) -> dict[str, Any]:
    reply = {"id": reply_id, "title": title, **({"description": description} if description is not None else {})}
    return _message(wa_id, "interactive", {"type": "list_reply", "list_reply": reply}, wamid, timestamp)


def button(wa_id: str, payload: str, text: str, *, wamid: str | None = None, timestamp: int | str | None = None) -> dict[str, Any]:
    """A tap on a template's quick-reply button (Meta adds the template message as `context`: see in_reply_to)."""
    return _message(wa_id, "button", {"payload": payload, "text": text}, wamid, timestamp)


def reaction(wa_id: str, message_id: str, emoji: str, *, wamid: str | None = None, timestamp: int | str | None = None) -> dict[str, Any]:
    """A reaction to message_id; emoji "" when the reaction is removed."""
    return _message(wa_id, "reaction", {"message_id": message_id, "emoji": emoji}, wamid, timestamp)


def unsupported(
    wa_id: str, *, unsupported_type: str = "poll_creation", wamid: str | None = None, timestamp: int | str | None = None
) -> dict[str, Any]:
    message = _message(wa_id, "unsupported", {"type": unsupported_type}, wamid, timestamp)
    title, details = ERRORS[131051]
    message["errors"] = [{"code": 131051, "title": title, "message": title, "error_data": {"details": details}}]
    return message


def system(
    wa_id: str, new_wa_id: str, *, name: str = "Someone", wamid: str | None = None, timestamp: int | str | None = None
) -> dict[str, Any]:
    """The note Meta sends when a person changes their number (such webhooks carry no `contacts`)."""
    content = {"body": f"User {name} changed from {wa_id} to {new_wa_id}", "wa_id": new_wa_id, "type": "user_changed_number"}
    return _message(wa_id, "system", content, wamid, timestamp)


def status_error(code: int, *, title: str | None = None, details: str | None = None) -> dict[str, Any]:
    """An entry of a failed status's `errors`; title and details default to Meta's words for the code."""
    known_title, known_details = ERRORS.get(code, ("Graph error", ""))
    return {
        "code": code,
        "title": title or known_title,
        "message": title or known_title,
        "error_data": {"details": details or known_details or known_title},
    }


def status(
    wamid: str,
    status: str,
    recipient_id: str,
    *,
    timestamp: int | str | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A delivery update for one of our messages; a failed one gets a 131026 error unless errors are given."""
    update: dict[str, Any] = {
        "id": wamid,
        "status": status,
        "timestamp": str(int(time.time()) if timestamp is None else timestamp),
        "recipient_id": recipient_id,
    }
    if status in ("sent", "delivered"):
        update["pricing"] = {"billable": False, "pricing_model": "PMP", "category": "service", "type": "free_customer_service"}
    if status == "failed" or errors:
        update["errors"] = copy.deepcopy(errors) if errors is not None else [status_error(131026)]
    return update
