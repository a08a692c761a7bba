"""The billing fakes against the real clients: stripe-python against FakeStripe, smtplib against FakeSMTP."""

from __future__ import annotations

import json
import smtplib
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage

import httpx
import pytest
import stripe

from tests.fakes import stripe as fs
from tests.fakes.server import QuietHandler, serve, shutdown
from tests.fakes.smtp import FakeSMTP

SECRET = "whsec_test_secret"


@pytest.fixture(scope="module")
def stripe_server() -> Iterator[fs.FakeStripe]:
    fake = fs.FakeStripe().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_stripe(stripe_server: fs.FakeStripe, monkeypatch: pytest.MonkeyPatch) -> fs.FakeStripe:
    monkeypatch.setattr(stripe, "enable_telemetry", False)  # else stripe-python writes ~/.config/stripe/telemetry_id
    stripe_server.reset()
    return stripe_server


def client_for(fake: fs.FakeStripe, key: str | None = None) -> stripe.StripeClient:
    return stripe.StripeClient(key or fake.api_key, base_addresses={"api": fake.url}, max_network_retries=0)


# ---------------------------------------------------------------------------------------------- form decoding


def test_parse_form_nests_brackets_into_dicts_and_lists() -> None:
    body = (
        b"mode=subscription&line_items[0][price]=price_pro&line_items[0][quantity]=1&line_items[1][price]=price_starter"
        b"&metadata[tenant_id]=t-1&metadata[0]=zero&subscription_data[metadata][tenant_id]=t-1"
        b"&success_url=https%3A%2F%2Fapp.test%2Fok%3Fa%3D1%26b%3D2&expand[]=customer&expand[]=subscription&note="
        b"&line_items%5B1%5D%5Bquantity%5D=2"
    )
    assert fs.parse_form(body) == {
        "mode": "subscription",
        "line_items": [{"price": "price_pro", "quantity": "1"}, {"price": "price_starter", "quantity": "2"}],
        "metadata": {"tenant_id": "t-1", "0": "zero"},
        "subscription_data": {"metadata": {"tenant_id": "t-1"}},
        "success_url": "https://app.test/ok?a=1&b=2",
        "expand": ["customer", "subscription"],
        "note": "",
    }
    assert fs.parse_form(b"") == {}
    assert fs.parse_form("items[1]=x") == {"items": {"1": "x"}}  # not 0..n-1: stays a dict
    for bad in (b"a=1&a[b]=2", b"a[b]=2&a=1", b"a]b=1", b"[x]=1"):
        with pytest.raises(ValueError):
            fs.parse_form(bad)


# ---------------------------------------------------------------------------------------------- the API


def test_customer_create_retrieve_list(fake_stripe: fs.FakeStripe) -> None:
    client = client_for(fake_stripe)
    customer = client.v1.customers.create(params={"email": "a@example.com", "name": "Ann", "metadata": {"tenant_id": "t-1"}})
    assert customer.id.startswith("cus_") and customer.object == "customer" and customer.livemode is False
    assert customer.email == "a@example.com" and customer.name == "Ann" and customer["metadata"]["tenant_id"] == "t-1"
    assert fake_stripe.customers[customer.id]["email"] == "a@example.com"

    call = fake_stripe.requests[-1]
    assert (call.method, call.path, call.status) == ("POST", "/v1/customers", 200)
    assert call.form == {"email": "a@example.com", "name": "Ann", "metadata": {"tenant_id": "t-1"}}
    assert call.headers["authorization"] == f"Bearer {fake_stripe.api_key}"
    assert call.headers["content-type"] == "application/x-www-form-urlencoded"
    assert call.headers["idempotency-key"]  # stripe-python sends one on every POST

    assert client.v1.customers.retrieve(customer.id).email == "a@example.com"
    client.v1.customers.create(params={"email": "b@example.com"})
    listed = client.v1.customers.list(params={"email": "a@example.com", "limit": 5})
    assert [c.id for c in listed.data] == [customer.id]
    assert fake_stripe.requests[-1].query == {"email": "a@example.com", "limit": "5"}

    updated = client.v1.customers.update(customer.id, params={"metadata": {"plan": "pro", "tenant_id": ""}})
    assert updated["metadata"].to_dict() == {"plan": "pro"}

    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.customers.retrieve("cus_nope")
    assert missing.value.http_status == 404 and missing.value.code == "resource_missing"


def test_checkout_session(fake_stripe: fs.FakeStripe) -> None:
    client = client_for(fake_stripe)
    customer = client.v1.customers.create(params={"email": "a@example.com"})
    session = client.v1.checkout.sessions.create(
        params={
            "mode": "subscription",
            "customer": customer.id,
            "client_reference_id": "t-1",
            "line_items": [{"price": "price_pro", "quantity": 1}],
            "metadata": {"tenant_id": "t-1"},
            "subscription_data": {"metadata": {"tenant_id": "t-1"}},
            "success_url": "https://app.test/billing?ok=1&session={CHECKOUT_SESSION_ID}",
            "cancel_url": "https://app.test/billing",
            "allow_promotion_codes": True,
        }
    )
    assert session.id.startswith("cs_test_") and session.object == "checkout.session"
    assert session.url == f"{fake_stripe.url}/checkout/{session.id}"
    assert (session.mode, session.status, session.payment_status, session.customer) == ("subscription", "open", "unpaid", customer.id)
    assert session.client_reference_id == "t-1" and session["metadata"]["tenant_id"] == "t-1"
    assert session.success_url == "https://app.test/billing?ok=1&session={CHECKOUT_SESSION_ID}"
    assert "line_items" not in session
    assert fake_stripe.checkout_sessions[session.id]["cancel_url"] == "https://app.test/billing"

    form = fake_stripe.requests[-1].form
    assert form["line_items"] == [{"price": "price_pro", "quantity": "1"}]  # the wire has strings only
    assert form["subscription_data"] == {"metadata": {"tenant_id": "t-1"}}
    assert form["allow_promotion_codes"] == "true"

    assert client.v1.checkout.sessions.retrieve(session.id).id == session.id
    page = httpx.get(session.url)
    assert page.status_code == 200 and session.id in page.text
    assert httpx.get(f"{fake_stripe.url}/checkout/cs_test_nope").status_code == 404


def test_checkout_session_errors(fake_stripe: fs.FakeStripe) -> None:
    client = client_for(fake_stripe)
    with pytest.raises(stripe.InvalidRequestError) as unknown_price:
        client.v1.checkout.sessions.create(params={"mode": "subscription", "line_items": [{"price": "price_gold", "quantity": 1}]})
    error = unknown_price.value
    assert (error.http_status, error.code, error.param) == (400, "resource_missing", "line_items[0][price]")
    assert error.user_message == "No such price: 'price_gold'"

    with pytest.raises(stripe.InvalidRequestError) as unknown_customer:
        client.v1.checkout.sessions.create(params={"mode": "subscription", "customer": "cus_nope", "line_items": [{"price": "price_pro"}]})
    assert unknown_customer.value.param == "customer"

    with pytest.raises(stripe.InvalidRequestError) as no_mode:
        client.v1.checkout.sessions.create(params={"line_items": [{"price": "price_pro"}]})
    assert (no_mode.value.code, no_mode.value.param) == ("parameter_missing", "mode")

    with pytest.raises(stripe.InvalidRequestError) as no_items:
        client.v1.checkout.sessions.create(params={"mode": "subscription", "success_url": "https://app.test/ok"})
    assert no_items.value.param == "line_items"
    assert fake_stripe.checkout_sessions == {}


def test_portal_session(fake_stripe: fs.FakeStripe) -> None:
    client = client_for(fake_stripe)
    customer = fake_stripe.add_customer("a@example.com", metadata={"tenant_id": "t-1"})
    portal = client.v1.billing_portal.sessions.create(params={"customer": customer["id"], "return_url": "https://app.test/billing"})
    assert portal.id.startswith("bps_") and portal.object == "billing_portal.session"
    assert portal.url == f"{fake_stripe.url}/portal/{portal.id}" and portal.return_url == "https://app.test/billing"
    assert fake_stripe.portal_sessions[portal.id]["customer"] == customer["id"]
    assert httpx.get(portal.url).status_code == 200

    with pytest.raises(stripe.InvalidRequestError) as unknown:
        client.v1.billing_portal.sessions.create(params={"customer": "cus_nope"})
    assert unknown.value.param == "customer"


def test_wrong_key_and_unknown_route(fake_stripe: fs.FakeStripe) -> None:
    key = "sk_test_this_is_the_wrong_key_1234"
    with pytest.raises(stripe.AuthenticationError) as wrong:
        client_for(fake_stripe, key).v1.customers.create(params={"email": "a@example.com"})
    assert wrong.value.http_status == 401 and key not in str(wrong.value) and "1234" in str(wrong.value)
    assert fake_stripe.customers == {} and fake_stripe.requests[-1].status == 401

    assert httpx.post(f"{fake_stripe.url}/v1/customers").status_code == 401  # no key at all
    unknown = httpx.get(f"{fake_stripe.url}/v1/plans", headers={"Authorization": f"Bearer {fake_stripe.api_key}"})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "invalid_request_error"


def test_idempotency_key_replays(fake_stripe: fs.FakeStripe) -> None:
    client = client_for(fake_stripe)
    first = client.v1.customers.create(params={"email": "a@example.com"}, options={"idempotency_key": "k-1"})
    client.v1.customers.update(first.id, params={"name": "Changed"})
    again = client.v1.customers.create(params={"email": "a@example.com"}, options={"idempotency_key": "k-1"})
    assert first.id == again.id and again.name is None and len(fake_stripe.customers) == 1  # the first answer, replayed
    with pytest.raises(stripe.IdempotencyError):
        client.v1.customers.create(params={"email": "other@example.com"}, options={"idempotency_key": "k-1"})


# ---------------------------------------------------------------------------------------------- webhooks


def test_signature_round_trips_with_stripe_python() -> None:
    now = int(time.time())
    sub = fs.subscription("sub_123", "cus_123", "active", price="price_pro", tenant_id="t-1", created=now)
    payload = json.dumps(fs.event("customer.subscription.updated", sub, created=now, event_id="evt_1")).encode()
    header = fs.sign(payload, SECRET)

    verified = stripe.Webhook.construct_event(payload, header, SECRET)
    assert (verified.id, verified.type, verified.api_version) == ("evt_1", "customer.subscription.updated", fs.API_VERSION)
    obj = verified.data.object
    assert obj["id"] == "sub_123" and obj["metadata"]["tenant_id"] == "t-1"
    item = obj["items"]["data"][0]
    assert item["price"]["id"] == "price_pro" and item["current_period_end"] == now + 30 * fs.DAY

    for bad_payload, bad_header, secret in (
        (payload.replace(b"active", b"canceled"), header, SECRET),  # tampered
        (payload, header, "whsec_other"),  # wrong secret
        (payload, fs.sign(payload, SECRET, timestamp=now - 301), SECRET),  # too old
    ):
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.Webhook.construct_event(bad_payload, bad_header, secret)
    assert stripe.Webhook.construct_event(payload, fs.sign(payload, SECRET, timestamp=now - 200), SECRET).id == "evt_1"


def test_event_builders() -> None:
    now = int(time.time())
    completed = fs.checkout_completed("cs_test_1", "cus_1", "sub_1", tenant_id="t-1", created=now)
    assert (completed["status"], completed["payment_status"], completed["client_reference_id"]) == ("complete", "paid", "t-1")
    paid = fs.invoice("in_1", "cus_1", "sub_1", status="paid", created=now)
    assert paid["subscription"] == paid["parent"]["subscription_details"]["subscription"] == "sub_1"
    assert paid["status_transitions"]["paid_at"] == now
    assert fs.invoice("in_2", "cus_1", "sub_1", status="open", created=now)["status_transitions"]["paid_at"] is None
    canceled = fs.subscription("sub_1", "cus_1", "canceled", created=now)
    assert canceled["metadata"] == {} and canceled["ended_at"] == canceled["canceled_at"] == now
    envelope = fs.event("invoice.paid", paid, created=now)
    assert envelope["id"].startswith("evt_") and envelope["data"]["object"] is paid
    assert envelope["request"] == {"id": None, "idempotency_key": None} and envelope["pending_webhooks"] == 1


def test_post_event_is_verifiable() -> None:
    received: list[stripe.Event] = []
    lock = threading.Lock()

    class Receiver(QuietHandler):
        def do_POST(self) -> None:
            body = self.read_body()
            try:
                verified = stripe.Webhook.construct_event(body, self.headers.get("Stripe-Signature"), SECRET)
            except stripe.SignatureVerificationError:
                self.send_bytes(400, "text/plain", b"bad signature")
                return
            with lock:
                received.append(verified)
            self.send_bytes(200, "application/json", b"{}")

    server = serve(Receiver, 0, "stripe-webhook-receiver")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/webhooks/stripe"
        now = int(time.time())
        sent = fs.event(
            "checkout.session.completed", fs.checkout_completed("cs_test_1", "cus_1", "sub_1", tenant_id="t-1", created=now), created=now
        )
        assert fs.post_event(url, sent, SECRET).status_code == 200
        assert fs.post_event(url, sent, "whsec_other").status_code == 400
        assert fs.post_event(url, sent, SECRET, timestamp=now - 3600).status_code == 400
    finally:
        shutdown(server)
    assert [e.id for e in received] == [sent["id"]]
    assert received[0].data.object["metadata"]["tenant_id"] == "t-1"


# ---------------------------------------------------------------------------------------------- SMTP


def _mail(to: str = "bob@example.com") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Konstruct <noreply@konstruct.test>"
    message["To"] = to
    message["Subject"] = "Your invoice — März"
    message.set_content("Hello Bob,\nyour invoice is ready: 29 €.\n")
    message.add_alternative("<p>Hello Bob, your invoice is ready: 29 €.</p>", subtype="html")
    return message


def test_smtp_records_mail() -> None:
    fake = FakeSMTP().start()
    try:
        with smtplib.SMTP(fake.host, fake.port, timeout=10) as smtp:
            smtp.send_message(_mail(), to_addrs=["bob@example.com", "cc@example.com"])
        (mail,) = fake.wait_for(1)
        assert mail.sender == "noreply@konstruct.test" and mail.recipients == ["bob@example.com", "cc@example.com"]
        assert mail.subject == "Your invoice — März"
        assert mail.body == "Hello Bob,\nyour invoice is ready: 29 €.\n"
        assert "29 €" in mail.html and mail.login is None
        assert mail.message["To"] == "bob@example.com" and b"Subject:" in mail.raw

        with smtplib.SMTP(fake.host, fake.port, timeout=10) as smtp:
            smtp.ehlo()
            assert not smtp.has_extn("auth")  # no credentials configured: no AUTH offered
        with pytest.raises(AssertionError, match="wanted 2 mail"):
            fake.wait_for(2, timeout=0.2)
    finally:
        fake.stop()


def test_smtp_login() -> None:
    fake = FakeSMTP(username="mailer", password="s3cret").start()
    try:
        with smtplib.SMTP(fake.host, fake.port, timeout=10) as smtp, pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.send_message(_mail())
        assert refused.value.smtp_code == 530

        with smtplib.SMTP(fake.host, fake.port, timeout=10) as smtp, pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("mailer", "wrong")
        assert fake.failed_logins == 2  # smtplib tries PLAIN, then LOGIN

        with smtplib.SMTP(fake.host, fake.port, timeout=10) as smtp:
            smtp.login("mailer", "s3cret")  # smtplib picks PLAIN
            smtp.send_message(_mail("plain@example.com"))
        with smtplib.SMTP(fake.host, fake.port, timeout=10) as smtp:
            smtp.ehlo()
            smtp.user, smtp.password = "mailer", "s3cret"
            smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=False)
            smtp.send_message(_mail("login@example.com"))
        mails = fake.wait_for(2)
        assert [m.recipients for m in mails] == [["plain@example.com"], ["login@example.com"]]
        assert {m.login for m in mails} == {"mailer"}
    finally:
        fake.stop()
