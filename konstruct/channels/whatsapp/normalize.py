"""WhatsApp Cloud API webhooks, normalised: what people sent, and what became of what we sent.

Meta adds message types and fields over time and a junk body must not take the gateway down, so
nothing here raises: an unknown or malformed message becomes `unsupported`, a message without an
id or a sender is skipped, and so is a status that is not sent, delivered, read or failed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OBJECT = "whatsapp_business_account"
MEDIA_KINDS = ("image", "audio", "video", "document", "sticker")
STATUSES = ("sent", "delivered", "read", "failed")
UNSUPPORTED = "[a message type Konstruct cannot read]"
SILENT_KINDS = ("reaction", "system")
MAX_ID = 256


@dataclass(frozen=True)
class Media:
    id: str
    kind: str  # image | audio | video | document | sticker
    mime_type: str
    sha256: str | None  # as Meta sent it: webhooks have carried base64 as well as hex
    caption: str | None
    filename: str | None


@dataclass(frozen=True)
class Normalized:
    wamid: str
    wa_id: str  # the sender ("from")
    name: str | None  # the sender's profile name from value.contacts, if given
    timestamp: int  # unix seconds (0 if missing or bad)
    kind: str  # Meta's message type, or "unsupported" for anything unknown or malformed
    text: str  # what the model reads: the person's words, or a short description in square brackets
    media: Media | None
    reply_to: str | None  # context.id; for a reaction, the message reacted to
    answer: bool  # False for reactions and system messages: recorded in history, not answered
    button_id: str | None = None  # the id of the reply button tapped (an interactive button_reply), e.g. an approval's


@dataclass(frozen=True)
class Status:
    wamid: str
    status: str  # sent | delivered | read | failed
    recipient: str
    timestamp: int
    error: str | None  # "131026: Message undeliverable (details)" when failed


def phone_number_id(value: dict[str, Any]) -> str | None:
    """The business number the change is for (`metadata.phone_number_id`)."""
    return _ident(_dict(_dict(value).get("metadata")).get("phone_number_id"))


def changes(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Every `entry[].changes[].value` whose field is "messages"; other objects and junk give nothing."""
    body = _dict(payload)
    if body.get("object", OBJECT) != OBJECT:
        return []
    values: list[dict[str, Any]] = []
    for entry in _list(body.get("entry")):
        for change in _list(_dict(entry).get("changes")):
            change = _dict(change)
            if change.get("field") == "messages" and isinstance(change.get("value"), dict):
                values.append(change["value"])
    return values


def messages(value: dict[str, Any]) -> list[Normalized]:
    """The messages in one change value, in order."""
    value = _dict(value)
    names = _names(value)
    found = (_message(raw, names) for raw in _list(value.get("messages")))
    return [message for message in found if message is not None]


def statuses(value: dict[str, Any]) -> list[Status]:
    """The delivery updates for our own messages in one change value, in order."""
    found: list[Status] = []
    for raw in _list(_dict(value).get("statuses")):
        item = _dict(raw)
        wamid, status = _ident(item.get("id")), item.get("status")
        if wamid is None or not isinstance(status, str) or status not in STATUSES:
            continue
        error = (_errors(item.get("errors")) or "unknown error") if status == "failed" else None
        found.append(Status(wamid, status, _ident(item.get("recipient_id")) or "", _timestamp(item.get("timestamp")), error))
    return found


def _message(raw: Any, names: dict[str, str]) -> Normalized | None:
    message = _dict(raw)
    wamid, wa_id = _ident(message.get("id")), _ident(message.get("from"))
    if wamid is None or wa_id is None or len(wamid) > MAX_ID or len(wa_id) > MAX_ID:
        return None  # not Meta's: ids are a few dozen characters (and kilobytes would overflow the inbox index)
    kind, text, media = _content(message)
    reply_to = _ident(_dict(message.get("context")).get("id"))
    if reply_to is None and kind == "reaction":
        reply_to = _ident(_dict(message.get("reaction")).get("message_id"))
    return Normalized(
        wamid=wamid,
        wa_id=wa_id,
        name=names.get(wa_id),
        timestamp=_timestamp(message.get("timestamp")),
        kind=kind,
        text=text,
        media=media,
        reply_to=reply_to,
        answer=kind not in SILENT_KINDS,
        button_id=_button_id(message) if kind == "interactive" else None,
    )


def _button_id(message: dict[str, Any]) -> str | None:
    body = _dict(message.get("interactive"))
    found = _ident(_dict(body.get("button_reply")).get("id")) if body.get("type") == "button_reply" else None
    return found if found is not None and len(found) <= MAX_ID else None


def _content(message: dict[str, Any]) -> tuple[str, str, Media | None]:
    """(kind, text, media); anything unknown or malformed is `unsupported`."""
    kind = message.get("type")
    if not isinstance(kind, str):
        return "unsupported", UNSUPPORTED, None
    body = message.get(kind)
    if kind in MEDIA_KINDS:
        media = _media(kind, _dict(body))
        if media is not None:
            return kind, _media_text(media, _dict(body)), media
    else:
        describe = _DESCRIBE.get(kind)
        text = describe(body) if describe is not None else None
        if text is not None:
            return kind, text, None
    return "unsupported", UNSUPPORTED, None


def media_id_ok(media_id: str) -> bool:
    """Meta's media ids are digits: anything else must never be put into a Graph API path."""
    return media_id.isascii() and media_id.isdigit() and len(media_id) <= MAX_ID


def _media(kind: str, body: dict[str, Any]) -> Media | None:
    media_id = _ident(body.get("id"))
    if media_id is None or not media_id_ok(media_id):
        return None
    default_mime = "image/webp" if kind == "sticker" else "application/octet-stream"
    return Media(
        id=media_id,
        kind=kind,
        mime_type=_inline(body.get("mime_type")) or default_mime,
        sha256=_inline(body.get("sha256")),
        caption=_str(body.get("caption")) if kind in ("image", "video", "document") else None,
        filename=_inline(body.get("filename")) if kind == "document" else None,
    )


def _media_text(media: Media, body: dict[str, Any]) -> str:
    if media.caption:
        return media.caption
    if media.kind == "audio":
        return "[voice message]" if body.get("voice") is True else "[audio]"
    if media.kind == "document":
        return f"[document: {media.filename}]" if media.filename else "[document]"
    return f"[{media.kind}]"


def _text(body: Any) -> str | None:
    return _str(_dict(body).get("body"))


def _location(body: Any) -> str | None:
    body = _dict(body)
    place = ", ".join(part for part in (_inline(body.get("name")), _inline(body.get("address"))) if part)
    latitude, longitude = _coordinate(body.get("latitude"), 90), _coordinate(body.get("longitude"), 180)
    if latitude is not None and longitude is not None:
        point = f"{_degrees(latitude)}, {_degrees(longitude)}"
        place = f"{place} ({point})" if place else point
    return f"[location: {place}]" if place else None


def _contacts(body: Any) -> str | None:
    notes: list[str] = []
    for raw in _list(body):
        card = _dict(raw)
        name = _dict(card.get("name"))
        full = _inline(name.get("formatted_name")) or " ".join(
            part for part in (_inline(name.get("first_name")), _inline(name.get("last_name"))) if part
        )
        phones = [_phone(_dict(phone)) for phone in _list(card.get("phones"))]
        described = " ".join(part for part in (full, ", ".join(phone for phone in phones if phone)) if part)
        if described:
            notes.append(f"[shared contact: {described}]")
    return " ".join(notes) or None


def _phone(phone: dict[str, Any]) -> str | None:
    if number := _inline(phone.get("phone")):
        return number
    wa_id = _ident(phone.get("wa_id"))
    return f"+{wa_id}" if wa_id else None


def _interactive(body: Any) -> str | None:
    body = _dict(body)
    kind = body.get("type")
    if kind not in ("button_reply", "list_reply"):
        return None
    reply = _dict(body.get(kind))
    title = _str(reply.get("title"))
    if title is None:
        return None
    description = _str(reply.get("description")) if kind == "list_reply" else None
    return f"{title} — {description}" if description else title


def _button(body: Any) -> str | None:
    body = _dict(body)
    return _str(body.get("text")) or _str(body.get("payload"))


def _reaction(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    emoji = _inline(body.get("emoji"))
    return f"[reacted {emoji} to a message]" if emoji else "[removed a reaction]"


def _unsupported(body: Any) -> str:
    return UNSUPPORTED


def _system(body: Any) -> str:
    body = _dict(body)
    said = _inline(body.get("body")) or _inline(body.get("type"))
    return f"[system: {said}]" if said else "[system]"


_DESCRIBE: dict[str, Callable[[Any], str | None]] = {
    "text": _text,
    "location": _location,
    "contacts": _contacts,
    "interactive": _interactive,
    "button": _button,
    "reaction": _reaction,
    "unsupported": _unsupported,
    "system": _system,
}


def _errors(value: Any) -> str | None:
    """Meta's `errors` list as "code: title (details)", joined with "; "."""
    described: list[str] = []
    for raw in _list(value):
        error = _dict(raw)
        title = _inline(error.get("title")) or _inline(error.get("message"))
        details = _inline(_dict(error.get("error_data")).get("details"))
        text = ": ".join(part for part in (_ident(error.get("code")), title) if part)
        if details and details != title:
            text = f"{text} ({details})" if text else details
        if text:
            described.append(text)
    return "; ".join(described) or None


def _names(value: dict[str, Any]) -> dict[str, str]:
    names: dict[str, str] = {}
    for raw in _list(value.get("contacts")):
        contact = _dict(raw)
        wa_id, name = _ident(contact.get("wa_id")), _inline(_dict(contact.get("profile")).get("name"))
        if wa_id and name:
            names.setdefault(wa_id, name)
    return names


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str | None:
    """A string with something in it, as it is."""
    return value if isinstance(value, str) and value.strip() else None


def _inline(value: Any) -> str | None:
    """A string on one line with single spaces, for inside a bracketed note."""
    return (" ".join(value.split()) or None) if isinstance(value, str) else None


def _ident(value: Any) -> str | None:
    """An id or a number Meta sends as a string; a bare integer is taken too."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return str(value)
        except ValueError:  # more digits than str() will write
            return None
    return _inline(value)


def _timestamp(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float):
        return max(int(value), 0) if math.isfinite(value) else 0
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        try:
            return int(value)
        except ValueError:  # more digits than int() accepts from a string
            return 0
    return 0


def _coordinate(value: Any, limit: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and -limit <= number <= limit else None


def _degrees(number: float) -> str:
    return f"{number:.6f}".rstrip("0").rstrip(".")
