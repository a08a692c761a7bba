"""The status page and /metrics through a real gateway process: sign-in (cookie flags, CSRF, throttling),
what each role sees, impersonation, the web invitation form, and a real headless Chromium signing in.

One gateway serves the module; each test has tenants and people of its own (sign-in throttling counts per email)."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.engine import URL

from konstruct import audit
from konstruct.agent.agents import create_agent
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.db.urls import resolve_urls
from konstruct.tenancy import invitations
from konstruct.tenancy.tenants import create_tenant, get_tenant
from konstruct.tenancy.users import add_member, create_user
from tests.browser import chromium_page, screenshot
from tests.conftest import write_config
from tests.fakes.llm import FakeLLM
from tests.helpers import Proc, meter, wait_for
from tests.shared import module_database

PASSWORD = "a long enough password"
IMPERSONATION = 0.03  # web.impersonation_minutes: 1.8 s, so the test sees a view as a tenant end by itself
METRICS_TOKEN = "metrics-token-0123456789"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Site:
    config: Path
    base: str
    gateway: Proc
    acme: str  # this test's tenants (slugs) and people
    globex: str
    ann: str
    root: str
    bo: str

    def client(self) -> httpx.Client:
        """A client that keeps cookies like a browser does on loopback, where Secure cookies are sent over http
        (httpx's cookie jar never sends them without TLS)."""
        jar: dict[str, str] = {}

        def keep(response: httpx.Response) -> None:
            for header in response.headers.get_list("set-cookie"):
                name, _, rest = header.partition("=")
                value = rest.split(";", 1)[0]
                if "max-age=0" in header.lower() or "expires=thu, 01 jan 1970" in header.lower():
                    jar.pop(name, None)
                else:
                    jar[name] = value

        def send(request: httpx.Request) -> None:
            if jar:
                request.headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in jar.items())

        return httpx.Client(base_url=self.base, headers={"Accept": "text/html"}, follow_redirects=False, timeout=20,
                            event_hooks={"request": [send], "response": [keep]})  # fmt: skip

    def sign_in(self, client: httpx.Client, email: str, password: str = PASSWORD) -> httpx.Response:
        form = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert csrf, form.text
        return client.post("/login", data={"csrf": csrf[1], "email": email, "password": password})

    def owner(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows as the database owner reads them (all tenants)."""
        with psycopg.connect(resolve_urls(load_settings(self.config)).owner_sync().replace("+psycopg", "")) as conn:
            return conn.execute(sql).fetchall()  # type: ignore[arg-type]

    def events(self, slug: str) -> list[audit.AuditEvent]:
        async def go() -> list[audit.AuditEvent]:
            db = Database(load_settings(self.config))
            try:
                return await audit.events(db, (await get_tenant(db, slug)).id)
            finally:
                await db.dispose()

        return asyncio.run(go())


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page
    return found[1]


@pytest.fixture(scope="module")
def gateway(pg_server: URL, template_db: str, fake_llm_server: FakeLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One gateway for the module (people and tenants are made per test by `site`)."""
    path = tmp_path_factory.mktemp("status")
    with module_database(pg_server, template_db) as url:
        config = write_config(path, url, fake_llm_server.url,
                              web={"metrics_token": METRICS_TOKEN, "login_attempts": 3, "impersonation_minutes": IMPERSONATION})  # fmt: skip
        gateway = Proc("gateway", ["gateway"], config=config, log_dir=path)
        try:
            gateway.wait_for_log("Uvicorn running on")
            yield Site(config, f"http://127.0.0.1:{load_settings(config).gateway.port}", gateway, "", "", "", "", "")
        finally:
            gateway.stop()


@pytest.fixture
def site(gateway: Site) -> Site:
    tag = uuid.uuid4().hex[:6]
    site = replace(gateway, acme=f"acme-{tag}", globex=f"globex-{tag}", ann=f"ann-{tag}@acme.test", root=f"root-{tag}@x.test",
                   bo=f"bo-{tag}@acme.test")  # fmt: skip

    async def seed() -> None:
        db = Database(load_settings(site.config))
        try:
            acme = await create_tenant(db, name="Acme Inc", slug=site.acme, actor="test")
            globex = await create_tenant(db, name="Globex Secret Corp", slug=site.globex, actor="test")
            for tenant in (acme, globex):
                await create_agent(db, tenant, name=f"Ava of {tenant.slug}", role="Support", persona="Brief.", model=None, actor="test")
            await create_user(db, email=site.root, name="Root", password=PASSWORD, platform_admin=True, actor="test")
            admin = await create_user(db, email=site.ann, name="Ann", password=PASSWORD, platform_admin=False, actor="test")
            async with db.tenant(tenant_id=acme.id) as session:
                await add_member(session, acme.id, admin, "customer_admin", actor="test")
        finally:
            await db.dispose()

    asyncio.run(seed())
    return site


def test_sign_in_sets_a_secure_cookie_and_a_customer_sees_only_its_tenant(site: Site) -> None:
    with site.client() as client:
        assert client.get("/").headers["location"] == "/login"
        signed = site.sign_in(client, site.ann)
        assert signed.status_code == 303, signed.text
        cookie = signed.headers["set-cookie"]
        assert "konstruct_session=" in cookie and "HttpOnly" in cookie and "Secure" in cookie and "SameSite=lax" in cookie
        home = client.get("/")
        assert home.status_code == 303 and home.headers["location"] == f"/tenants/{site.acme}"
        page = client.get(f"/tenants/{site.acme}")
        assert page.status_code == 200 and "Acme Inc" in page.text and f"Ava of {site.acme}" in page.text
        assert "<svg" in page.text and "Latest audit events" in page.text and "<script" not in page.text
        other = client.get(f"/tenants/{site.globex}")
        assert other.status_code == 403 and "Globex Secret Corp" not in other.text and f"Ava of {site.globex}" not in other.text
        missing = client.get("/tenants/nope")
        assert missing.status_code == 403  # the same answer as another tenant's: nothing to probe
        # Signing out needs the page's CSRF token.
        assert client.post("/logout", data={"csrf": "forged"}).status_code == 403
        assert client.post("/logout", data={"csrf": csrf_of(page.text)}).status_code == 303
        assert client.get(f"/tenants/{site.acme}").headers.get("location") == "/login"


def test_login_needs_the_form_token_and_is_throttled(site: Site) -> None:
    with site.client() as client:
        client.get("/login")
        assert client.post("/login", data={"csrf": "forged", "email": site.ann, "password": PASSWORD}).status_code == 403
        for _ in range(3):
            assert site.sign_in(client, site.ann, "wrong password!").status_code == 401
        throttled = site.sign_in(client, site.ann)  # the right password, too late
        assert throttled.status_code == 429 and "too many" in throttled.text.lower()
        assert "konstruct_session" not in throttled.headers.get("set-cookie", "")


def test_a_platform_admin_sees_health_and_impersonates_with_a_reason(site: Site) -> None:
    with site.client() as client:
        assert site.sign_in(client, site.root).status_code == 303
        home = client.get("/")
        assert home.status_code == 200 and "System health" in home.text and site.acme in home.text and site.globex in home.text
        csrf = csrf_of(home.text)
        assert client.post("/impersonate", data={"csrf": csrf, "tenant": site.acme, "reason": ""}).status_code == 422
        began = time.monotonic()
        started = client.post("/impersonate", data={"csrf": csrf, "tenant": site.acme, "reason": "customer ticket 4711 about replies"})
        assert started.status_code == 303
        page = client.get(f"/tenants/{site.acme}")
        assert "Viewing as a tenant" in page.text and "customer ticket 4711" in page.text
        assert client.get(f"/tenants/{site.globex}").status_code == 403  # while viewing as acme, only acme
        # web.impersonation_minutes later it has ended by itself: the other tenant is visible again, without a banner.
        after = wait_for(lambda: ended(client.get(f"/tenants/{site.globex}")), 30, "the impersonation to end", interval=0.1)
        assert time.monotonic() - began >= IMPERSONATION * 60 - 0.1, "ended before web.impersonation_minutes"
        assert after.status_code == 200 and "Viewing as a tenant" not in after.text
    events = [e for e in site.events(site.acme) if e.action == "impersonation.started"]
    assert len(events) == 1 and events[0].detail["reason"] == "customer ticket 4711 about replies"
    assert events[0].actor == f"user:{site.root}"


def ended(response: httpx.Response) -> httpx.Response | None:
    return response if response.status_code != 403 else None


def test_a_customer_cannot_impersonate(site: Site) -> None:
    with site.client() as client:
        assert site.sign_in(client, site.ann).status_code == 303
        page = client.get(f"/tenants/{site.acme}")
        refused = client.post("/impersonate", data={"csrf": csrf_of(page.text), "tenant": site.globex, "reason": "just looking around"})
        assert refused.status_code == 403 and "Globex Secret Corp" not in refused.text
        refused_own = client.post("/impersonate", data={"csrf": csrf_of(page.text), "tenant": site.acme, "reason": "just looking around"})
        assert refused_own.status_code == 403
    assert not [e for e in site.events(site.acme) if e.action == "impersonation.started"]


def test_metrics_need_the_token(site: Site) -> None:
    with httpx.Client(base_url=site.base, timeout=20) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert ok.status_code == 200, ok.text
    active = site.owner("select count(*) from tenants where status = 'active'")[0][0]  # the module's tests' tenants
    for name in ("konstruct_messages_in", "konstruct_reply_latency_seconds_bucket", "konstruct_queue_depth",
                 "konstruct_llm_errors_total", "konstruct_llm_cost_usd_total", f'konstruct_tenants{{status="active"}} {float(active)}'):  # fmt: skip
        assert name in ok.text, name


def test_an_invitation_is_accepted_on_the_web_once(site: Site) -> None:
    async def invite() -> str:
        db = Database(load_settings(site.config))
        try:
            _, token = await invitations.create(db, await get_tenant(db, site.acme), email=site.bo, role="customer_operator",
                                                actor="test")  # fmt: skip
            return token
        finally:
            await db.dispose()

    token = asyncio.run(invite())
    with site.client() as client:
        form = client.get(f"/invite/{token}")
        assert form.status_code == 200 and site.bo in form.text and "Acme Inc" in form.text
        fields = {"csrf": csrf_of(form.text), "name": "Bo", "password": PASSWORD, "confirm": PASSWORD}
        assert client.post(f"/invite/{token}", data={**fields, "csrf": "forged"}).status_code == 403
        assert client.post(f"/invite/{token}", data={**fields, "confirm": "something else!"}).status_code == 422
        done = client.post(f"/invite/{token}", data=fields)
        assert done.status_code == 200 and "Welcome" in done.text
        again = client.get(f"/invite/{token}")
        assert again.status_code == 409 and "used already" in again.text
    with site.client() as client:
        assert site.sign_in(client, site.bo).status_code == 303
        assert client.get(f"/tenants/{site.acme}").status_code == 200


def test_a_customer_admin_signs_in_with_a_real_browser(site: Site, tmp_path: Path) -> None:
    artifacts = Path(os.environ.get("KONSTRUCT_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with chromium_page(tmp_path) as page:
        page.goto(f"{site.base}/")
        assert page.url.endswith("/login")
        page.fill("#email", site.ann)
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{site.base}/tenants/{site.acme}")
        body = page.text_content("body") or ""
        assert "Acme Inc" in body and f"Ava of {site.acme}" in body and "Usage and budget" in body
        assert "Globex" not in body and "globex" not in body
        cookies = {c["name"]: c for c in page.context.cookies()}
        session = cookies["konstruct_session"]
        assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Lax"
        assert page.evaluate("document.cookie") == ""  # invisible to scripts
        shot = screenshot(page, artifacts, "status-page-customer-admin")
        assert shot.exists() and shot.stat().st_size > 5000
        page.goto(f"{site.base}/tenants/{site.globex}")
        assert "Globex Secret Corp" not in (page.text_content("body") or "")


def test_a_budget_below_a_cent_is_shown_as_it_is(site: Site) -> None:
    """`budget set --usd 0.0005` once read "of $0.00 (117%)" here."""
    from decimal import Decimal

    from konstruct.llm import budget

    async def spend() -> None:
        settings = load_settings(site.config)
        db = Database(settings)
        try:
            acme = await get_tenant(db, site.acme)
            await budget.set_budget(db, acme, usd=0.0005, alerts=[80], action="block", downgrade_model=None, settings=settings, actor="t")
            await meter(db, acme.id, Decimal("0.000585"))
        finally:
            await db.dispose()

    asyncio.run(spend())
    with site.client() as client:
        assert site.sign_in(client, site.ann).status_code == 303
        page = client.get(f"/tenants/{site.acme}").text
    assert "Spent <b>$0.00059</b>" in page and "of $0.0005 (117.0%" in page and "$0.00 " not in page, page


def test_open_escalations_show_age_owner_category_and_reason_with_a_transcript_link(site: Site) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from konstruct import inbox
    from konstruct.agent import escalation
    from konstruct.db.models import Conversation
    from konstruct.messaging import InboundMessage

    async def escalate() -> str:
        db = Database(load_settings(site.config))
        try:
            acme = await get_tenant(db, site.acme)
            message = InboundMessage(acme.id, None, "terminal", uuid.uuid4().hex, "session-9", "pat", "where is my parcel?")
            stored = await inbox.store(db, message)
            assert stored is not None
            await escalation.escalate(db, tenant_id=acme.id, conversation_id=stored.conversation_id, reason="rule 'parcel' fired: has parcel",
                                      category=escalation.RULE, actor="test", link="-", channels={})  # fmt: skip
            async with db.tenant(tenant_id=acme.id) as session:  # escalated two hours ago
                since = datetime.now(UTC) - timedelta(hours=2, seconds=5)
                await session.execute(update(Conversation).where(Conversation.id == stored.conversation_id).values(escalated_at=since))
            return str(stored.conversation_id)
        finally:
            await db.dispose()

    conversation_id = asyncio.run(escalate())
    with site.client() as client:
        assert site.sign_in(client, site.ann).status_code == 303
        page = client.get(f"/tenants/{site.acme}").text
        table = page[page.index('<table id="escalations">') :]
        table = table[: table.index("</table>")]
        assert re.search(r"<td>2 h 0\d min</td>", table) and "<td>terminal</td>" in table and "<td>pat</td>" in table, table
        assert "<td>—</td>" in table  # nobody has taken it
        assert "<td>rule</td>" in table and "rule &#39;parcel&#39; fired: has parcel" in table
        link = f"/tenants/{site.acme}/conversations/{conversation_id}"
        assert f'href="{link}"' in table
        transcript = client.get(link)
        assert transcript.status_code == 200 and "where is my parcel?" in transcript.text and "<b>rule</b>" in transcript.text
