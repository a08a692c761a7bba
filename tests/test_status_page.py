"""The status page and /metrics through a real gateway process: sign-in (cookie flags, CSRF, throttling),
what each role sees, impersonation, the web invitation form, and a real headless Chromium signing in."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from konstruct import audit
from konstruct.agent.agents import create_agent
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.tenancy import invitations
from konstruct.tenancy.tenants import create_tenant, get_tenant
from konstruct.tenancy.users import add_member, create_user
from tests.browser import chromium_page, screenshot
from tests.conftest import write_config
from tests.fakes.llm import FakeLLM
from tests.helpers import Proc

PASSWORD = "a long enough password"
METRICS_TOKEN = "metrics-token-0123456789"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Site:
    config: Path
    base: str
    gateway: Proc

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


@pytest.fixture
def site(tmp_path: Path, database_url: str, fake_llm: FakeLLM) -> Iterator[Site]:
    config = write_config(tmp_path / "site", database_url, fake_llm.url,
                          web={"metrics_token": METRICS_TOKEN, "login_attempts": 3, "impersonation_minutes": 0.05})  # fmt: skip

    async def seed() -> None:
        db = Database(load_settings(config))
        try:
            acme = await create_tenant(db, name="Acme Inc", slug="acme", actor="test")
            globex = await create_tenant(db, name="Globex Secret Corp", slug="globex", actor="test")
            for tenant in (acme, globex):
                await create_agent(db, tenant, name=f"Ava of {tenant.slug}", role="Support", persona="Brief.", model=None, actor="test")
            await create_user(db, email="root@x.test", name="Root", password=PASSWORD, platform_admin=True, actor="test")
            admin = await create_user(db, email="ann@acme.test", name="Ann", password=PASSWORD, platform_admin=False, actor="test")
            async with db.tenant(tenant_id=acme.id) as session:
                await add_member(session, acme.id, admin, "customer_admin", actor="test")
        finally:
            await db.dispose()

    asyncio.run(seed())
    gateway = Proc("gateway", ["gateway"], config=config, log_dir=tmp_path)
    gateway.wait_for_log("Uvicorn running on")
    yield Site(config, f"http://127.0.0.1:{load_settings(config).gateway.port}", gateway)
    gateway.stop()


def test_sign_in_sets_a_secure_cookie_and_a_customer_sees_only_its_tenant(site: Site) -> None:
    with site.client() as client:
        assert client.get("/").headers["location"] == "/login"
        signed = site.sign_in(client, "ann@acme.test")
        assert signed.status_code == 303, signed.text
        cookie = signed.headers["set-cookie"]
        assert "konstruct_session=" in cookie and "HttpOnly" in cookie and "Secure" in cookie and "SameSite=lax" in cookie
        home = client.get("/")
        assert home.status_code == 303 and home.headers["location"] == "/tenants/acme"
        page = client.get("/tenants/acme")
        assert page.status_code == 200 and "Acme Inc" in page.text and "Ava of acme" in page.text
        assert "<svg" in page.text and "Latest audit events" in page.text and "<script" not in page.text
        other = client.get("/tenants/globex")
        assert other.status_code == 403 and "Globex Secret Corp" not in other.text and "Ava of globex" not in other.text
        missing = client.get("/tenants/nope")
        assert missing.status_code == 403  # the same answer as another tenant's: nothing to probe
        # Signing out needs the page's CSRF token.
        assert client.post("/logout", data={"csrf": "forged"}).status_code == 403
        assert client.post("/logout", data={"csrf": csrf_of(page.text)}).status_code == 303
        assert client.get("/tenants/acme").headers.get("location") == "/login"


def test_login_needs_the_form_token_and_is_throttled(site: Site) -> None:
    with site.client() as client:
        client.get("/login")
        assert client.post("/login", data={"csrf": "forged", "email": "ann@acme.test", "password": PASSWORD}).status_code == 403
        for _ in range(3):
            assert site.sign_in(client, "ann@acme.test", "wrong password!").status_code == 401
        throttled = site.sign_in(client, "ann@acme.test")  # the right password, too late
        assert throttled.status_code == 429 and "too many" in throttled.text.lower()
        assert "konstruct_session" not in throttled.headers.get("set-cookie", "")


def test_a_platform_admin_sees_health_and_impersonates_with_a_reason(site: Site) -> None:
    with site.client() as client:
        assert site.sign_in(client, "root@x.test").status_code == 303
        home = client.get("/")
        assert home.status_code == 200 and "System health" in home.text and "acme" in home.text and "globex" in home.text
        csrf = csrf_of(home.text)
        assert client.post("/impersonate", data={"csrf": csrf, "tenant": "acme", "reason": ""}).status_code == 422
        started = client.post("/impersonate", data={"csrf": csrf, "tenant": "acme", "reason": "customer ticket 4711 about replies"})
        assert started.status_code == 303
        page = client.get("/tenants/acme")
        assert "Viewing as a tenant" in page.text and "customer ticket 4711" in page.text
        assert client.get("/tenants/globex").status_code == 403  # while viewing as acme, only acme
        events = [e for e in site.events("acme") if e.action == "impersonation.started"]
        assert len(events) == 1 and events[0].detail["reason"] == "customer ticket 4711 about replies"
        assert events[0].actor == "user:root@x.test"
        time.sleep(3.5)  # impersonation_minutes = 0.05: it has ended
        after = client.get("/tenants/globex")
        assert after.status_code == 200 and "Viewing as a tenant" not in after.text


def test_a_customer_cannot_impersonate(site: Site) -> None:
    with site.client() as client:
        assert site.sign_in(client, "ann@acme.test").status_code == 303
        page = client.get("/tenants/acme")
        refused = client.post("/impersonate", data={"csrf": csrf_of(page.text), "tenant": "globex", "reason": "just looking around"})
        assert refused.status_code == 403 and "Globex Secret Corp" not in refused.text
        refused_own = client.post("/impersonate", data={"csrf": csrf_of(page.text), "tenant": "acme", "reason": "just looking around"})
        assert refused_own.status_code == 403
    assert not [e for e in site.events("acme") if e.action == "impersonation.started"]


def test_metrics_need_the_token(site: Site) -> None:
    with httpx.Client(base_url=site.base, timeout=20) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert ok.status_code == 200, ok.text
        for name in ("konstruct_messages_in", "konstruct_reply_latency_seconds_bucket", "konstruct_queue_depth",
                     "konstruct_llm_errors_total", "konstruct_llm_cost_usd_total", 'konstruct_tenants{status="active"} 2.0'):  # fmt: skip
            assert name in ok.text, name


def test_an_invitation_is_accepted_on_the_web_once(site: Site) -> None:
    async def invite() -> str:
        db = Database(load_settings(site.config))
        try:
            _, token = await invitations.create(db, await get_tenant(db, "acme"), email="bo@acme.test", role="customer_operator",
                                                actor="test")  # fmt: skip
            return token
        finally:
            await db.dispose()

    token = asyncio.run(invite())
    with site.client() as client:
        form = client.get(f"/invite/{token}")
        assert form.status_code == 200 and "bo@acme.test" in form.text and "Acme Inc" in form.text
        fields = {"csrf": csrf_of(form.text), "name": "Bo", "password": PASSWORD, "confirm": PASSWORD}
        assert client.post(f"/invite/{token}", data={**fields, "csrf": "forged"}).status_code == 403
        assert client.post(f"/invite/{token}", data={**fields, "confirm": "something else!"}).status_code == 422
        done = client.post(f"/invite/{token}", data=fields)
        assert done.status_code == 200 and "Welcome" in done.text
        again = client.get(f"/invite/{token}")
        assert again.status_code == 409 and "used already" in again.text
    with site.client() as client:
        assert site.sign_in(client, "bo@acme.test").status_code == 303
        assert client.get("/tenants/acme").status_code == 200


def test_a_customer_admin_signs_in_with_a_real_browser(site: Site, tmp_path: Path) -> None:
    artifacts = Path(os.environ.get("KONSTRUCT_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with chromium_page(tmp_path) as page:
        page.goto(f"{site.base}/")
        assert page.url.endswith("/login")
        page.fill("#email", "ann@acme.test")
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{site.base}/tenants/acme")
        body = page.text_content("body") or ""
        assert "Acme Inc" in body and "Ava of acme" in body and "Usage and budget" in body
        assert "Globex" not in body and "globex" not in body
        cookies = {c["name"]: c for c in page.context.cookies()}
        session = cookies["konstruct_session"]
        assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Lax"
        assert page.evaluate("document.cookie") == ""  # invisible to scripts
        shot = screenshot(page, artifacts, "status-page-customer-admin")
        assert shot.exists() and shot.stat().st_size > 5000
        page.goto(f"{site.base}/tenants/globex")
        assert "Globex Secret Corp" not in (page.text_content("body") or "")
