"""A loopback fake of the Stripe API (customers, Checkout, the billing portal), and builders of the webhooks Stripe sends.

`FakeStripe` is a real HTTP server on 127.0.0.1; point stripe-python at it with
`stripe.StripeClient(fake.api_key, base_addresses={"api": fake.url})`. Like Stripe, it takes
form-encoded bodies with bracketed keys (`metadata[tenant_id]=...`, `line_items[0][price]=...`),
answers JSON objects with `id`, `object`, `created` and `livemode: false`, wants
`Authorization: Bearer <api_key>` (401 otherwise), replays a repeated `Idempotency-Key`, and shapes
every error as `{"error": {"type", "message", "code"?, "param"?}}`. Checkout and portal sessions get
a `url` on the fake itself, which serves a small HTML page.

The builders below (`event`, `subscription`, `checkout_completed`, `invoice`, `sign`, `post_event`)
make the signed webhook deliveries Stripe POSTs to our endpoint, shaped like Stripe's own.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import html
import json
import re
import secrets
import string
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import httpx
import stripe

from tests.fakes.server import QuietHandler, serve, shutdown

API_VERSION: str = stripe.api_version  # what an endpoint made with the installed stripe-python would be pinned to
DAY = 86400
_ALNUM = string.ascii_letters + string.digits
_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_KEY_PREFIX = re.compile(r"^((?:sk|rk|pk)_(?:test|live)_)")


def new_id(prefix: str, length: int = 24) -> str:
    """A Stripe-looking id: the prefix and random letters and digits."""
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(length))


# ---------------------------------------------------------------------------------------------- form decoding


def parse_form(body: bytes | str) -> dict[str, Any]:
    """Decode a form body with Stripe's bracket syntax into nested dicts and lists (values stay strings).

    `a[b]=1` is `{"a": {"b": "1"}}`; keys `0..n-1` make a list (`line_items[0][price]`), except under `metadata`;
    `a[]=x` appends. Raises ValueError on a malformed key or a key used both as a value and as a container.
    """
    text = body.decode() if isinstance(body, bytes) else body
    root: dict[str, Any] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"malformed key {key!r}")
        parts = [match[1], *re.findall(r"\[([^\[\]]*)\]", match[2])]
        node = root
        for depth, part in enumerate(parts):
            if part == "":
                part = str(len(node))
            if depth == len(parts) - 1:
                if isinstance(node.get(part), dict):
                    raise ValueError(f"{key!r} is both a value and a container")
                node[part] = value
                continue
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{key!r} is both a value and a container")
            node = child
    return {key: _listify(key, value) for key, value in root.items()}


def _listify(key: str, value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    value = {k: _listify(k, v) for k, v in value.items()}
    if key != "metadata" and value and sorted(value) == sorted(str(n) for n in range(len(value))):
        return [value[str(n)] for n in range(len(value))]
    return value


# ---------------------------------------------------------------------------------------------- errors


class StripeError(Exception):
    """An error answer in Stripe's shape."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None, param: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.payload: dict[str, Any] = {"error": {"type": type, "message": message}}
        if code:
            self.payload["error"]["code"] = code
        if param:
            self.payload["error"]["param"] = param


def missing(param: str) -> StripeError:
    return StripeError(400, f"Missing required param: {param}.", code="parameter_missing", param=param)


def no_such(kind: str, value: Any, *, status: int = 400, param: str | None = None) -> StripeError:
    return StripeError(status, f"No such {kind}: '{value}'", code="resource_missing", param=param)


def mask_key(key: str) -> str:
    """An API key as Stripe shows it in errors: the prefix, stars, and the last four only when the key is long."""
    prefix_match = _KEY_PREFIX.match(key)
    prefix = prefix_match[1] if prefix_match else ""
    rest = key[len(prefix) :]
    return prefix + "*" * max(len(rest) - 4, 4) + (rest[-4:] if len(rest) >= 16 else "")


def _metadata(value: Any, param: str = "metadata") -> dict[str, str]:
    if value is None or value == "":
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise StripeError(400, "Invalid metadata: a hash of string keys to string values", param=param)
    return {k: v for k, v in value.items() if v != ""}


# ---------------------------------------------------------------------------------------------- the server


@dataclass
class Recorded:
    method: str
    path: str  # without the query string
    headers: dict[str, str]  # names lowercased
    form: dict[str, Any]  # the decoded body
    query: dict[str, Any] = field(default_factory=dict)  # the decoded query string
    status: int = 0  # what the fake answered


@dataclass
class FakeStripe:
    api_key: str = "sk_test_fake"
    prices: set[str] = field(default_factory=lambda: {"price_starter", "price_pro"})
    requests: list[Recorded] = field(default_factory=list)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkout_sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    portal_sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    _idempotent: dict[str, tuple[tuple[str, str, dict[str, Any]], int, dict[str, Any]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The origin, for `base_addresses={"api": ...}`."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def reset(self) -> None:
        """Forget every request and object (the key and prices stay)."""
        with self._lock:
            self.requests.clear()
            self.customers.clear()
            self.checkout_sessions.clear()
            self.portal_sessions.clear()
            self._idempotent.clear()

    def add_customer(self, email: str | None = None, *, name: str | None = None, metadata: dict[str, str] | None = None) -> dict[str, Any]:
        """Make a customer directly, as if created earlier through the API."""
        with self._lock:
            return self._create_customer({"email": email, "name": name, "metadata": metadata or {}})

    # --- routing (called under the lock)

    def handle(self, method: str, path: str, query: dict[str, Any], form: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Answer one authenticated API call: (HTTP status, JSON body)."""
        try:
            return 200, self._route(method, path, query, form)
        except StripeError as error:
            return error.status, error.payload

    def _route(self, method: str, path: str, query: dict[str, Any], form: dict[str, Any]) -> dict[str, Any]:
        parts = path.strip("/").split("/")
        if method == "POST" and parts == ["v1", "customers"]:
            return self._create_customer(form)
        if method == "GET" and parts == ["v1", "customers"]:
            return self._list_customers(query)
        if parts[:2] == ["v1", "customers"] and len(parts) == 3:
            customer = self.customers.get(parts[2])
            if customer is None:
                raise no_such("customer", parts[2], status=404, param="id")
            if method == "GET":
                return customer
            if method == "POST":
                return self._update_customer(customer, form)
        if method == "POST" and parts == ["v1", "checkout", "sessions"]:
            return self._create_checkout(form)
        if method == "GET" and parts[:3] == ["v1", "checkout", "sessions"] and len(parts) == 4:
            if parts[3] not in self.checkout_sessions:
                raise no_such("checkout.session", parts[3], status=404, param="session")
            return self.checkout_sessions[parts[3]]
        if method == "POST" and parts == ["v1", "billing_portal", "sessions"]:
            return self._create_portal(form)
        raise StripeError(
            404,
            f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs or we can help at https://support.stripe.com/.",
        )

    def _customer_id(self, form: dict[str, Any], *, required: bool) -> str | None:
        customer = form.get("customer")
        if customer in (None, ""):
            if required:
                raise missing("customer")
            return None
        if customer not in self.customers:
            raise no_such("customer", customer, param="customer")
        return str(customer)

    def _create_customer(self, form: dict[str, Any]) -> dict[str, Any]:
        customer: dict[str, Any] = {
            "id": new_id("cus_", 14),
            "object": "customer",
            "address": None,
            "balance": 0,
            "created": int(time.time()),
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": form.get("description"),
            "discount": None,
            "email": form.get("email"),
            "invoice_prefix": new_id("", 8).upper(),
            "invoice_settings": {"custom_fields": None, "default_payment_method": None, "footer": None, "rendering_options": None},
            "livemode": False,
            "metadata": _metadata(form.get("metadata")),
            "name": form.get("name"),
            "phone": form.get("phone"),
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }
        self.customers[customer["id"]] = customer
        return customer

    def _update_customer(self, customer: dict[str, Any], form: dict[str, Any]) -> dict[str, Any]:
        for name in ("email", "name", "description", "phone"):
            if name in form:
                customer[name] = form[name] or None
        if "metadata" in form:
            if form["metadata"] == "":
                customer["metadata"] = {}
            elif isinstance(form["metadata"], dict):
                merged = {**customer["metadata"], **form["metadata"]}
                customer["metadata"] = _metadata(merged)
            else:
                _metadata(form["metadata"])
        return customer

    def _list_customers(self, query: dict[str, Any]) -> dict[str, Any]:
        found = [c for c in self.customers.values() if "email" not in query or c["email"] == query["email"]]
        found.sort(key=lambda c: c["created"], reverse=True)
        limit = int(query.get("limit") or 10)
        return {"object": "list", "data": found[:limit], "has_more": len(found) > limit, "url": "/v1/customers"}

    def _create_checkout(self, form: dict[str, Any]) -> dict[str, Any]:
        mode = form.get("mode")
        if not mode:
            raise missing("mode")
        if mode not in ("payment", "setup", "subscription"):
            raise StripeError(400, f"Invalid mode: must be one of payment, setup, or subscription (got {mode!r})", param="mode")
        items = form.get("line_items", [])
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise StripeError(400, "Invalid array", param="line_items")
        if mode in ("payment", "subscription") and not items:
            raise StripeError(400, f"`line_items` is required in `{mode}` mode.", code="parameter_missing", param="line_items")
        for n, item in enumerate(items):
            if "price_data" in item:
                continue
            if "price" not in item:
                raise missing(f"line_items[{n}][price]")
            if item["price"] not in self.prices:
                raise no_such("price", item["price"], param=f"line_items[{n}][price]")
        customer = self._customer_id(form, required=False)
        if customer and form.get("customer_email"):
            raise StripeError(400, "You may only specify one of these parameters: customer, customer_email.", param="customer_email")
        created = int(time.time())
        session_id = new_id("cs_test_", 58)
        session = {
            "id": session_id,
            "object": "checkout.session",
            "allow_promotion_codes": form.get("allow_promotion_codes") == "true" or None,
            "amount_subtotal": None,
            "amount_total": None,
            "cancel_url": form.get("cancel_url"),
            "client_reference_id": form.get("client_reference_id"),
            "created": created,
            "currency": None,
            "customer": customer,
            "customer_email": form.get("customer_email"),
            "expires_at": created + DAY,
            "livemode": False,
            "locale": form.get("locale"),
            "metadata": _metadata(form.get("metadata")),
            "mode": mode,
            "payment_intent": None,
            "payment_status": "no_payment_required" if mode == "setup" else "unpaid",
            "status": "open",
            "subscription": None,
            "success_url": form.get("success_url"),
            "ui_mode": "hosted",
            "url": f"{self.url}/checkout/{session_id}",
        }
        self.checkout_sessions[session_id] = session
        return session

    def _create_portal(self, form: dict[str, Any]) -> dict[str, Any]:
        customer = self._customer_id(form, required=True)
        session_id = new_id("bps_", 24)
        session = {
            "id": session_id,
            "object": "billing_portal.session",
            "configuration": form.get("configuration") or "bpc_fake",
            "created": int(time.time()),
            "customer": customer,
            "flow": None,
            "livemode": False,
            "locale": form.get("locale"),
            "on_behalf_of": None,
            "return_url": form.get("return_url"),
            "url": f"{self.url}/portal/{session_id}",
        }
        self.portal_sessions[session_id] = session
        return session

    def _hosted_page(self, path: str) -> tuple[int, str] | None:
        """(status, HTML) of the fake hosted Checkout or portal page at path, or None if path is an API path."""
        kind, _, session_id = path.strip("/").partition("/")
        sessions = {"checkout": self.checkout_sessions, "portal": self.portal_sessions}.get(kind)
        if sessions is None:
            return None
        if session_id not in sessions:
            return 404, "<h1>Fake Stripe: no such session</h1>"
        title = "Checkout" if kind == "checkout" else "billing portal"
        return 200, f"<h1>Fake Stripe {title}</h1><p>{html.escape(session_id)}</p>"

    # --- HTTP

    def _answer(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes, str]:
        """(status, extra headers, body, content type) for one request; records it."""
        split = urlsplit(raw_path)
        path = split.path
        extra = {"Request-Id": new_id("req_", 14)}
        try:
            query = parse_form(split.query)
            form = parse_form(body) if body else {}
        except (ValueError, UnicodeDecodeError) as error:
            query, form = {}, {}
            status, payload = 400, StripeError(400, f"Invalid request body: {error}").payload
        else:
            status, payload = 0, {}
        with self._lock:
            record = Recorded(method, path, headers, form, query)
            self.requests.append(record)
            if not status and method == "GET" and (page := self._hosted_page(path)) is not None:
                record.status = page[0]
                return page[0], {}, page[1].encode(), "text/html; charset=utf-8"
            if not status:
                status, payload = self._authenticated(method, path, headers, query, form, extra)
            record.status = status
        return status, extra, json.dumps(payload, indent=2).encode(), "application/json"

    def _authenticated(
        self, method: str, path: str, headers: dict[str, str], query: dict[str, Any], form: dict[str, Any], extra: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return 401, StripeError(
                401, "You did not provide an API key. You need to provide your API key in the Authorization header."
            ).payload
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            return 401, StripeError(401, f"Invalid API Key provided: {mask_key(key.strip())}").payload
        idempotency_key = headers.get("idempotency-key") if method == "POST" else None
        if idempotency_key:
            extra["Idempotency-Key"] = idempotency_key
            seen = self._idempotent.get(idempotency_key)
            if seen is not None:
                if seen[0] != (method, path, form):
                    message = "Keys for idempotent requests can only be used with the same parameters they were first used with."
                    return 400, StripeError(400, message, type="idempotency_error").payload
                extra["Idempotent-Replayed"] = "true"
                return seen[1], seen[2]
        status, payload = self.handle(method, path, query, form)
        if idempotency_key:
            self._idempotent[idempotency_key] = ((method, path, form), status, copy.deepcopy(payload))  # as it was then
        return status, payload

    def start(self, port: int = 0) -> FakeStripe:
        fake = self

        class Handler(QuietHandler):
            def _serve(self) -> None:
                body = self.read_body()
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, extra, data, content_type = fake._answer(self.command, self.path, headers, body)
                self.send_bytes(status, content_type, data, extra)

            do_GET = do_POST = do_DELETE = _serve

        self._server = serve(Handler, port, "fake-stripe")
        return self

    def stop(self) -> None:
        shutdown(self._server)
        self._server = None


# ---------------------------------------------------------------------------------------------- webhook builders


def sign(payload: bytes | str, secret: str, timestamp: int | None = None) -> str:
    """A `Stripe-Signature` header for exactly these bytes: `t=<ts>,v1=<hex HMAC-SHA256 of "<ts>.<payload>">`."""
    data = payload.encode() if isinstance(payload, str) else payload
    ts = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{ts}.".encode() + data, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


def event(type: str, obj: dict[str, Any], *, created: int, event_id: str | None = None) -> dict[str, Any]:
    """A Stripe event envelope around one object (a snapshot event, as webhooks deliver)."""
    return {
        "id": event_id or new_id("evt_", 24),
        "object": "event",
        "api_version": API_VERSION,
        "created": created,
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": type,
    }


def _suffix(object_id: str) -> str:
    return object_id.partition("_")[2] or object_id


def subscription(
    sub_id: str,
    customer: str,
    status: str,
    *,
    price: str = "price_starter",
    tenant_id: str | None = None,
    current_period_end: int | None = None,
    cancel_at_period_end: bool = False,
    canceled_at: int | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A subscription object with one item; the billing period lives on the item, as in API versions since 2025-03-31.

    `created` defaults to now, `current_period_end` to 30 days after `created`; `canceled_at` (and `ended_at` when
    the status is canceled) default to `created` when the subscription is canceled or set to cancel.
    """
    created = int(time.time()) if created is None else created
    period_end = created + 30 * DAY if current_period_end is None else current_period_end
    period_start = period_end - 30 * DAY
    if canceled_at is None and (status == "canceled" or cancel_at_period_end):
        canceled_at = created
    return {
        "id": sub_id,
        "object": "subscription",
        "billing_cycle_anchor": period_start,
        "cancel_at": period_end if cancel_at_period_end else None,
        "cancel_at_period_end": cancel_at_period_end,
        "canceled_at": canceled_at,
        "collection_method": "charge_automatically",
        "created": created,
        "currency": "usd",
        "customer": customer,
        "default_payment_method": None,
        "ended_at": canceled_at if status == "canceled" else None,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": f"si_{_suffix(sub_id)}",
                    "object": "subscription_item",
                    "created": created,
                    "current_period_end": period_end,
                    "current_period_start": period_start,
                    "metadata": {},
                    "price": {
                        "id": price,
                        "object": "price",
                        "active": True,
                        "currency": "usd",
                        "livemode": False,
                        "product": f"prod_{_suffix(price)}",
                        "recurring": {"interval": "month", "interval_count": 1, "usage_type": "licensed"},
                        "type": "recurring",
                    },
                    "quantity": 1,
                    "subscription": sub_id,
                }
            ],
            "has_more": False,
            "total_count": 1,
            "url": f"/v1/subscription_items?subscription={sub_id}",
        },
        "latest_invoice": None,
        "livemode": False,
        "metadata": {"tenant_id": tenant_id} if tenant_id is not None else {},
        "start_date": created,
        "status": status,
        "trial_end": period_end if status == "trialing" else None,
        "trial_start": period_start if status == "trialing" else None,
    }


def checkout_completed(session_id: str, customer: str, subscription_id: str, *, tenant_id: str, created: int) -> dict[str, Any]:
    """A completed, paid subscription-mode checkout.session (the object of `checkout.session.completed`)."""
    return {
        "id": session_id,
        "object": "checkout.session",
        "amount_subtotal": None,
        "amount_total": None,
        "cancel_url": None,
        "client_reference_id": tenant_id,
        "created": created,
        "currency": "usd",
        "customer": customer,
        "customer_email": None,
        "expires_at": created + DAY,
        "livemode": False,
        "metadata": {"tenant_id": tenant_id},
        "mode": "subscription",
        "payment_intent": None,
        "payment_status": "paid",
        "status": "complete",
        "subscription": subscription_id,
        "success_url": None,
        "ui_mode": "hosted",
        "url": None,
    }


def invoice(
    invoice_id: str,
    customer: str,
    subscription_id: str,
    *,
    status: Literal["draft", "open", "paid", "uncollectible", "void"],
    created: int,
    paid_at: int | None = None,
    amount: int = 0,
) -> dict[str, Any]:
    """A subscription invoice; the subscription id is both at the top level (older API versions) and under `parent`."""
    if status == "paid" and paid_at is None:
        paid_at = created
    paid = status == "paid"
    return {
        "id": invoice_id,
        "object": "invoice",
        "amount_due": amount,
        "amount_paid": amount if paid else 0,
        "amount_remaining": 0 if paid else amount,
        "billing_reason": "subscription_cycle",
        "collection_method": "charge_automatically",
        "created": created,
        "currency": "usd",
        "customer": customer,
        "hosted_invoice_url": None,
        "lines": {"object": "list", "data": [], "has_more": False, "url": f"/v1/invoices/{invoice_id}/lines"},
        "livemode": False,
        "metadata": {},
        "parent": {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"subscription": subscription_id, "metadata": {}},
        },
        "period_end": created,
        "period_start": created - 30 * DAY,
        "status": status,
        "status_transitions": {
            "finalized_at": None if status == "draft" else created,
            "marked_uncollectible_at": created if status == "uncollectible" else None,
            "paid_at": paid_at,
            "voided_at": created if status == "void" else None,
        },
        "subscription": subscription_id,
    }


def post_event(url: str, event: dict[str, Any], secret: str, *, timestamp: int | None = None, timeout: float = 10.0) -> httpx.Response:
    """POST the event as Stripe delivers it: compact JSON, signed over exactly those bytes."""
    body = json.dumps(event, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "Stripe-Signature": sign(body, secret, timestamp),
        "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
    }
    return httpx.post(url, content=body, headers=headers, timeout=timeout)
