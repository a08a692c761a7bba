"""MCP servers' tools for agents, against real MCP servers the tests start with the SDK's own server: streamable HTTP
on loopback (tests/fakes/mcp_server.py) and stdio (tests/fakes/mcp_stdio.py). The fake LLM calls the tools in the
OpenAI wire format; the turns run through the real pipeline in-process, the commands through the real CLI."""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from konstruct import inbox
from konstruct.agent import mcp_servers
from konstruct.agent.agents import AgentInfo, create_agent, get_agent, update_agent
from konstruct.agent.pipeline import Pipeline
from konstruct.agent.tools import mcp_client
from konstruct.channels.registry import channels
from konstruct.config import McpSettings, Settings
from konstruct.db.engine import Database
from konstruct.db.models import AuditEvent, Message, ToolApproval
from konstruct.db.urls import resolve_urls
from konstruct.errors import ValidationError
from konstruct.messaging import InboundMessage
from konstruct.tenancy.tenants import TenantInfo, create_tenant, get_tenant
from konstruct.tenancy.users import add_member, create_user
from konstruct.worker.queue import make_queue
from tests.conftest import write_config
from tests.fakes.llm import FakeLLM
from tests.fakes.mcp_server import LoopbackMcp
from tests.fakes.mcp_stdio import LONG_NAME
from tests.helpers import cli_env, konstruct_in_process

STDIO = (sys.executable, str(Path(__file__).parent / "fakes" / "mcp_stdio.py"))
TOKEN = "shop-token-9f8e7d6c5b4a"


@pytest.fixture(scope="module")
def shop() -> Iterator[LoopbackMcp]:
    fake = LoopbackMcp().start()
    yield fake
    fake.stop()


@pytest.fixture
def config_path(tmp_path: Path, database_url: str, fake_llm: FakeLLM) -> Path:
    return write_config(tmp_path, database_url, fake_llm.url, mcp={"allow_private": True, "connect_seconds": 20})


@pytest.fixture
async def site(db: Database, settings: Settings, fake_llm: FakeLLM) -> AsyncIterator[tuple[Pipeline, TenantInfo, AgentInfo]]:
    tenant = await create_tenant(db, name="Acme", slug="acme", actor="test")
    agent = await create_agent(db, tenant, name="Ava", role="Support", persona="Brief.", model=None, actor="test")
    yield Pipeline(settings, db, channels(settings, db), worker_id="test-worker"), tenant, agent
    await mcp_client.close_pool()  # stdio servers stop, connections close


async def add(db: Database, settings: Settings, tenant: TenantInfo, spec: mcp_servers.ServerSpec) -> mcp_servers.ServerInfo:
    tools = await mcp_client.probe(mcp_servers.draft(spec, settings, tenant.id), settings)
    return await mcp_servers.save_server(db, settings, tenant, spec, actor="test", tools=tools)


async def ask(pipeline: Pipeline, tenant: TenantInfo, agent: AgentInfo, text: str) -> str:
    stored, state = await turn(pipeline, tenant, agent, text)
    assert state == "replied"
    async with pipeline.db.tenant(tenant_id=tenant.id) as session:
        reply = await session.scalar(select(Message.text).where(Message.inbound_id == stored, Message.direction == "out"))
    assert reply is not None
    return reply


async def turn(pipeline: Pipeline, tenant: TenantInfo, agent: AgentInfo, text: str) -> tuple[uuid.UUID, str | None]:
    """One person's message through the pipeline: its inbox id and the state the turn ended in."""
    queue = make_queue(pipeline.settings, resolve_urls(pipeline.settings))
    try:
        stored = await inbox.accept(
            pipeline.db, queue, InboundMessage(tenant.id, agent.id, "terminal", uuid.uuid4().hex, "session-1", "pat", text)
        )
    finally:
        queue.close()
    assert stored is not None
    return stored.id, await pipeline.process(tenant_id=tenant.id, inbound_id=stored.id)


def call(name: str, **arguments: object) -> str:
    return f"[[call {name} {json.dumps(arguments)}]]"


def test_tool_names_are_namespaced_sanitised_and_distinct() -> None:
    names = mcp_servers.exposed_names("shop", ["lookup_order", "get.status", "get_status", LONG_NAME, "Mixed-Case_1"])
    assert names["lookup_order"] == "shop__lookup_order" and names["Mixed-Case_1"] == "shop__Mixed-Case_1"
    assert names["get_status"] == "shop__get_status"  # unchanged names keep theirs; the changed look-alike is told apart
    assert names["get.status"].startswith("shop__get_status_") and names["get.status"] != names["get_status"]
    assert all(len(n) <= 64 and n.replace("_", "").replace("-", "").isalnum() for n in names.values())
    assert len(set(names.values())) == len(names) and names == mcp_servers.exposed_names("shop", list(reversed(names)))
    assert mcp_servers.server_of("shop__x") == "shop" and mcp_servers.server_of("shop") == "shop"
    assert mcp_servers.server_of("calculator") == "calculator" and mcp_servers.server_of("Bad Name") is None


async def test_a_call_round_trips_into_the_answer_over_one_reused_session(
    site: tuple[Pipeline, TenantInfo, AgentInfo], shop: LoopbackMcp, fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline, tenant, agent = site
    monkeypatch.setenv("SHOP_TOKEN", TOKEN)
    headers = mcp_servers.parse_assignments(["Authorization=Bearer $env:SHOP_TOKEN"], "header")
    server = await add(pipeline.db, pipeline.settings, tenant, mcp_servers.ServerSpec("shop", "http", shop.url, headers=headers))
    assert server.secret_hints == {"headers": {"Authorization": "…" + TOKEN[-4:]}}
    assert {t.exposed: t.read_only for t in server.tools}["shop__lookup_order"] is True
    await update_agent(
        pipeline.db, tenant, "Ava", changes={"tools": ["calculator", "shop"], "tool_policy": {"shop__refund": "allow"}}, actor="test"
    )
    before = shop.handshakes

    answer = await ask(pipeline, tenant, agent, "where is it? " + call("shop__lookup_order", order_id="42"))
    assert "Tool said: order 42: shipped, 2 items" in answer and shop.authorization == f"Bearer {TOKEN}"
    offered = {t["function"]["name"]: t["function"] for t in fake_llm.requests[0].body["tools"]}
    assert "calculator" in offered and offered["shop__lookup_order"]["parameters"]["required"] == ["order_id"]
    assert offered["shop__lookup_order"]["description"].startswith("Look up an order")
    answer = await ask(pipeline, tenant, agent, "refund it " + call("shop__refund", order_id="42", amount=5))
    assert "refunded 5.00 on order 42" in answer
    assert shop.handshakes == before + 1 and shop.calls[-2:] == ["lookup_order", "refund"]  # one session for both turns

    async with pipeline.db.tenant(tenant_id=tenant.id) as session:
        events = list(await session.scalars(select(AuditEvent).where(AuditEvent.action == "tool.called").order_by(AuditEvent.id)))
    assert [(e.target, e.detail["arguments"], e.detail["ok"]) for e in events] == [
        ("shop__lookup_order", {"order_id": "42"}, True), ("shop__refund", {"order_id": "42", "amount": 5}, True),
    ]  # fmt: skip
    assert all(isinstance(e.detail["ms"], int) for e in events)
    everything = json.dumps([e.detail for e in events]) + str(await mcp_servers.list_servers(pipeline.db, tenant))
    assert TOKEN not in everything  # the header is stored encrypted, never echoed


async def test_a_tool_that_changes_things_waits_for_approval_unless_the_agent_allows_it(
    site: tuple[Pipeline, TenantInfo, AgentInfo], shop: LoopbackMcp
) -> None:
    """An MCP tool its server does not mark read-only asks (the person) before it runs; a read-only one runs; the
    agent's tool_policy names a server's tool, and only one its server has."""
    pipeline, tenant, agent = site
    await add(pipeline.db, pipeline.settings, tenant, mcp_servers.ServerSpec("shop", "http", shop.url))
    await update_agent(pipeline.db, tenant, "Ava", changes={"tools": ["shop"]}, actor="test")
    calls = len(shop.calls)
    inbound_id, state = await turn(pipeline, tenant, agent, "refund " + call("shop__refund", order_id="9", amount=3))
    assert state == "waiting" and len(shop.calls) == calls  # paused before the call: nothing ran
    async with pipeline.db.tenant(tenant_id=tenant.id) as session:
        pending = list(await session.scalars(select(ToolApproval).where(ToolApproval.inbound_id == inbound_id)))
    assert [(a.tool, a.arguments, a.status, a.approver) for a in pending] == [
        ("shop__refund", {"order_id": "9", "amount": 3}, "pending", "person")
    ]
    assert "order 9: shipped" in await ask(pipeline, tenant, agent, call("shop__lookup_order", order_id="9"))  # read-only
    with pytest.raises(ValidationError, match="has no tool 'shop__nope'"):
        await update_agent(pipeline.db, tenant, "Ava", changes={"tool_policy": {"shop__nope": "allow"}}, actor="test")
    allowed = await update_agent(pipeline.db, tenant, "Ava", changes={"tool_policy": {"shop__refund": "allow"}}, actor="test")
    assert allowed.settings["tool_policy"] == {"shop__refund": "allow"}
    assert "refunded 3.00 on order 9" in await ask(pipeline, tenant, agent, call("shop__refund", order_id="9", amount=3))


async def test_a_slow_and_a_failing_server_become_tool_errors_and_it_reconnects(
    site: tuple[Pipeline, TenantInfo, AgentInfo], fake_llm: FakeLLM
) -> None:
    pipeline, tenant, agent = site
    flaky = LoopbackMcp().start()
    try:
        spec = mcp_servers.ServerSpec("shop", "http", flaky.url, timeout_seconds=0.5)
        await add(pipeline.db, pipeline.settings, tenant, spec)
        policy = {"shop__refund": "allow", "shop__fail": "allow"}  # they change things: asked for by default
        await update_agent(pipeline.db, tenant, "Ava", changes={"tools": ["shop__*"], "tool_policy": policy}, actor="test")
        answer = await ask(pipeline, tenant, agent, call("shop__slow", seconds=5))
        assert "error: MCP server shop did not answer slow within 0.5 seconds" in answer
        answer = await ask(pipeline, tenant, agent, call("shop__fail", reason="closed on Sundays"))
        assert "error: " in answer and "the shop refused: closed on Sundays" in answer
        answer = await ask(pipeline, tenant, agent, call("shop__big"))
        assert "[truncated: 100000 characters in all]" in answer and len(answer) < 8200
        handshakes = flaky.handshakes

        flaky.stop()  # the server goes away: the turn still gets its answer, with the tool's error
        answer = await ask(pipeline, tenant, agent, call("shop__refund", order_id="7", amount=1))
        assert "Tool said: error: " in answer and ("broke during the call" in answer or "could not connect" in answer)
        flaky.start()  # back: the next call reconnects
        answer = await ask(pipeline, tenant, agent, call("shop__refund", order_id="7", amount=1))
        assert "refunded 1.00 on order 7" in answer and flaky.handshakes == handshakes + 1
    finally:
        flaky.stop()


async def test_stdio_server_runs_with_a_clean_environment(
    site: tuple[Pipeline, TenantInfo, AgentInfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline, tenant, agent = site
    monkeypatch.setenv("KONSTRUCT_SOMETHING_SECRET", "do-not-leak")
    monkeypatch.setenv("ERP_KEY", "erp-key-123456")
    env = mcp_servers.parse_assignments(["ERP_KEY=$env:ERP_KEY"], "env")
    await add(pipeline.db, pipeline.settings, tenant, mcp_servers.ServerSpec("erp", "stdio", command=STDIO, env=env, agents=("Ava",)))
    await update_agent(pipeline.db, tenant, "Ava", changes={"tools": ["erp__env_keys", "erp__get_status"]}, actor="test")
    answer = await ask(pipeline, tenant, agent, call("erp__env_keys"))
    keys = set(json.loads(answer.split("Tool said: ", 1)[1]))
    assert "ERP_KEY" in keys and "PATH" in keys
    assert not {k for k in keys if k.startswith("KONSTRUCT") or k in ("PYTHONPATH", "VIRTUAL_ENV")}, keys
    assert keys <= {"ERP_KEY", "HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "LC_CTYPE"}
    assert "all good" in await ask(pipeline, tenant, agent, call("erp__get_status"))
    assert mcp_client.pool().opened == 1  # the same process served both turns


async def test_agent_tools_name_servers_or_tools_and_the_scope_holds(
    site: tuple[Pipeline, TenantInfo, AgentInfo], shop: LoopbackMcp
) -> None:
    pipeline, tenant, _ = site
    db, settings = pipeline.db, pipeline.settings
    await create_agent(db, tenant, name="Bob", role="Sales", persona="Brief.", model=None, actor="test")
    await add(db, settings, tenant, mcp_servers.ServerSpec("shop", "http", shop.url, agents=("Ava",)))
    for tools in (["shop"], ["shop__*"], ["shop__lookup_order", "calculator"]):
        assert (await update_agent(db, tenant, "Ava", changes={"tools": tools}, actor="test")).settings["tools"] == tools
    with pytest.raises(ValidationError, match="MCP server shop has no tool 'shop__nope'"):
        await update_agent(db, tenant, "Ava", changes={"tools": ["shop__nope"]}, actor="test")
    with pytest.raises(ValidationError, match="MCP server shop is not for agent Bob"):
        await update_agent(db, tenant, "Bob", changes={"tools": ["shop"]}, actor="test")
    with pytest.raises(ValidationError, match="unknown tool 'crm'"):
        await update_agent(db, tenant, "Ava", changes={"tools": ["crm"]}, actor="test")
    with pytest.raises(ValidationError, match="private or reserved address"):
        await mcp_servers.check_url(shop.url, settings.model_copy(update={"mcp": McpSettings(allow_private=False)}))
    assert await mcp_servers.remove_server(db, tenant, "shop", actor="test") == ["Ava"]
    assert (await get_agent(db, tenant, "Ava")).settings["tools"] == ["calculator"]


async def test_the_commands(
    config_path: Path, tmp_path: Path, database_url: str, fake_llm: FakeLLM, shop: LoopbackMcp, db: Database
) -> None:
    env = cli_env(SHOP_TOKEN=TOKEN)

    def run(*args: str, config: Path = config_path) -> tuple[int, str]:
        done = konstruct_in_process(*args, config=config, env=env)
        assert "Traceback" not in done.stderr and TOKEN not in done.stdout + done.stderr
        return done.returncode, done.stdout + done.stderr

    assert run("tenant", "create", "Acme")[0] == 0
    assert run("agent", "create", "-t", "acme", "-n", "Ava", "-r", "Support", "--persona", "Brief.")[0] == 0
    code, text = run("mcp", "add", "shop", "-t", "acme", "--url", shop.url, "--header", "Authorization=Bearer $env:SHOP_TOKEN", "--json")
    assert code == 0, text
    added = json.loads(text)
    assert added["headers"] == {"Authorization": "…" + TOKEN[-4:]} and len(added["tools"]) == 8
    code, text = run("mcp", "test", "shop", "-t", "acme")
    assert code == 0 and "connected" in text and "shop__lookup_order" in text and "Look up an order" in text, text
    tested = json.loads(run("mcp", "test", "shop", "-t", "acme", "--json")[1])
    assert tested["ok"] and {t["exposed"]: t["read_only"] for t in tested["tools"]}["shop__refund"] is False
    code, text = run("mcp", "list", "-t", "acme")
    assert code == 0 and "shop" in text and "Authorization=…" in text
    assert json.loads(run("mcp", "show", "shop", "-t", "acme", "--json")[1])["url"] == shop.url
    assert run("agent", "update", "Ava", "-t", "acme", "--tools", "calculator,shop__lookup_order")[0] == 0

    code, text = run("mcp", "add", "shop", "-t", "acme", "--url", shop.url, "--header", "Authorization=Bearer abc")
    assert code == 1 and "a secret comes from the environment" in text and len(text.strip().splitlines()) == 1
    code, text = run("mcp", "add", "erp", "-t", "acme", "--url", "http://127.0.0.1:1/mcp")
    assert code == 1 and "could not connect to MCP server erp" in text and len(text.strip().splitlines()) == 1
    strict = write_config(tmp_path / "strict", database_url, fake_llm.url)  # [mcp] allow_private off, the default
    code, text = run("mcp", "add", "erp", "-t", "acme", "--url", shop.url, config=strict)
    assert code == 1 and "private or reserved address" in text

    acme = await get_tenant(db, "acme")
    user = await create_user(db, email="admin@acme.test", name="Ann", password=None, platform_admin=False, actor="test")
    async with db.tenant(tenant_id=acme.id) as session:
        await add_member(session, acme.id, user, "customer_admin", actor="test")
    code, text = run("--as", "admin@acme.test", "mcp", "add", "erp", "-t", "acme", "--command", " ".join(STDIO))
    assert code == 3 and "may not do mcp.stdio: only a platform admin may" in text
    assert run("--as", "admin@acme.test", "mcp", "list", "-t", "acme")[0] == 0  # a customer admin manages HTTP servers
    code, text = run("mcp", "add", "erp", "-t", "acme", "--command", " ".join(STDIO), "--no-check")
    assert code == 0 and "not connected yet" in text
    code, text = run("mcp", "remove", "shop", "-t", "acme", "--yes")
    assert code == 0 and "left the tool lists of Ava" in text
    code, text = run("mcp", "show", "shop", "-t", "acme")
    assert code == 1 and "has no MCP server 'shop'" in text and "erp" in text


def test_plain_environment_is_unchanged() -> None:
    assert "SHOP_TOKEN" not in os.environ  # monkeypatched variables do not outlive their tests
