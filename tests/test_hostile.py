"""Hostile input: each reported 5xx as a regression test (in-process, real database), raw-socket limits and
a seeded fuzz run of thousands of generated requests against a real gateway process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from konstruct.agent.agents import create_agent
from konstruct.channels import connections
from konstruct.config import Settings, load_settings
from konstruct.db.engine import Database
from konstruct.db.models import InboundMessage as InboxRow
from konstruct.tenancy.tenants import TenantInfo, create_tenant
from konstruct.tenancy.users import add_member, create_user
from tests.conftest import write_config
from tests.fakes import hostile
from tests.fakes.llm import FakeLLM
from tests.helpers import Proc, gateway_in_process

TEAM, SLACK_SECRET = "T0HOSTILE1", "hostile-slack-signing-secret"
NUMBER, WA_SECRET = "106540352242922", "hostile-wa-app-secret"
STRIPE_SECRET = "whsec_hostile_secret"
EMAIL, PASSWORD = "admin@acme.test", "a long enough password"
KEYS = hostile.Keys(TEAM, SLACK_SECRET, NUMBER, WA_SECRET, STRIPE_SECRET, EMAIL)


@dataclass
class Site:
    config: Path
    settings: Settings
    db: Database
    tenant: TenantInfo
    dsn: str


@pytest.fixture
async def site(tmp_path: Path, database_url: str, fake_llm: FakeLLM) -> AsyncIterator[Site]:
    config = write_config(
        tmp_path / "site", database_url, fake_llm.url,
        billing={"stripe_api_key": "sk_test_hostile", "webhook_secret": STRIPE_SECRET, "api_base": "http://127.0.0.1:9"},
    )  # fmt: skip
    settings = load_settings(config)
    db = Database(settings)
    tenant = await create_tenant(db, name="Acme", slug="acme", actor="test")
    await create_agent(db, tenant, name="Ava", role="Support", persona="Brief.", model=None, actor="test")
    await connections.connect(
        db, settings, tenant, kind="slack", external_id=TEAM, name="Acme HQ", mode="single",
        credentials={"bot_token": "xoxb-hostile", "signing_secret": SLACK_SECRET}, details={"bot_user_id": "U0000000BOT"},
        default_agent=None, actor="test",
    )  # fmt: skip
    await connections.connect(
        db, settings, tenant, kind="whatsapp", external_id=NUMBER, name="+1 555", mode="single",
        credentials={"access_token": "EAAG-hostile", "app_secret": WA_SECRET, "verify_token": "verify"}, details={},
        default_agent=None, actor="test",
    )  # fmt: skip
    user = await create_user(db, email=EMAIL, name="Admin", password=PASSWORD, platform_admin=False, actor="test")
    async with db.tenant(tenant_id=tenant.id) as session:
        await add_member(session, tenant.id, user, "customer_admin", actor="test")
    yield Site(config, settings, db, tenant, database_url.replace("postgresql+asyncpg", "postgresql"))
    await db.dispose()


@pytest.fixture
async def client(site: Site) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_in_process(site.settings) as http:
        yield http


async def inbox_count(site: Site) -> int:
    async with site.db.tenant(tenant_id=site.tenant.id) as session:
        return int(await session.scalar(select(func.count()).select_from(InboxRow)) or 0)


def slack_message(text: str = "hello", **event: Any) -> dict[str, Any]:
    ts = f"{time.time():.6f}"
    base = {"type": "message", "user": "U0000000001", "text": text, "ts": ts, "channel": "D0000000001", "channel_type": "im"}
    return {"team_id": TEAM, "type": "event_callback", "event_id": f"Ev{time.monotonic_ns()}", "event": {**base, **event}}


async def post_slack(client: httpx.AsyncClient, body: bytes, headers: list[tuple[bytes, bytes]] | None = None,
                     content_type: bytes = b"application/json") -> httpx.Response:  # fmt: skip
    signed = hostile.slack_headers(body, SLACK_SECRET) if headers is None else headers
    return await client.post("/slack/events", content=body, headers=[(b"content-type", content_type), *signed])


# -- unauthenticated requests that got a 500 --


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-slack-request-timestamp", b"abc"), (b"x-slack-signature", b"v0=" + b"0" * 64)],
        [(b"x-slack-request-timestamp", b"1"), (b"x-slack-signature", "v0=é".encode())],
    ],
)
@pytest.mark.parametrize("team", [TEAM, None])
async def test_slack_malformed_signature_headers_are_401(client: httpx.AsyncClient, site: Site, headers: Any, team: str | None) -> None:
    payload = slack_message() if team else {"type": "url_verification", "challenge": "c"}
    response = await post_slack(client, json.dumps(payload).encode(), headers)
    assert response.status_code == 401
    assert await inbox_count(site) == 0


async def test_slack_deep_nesting_and_form_list_payload(client: httpx.AsyncClient, site: Site) -> None:
    unsigned = [(b"x-slack-request-timestamp", str(int(time.time())).encode()), (b"x-slack-signature", b"v0=" + b"0" * 64)]
    assert (await post_slack(client, b"[" * 100_000, unsigned)).status_code == 401
    assert (await post_slack(client, b"payload=%5B1%5D", unsigned, b"application/x-www-form-urlencoded")).status_code == 401
    # The same bodies validly signed: authentic, unusable, acknowledged (so Slack does not retry), nothing stored.
    assert (await post_slack(client, b"[" * 100_000)).status_code == 200
    assert (await post_slack(client, b"payload=%5B1%5D", content_type=b"application/x-www-form-urlencoded")).status_code == 200
    assert (await post_slack(client, b"{not json")).status_code == 200
    assert await inbox_count(site) == 0


async def test_whatsapp_bad_signature_header_and_nesting(client: httpx.AsyncClient, site: Site) -> None:
    body = json.dumps({"object": "whatsapp_business_account", "entry": []}).encode()
    bad = await client.post("/whatsapp/webhook", content=body, headers=[(b"x-hub-signature-256", "sha256=é".encode())])
    assert bad.status_code == 403
    deep = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    response = await client.post("/whatsapp/webhook", content=deep, headers=hostile.whatsapp_headers(deep, "forged"))
    assert response.status_code == 403
    response = await client.post("/whatsapp/webhook", content=deep, headers=hostile.whatsapp_headers(deep, WA_SECRET))
    assert response.status_code in (200, 403)  # authentic for no number: nothing to store


async def test_stripe_non_ascii_signature_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/stripe/webhook", content=b"{}", headers=[(b"stripe-signature", f"t={int(time.time())},v1=é".encode())])
    assert response.status_code == 400


async def test_install_state_non_ascii_and_login_nul(client: httpx.AsyncClient, site: Site) -> None:
    assert (await client.get("/slack/install?state=%C3%A9.%C3%A9")).status_code == 400
    form = await client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf
    response = await client.post(
        "/login", content=f"csrf={csrf[1]}&email=admin%40acme.test%00&password=x".encode(),
        headers={"content-type": "application/x-www-form-urlencoded", "cookie": f"konstruct_login_csrf={csrf[1]}"},
    )  # fmt: skip
    assert 400 <= response.status_code < 500


async def test_security_headers_on_every_response(client: httpx.AsyncClient) -> None:
    for response in (await client.get("/healthz"), await client.post("/slack/events", content=b"x"), await client.get("/login")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert "content-security-policy" in response.headers


# -- validly signed but malformed payloads --


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2],
        "a string",
        {"type": "event_callback", "team_id": TEAM, "event": "a string"},
        {"type": "event_callback", "team_id": TEAM, "event": {"type": "message", "channel": ["C1"], "ts": "1.2", "user": "U1"}},
        {"type": "event_callback", "team_id": TEAM, "event": {"type": "tokens_revoked", "tokens": "all"}},
        {"type": "event_callback", "team_id": TEAM},
        {"type": "url_verification"},
        {"type": "event_callback", "team_id": TEAM, "event": {"type": "message", "channel": "C" * 3000, "ts": "1.2", "user": "U1"}},
    ],
)
async def test_slack_signed_type_confusion_is_not_5xx(client: httpx.AsyncClient, site: Site, payload: Any) -> None:
    response = await post_slack(client, json.dumps(payload).encode())
    assert response.status_code < 500, response.text
    assert await inbox_count(site) == 0


async def test_slack_nul_and_surrogate_text_is_cleaned_and_stored(client: httpx.AsyncClient, site: Site) -> None:
    body = json.dumps(slack_message("a\x00b \ud800 c")).encode()  # json escapes both, as Slack's JSON may
    assert (await post_slack(client, body)).status_code == 200
    async with site.db.tenant(tenant_id=site.tenant.id) as session:
        assert await session.scalar(select(InboxRow.text)) == "ab \ufffd c"


async def test_whatsapp_nul_surrogate_nan_are_stored(client: httpx.AsyncClient, site: Site) -> None:
    messages = [
        {"from": "15550001111", "id": "wamid.NUL", "timestamp": "1", "type": "text", "text": {"body": "hi\x00 there \udc00"}},
        {"from": "15550001111", "id": "wamid.NAN", "timestamp": "1", "type": "location", "location": {"latitude": float("nan"),
         "longitude": 1.0, "name": "Dock\x00 7"}},
        {"from": "15550001111", "id": "wamid." + "L" * 3000, "timestamp": "1", "type": "text", "text": {"body": "long id"}},
    ]  # fmt: skip
    value = {"metadata": {"phone_number_id": NUMBER}, "messages": messages}
    body = json.dumps({"object": "whatsapp_business_account", "entry": [{"changes": [{"field": "messages", "value": value}]}]}).encode()
    response = await client.post("/whatsapp/webhook", content=body, headers=hostile.whatsapp_headers(body, WA_SECRET))
    assert response.status_code == 200, response.text
    async with site.db.tenant(tenant_id=site.tenant.id) as session:
        rows = dict((await session.execute(select(InboxRow.external_id, InboxRow.text))).all())
    assert rows == {"wamid.NUL": "hi there \ufffd", "wamid.NAN": "[location: Dock 7]"}


async def test_whatsapp_media_id_must_be_digits(client: httpx.AsyncClient, site: Site) -> None:
    message = {"from": "15550001111", "id": "wamid.MEDIA", "timestamp": "1", "type": "image",
               "image": {"id": "MEDIA1/../../15550002222/messages", "mime_type": "image/png"}}  # fmt: skip
    value = {"metadata": {"phone_number_id": NUMBER}, "messages": [message]}
    body = json.dumps({"object": "whatsapp_business_account", "entry": [{"changes": [{"field": "messages", "value": value}]}]}).encode()
    assert (await client.post("/whatsapp/webhook", content=body, headers=hostile.whatsapp_headers(body, WA_SECRET))).status_code == 200
    async with site.db.tenant(tenant_id=site.tenant.id) as session:
        payload = await session.scalar(select(InboxRow.payload))
    assert payload is not None and payload["media"] is None and payload["kind"] == "unsupported"


def stripe_body(event: Any) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps(event).encode()
    return body, hostile.stripe_headers(body, STRIPE_SECRET)


@pytest.mark.parametrize(
    "event",
    [
        [1],
        "evt",
        {"id": "evt_1", "type": "customer.subscription.updated", "data": "x"},
        {"id": "evt_2", "type": "customer.subscription.updated", "data": {"object": [1]}},
        {"id": "evt_3", "type": "invoice.paid", "data": {"object": {"subscription": 5, "parent": "x"}}, "created": "abc"},
        {"id": "evt_4", "type": "customer.subscription.updated", "data": {"object": {"id": "sub_1", "items": "x",
         "customer": {"id": ["c"]}, "current_period_end": 10**30}}},
        {"id": "e" * 3000, "type": "invoice.paid", "data": {"object": {}}},
    ],
)  # fmt: skip
async def test_stripe_signed_type_confusion_is_4xx_or_ignored(client: httpx.AsyncClient, event: Any) -> None:
    body, headers = stripe_body(event)
    response = await client.post("/stripe/webhook", content=body, headers=headers)
    assert response.status_code < 500, response.text


async def test_stripe_subscription_of_another_tenant_is_ignored_not_500(client: httpx.AsyncClient, site: Site) -> None:
    other = await create_tenant(site.db, name="Globex", slug="globex", actor="test")
    events = []
    for tenant, event_id in ((other, "evt_first"), (site.tenant, "evt_second")):
        events.append({"id": event_id, "type": "customer.subscription.updated", "created": int(time.time()),
                       "data": {"object": {"id": "sub_shared", "customer": f"cus_{tenant.slug}", "status": "active",
                                           "metadata": {"tenant_id": str(tenant.id)}}}})  # fmt: skip
    for event in events:
        body, headers = stripe_body(event)
        response = await client.post("/stripe/webhook", content=body, headers=headers)
        assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "ignored"
    async with site.db.system() as session:
        outcome = await session.scalar(text("select outcome from stripe_events where id = 'evt_second'"))
    assert outcome == "ignored: subscription of another tenant"


# -- limits at the HTTP layer, on a real gateway process --


@pytest.fixture
def gateway(site: Site, tmp_path: Path) -> Any:
    proc = Proc("gateway", ["gateway"], config=site.config, log_dir=tmp_path)
    proc.wait_for_log("Uvicorn running on")
    yield proc
    assert proc.stop() == 0


def raw(port: int, data: bytes, timeout: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


async def test_gateway_bounds_headers_and_slow_clients(site: Site, tmp_path: Path) -> None:
    config = site.config
    config.write_text(config.read_text().replace("[gateway]\n", "[gateway]\nread_timeout = 1.0\n", 1))
    port = load_settings(config).gateway.port
    proc = Proc("gateway", ["gateway"], config=config, log_dir=tmp_path)
    try:
        proc.wait_for_log("Uvicorn running on")
        huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20)
        assert raw(port, huge).startswith(b"HTTP/1.1 431")
        started = time.monotonic()
        chunked = b"POST /slack/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\nabc"
        answer = raw(port, chunked)
        assert answer == b"" or answer.startswith((b"HTTP/1.1 408", b"HTTP/1.1 400", b"HTTP/1.1 413")), answer[:100]
        half_open = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
        for sock in half_open:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        for sock in half_open:
            sock.settimeout(10)
            assert sock.recv(100).startswith(b"HTTP/1.1 408")
            sock.close()
        assert time.monotonic() - started < 10
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        assert "Traceback" not in proc.log()
    finally:
        assert proc.stop() == 0


# -- the fuzz run --

PER_ROUTE = {"slack": 1000, "slack_interactive": 500, "whatsapp": 1000, "stripe": 1000, "login": 150}


async def test_fuzz_thousands_of_hostile_requests(site: Site, gateway: Proc) -> None:
    base = f"http://127.0.0.1:{site.settings.gateway.port}"
    before = hostile.count_rows(site.dsn)
    unsigned = await hostile.send(base, hostile.batch(13, KEYS, PER_ROUTE, signed=False))
    assert unsigned.server_errors == 0, unsigned.by_route()
    assert not unsigned.errors, unsigned.errors
    assert hostile.count_rows(site.dsn) == before, "unauthenticated input wrote rows"
    signed = await hostile.send(base, hostile.batch(31, KEYS, {k: v for k, v in PER_ROUTE.items() if k != "login"}, signed=True))
    assert signed.server_errors == 0, signed.by_route()
    assert not signed.errors, signed.errors
    assert sum(n for (_, is_signed, status), n in signed.statuses.items() if is_signed and status == 200) > 1000
    assert unsigned.health_failures == signed.health_failures == 0
    assert httpx.get(f"{base}/healthz").status_code == 200
    log = gateway.log()
    for marker in ("Traceback", "Exception in ASGI application", "ERROR"):
        assert marker not in log, log[-3000:]


# -- reaching where it should not --


async def test_invitation_cannot_claim_a_passwordless_account(site: Site) -> None:
    from konstruct.tenancy import invitations
    from konstruct.tenancy.users import verify_password

    await create_user(site.db, email="ops@acme.test", name="Ops", password=None, platform_admin=False, actor="test")
    _, token = await invitations.create(site.db, site.tenant, email="ops@acme.test", role="customer_admin", actor="test")
    assert (await invitations.look_up(site.db, token)).has_password  # an existing account: nothing to set
    await invitations.accept(site.db, token, name="Mallory", password="mallory's new password")
    async with site.db.system() as session:
        row = (await session.execute(text("select name, password_hash from konstruct_user_by_email('ops@acme.test')"))).one()
    assert row.password_hash is None and row.name == "Ops"
    assert not verify_password("mallory's new password", row.password_hash)


async def test_tenant_llm_key_refuses_private_api_base(site: Site) -> None:
    from konstruct.errors import ValidationError
    from konstruct.llm.keys import add_key

    for base in ("http://127.0.0.1:8080/v1", "http://169.254.169.254/latest", "http://[::1]:5432", "http://10.0.0.5"):
        with pytest.raises(ValidationError, match="private or reserved"):
            await add_key(site.db, site.settings, site.tenant, provider="openai", key="sk-tenant-key-123456", api_base=base, actor="t")
    allowing = site.settings.model_copy(update={"agent": site.settings.agent.model_copy(update={"tenant_api_base_private": True})})
    await add_key(site.db, allowing, site.tenant, provider="openai", key="sk-tenant-key-123456", api_base="http://127.0.0.1:1", actor="t")
    # Stored while private addresses were allowed (or before the check existed): refused when it is used, too.
    from konstruct.llm.client import LLMError
    from konstruct.llm.service import CallContext, LLMService

    ctx = CallContext(site.tenant.id, uuid.uuid4(), uuid.uuid4(), "reply", "agent:test")
    with pytest.raises(LLMError, match="private or reserved"):
        await LLMService(site.settings, site.db).complete(ctx, model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])


def test_slack_bot_token_only_goes_to_slack_file_hosts(site: Site) -> None:
    from konstruct.channels.slack.channel import file_host_allowed

    assert file_host_allowed(site.settings, "https://files.slack.com/files-pri/T1-F1/a.png")
    for url in ("https://evil.example/a.png", "http://files.slack.com/a.png", "https://files.slack.com.evil.example/a",
                "http://169.254.169.254/latest/meta-data", "https://files.slack.com:8443/a"):  # fmt: skip
        assert not file_host_allowed(site.settings, url), url


async def test_connection_conflict_does_not_confirm_another_tenant(site: Site) -> None:
    from konstruct.errors import ConflictError

    other = await create_tenant(site.db, name="Globex", slug="globex", actor="test")
    with pytest.raises(ConflictError) as caught:
        await connections.connect(
            site.db, site.settings, other, kind="slack", external_id=TEAM, name="x", mode="single",
            credentials={"bot_token": "xoxb-x", "signing_secret": "s"}, details={}, default_agent=None, actor="test",
        )  # fmt: skip
    assert "another tenant" not in str(caught.value) and "exists" not in str(caught.value)


# -- sign-in --


async def _csrf(client: httpx.AsyncClient) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', (await client.get("/login")).text)
    assert found
    return found[1]


async def _sign_in(client: httpx.AsyncClient, email: str, password: str, forwarded: str | None = None) -> httpx.Response:
    csrf = await _csrf(client)
    headers = {"content-type": "application/x-www-form-urlencoded", "cookie": f"konstruct_login_csrf={csrf}"}
    if forwarded:
        headers["x-forwarded-for"] = forwarded
    body = f"csrf={csrf}&email={email.replace('@', '%40')}&password={password.replace(' ', '+')}"
    return await client.post("/login", content=body.encode(), headers=headers)


async def test_wrong_passwords_from_elsewhere_do_not_lock_the_owner_out(client: httpx.AsyncClient, site: Site) -> None:
    for _ in range(8):
        await _sign_in(client, EMAIL, "wrong password", forwarded="203.0.113.9")  # not trusted: all count for 127.0.0.1
    throttled = await _sign_in(client, EMAIL, PASSWORD)
    assert throttled.status_code == 429  # this address, this email: waits
    async with site.db.system() as session:
        await session.execute(text("update login_failures set failed_at = failed_at - interval '10 minutes'"))  # time passes
    behind_proxy = site.settings.model_copy(update={"web": site.settings.web.model_copy(update={"trusted_proxies": ["127.0.0.0/8"]})})
    async with gateway_in_process(behind_proxy, client=("127.0.0.1", 5000)) as proxied:
        for _ in range(8):  # an attacker behind the trusted proxy
            await _sign_in(proxied, EMAIL, "wrong password", forwarded="198.51.100.7")
        assert (await _sign_in(proxied, EMAIL, PASSWORD, forwarded="198.51.100.7")).status_code == 429
        # The owner, from another address, signs in at once: nobody can lock an account for everyone.
        assert (await _sign_in(proxied, EMAIL, PASSWORD, forwarded="192.0.2.44")).status_code == 303


async def test_concurrent_guesses_are_counted_atomically(site: Site) -> None:
    from konstruct.web import sessions

    settings = site.settings.model_copy(update={"web": site.settings.web.model_copy(update={"address_attempts": 5})})

    async def guess() -> str:
        try:
            await sessions.sign_in(site.db, settings, f"user{time.monotonic_ns()}@x.test", "wrong", "192.0.2.1")
        except sessions.TooManyAttempts:
            return "throttled"
        except Exception as exc:
            return type(exc).__name__
        return "in"

    results = await asyncio.gather(*(guess() for _ in range(20)))
    assert results.count("ValidationError") == 5 and results.count("throttled") == 15, results


async def test_unknown_email_costs_as_much_as_a_known_one(site: Site) -> None:
    from konstruct.web import sessions

    async def timed(email: str, address: str) -> float:
        started = time.perf_counter()
        with contextlib.suppress(Exception):
            await sessions.sign_in(site.db, site.settings, email, "wrong password", address)
        return time.perf_counter() - started

    await timed("warm@up.test", "192.0.2.9")  # the dummy hash is made once
    known = min([await timed(EMAIL, f"192.0.2.{i}") for i in range(3)])
    unknown = min([await timed(f"nobody{i}@acme.test", f"192.0.2.{10 + i}") for i in range(3)])
    assert unknown > known * 0.5, (known, unknown)  # both pay for scrypt


async def test_scrypt_does_not_block_the_event_loop(site: Site) -> None:
    from konstruct.web import sessions

    lags: list[float] = []

    async def ticker() -> None:
        for _ in range(40):
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - started - 0.005)

    async def attempt(i: int) -> None:
        with contextlib.suppress(Exception):
            await sessions.sign_in(site.db, site.settings, EMAIL, "wrong password", f"192.0.2.{100 + i}")

    await asyncio.gather(ticker(), *(attempt(i) for i in range(4)))
    assert max(lags) < 0.05, max(lags)  # scrypt takes ~0.1 s per attempt: on the loop, each stalled it that long


# -- files and the embedded database --


def test_app_role_password_is_checked_and_files_are_private(site: Site, pg_server: Any, tmp_path: Path) -> None:
    import psycopg

    from konstruct.channels.whatsapp.channel import MediaStore

    url = pg_server.set(drivername="postgresql", username="konstruct_app", password="not-the-password", database="postgres")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(url.render_as_string(hide_password=False)).close()
    data_dir = Path(str(pg_server.query["host"])).parent
    assert data_dir.stat().st_mode & 0o077 in (0, 0o011)  # 0700 (0711 as root, so pgserver's user can reach its folder)
    saved = MediaStore(tmp_path / "media").save(b"a customer's image")
    assert saved.stat().st_mode & 0o777 == 0o600


async def test_app_role_cannot_insert_sealed_or_backdated_audit_events(site: Site) -> None:
    from sqlalchemy.exc import DBAPIError

    from konstruct import audit

    async with site.db.tenant(tenant_id=site.tenant.id) as session:
        await audit.record(session, tenant_id=site.tenant.id, actor="test", action="test.plain", target=None)
    for columns, values in (("created_at", "'2001-01-01'"), ("seq, hash", "1, '\\x00'")):
        with pytest.raises(DBAPIError, match="permission denied"):
            async with site.db.tenant(tenant_id=site.tenant.id) as session:
                await session.execute(
                    text(f"insert into audit_events (tenant_id, actor, action, {columns}) values (:t, 'x', 'forged', {values})"),
                    {"t": site.tenant.id},
                )
    async with site.db.system() as session:
        assert await session.scalar(text("select konstruct_audit_seal_all()")) is not None
    async with site.db.tenant(tenant_id=site.tenant.id) as session:
        forged = await session.scalar(text("select count(*) from audit_events where action = 'forged'"))
        plain_at = await session.scalar(
            text("select created_at > now() - interval '1 minute' from audit_events where action = 'test.plain'")
        )
    assert forged == 0 and plain_at


async def test_deleting_the_newest_audit_events_is_detected(site: Site) -> None:
    import psycopg

    from konstruct import audit

    async with site.db.tenant(tenant_id=site.tenant.id) as session:
        for i in range(3):
            await audit.record(session, tenant_id=site.tenant.id, actor="test", action=f"test.{i}")
    report = await audit.verify(site.db, site.tenant.id)
    assert report.intact, report.problems
    head = audit.read_checkpoints(site.db)[str(site.tenant.id)]
    assert head["seq"] == report.events
    assert (site.settings.data_dir / audit.CHECKPOINTS).stat().st_mode & 0o777 == 0o600
    with psycopg.connect(site.dsn, autocommit=True) as conn:  # someone with the database's keys
        conn.execute("ALTER TABLE audit_events DISABLE TRIGGER USER")
        conn.execute("DELETE FROM audit_events WHERE seq >= %s", (report.events - 1,))
        conn.execute("ALTER TABLE audit_events ENABLE TRIGGER USER")
    broken = await audit.verify(site.db, site.tenant.id)
    assert not broken.intact and "newest events were deleted" in broken.problems[0], broken.problems


async def test_audit_checkpoint_is_printable(site: Site) -> None:
    from tests.helpers import konstruct

    assert konstruct("audit", "verify", config=site.config).returncode == 0
    printed = konstruct("audit", "checkpoint", "--json", config=site.config)
    assert printed.returncode == 0, printed.stderr
    heads = json.loads(printed.stdout)
    assert [h["tenant"] for h in heads] == ["acme"] and heads[0]["seq"] >= 1 and len(heads[0]["hash"]) == 64


async def test_app_role_cannot_make_itself_platform_admin(site: Site) -> None:
    from sqlalchemy.exc import DBAPIError

    from konstruct.tenancy.users import as_user, directory, set_platform_admin

    async with site.db.system() as session:
        user_id = await session.scalar(text("select id from konstruct_user_by_email(:e)"), {"e": EMAIL})
    for statement in ("update users set platform_admin = true where id = :u", "update users set password_hash = 'x' where id = :u"):
        with pytest.raises(DBAPIError, match="permission denied"):
            async with site.db.system() as session:
                await as_user(session, user_id)
                await session.execute(text(statement), {"u": user_id})
    await set_platform_admin(site.db, EMAIL, True)  # the operator's command, through the owner role
    assert [u["platform_admin"] for u in await directory(site.db) if u["email"] == EMAIL] == [True]
