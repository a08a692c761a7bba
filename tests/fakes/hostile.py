"""Hostile requests for the gateway, generated from a seed: unsigned, forged and validly signed bodies for
the Slack (events and interactivity), WhatsApp and Stripe webhooks, and sign-in forms. Shared by tests/test_hostile.py (the fuzz test)
and bench/hostile.py (20,000 of them with figures), so both send the same kinds of abuse.

Signatures are made exactly as Slack, Meta and Stripe make them, so "signed" requests pass verification
and exercise what lies behind it: type confusion, missing fields, huge ids, NUL bytes, lone surrogates,
NaN, deep nesting, invalid UTF-8 and JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

ROUTES = ("slack", "slack_interactive", "whatsapp", "stripe", "login")
PATHS = {"slack": "/slack/events", "slack_interactive": "/slack/interactive", "whatsapp": "/whatsapp/webhook",
         "stripe": "/stripe/webhook", "login": "/login"}  # fmt: skip
# Tables no unauthenticated request may write to (login_failures is the throttle's own count, by design).
TABLES = ("inbound_messages", "messages", "conversations", "stripe_events", "subscriptions", "channel_connections", "audit_events",
          "reply_feedback")  # fmt: skip


@dataclass(frozen=True)
class Keys:
    """What a signer knows: the installation's ids and secrets."""

    slack_team: str
    slack_secret: str
    wa_number: str
    wa_secret: str
    stripe_secret: str
    login_email: str


@dataclass(frozen=True)
class Hostile:
    route: str
    signed: bool
    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes


# -- values --

_ODD_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfffy",
    "é",
    "😀" * 50,
    "A" * 3000,
    "B" * 70_000,
    "../../etc/passwd",
    "MEDIA1/../../15550001111/messages",
    "<script>alert(1)</script>",
    "' OR 1=1 --",
    "%00",
    "\u202e",
    "null",
]
_ODD_NUMBERS: list[Any] = [0, -1, 2**63, -(2**63) - 1, 10**400, 1e308, 1.5, True, False, None]


def odd_scalar(rng: random.Random) -> Any:
    pick = rng.random()
    if pick < 0.55:
        return rng.choice(_ODD_STRINGS)
    if pick < 0.85:
        return rng.choice(_ODD_NUMBERS)
    return float("nan") if rng.random() < 0.5 else float("inf")


def odd_value(rng: random.Random, depth: int = 0) -> Any:
    """A scalar, or a small list or object of odd values."""
    pick = rng.random()
    if depth > 3 or pick < 0.6:
        return odd_scalar(rng)
    if pick < 0.8:
        return [odd_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["id", "type", "text", "x", "\x00", "\ud800"]): odd_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def mutate(rng: random.Random, value: Any, rounds: int = 3) -> Any:
    """The value with a few fields replaced, deleted or given the wrong type, anywhere in the tree."""
    for _ in range(rounds):
        value = _mutate_once(rng, value)
    return value


def _mutate_once(rng: random.Random, value: Any) -> Any:
    if isinstance(value, dict) and value and rng.random() < 0.75:
        key = rng.choice(list(value))
        copy = dict(value)
        action = rng.random()
        if action < 0.2:
            del copy[key]
        elif action < 0.5:
            copy[key] = odd_value(rng)
        else:
            copy[key] = _mutate_once(rng, value[key])
        return copy
    if isinstance(value, list) and value and rng.random() < 0.75:
        items = list(value)
        index = rng.randrange(len(items))
        items[index] = _mutate_once(rng, items[index]) if rng.random() < 0.6 else odd_value(rng)
        return items
    return odd_value(rng)


def encode(rng: random.Random, value: Any) -> bytes:
    """JSON, sometimes broken: NaN allowed, invalid UTF-8, truncated, deeply nested, or not JSON at all."""
    pick = rng.random()
    if pick < 0.04:
        return b"[" * rng.choice([100, 1000, 100_000])
    if pick < 0.06:
        return b'{"a":' * 2000 + b"1" + b"}" * 2000
    if pick < 0.09:
        return b"\xff\xfe\x00garbage"
    if pick < 0.12:
        return b"not json at all"
    text = json.dumps(value, allow_nan=True, ensure_ascii=rng.random() < 0.5, default=str, separators=(",", ":"))
    raw = text.encode("utf-8", "surrogatepass")
    if pick < 0.16:
        return raw[: rng.randint(0, len(raw))]
    return raw


# -- templates of real deliveries --


def slack_event(keys: Keys, rng: random.Random) -> dict[str, Any]:
    ts = f"{time.time():.6f}"
    event = {"type": rng.choice(["message", "app_mention", "app_uninstalled", "tokens_revoked", "reaction_added"]),
             "user": "U0000000001", "text": "hello", "ts": ts, "channel": "C0000000001", "channel_type": "channel",
             "event_ts": ts, "files": [{"id": "F1", "name": "a.png", "mimetype": "image/png", "size": 10,
                                        "url_private": "https://files.slack.com/a.png"}],
             "tokens": {"bot": ["U0000000BOT"]}}  # fmt: skip
    return {"token": "t", "team_id": keys.slack_team, "api_app_id": "A1", "event": event, "type": "event_callback",
            "event_id": f"Ev{rng.randrange(10**10):010d}", "event_time": int(time.time())}  # fmt: skip


def slack_interaction(keys: Keys, rng: random.Random) -> dict[str, Any]:
    """A click on the feedback buttons under an answer (a block_actions payload)."""
    action = {"type": "feedback_buttons", "action_id": "konstruct_feedback", "value": rng.choice(["positive", "negative"]),
              "block_id": f"konstruct_feedback:{uuid.UUID(int=rng.getrandbits(128))}", "action_ts": f"{time.time():.6f}",
              "text": {"type": "plain_text", "text": "👍"}}  # fmt: skip
    return {"type": rng.choice(["block_actions", "block_actions", "view_submission"]), "team": {"id": keys.slack_team, "domain": "x"},
            "user": {"id": "U0000000001", "team_id": keys.slack_team}, "api_app_id": "A1", "token": "t",
            "container": {"type": "message", "message_ts": "1.2", "channel_id": "D0000000001"}, "channel": {"id": "D0000000001"},
            "actions": [action]}  # fmt: skip


def whatsapp_delivery(keys: Keys, rng: random.Random) -> dict[str, Any]:
    wa_id = "15550001111"
    message: dict[str, Any] = {"from": wa_id, "id": f"wamid.H{rng.randrange(10**12)}", "timestamp": str(int(time.time()))}
    kind = rng.choice(["text", "image", "location", "interactive", "contacts", "reaction", "document"])
    message["type"] = kind
    message[kind] = {
        "text": {"body": rng.choice(["hi", "a\x00b", "x\ud800y", "ok"])},
        "image": {"id": rng.choice(["1234567", "MEDIA1/../../15550001111/messages"]), "mime_type": "image/png", "sha256": "ab"},
        "document": {"id": "7654321", "mime_type": "application/pdf", "filename": "a\x00.pdf"},
        "location": {"latitude": rng.choice([1.5, float("nan"), "NaN", 1e400]), "longitude": 2.0, "name": "x"},
        "interactive": {"type": "button_reply", "button_reply": {"id": "b1", "title": "Yes"}},
        "contacts": [{"name": {"formatted_name": "N"}, "phones": [{"phone": "+1 555", "wa_id": "1555"}]}],
        "reaction": {"message_id": "wamid.X", "emoji": "👍"},
    }[kind]
    value = {"messaging_product": "whatsapp", "metadata": {"display_phone_number": "15550000000", "phone_number_id": keys.wa_number},
             "contacts": [{"profile": {"name": "Pat"}, "wa_id": wa_id}], "messages": [message],
             "statuses": [{"id": "wamid.OUT", "status": rng.choice(["sent", "read", "failed", "x"]), "timestamp": "1",
                           "recipient_id": wa_id, "errors": [{"code": 131026, "title": "t"}]}]}  # fmt: skip
    return {"object": "whatsapp_business_account", "entry": [{"id": "WABA", "changes": [{"field": "messages", "value": value}]}]}


def stripe_event(keys: Keys, rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["customer.subscription.updated", "checkout.session.completed", "invoice.paid", "invoice.payment_failed",
                       "customer.subscription.deleted", "charge.refunded"])  # fmt: skip
    obj: dict[str, Any] = {"id": f"sub_{rng.randrange(10**8)}", "object": "subscription", "customer": "cus_hostile",
                           "status": "active", "items": {"data": [{"price": {"id": "price_1"}, "current_period_end": 2_000_000_000}]},
                           "metadata": {"tenant_id": "00000000-0000-0000-0000-000000000000"}, "mode": "subscription",
                           "subscription": "sub_1", "payment_status": "paid",
                           "parent": {"subscription_details": {"subscription": "sub_2"}}}  # fmt: skip
    return {"id": f"evt_{rng.randrange(10**12)}", "object": "event", "type": kind, "created": int(time.time()), "data": {"object": obj}}


# -- signing --


def slack_headers(body: bytes, secret: str) -> list[tuple[bytes, bytes]]:
    ts = str(int(time.time()))
    signature = "v0=" + hmac.new(secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
    return [(b"x-slack-request-timestamp", ts.encode()), (b"x-slack-signature", signature.encode())]


def whatsapp_headers(body: bytes, secret: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-hub-signature-256", ("sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()).encode())]


def stripe_headers(body: bytes, secret: str) -> list[tuple[bytes, bytes]]:
    ts = int(time.time())
    signature = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return [(b"stripe-signature", f"t={ts},v1={signature}".encode())]


_BAD_HEADER_VALUES = [b"abc", b"\xc3\xa9", b"", b"v0=" + b"g" * 64, b"sha256=" + b"\xc3\xa9" * 32, b"t=1,v1=\xc3\xa9", b"9" * 400]


def _forged(rng: random.Random, route: str, body: bytes, keys: Keys) -> list[tuple[bytes, bytes]]:
    """Headers that must not verify: missing, malformed, non-ASCII, stale, or signed with the wrong secret."""
    pick = rng.random()
    if route in ("slack", "slack_interactive"):
        good = slack_headers(body, "wrong-secret" if pick < 0.3 else keys.slack_secret)
        if pick < 0.3:
            return good
        if pick < 0.5:
            return [(b"x-slack-request-timestamp", rng.choice(_BAD_HEADER_VALUES)), good[1]]
        if pick < 0.7:
            return [good[0], (b"x-slack-signature", rng.choice(_BAD_HEADER_VALUES))]
        if pick < 0.85:  # a valid signature from an old timestamp (replay)
            ts = str(int(time.time()) - 3600)
            sig = "v0=" + hmac.new(keys.slack_secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
            return [(b"x-slack-request-timestamp", ts.encode()), (b"x-slack-signature", sig.encode())]
        return []
    if route == "whatsapp":
        if pick < 0.4:
            return whatsapp_headers(body, "wrong-secret")
        if pick < 0.8:
            return [(b"x-hub-signature-256", rng.choice(_BAD_HEADER_VALUES))]
        return []
    if pick < 0.4:
        return stripe_headers(body, "whsec_wrong")
    if pick < 0.8:
        return [(b"stripe-signature", rng.choice([*_BAD_HEADER_VALUES, f"t={int(time.time())},v1=\xe9".encode()]))]
    return []


def _login(rng: random.Random, keys: Keys, csrf: str) -> Hostile:
    email = rng.choice([keys.login_email, "nobody@example.com", "a\x00@b.c", "é" * 500, "", "x" * 5000])
    password = rng.choice(["wrong password!", "", "\x00", "p" * 5000, "\ud800"])
    fields = {"csrf": csrf if rng.random() < 0.8 else "forged", "email": email, "password": password}
    if rng.random() < 0.3:
        fields[rng.choice(["email", "x", "\x00"])] = str(odd_scalar(rng))
    body = "&".join(f"{quote(k, errors='surrogatepass')}={quote(v, errors='surrogatepass')}" for k, v in fields.items()).encode()
    if rng.random() < 0.05:
        body = b"\xff\xfe" + body
    content_type = b"application/x-www-form-urlencoded" if rng.random() < 0.9 else b"text/plain"
    headers = [(b"content-type", content_type), (b"cookie", f"konstruct_login_csrf={csrf}".encode())]
    if rng.random() < 0.3:
        headers.append((b"x-forwarded-for", f"10.0.{rng.randrange(256)}.{rng.randrange(256)}".encode()))
    return Hostile("login", False, "POST", "/login", headers, body)


def generate(rng: random.Random, keys: Keys, route: str, *, signed: bool, csrf: str = "csrf-token-for-fuzzing") -> Hostile:
    """One hostile request for a route; `signed` ones carry a valid signature over whatever body they hold."""
    if route == "login":
        return _login(rng, keys, csrf)
    templates = {"slack": slack_event, "slack_interactive": slack_interaction, "whatsapp": whatsapp_delivery, "stripe": stripe_event}
    template = templates[route](keys, rng)
    value = mutate(rng, template, rounds=rng.randint(0, 4)) if rng.random() < 0.9 else odd_value(rng)
    body = encode(rng, value)
    content_type = b"application/json"
    if (route == "slack" and rng.random() < 0.1) or (route == "slack_interactive" and rng.random() < 0.9):  # form-encoded payload=…
        content_type = b"application/x-www-form-urlencoded"
        body = b"payload=" + quote(body.decode("utf-8", "replace"), errors="surrogatepass").encode()
    if signed:
        secret = {"slack": keys.slack_secret, "slack_interactive": keys.slack_secret, "whatsapp": keys.wa_secret,
                  "stripe": keys.stripe_secret}[route]  # fmt: skip
        sign = {"slack": slack_headers, "slack_interactive": slack_headers, "whatsapp": whatsapp_headers, "stripe": stripe_headers}[route]
        headers = sign(body, secret)
    else:
        headers = _forged(rng, route, body, keys)
    return Hostile(route, signed, "POST", PATHS[route], [(b"content-type", content_type), *headers], body)


def batch(seed: int, keys: Keys, per_route: dict[str, int], *, signed: bool) -> list[Hostile]:
    """`per_route[route]` requests for each route, shuffled together, the same for the same seed."""
    rng = random.Random(seed)
    requests = [generate(rng, keys, route, signed=signed and route != "login") for route, n in per_route.items() for _ in range(n)]
    rng.shuffle(requests)
    return requests


# -- sending --


@dataclass
class Tally:
    """Statuses by (route, signed, status), transport errors, and latencies of interleaved /healthz probes."""

    statuses: Counter[tuple[str, bool, int]] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    health_ms: list[float] = field(default_factory=list)
    health_failures: int = 0

    @property
    def server_errors(self) -> int:
        return sum(n for (_, _, status), n in self.statuses.items() if status >= 500)

    def by_route(self) -> dict[str, dict[int, int]]:
        table: dict[str, dict[int, int]] = {}
        for (route, signed, status), n in sorted(self.statuses.items()):
            row = table.setdefault(f"{route} {'signed' if signed else 'unsigned'}", {})
            row[status] = row.get(status, 0) + n
        return table


async def send(base_url: str, requests: Iterable[Hostile], *, concurrency: int = 16, tally: Tally | None = None,
               health_every: float = 0.05) -> Tally:  # fmt: skip
    """Send every request (`concurrency` at a time) while probing /healthz; statuses into the tally."""
    tally = tally or Tally()
    queue: asyncio.Queue[Hostile] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
        done = asyncio.Event()

        async def one_worker() -> None:
            while not queue.empty():
                request = queue.get_nowait()
                try:
                    response = await client.request(request.method, request.path, headers=request.headers, content=request.body)
                    tally.statuses[(request.route, request.signed, response.status_code)] += 1
                except httpx.HTTPError as exc:
                    tally.errors[type(exc).__name__] += 1

        async def probe() -> None:
            async with httpx.AsyncClient(base_url=base_url, timeout=10) as health:
                while not done.is_set():
                    started = time.perf_counter()
                    try:
                        ok = (await health.get("/healthz")).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    tally.health_ms.append((time.perf_counter() - started) * 1000)
                    tally.health_failures += 0 if ok else 1
                    await asyncio.sleep(health_every)

        prober = asyncio.create_task(probe())
        await asyncio.gather(*(one_worker() for _ in range(concurrency)))
        done.set()
        await prober
    return tally


def count_rows(dsn: str) -> dict[str, int]:
    """Rows in each table unauthenticated input must not touch (read as the superuser: every tenant's)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return {table: int(conn.execute(f"select count(*) from {table}").fetchone()[0]) for table in TABLES}  # type: ignore[index]
