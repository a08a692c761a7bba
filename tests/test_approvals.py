"""A human's approval before a tool call: the turn pauses (its inbox row `waiting`, the worker slot free), the request goes
where the approver is, and a decision resumes the turn on any worker, exactly once.

Most tests run the pipeline in this process on a database of their own (the real gateway in-process over ASGI for
signed Slack clicks and WhatsApp webhooks, the fake Slack Web API, the fake Graph API, the fake LLM calling tools in
OpenAI's wire format). Where a process is what matters — a worker SIGKILLed between the request and the click, the
terminal chat that needs a live worker — the module shares one real worker.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import URL

from konstruct import approvals, audit
from konstruct.agent.agents import AgentInfo, create_agent, update_agent
from konstruct.agent.pipeline import Pipeline
from konstruct.agent.tools.policy import ASK, Policy, default_policy, parse_assignments, parse_policy
from konstruct.agent.tools.registry import Tool
from konstruct.channels import connections
from konstruct.channels.registry import channels
from konstruct.config import Settings, load_settings
from konstruct.db.engine import Database
from konstruct.db.models import InboundMessage as InboxRow
from konstruct.db.models import Message, ToolApproval
from konstruct.db.urls import resolve_urls
from konstruct.errors import ValidationError
from konstruct.inbox import accept
from konstruct.messaging import InboundMessage
from konstruct.tenancy.tenants import TenantInfo, create_tenant, update_settings
from konstruct.tenancy.users import add_member, create_user
from konstruct.worker.queue import Queue, make_queue
from tests.conftest import write_config
from tests.fakes import whatsapp as wa
from tests.fakes.llm import FakeLLM
from tests.fakes.slack import FakeSlack, sign
from tests.fakes.whatsapp import FakeGraph
from tests.helpers import Proc, gateway_in_process, konstruct_in_process, wait_until
from tests.shared import SharedWorker, shared_worker, unique_slug

APP_SECRET = "distributed-app-signing-secret"
BOT, PERSON, OTHER, OPERATOR, DM, OPS = "U0000000BOT", "U0000000001", "U0000000002", "U00000000OP", "D0000000001", "C0000000OPS"
FORM = "application/x-www-form-urlencoded"
CALC = '[[call calculator {"expression": "6*7"}]]'
WA_TOKEN, WA_SECRET, WA_PERSON = "EAAG-test-token", "wa-app-secret", "15551234567"


@pytest.fixture(scope="module")
def fake_slack() -> Iterator[FakeSlack]:
    fake = FakeSlack().start()
    fake.retry_after = 0
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def fake_graph() -> Iterator[FakeGraph]:
    fake = FakeGraph().start()
    yield fake
    fake.stop()


def sections(slack: FakeSlack, graph: FakeGraph, **approval: object) -> dict[str, dict[str, object]]:
    return {
        "slack": {"api_url": slack.url, "signing_secret": APP_SECRET, "stream": False},
        "whatsapp": {"graph_url": graph.url, "recipient_interval": 0.0, "retry_backoff": 0.05},
        "approvals": {"check_interval": 0.2, **approval},
    }


# -- in-process: the pipeline, the gateway over ASGI, a database per test --


@dataclass
class Site:
    settings: Settings
    db: Database
    queue: Queue
    pipeline: Pipeline
    tenant: TenantInfo
    agent: AgentInfo
    team: str
    secret: str
    http: httpx.AsyncClient  # the gateway, in-process

    async def process(self, inbound_id: uuid.UUID) -> str | None:
        return await self.pipeline.process(tenant_id=self.tenant.id, inbound_id=inbound_id)

    async def inbox_status(self, inbound_id: uuid.UUID) -> str:
        async with self.db.tenant(tenant_id=self.tenant.id) as session:
            return str(await session.scalar(select(InboxRow.status).where(InboxRow.id == inbound_id)))

    async def reply(self, inbound_id: uuid.UUID) -> str | None:
        async with self.db.tenant(tenant_id=self.tenant.id) as session:
            return await session.scalar(select(Message.text).where(Message.inbound_id == inbound_id, Message.direction == "out"))

    async def approval(self, inbound_id: uuid.UUID) -> ToolApproval:
        async with self.db.tenant(tenant_id=self.tenant.id) as session:
            row = await session.scalar(
                select(ToolApproval).where(ToolApproval.inbound_id == inbound_id).order_by(ToolApproval.requested_at)
            )
        assert row is not None
        return row

    async def queued(self, inbound_id: uuid.UUID) -> int:
        async with self.db.system() as session:
            return int(await session.scalar(text("select count(*) from huey_task where inbound_id = :i"), {"i": inbound_id}) or 0)

    async def slack_message(self, text_: str, *, user: str = PERSON) -> uuid.UUID:
        """A DM from `user` in the workspace, stored as the Slack events endpoint stores one."""
        ts = f"{time.time():.6f}"
        payload = {"team_id": self.team, "channel": DM, "channel_type": "im", "ts": ts, "thread_ts": ts}
        stored = await accept(self.db, self.queue, InboundMessage(self.tenant.id, self.agent.id, "slack", f"{DM}:{ts}", f"{DM}:{ts}",
                                                                  user, text_, payload))  # fmt: skip
        assert stored is not None
        return stored.id

    async def click(self, request: dict[str, Any], *, approve: bool = True, user: str = PERSON, secret: str | None = "") -> httpx.Response:
        """Click Approve (or Deny) on the request message as Slack posts it to /slack/interactive, signed (or not)."""
        actions = next(b for b in request["blocks"] if b["type"] == "actions")
        button = actions["elements"][0 if approve else 1]
        payload = {
            "type": "block_actions", "user": {"id": user, "team_id": self.team}, "team": {"id": self.team},
            "container": {"type": "message", "message_ts": request["ts"], "channel_id": request["channel"]},
            "channel": {"id": request["channel"]}, "trigger_id": "1.2.3", "api_app_id": "A0000000001",
            "actions": [{"type": "button", "action_id": button["action_id"], "block_id": actions["block_id"], "value": button["value"],
                         "text": button["text"], "action_ts": f"{time.time():.6f}"}],
        }  # fmt: skip
        body = urlencode({"payload": json.dumps(payload)}).encode()
        key = self.secret if secret == "" else secret
        headers = {**sign(body, key), "Content-Type": FORM} if key else {"Content-Type": FORM}
        return await self.http.post("/slack/interactive", content=body, headers=headers)


def slack_requests(fake: FakeSlack, channel: str) -> list[dict[str, Any]]:
    """The approval requests the app posted in a channel (messages with an actions block), with their channel."""
    found = [m for m in fake.messages_in(channel) if any(b.get("type") == "actions" for b in m.get("blocks") or [])]
    return [{**m, "channel": channel} for m in found]


@pytest.fixture
async def site(tmp_path: Path, database_url: str, fake_llm: FakeLLM, fake_slack: FakeSlack, fake_graph: FakeGraph) -> AsyncIterator[Site]:
    config = write_config(tmp_path, database_url, fake_llm.url, **sections(fake_slack, fake_graph, expire_after=0.02))
    settings = load_settings(config)
    db = Database(settings)
    queue = make_queue(settings, resolve_urls(settings))
    tenant = await create_tenant(db, name="Acme", slug=unique_slug("acme"), actor="test")
    agent = await create_agent(db, tenant, name="Ava", role="Support", persona="Brief.", model=None, actor="test")
    agent = await update_agent(db, tenant, "Ava", changes={"tools": ["calculator"], "tool_policy": {"calculator": "ask"}}, actor="test")
    team, token, secret = "T" + uuid.uuid4().hex[:10].upper(), f"xoxb-{uuid.uuid4().hex[:12]}", f"signing-{uuid.uuid4().hex}"
    fake_slack.add_token(token, team_id=team, team="Acme HQ", user_id=BOT)
    await connections.connect(db, settings, tenant, kind="slack", external_id=team, name=team, mode="single",
                              credentials={"bot_token": token, "signing_secret": secret}, details={"bot_user_id": BOT},
                              default_agent=None, actor="test")  # fmt: skip
    pipeline = Pipeline(settings, db, channels(settings, db), worker_id="test-worker")
    try:
        async with gateway_in_process(settings) as http:
            yield Site(settings, db, queue, pipeline, tenant, agent, team, secret, http)
    finally:
        for channel in pipeline.channels.values():
            close = getattr(channel, "close", None)
            if close is not None:
                await close()
        queue.close()
        await db.dispose()


async def test_a_double_click_resumes_the_turn_once(site: Site, fake_slack: FakeSlack, fake_llm: FakeLLM) -> None:
    inbound = await site.slack_message(f"what is six times seven {CALC}")
    assert await site.process(inbound) == "waiting"
    assert await site.inbox_status(inbound) == "waiting" and await site.queued(inbound) == 1  # only the first doorbell
    [request] = slack_requests(fake_slack, DM)
    assert request["thread_ts"] is not None  # in the thread the question is answered in
    asked = len(fake_llm.requests)
    first, second = await site.click(request), await site.click(request)
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    assert await site.inbox_status(inbound) == "received"
    assert await site.queued(inbound) == 2  # rung once more for the decision, not twice
    assert await site.process(inbound) == "replied"
    assert await site.process(inbound) is None  # the second doorbell finds it answered
    assert (await site.reply(inbound) or "").endswith("Tool said: 42")
    assert len(fake_llm.requests) == asked + 1  # the loop went on from the stored state: compose was not redone
    row = await site.approval(inbound)
    assert (row.status, row.decided_by) == ("approved", f"slack:{PERSON}")
    events = [e.action for e in await audit.events(site.db, site.tenant.id) if e.action.startswith(("approval.", "tool."))]
    assert events == ["approval.requested", "approval.approved", "tool.called"]
    # The request message says who decided (off the interaction's path).
    await wait_until(lambda: _text_of(fake_slack, DM, request["ts"]), lambda t: "Approved by" in t, 5, "the request updated")


async def _text_of(fake: FakeSlack, channel: str, ts: str) -> str:
    return next((m["text"] for m in fake.messages_in(channel) if m["ts"] == ts), "")


async def test_an_unsigned_or_foreign_click_is_refused(site: Site, fake_slack: FakeSlack) -> None:
    inbound = await site.slack_message(f"compute {CALC}")
    assert await site.process(inbound) == "waiting"
    [request] = slack_requests(fake_slack, DM)
    assert (await site.click(request, secret=None)).status_code == 401
    assert (await site.click(request, secret="not-the-workspace-secret")).status_code == 401
    refused = await site.click(request, user=OTHER)  # signed, by someone else in the workspace
    assert refused.status_code == 403 and "only the person" in refused.json()["error"]
    assert (await site.approval(inbound)).status == "pending" and await site.inbox_status(inbound) == "waiting"
    denied = await site.click(request, approve=False)
    assert denied.status_code == 200
    assert await site.process(inbound) == "replied"
    assert "denied" in (await site.reply(inbound) or "")  # the model was told; the tool never ran
    assert [e for e in await audit.events(site.db, site.tenant.id) if e.action == "tool.called"] == []


async def test_an_operator_approves_in_the_escalation_channel_and_the_person_may_not(site: Site, fake_slack: FakeSlack) -> None:
    await update_settings(site.db, site.tenant, escalation_target=f"slack:{OPS}", allowed_hosts=None, actor="test")
    await update_agent(site.db, site.tenant, "Ava", changes={"tool_policy": {"calculator": "ask:operators"}}, actor="test")
    email = f"op-{uuid.uuid4().hex[:6]}@acme.test"
    user = await create_user(site.db, email=email, name="Olga", password=None, platform_admin=False, actor="test")
    async with site.db.tenant(tenant_id=site.tenant.id) as session:
        await add_member(session, site.tenant.id, user, "customer_operator", actor="test")
    fake_slack.add_user(OPERATOR, email, team_id=site.team, name="olga")
    fake_slack.add_user(OTHER, "stranger@elsewhere.test", team_id=site.team)
    inbound = await site.slack_message(f"compute {CALC}")
    assert await site.process(inbound) == "waiting"
    assert slack_requests(fake_slack, DM) == []  # the person is not asked
    [request] = slack_requests(fake_slack, OPS)
    assert "an operator" in json.dumps(request["blocks"])
    assert (await site.click(request, user=PERSON)).status_code == 403  # the person in the conversation may not
    assert (await site.click(request, user=OTHER)).status_code == 403  # nor a Slack user who is nobody of the tenant's
    assert (await site.approval(inbound)).status == "pending"
    assert (await site.click(request, user=OPERATOR)).status_code == 200
    assert (await site.approval(inbound)).decided_by == f"slack:{OPERATOR}"
    assert await site.process(inbound) == "replied"
    assert (await site.reply(inbound) or "").endswith("Tool said: 42")


async def test_an_undecided_call_expires_denied_and_the_model_is_told(site: Site, fake_slack: FakeSlack) -> None:
    inbound = await site.slack_message(f"compute {CALC}")
    assert await site.process(inbound) == "waiting"
    # The worker's expiry loop runs exactly this; the setting is 0.02 minutes here.
    expired = await wait_until(lambda: approvals.expire_due(site.db, site.queue), lambda n: n == 1, 10, "the approval to expire")
    assert expired == 1
    assert await approvals.expire_due(site.db, site.queue) == 0  # once
    row = await site.approval(inbound)
    assert (row.status, row.decided_by) == ("expired", approvals.EXPIRY_ACTOR)
    [request] = slack_requests(fake_slack, DM)
    assert (await site.click(request)).status_code == 200  # a late click changes nothing
    assert (await site.approval(inbound)).status == "expired"
    assert await site.process(inbound) == "replied"
    assert "nobody approved this call of calculator" in (await site.reply(inbound) or "")


async def test_a_whatsapp_button_reply_decides(site: Site, fake_graph: FakeGraph) -> None:
    number = str(uuid.uuid4().int)[:15]
    fake_graph.add_number(number, WA_TOKEN)
    await connections.connect(site.db, site.settings, site.tenant, kind="whatsapp", external_id=number, name=number, mode="single",
                              credentials={"access_token": WA_TOKEN, "app_secret": WA_SECRET, "verify_token": "v"}, details={},
                              default_agent=None, actor="test")  # fmt: skip
    message = wa.text(WA_PERSON, f"compute {CALC}")
    payload = {"phone_number_id": number, "wa_id": WA_PERSON, "wamid": message["id"], "timestamp": int(time.time())}
    stored = await accept(site.db, site.queue, InboundMessage(site.tenant.id, site.agent.id, "whatsapp", message["id"],
                                                              f"{number}:{WA_PERSON}", WA_PERSON, message["text"]["body"], payload))  # fmt: skip
    assert stored is not None
    assert await site.process(stored.id) == "waiting"
    [request] = [s.body for s in fake_graph.sent if s.kind == "interactive" and s.phone_number_id == number]
    buttons = request["interactive"]["action"]["buttons"]
    assert [b["reply"]["title"] for b in buttons] == ["Approve", "Deny"]

    async def tap(who: str, button: dict[str, Any]) -> None:
        tapped = wa.webhook(number, messages=[wa.button_reply(who, button["reply"]["id"], button["reply"]["title"])])
        body = json.dumps(tapped).encode()
        response = await site.http.post("/whatsapp/webhook", content=body,
                                        headers={"Content-Type": "application/json", "X-Hub-Signature-256": wa.sign(body, WA_SECRET)})  # fmt: skip
        assert response.status_code == 200

    await tap("15550009999", buttons[0])  # someone else's tap decides nothing
    assert (await site.approval(stored.id)).status == "pending"
    await tap(WA_PERSON, buttons[0])
    assert (await site.approval(stored.id)).status == "approved"
    async with site.db.tenant(tenant_id=site.tenant.id) as session:  # the taps are decisions, not messages to answer
        assert await session.scalar(select(func.count()).select_from(InboxRow)) == 1
    assert await site.process(stored.id) == "replied"
    texts = [s.body["text"]["body"] for s in fake_graph.sent if s.kind == "text" and s.phone_number_id == number]
    assert texts and texts[-1].endswith("Tool said: 42")


async def test_a_denied_tool_is_never_offered(site: Site, fake_llm: FakeLLM) -> None:
    await update_agent(site.db, site.tenant, "Ava", changes={"tool_policy": {"calculator": "deny"}}, actor="test")
    inbound = await site.slack_message(f"compute {CALC}")
    assert await site.process(inbound) == "replied"
    assert "tools" not in fake_llm.requests[-1].body
    assert "You said" in (await site.reply(inbound) or "")


def test_policies_parse_and_default_by_the_tool() -> None:
    assert parse_policy("ask:operators") == Policy(ASK, "operators") and parse_policy("ASK") == Policy(ASK, "person")
    for bad in ("maybe", "allow:operators", "ask:everyone"):
        with pytest.raises(ValidationError):
            parse_policy(bad)
    assert parse_assignments(["web_fetch=ask:operators", "calculator=default"]) == {"web_fetch": "ask:operators", "calculator": None}
    with pytest.raises(ValidationError):
        parse_assignments(["web_fetch"])

    async def run(args: dict[str, Any], ctx: Any) -> str:
        return ""

    schema: dict[str, Any] = {"type": "object", "properties": {}}
    assert default_policy(Tool("lookup", "Reads.", schema, run, origin="mcp:shop", read_only=True)).mode == "allow"
    assert default_policy(Tool("refund", "Writes.", schema, run, origin="mcp:shop")).mode == "ask"
    assert default_policy(Tool("calc", "Built in.", schema, run)).mode == "allow"


# -- CLI --


async def test_approval_cli_lists_approves_denies_and_checks_roles(site: Site, fake_slack: FakeSlack, tmp_path: Path) -> None:
    config = site.settings.config_path
    assert config is not None
    first, second = await site.slack_message(f"one {CALC}"), await site.slack_message(f"two {CALC}")
    assert await site.process(first) == "waiting" and await site.process(second) == "waiting"
    slug = site.tenant.slug
    listed = konstruct_in_process("approval", "list", "--tenant", slug, "--json", config=config)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["tool"] for r in rows] == ["calculator", "calculator"] and {r["status"] for r in rows} == {"pending"}
    assert rows[0]["arguments"] == {"expression": "6*7"}
    ids = {(await site.approval(i)).id: i for i in (first, second)}
    by_inbound = {i: str(a) for a, i in ids.items()}
    approved = konstruct_in_process("approval", "approve", by_inbound[first][:8], "--tenant", slug, "--json", config=config)
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["status"] == "approved" and json.loads(approved.stdout)["changed"] is True
    again = konstruct_in_process("approval", "deny", by_inbound[first], "--tenant", slug, config=config)
    assert again.returncode == 0 and "already approved" in again.stdout
    denied = konstruct_in_process("approval", "deny", by_inbound[second], "--tenant", slug, config=config)
    assert denied.returncode == 0 and "denied" in denied.stdout
    assert await site.process(first) == "replied" and await site.process(second) == "replied"
    assert (await site.reply(first) or "").endswith("Tool said: 42") and "denied" in (await site.reply(second) or "")
    table = konstruct_in_process("approval", "list", "--tenant", slug, "--status", "all", config=config)
    assert table.returncode == 0 and "approved" in table.stdout and "denied" in table.stdout
    # Someone with no role in the tenant: one red line, exit code 3, nothing decided.
    email = f"out-{uuid.uuid4().hex[:6]}@else.test"
    assert await create_user(site.db, email=email, name="Out", password=None, platform_admin=False, actor="test")
    refused = konstruct_in_process("--as", email, "approval", "list", "--tenant", slug, config=config)
    assert refused.returncode == 3 and "has no role in tenant" in refused.stderr and "Traceback" not in refused.stderr
    wrong = konstruct_in_process("approval", "approve", "nothex!!", "--tenant", slug, config=config)
    assert wrong.returncode == 1 and "not an approval id" in wrong.stderr
    assert konstruct_in_process("approval", "--help").returncode == 0
    policy = konstruct_in_process("agent", "update", "Ava", "--tenant", slug, "--tool-policy", "calculator=sometimes", config=config)
    assert policy.returncode == 1 and "not a tool policy" in policy.stderr
    policy = konstruct_in_process("agent", "update", "Ava", "--tenant", slug, "--tool-policy", "calculator=ask:operators", "--json",
                                  config=config)  # fmt: skip
    assert policy.returncode == 0, policy.stderr
    assert json.loads(policy.stdout)["settings"]["tool_policy"] == {"calculator": "ask:operators"}


# -- real processes: a worker SIGKILLed between the request and the click; the terminal's y/n --


@pytest.fixture(scope="module")
def worker(
    pg_server: URL, template_db: str, tmp_path_factory: pytest.TempPathFactory, fake_llm_server: FakeLLM, fake_slack: FakeSlack,
    fake_graph: FakeGraph,
) -> Iterator[SharedWorker]:  # fmt: skip
    path = tmp_path_factory.mktemp("approvals")
    with shared_worker(pg_server, template_db, path, fake_llm_server.url, **sections(fake_slack, fake_graph)) as shared:
        yield shared


@pytest.fixture
async def worker_site(worker: SharedWorker, fake_slack: FakeSlack, fake_graph: FakeGraph) -> AsyncIterator[Site]:
    settings = load_settings(worker.config)
    db = Database(settings)
    queue = make_queue(settings, resolve_urls(settings))
    tenant = await create_tenant(db, name="Acme", slug=unique_slug("acme"), actor="test")
    await create_agent(db, tenant, name="Ava", role="Support", persona="Brief.", model=None, actor="test")
    agent = await update_agent(db, tenant, "Ava", changes={"tools": ["calculator"], "tool_policy": {"calculator": "ask"}}, actor="test")
    team, token, secret = "T" + uuid.uuid4().hex[:10].upper(), f"xoxb-{uuid.uuid4().hex[:12]}", f"signing-{uuid.uuid4().hex}"
    fake_slack.add_token(token, team_id=team, team="Acme HQ", user_id=BOT)
    await connections.connect(db, settings, tenant, kind="slack", external_id=team, name=team, mode="single",
                              credentials={"bot_token": token, "signing_secret": secret}, details={"bot_user_id": BOT},
                              default_agent=None, actor="test")  # fmt: skip
    try:
        async with gateway_in_process(settings) as http:
            yield Site(settings, db, queue, Pipeline(settings, db, {}, worker_id="unused"), tenant, agent, team, secret, http)
    finally:
        queue.close()
        await db.dispose()


async def test_a_signed_click_resumes_the_turn_after_the_worker_was_killed(
    worker: SharedWorker, worker_site: Site, fake_slack: FakeSlack
) -> None:
    site = worker_site
    earlier = len(slack_requests(fake_slack, DM))  # other tests' requests in the same DM of the fake Slack
    inbound = await site.slack_message(f"what is six times seven {CALC}")
    await wait_until(lambda: site.inbox_status(inbound), lambda s: s == "waiting", 30, "the turn to wait for approval")
    request = (await wait_until(lambda: _requests(fake_slack, earlier), bool, 10, "the request in the thread"))[0]
    worker.worker.kill()  # SIGKILL, while the turn waits
    worker.worker = Proc("worker", ["worker"], config=worker.config, log_dir=worker.config.parent)
    worker.worker.wait_for_log(" ready: ")
    assert await site.inbox_status(inbound) == "waiting"  # the new worker's sweep did not take it for lost
    assert (await site.click(request, secret=None)).status_code == 401
    assert (await site.click(request)).status_code == 200
    await wait_until(lambda: site.inbox_status(inbound), lambda s: s == "replied", 30, "the resumed turn to be answered")
    assert (await site.reply(inbound) or "").endswith("Tool said: 42")
    shown = [m for m in fake_slack.messages_in(DM) if m.get("thread_ts") == request["thread_ts"] and "Tool said" in m.get("text", "")]
    assert len(shown) == 1, worker.worker.log()[-3000:]


async def _requests(fake: FakeSlack, earlier: int) -> list[dict[str, Any]]:
    return slack_requests(fake, DM)[earlier:]


def test_the_terminal_asks_yes_or_no(worker: SharedWorker, worker_site: Site) -> None:
    slug = worker_site.tenant.slug
    yes = konstruct_in_process("chat", "--tenant", slug, "--agent", "Ava", "--new", "-m", f"compute {CALC}", "--json",
                               config=worker.config, input="y\n")  # fmt: skip
    assert yes.returncode == 0, yes.stderr
    assert json.loads(yes.stdout)["reply"].endswith("Tool said: 42")
    assert "wants to call calculator" in yes.stderr and "Allow it? [y/N]" in yes.stderr
    no = konstruct_in_process("chat", "--tenant", slug, "--agent", "Ava", "--new", "-m", f"compute {CALC}", config=worker.config,
                              input="n\n")  # fmt: skip
    assert no.returncode == 0, no.stderr
    assert "denied" in no.stdout


def test_the_isolation_seed_knows_the_table() -> None:
    """tool_approvals is tenant data: tests/test_isolation.py seeds a row (its catalog check demands one)."""
    source = (Path(__file__).parent / "test_isolation.py").read_text()
    assert "ToolApproval" in source
