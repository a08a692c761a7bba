"""Why a conversation was escalated (its category) and what it holds (its transcript), in-process over a real database:
each kind of escalation through the real pipeline with the terminal channel and the fake LLM, `konstruct conversation
show` through the CLI's real entry point, and the status page's transcript page over ASGI with a real signed-in session."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from konstruct import audit, inbox
from konstruct.agent.agents import AgentInfo, create_agent, update_agent
from konstruct.agent.pipeline import Pipeline
from konstruct.channels.registry import channels
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Conversation, Message
from konstruct.db.urls import resolve_urls
from konstruct.errors import PermissionDenied
from konstruct.llm import budget
from konstruct.messaging import InboundMessage
from konstruct.tenancy.tenants import TenantInfo, create_tenant, update_settings
from konstruct.tenancy.users import add_member, create_user
from konstruct.worker.queue import make_queue
from tests.fakes.llm import FakeLLM
from tests.helpers import gateway_in_process, konstruct_in_process, meter

PASSWORD = "a long enough password"


@dataclass
class Site:
    pipeline: Pipeline
    acme: TenantInfo
    ava: AgentInfo
    globex: TenantInfo

    @property
    def db(self) -> Database:
        return self.pipeline.db

    async def say(self, text: str, session: str = "session-1", person: str = "pat") -> uuid.UUID:
        """The person's message into the inbox, answered by the pipeline: its conversation's id."""
        queue = make_queue(self.pipeline.settings, resolve_urls(self.pipeline.settings))
        try:
            message = InboundMessage(self.acme.id, self.ava.id, "terminal", uuid.uuid4().hex, session, person, text)
            stored = await inbox.accept(self.db, queue, message)
        finally:
            queue.close()
        assert stored is not None
        assert await self.pipeline.process(tenant_id=self.acme.id, inbound_id=stored.id) in ("replied", "failed", "ignored")
        return stored.conversation_id

    async def conversation(self, conversation_id: uuid.UUID) -> Conversation:
        async with self.db.tenant(tenant_id=self.acme.id) as session:
            found = await session.get(Conversation, conversation_id)
        assert found is not None
        return found

    async def tools(self, *names: str) -> None:
        self.ava = await update_agent(self.db, self.acme, "Ava", changes={"tools": list(names)}, actor="test")


@pytest.fixture
async def site(db: Database, settings: Settings, fake_llm: FakeLLM) -> AsyncIterator[Site]:
    acme = await create_tenant(db, name="Acme", slug="acme", actor="test")
    globex = await create_tenant(db, name="Globex Secret Corp", slug="globex", actor="test")
    ava = await create_agent(db, acme, name="Ava", role="Support", persona="Warm and brief.", model=None, actor="test")
    yield Site(Pipeline(settings, db, channels(settings, db), worker_id="test-worker"), acme, ava, globex)


# -- categories --


async def test_a_rule_escalation_is_recorded_as_rule(site: Site) -> None:
    site.ava = await update_agent(site.db, site.acme, "Ava", changes={"escalation_rules": ["refund"]}, actor="test")
    conversation = await site.conversation(await site.say("I want a refund"))
    assert conversation.status == "escalated" and conversation.escalation_category == "rule"
    assert conversation.escalation_reason is not None and conversation.escalation_reason.startswith("rule 'refund' fired")


async def test_the_model_escalating_on_request_is_person_asked(site: Site, fake_llm: FakeLLM) -> None:
    await site.tools("escalate_to_human")
    conversation = await site.conversation(await site.say('[[call escalate_to_human {"reason": "wants a manager"}]]'))
    assert conversation.escalation_category == "person_asked" and conversation.escalation_reason == "the agent asked: wants a manager"
    events = [e for e in await audit.events(site.db, site.acme.id) if e.action == "conversation.escalated"]
    assert [e.detail["category"] for e in events] == ["person_asked"]


async def test_the_model_escalating_after_a_tool_failed_is_tool_failure(site: Site) -> None:
    await site.tools("web_fetch", "escalate_to_human")
    # web_fetch of a host the tenant does not allow fails; the model then hands over without naming a category.
    said = '[[call web_fetch {"url": "https://orders.example.com/42"}]] [[call escalate_to_human {"reason": "cannot see the order"}]]'
    conversation = await site.conversation(await site.say(said))
    assert conversation.escalation_category == "tool_failure"
    assert conversation.escalation_reason == "the agent asked: cannot see the order (after web_fetch failed)"
    # The model may also say so itself, without a tool having failed.
    named = '[[call escalate_to_human {"reason": "the booking system is down", "category": "tool_failure"}]]'
    other = await site.conversation(await site.say(named, session="session-2"))
    assert other.escalation_category == "tool_failure" and other.escalation_reason == "the agent asked: the booking system is down"


async def test_a_spent_budget_escalates_where_a_human_can_answer(site: Site, settings: Settings, fake_llm: FakeLLM) -> None:
    await budget.set_budget(site.db, site.acme, usd=0.0005, alerts=[80], action="block", downgrade_model=None, settings=settings,
                            actor="test")  # fmt: skip
    await meter(site.db, site.acme.id, Decimal("0.001"))  # spent already
    # Without an escalation target nobody could answer: the person hears the agent is unavailable, nothing escalates.
    lone = await site.conversation(await site.say("are you there?"))
    assert lone.status == "open" and lone.escalation_category is None
    await update_settings(site.db, site.acme, escalation_target="slack:C0HUMANS", allowed_hosts=None, actor="test")
    conversation = await site.conversation(await site.say("hello?", session="session-2"))
    assert conversation.status == "escalated" and conversation.escalation_category == "budget"
    assert (conversation.escalation_reason or "").startswith("the monthly LLM budget is spent")
    assert fake_llm.requests == []  # the model was never asked
    async with site.db.tenant(tenant_id=site.acme.id) as session:
        reply = await session.scalar(select(Message).where(Message.conversation_id == conversation.id, Message.direction == "out"))
    assert reply is not None and reply.text == settings.budget.unavailable and reply.kind == "notice"


async def test_categories_are_listed_by_the_cli(site: Site, config_path: Path) -> None:
    site.ava = await update_agent(site.db, site.acme, "Ava", changes={"escalation_rules": ["refund"]}, actor="test")
    conversation_id = await site.say("refund please")
    listed = konstruct_in_process("conversation", "list", "--tenant", "acme", "--escalated", "--json", config=config_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["id"], r["category"]) for r in rows] == [(str(conversation_id), "rule")]
    table = konstruct_in_process("conversation", "list", "--tenant", "acme", config=config_path)
    assert "category" in table.stdout and "rule" in table.stdout


# -- conversation show --


async def test_conversation_show_prints_the_transcript_and_audits_the_reading(site: Site, config_path: Path) -> None:
    await site.say("what are your hours?")
    site.ava = await update_agent(site.db, site.acme, "Ava", changes={"escalation_rules": ["manager"]}, actor="test")
    conversation_id = await site.say("I want a [bold]manager[/bold]")
    short = str(conversation_id)[:8]
    shown = konstruct_in_process("conversation", "show", short, "--tenant", "acme", config=config_path)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert any("status" in line and "escalated" in line for line in lines)
    assert any("rule: rule 'manager' fired" in line for line in lines), shown.stdout
    said = [line for line in lines if "(person)" in line or "(agent)" in line or "(notice)" in line]
    assert len(said) == 4, shown.stdout
    assert "pat (person): what are your hours?" in said[0] and "Ava (agent): [fake-model] You said: what are your hours?" in said[1]
    assert "pat (person): I want a [bold]manager[/bold]" in said[2]  # what people write is never taken for markup
    assert "Ava (notice)" in said[3] and site.pipeline.settings.agent.handoff in said[3]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", said[0])

    as_json = konstruct_in_process("conversation", "show", str(conversation_id), "--tenant", "acme", "--json", config=config_path)
    data = json.loads(as_json.stdout)
    assert data["id"] == str(conversation_id) and data["category"] == "rule" and data["status"] == "escalated"
    assert [(m["role"], m["who"]) for m in data["messages"]] == [("person", "pat"), ("agent", "Ava"), ("person", "pat"), ("notice", "Ava")]
    assert data["messages"][1]["status"] == "sent" and data["messages"][1]["model"] and data["earlier"] is False
    latest = json.loads(
        konstruct_in_process("conversation", "show", short, "--tenant", "acme", "--json", "--limit", "1", config=config_path).stdout
    )
    assert [m["role"] for m in latest["messages"]] == ["notice"] and latest["earlier"] is True
    viewed = [e for e in await audit.events(site.db, site.acme.id) if e.action == "conversation.viewed"]
    assert len(viewed) == 3 and {e.target for e in viewed} == {str(conversation_id)} and viewed[0].detail["via"] == "cli"


async def test_conversation_show_refuses_another_tenants_user_and_unknown_ids(site: Site, config_path: Path) -> None:
    conversation_id = await site.say("my address is 1 Secret Lane")
    for slug, email, role in (("globex", "gil@globex.test", "customer_admin"), ("acme", "olga@acme.test", "customer_operator")):
        user = await create_user(site.db, email=email, name=email, password=PASSWORD, platform_admin=False, actor="test")
        tenant = site.globex if slug == "globex" else site.acme
        async with site.db.tenant(tenant_id=tenant.id) as session:
            await add_member(session, tenant.id, user, role, actor="test")
    refused = konstruct_in_process("--as", "gil@globex.test", "conversation", "show", str(conversation_id), "--tenant", "acme",
                                   config=config_path)  # fmt: skip
    assert refused.returncode == PermissionDenied.exit_code and "Secret Lane" not in refused.stdout + refused.stderr
    assert (
        len(refused.stderr.strip().splitlines()) == 1 and "no role in tenant acme" in refused.stderr and "Traceback" not in refused.stderr
    )
    # Their own tenant's id space does not have it either (row-level security): the same one line as for any unknown id.
    theirs = konstruct_in_process("--as", "gil@globex.test", "conversation", "show", str(conversation_id), "--tenant", "globex",
                                  config=config_path)  # fmt: skip
    assert theirs.returncode == 1 and len(theirs.stderr.strip().splitlines()) == 1 and "has no conversation" in theirs.stderr
    unknown = konstruct_in_process("conversation", "show", "0123abcd", "--tenant", "acme", config=config_path)
    assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1 and "has no conversation '0123abcd'" in unknown.stderr
    bad = konstruct_in_process("conversation", "show", "nope", "--tenant", "acme", config=config_path)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "not a conversation id" in bad.stderr
    # A customer operator of the tenant may read it.
    operator = konstruct_in_process("--as", "olga@acme.test", "conversation", "show", str(conversation_id), "--tenant", "acme",
                                    config=config_path)  # fmt: skip
    assert operator.returncode == 0 and "1 Secret Lane" in operator.stdout
    viewed = [e for e in await audit.events(site.db, site.acme.id) if e.action == "conversation.viewed"]
    assert [e.actor for e in viewed] == ["user:olga@acme.test"]


# -- the transcript page --


class Browser:
    """An in-process client keeping cookies as a browser does on loopback (Secure cookies are sent over http there)."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http, self.jar = http, dict[str, str]()

    async def request(self, method: str, url: str, data: dict[str, str] | None = None) -> httpx.Response:
        headers = {"Accept": "text/html", **({"Cookie": "; ".join(f"{k}={v}" for k, v in self.jar.items())} if self.jar else {})}
        response = await self.http.request(method, url, headers=headers, data=data)
        for header in response.headers.get_list("set-cookie"):
            name, _, rest = header.partition("=")
            if "max-age=0" in header.lower():
                self.jar.pop(name, None)
            else:
                self.jar[name] = rest.split(";", 1)[0]
        return response

    async def sign_in(self, email: str) -> None:
        form = await self.request("GET", "/login")
        signed = await self.request("POST", "/login", data={"csrf": csrf_of(form.text), "email": email, "password": PASSWORD})
        assert signed.status_code == 303, signed.text


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page
    return found[1]


async def test_the_transcript_page_for_the_tenants_operator_and_403_for_another_tenant(site: Site, settings: Settings) -> None:
    site.ava = await update_agent(site.db, site.acme, "Ava", changes={"escalation_rules": ["lawyer"]}, actor="test")
    await site.say("hello <b>there</b>")
    conversation_id = await site.say("my lawyer will call")
    people = (("olga@acme.test", site.acme, "customer_operator"), ("gil@globex.test", site.globex, "customer_admin"))
    for email, tenant, role in people:
        user = await create_user(site.db, email=email, name=email, password=PASSWORD, platform_admin=False, actor="test")
        async with site.db.tenant(tenant_id=tenant.id) as session:
            await add_member(session, tenant.id, user, role, actor="test")
    await create_user(site.db, email="root@x.test", name="Root", password=PASSWORD, platform_admin=True, actor="test")
    url = f"/tenants/acme/conversations/{conversation_id}"
    async with gateway_in_process(settings) as http:
        olga = Browser(http)
        assert (await olga.request("GET", url)).headers["location"] == "/login"  # signed-in users only
        await olga.sign_in("olga@acme.test")
        status = await olga.request("GET", "/tenants/acme")
        assert status.status_code == 200 and f'href="{url}"' in status.text and "lawyer" in status.text
        page = await olga.request("GET", url)
        assert page.status_code == 200, page.text
        assert "hello &lt;b&gt;there&lt;/b&gt;" in page.text and "<b>there</b>" not in page.text  # escaped, never markup
        assert "my lawyer will call" in page.text and "[fake-model] You said: hello" in page.text
        assert "rule &#39;lawyer&#39; fired" in page.text and "<b>rule</b>" in page.text and "<script" not in page.text
        assert "Viewing as a tenant" not in page.text
        assert (await olga.request("GET", f"/tenants/acme/conversations/{uuid.uuid4()}")).status_code == 404
        assert (await olga.request("GET", "/tenants/acme/conversations/not-an-id")).status_code == 404

        gil = Browser(http)
        await gil.sign_in("gil@globex.test")
        refused = await gil.request("GET", url)
        assert refused.status_code == 403 and "lawyer" not in refused.text and "hello" not in refused.text
        # Under their own tenant's address the conversation does not exist (row-level security): nothing to probe.
        other = await gil.request("GET", f"/tenants/globex/conversations/{conversation_id}")
        assert other.status_code == 404 and "lawyer" not in other.text

        root = Browser(http)
        await root.sign_in("root@x.test")
        home = await root.request("GET", "/")
        started = await root.request(
            "POST", "/impersonate", data={"csrf": csrf_of(home.text), "tenant": "acme", "reason": "ticket 77 about a transcript"}
        )
        assert started.status_code == 303
        seen = await root.request("GET", url)
        assert seen.status_code == 200 and "Viewing as a tenant" in seen.text and "ticket 77" in seen.text and "my lawyer" in seen.text
        assert (await root.request("GET", f"/tenants/globex/conversations/{conversation_id}")).status_code == 403
    viewed = [e for e in await audit.events(site.db, site.acme.id) if e.action == "conversation.viewed"]
    assert [(e.actor, e.detail["via"]) for e in viewed] == [
        ("user:olga@acme.test", "web"),
        ("user:root@x.test viewing as a tenant", "web"),
    ]
