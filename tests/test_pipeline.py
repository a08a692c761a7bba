"""The agent pipeline's steps and gates, in-process over a real database (no worker process).

Each gate is handed a loaded Turn with one fact changed and must decide alone; a whole turn runs through
every step with the terminal channel and the fake LLM.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select, text, update

from konstruct import inbox
from konstruct.agent import pipeline as steps
from konstruct.agent.agents import AgentInfo, create_agent
from konstruct.agent.pipeline import Outcome, Pipeline, Turn
from konstruct.billing.state import Standing
from konstruct.channels.registry import channels
from konstruct.config import Settings
from konstruct.db.engine import Database, unavailable
from konstruct.db.models import AuditEvent, Conversation, Message
from konstruct.db.models import InboundMessage as InboxRow
from konstruct.db.urls import resolve_urls
from konstruct.messaging import InboundMessage
from konstruct.tenancy.tenants import TenantInfo, create_tenant
from konstruct.worker.queue import make_queue
from tests.fakes.llm import FakeLLM
from tests.helpers import free_port


@pytest.fixture
async def site(db: Database, settings: Settings, fake_llm: FakeLLM) -> AsyncIterator[tuple[Pipeline, TenantInfo, AgentInfo]]:
    tenant = await create_tenant(db, name="Acme", slug="acme", actor="test")
    agent = await create_agent(db, tenant, name="Ava", role="Support", persona="Warm and brief.", model=None, actor="test")
    pipeline = Pipeline(settings, db, channels(settings, db), worker_id="test-worker")
    yield pipeline, tenant, agent


async def message(
    pipeline: Pipeline, tenant: TenantInfo, agent: AgentInfo, text: str, *, channel: str = "terminal", payload: dict[str, str] | None = None
) -> uuid.UUID:
    queue = make_queue(pipeline.settings, resolve_urls(pipeline.settings))
    try:
        stored = await inbox.accept(
            pipeline.db,
            queue,
            InboundMessage(tenant.id, agent.id, channel, uuid.uuid4().hex, "session-1", "pat", text, payload or {}),
        )
    finally:
        queue.close()
    assert stored is not None
    return stored.id


async def loaded(pipeline: Pipeline, tenant: TenantInfo, inbound_id: uuid.UUID) -> Turn:
    async with pipeline.db.tenant_driver(tenant_id=tenant.id) as conn:
        row = await steps.claim(conn, inbound_id, pipeline.worker_id, solo=False)
        assert row is not None
        assert await steps.claim(conn, inbound_id, "another-worker", solo=False) is None  # claimed once
        return await pipeline.load(conn, row)


async def test_every_gate_lets_an_ordinary_turn_through(site: tuple[Pipeline, TenantInfo, AgentInfo]) -> None:
    pipeline, tenant, agent = site
    turn = await loaded(pipeline, tenant, await message(pipeline, tenant, agent, "hello there"))
    assert turn.agent.name == "Ava" and turn.tenant_status == "active" and turn.state == "open" and turn.previous is None
    assert turn.channel is not None and turn.channel.name == "terminal" and turn.target.conversation_key == "session-1"
    for gate in steps.GATES:
        assert await gate(pipeline, turn) is None, gate.__name__


async def test_each_gate_decides_alone(site: tuple[Pipeline, TenantInfo, AgentInfo]) -> None:
    pipeline, tenant, agent = site
    turn = await loaded(pipeline, tenant, await message(pipeline, tenant, agent, "I want a refund now"))
    settings = pipeline.settings

    assert await steps.tenant_inactive(pipeline, dataclasses.replace(turn, tenant_status="suspended")) == Outcome(
        "ignored", "tenant is suspended"
    )
    assert await steps.no_channel(pipeline, dataclasses.replace(turn, channel=None)) == Outcome(
        "failed", "no 'terminal' channel on this worker"
    )
    paused = await steps.billing_paused(pipeline, dataclasses.replace(turn, billing=Standing(False, "no subscription", None)))
    assert paused == Outcome("replied", "paused: no subscription", reply=settings.billing.paused, model="billing")
    assert await steps.billing_paused(pipeline, dataclasses.replace(turn, billing=Standing(True, "active", "active"))) is None

    assert await steps.escalated(pipeline, dataclasses.replace(turn, state="escalated")) == Outcome(
        "ignored", "escalated: a human is handling this conversation"
    )

    crashed = dataclasses.replace(turn, inbound=InboxRow(**{**_columns(turn.inbound), "crashes": settings.worker.max_attempts}))
    gave_up = await steps.gave_up(pipeline, crashed)
    assert gave_up is not None and gave_up.status == "failed" and gave_up.reply == settings.agent.apology
    assert gave_up.error == f"gave up after {settings.worker.max_attempts} attempts that did not finish"
    assert await steps.gave_up(pipeline, dataclasses.replace(crashed, previous=Message(text="stored"))) is None  # deliver that one

    # A rule that fires escalates the conversation (once) and hands over; a reply stored earlier is delivered instead.
    rule = dataclasses.replace(turn, rules=["refund AND count >= 1"], turns=1)
    assert await steps.escalation_rule(pipeline, dataclasses.replace(rule, previous=Message(text="stored"))) is None
    handoff = await steps.escalation_rule(pipeline, rule)
    assert handoff == Outcome("replied", reply=settings.agent.handoff, model="escalation")
    async with pipeline.db.tenant(tenant_id=tenant.id) as session:
        conversation = await session.get(Conversation, turn.conversation_id)
        assert conversation is not None and conversation.status == "escalated"
        assert conversation.escalation_reason is not None and "rule 'refund AND count >= 1' fired" in conversation.escalation_reason
    # ... and `/release` from the person hands it back.
    released = dataclasses.replace(turn, state="escalated", inbound=InboxRow(**{**_columns(turn.inbound), "text": "/release"}))
    assert await steps.escalated(pipeline, released) == Outcome("ignored", "released the conversation back to the agent")
    async with pipeline.db.tenant(tenant_id=tenant.id) as session:
        conversation = await session.get(Conversation, turn.conversation_id)
        assert conversation is not None and conversation.status == "open"


async def test_compose_and_answer_in_process(site: tuple[Pipeline, TenantInfo, AgentInfo], fake_llm: FakeLLM) -> None:
    pipeline, tenant, agent = site
    turn = await loaded(pipeline, tenant, await message(pipeline, tenant, agent, "what are your hours?"))
    model, messages = await pipeline.compose(turn)
    assert model == pipeline.settings.llm.model
    assert "Warm and brief." in messages[0]["content"] and messages[-1]["role"] == "user"
    assert "what are your hours?" in str(messages[-1]["content"])
    answer = await pipeline.answer(turn, model, messages)
    assert answer.status == "replied" and answer.text == "[fake-model] You said: what are your hours?" and answer.error is None
    assert len(fake_llm.requests) == 1


async def test_a_whole_turn_in_process_is_stored_delivered_finished_and_audited(site: tuple[Pipeline, TenantInfo, AgentInfo]) -> None:
    pipeline, tenant, agent = site
    inbound_id = await message(pipeline, tenant, agent, "hello there")
    assert await pipeline.process(tenant_id=tenant.id, inbound_id=inbound_id) == "replied"
    assert await pipeline.process(tenant_id=tenant.id, inbound_id=inbound_id) is None  # a second doorbell finds it taken
    async with pipeline.db.tenant(tenant_id=tenant.id) as session:
        row = await session.get(InboxRow, inbound_id)
        assert row is not None and row.status == "replied" and row.worker_id == "test-worker" and row.finished_at is not None
        replies = list(await session.scalars(select(Message).where(Message.inbound_id == inbound_id, Message.direction == "out")))
        assert [(r.text, r.status) for r in replies] == [("[fake-model] You said: hello there", "sent")]
        actions = list(await session.scalars(select(AuditEvent.action).where(AuditEvent.target == str(inbound_id))))
        assert sorted(actions) == ["message.received", "message.replied"]


def _columns(row: InboxRow) -> dict[str, object]:
    return {a.key: getattr(row, a.key) for a in InboxRow.__mapper__.column_attrs}


async def test_a_reply_an_earlier_attempt_stored_is_delivered_without_asking_again(
    site: tuple[Pipeline, TenantInfo, AgentInfo], fake_llm: FakeLLM
) -> None:
    pipeline, tenant, agent = site
    inbound_id = await message(pipeline, tenant, agent, "still there?")
    turn = await loaded(pipeline, tenant, inbound_id)  # the attempt that dies: claimed, answered, the reply stored …
    model, messages = await pipeline.compose(turn)
    answer = await pipeline.answer(turn, model, messages)
    assert await pipeline.store(turn, answer.text, answer.model, answer.latency_ms, kind=steps.MESSAGE) is not None
    async with pipeline.db.tenant(tenant_id=tenant.id) as session:  # … then it dies, and the row is given back
        await session.execute(update(InboxRow).where(InboxRow.id == inbound_id).values(status="received", worker_id=None))
    asked = len(fake_llm.requests)
    assert await pipeline.process(tenant_id=tenant.id, inbound_id=inbound_id) == "replied"
    assert len(fake_llm.requests) == asked  # delivered, not asked again
    async with pipeline.db.tenant(tenant_id=tenant.id) as session:
        replies = list(await session.scalars(select(Message).where(Message.inbound_id == inbound_id, Message.direction == "out")))
    assert [(r.text, r.status) for r in replies] == [("[fake-model] You said: still there?", "sent")]


async def test_a_platform_key_that_cannot_be_read_fails_the_answer_naming_the_variable(
    site: tuple[Pipeline, TenantInfo, AgentInfo], fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llm.api_key = { "$env" = … } with the variable missing where the worker runs: the person gets the apology, the
    message records which variable, and nothing reaches the model."""
    from pathlib import Path

    from konstruct.config import SecretReference

    pipeline, tenant, agent = site
    monkeypatch.delenv("H_UNSET_LLM_KEY", raising=False)
    missing = SecretReference("$env", "H_UNSET_LLM_KEY", setting="llm.api_key", base=Path("."))
    settings = pipeline.settings.model_copy(update={"llm": pipeline.settings.llm.model_copy(update={"api_key": missing})})
    keyless = Pipeline(settings, pipeline.db, channels(settings, pipeline.db), worker_id="test-worker")
    turn = await loaded(keyless, tenant, await message(keyless, tenant, agent, "what are your hours?"))
    model, messages = await keyless.compose(turn)
    answer = await keyless.answer(turn, model, messages)
    assert answer.status == "failed" and answer.text == settings.agent.apology
    assert answer.error is not None and "llm.api_key: environment variable H_UNSET_LLM_KEY is not set" in answer.error
    assert fake_llm.requests == []


async def test_a_database_outage_while_delivering_gives_the_message_back_with_its_reply_kept(
    site: tuple[Pipeline, TenantInfo, AgentInfo], fake_llm: FakeLLM
) -> None:
    """The channel cannot read the workspace's token (its database refuses connections: what 53300 or a restart looks
    like): nothing went out, so the message is not failed. The worker gives it back uncharged and the next attempt
    delivers the reply stored before, without asking the model again."""
    pipeline, tenant, agent = site
    urls = resolve_urls(pipeline.settings)
    refused = Database(pipeline.settings, dataclasses.replace(urls, app=urls.app.set(host="127.0.0.1", port=free_port(), query={})))
    cut_off = Pipeline(pipeline.settings, pipeline.db, channels(pipeline.settings, refused), worker_id="test-worker")
    payload = {"team_id": "T0OUTAGE", "channel": "C0OUTAGE", "ts": "1700000000.000100", "user": "U0PERSON"}
    inbound_id = await message(pipeline, tenant, agent, "are you open?", channel="slack", payload=payload)
    try:
        with pytest.raises(Exception) as raised:
            await cut_off.process(tenant_id=tenant.id, inbound_id=inbound_id)
    finally:
        await refused.dispose()
    assert unavailable(raised.value)
    asked = len(fake_llm.requests)
    async with pipeline.db.tenant(tenant_id=tenant.id) as session:
        row = await session.get(InboxRow, inbound_id)
        assert row is not None and row.status == "processing" and row.error is None  # not failed: still this worker's
        replies = list(await session.scalars(select(Message).where(Message.inbound_id == inbound_id, Message.direction == "out")))
    assert [(r.text, r.status) for r in replies] == [("[fake-model] You said: are you open?", "sending")]
    async with pipeline.db.system() as session:  # what the worker's retry loop does with it
        await session.execute(text("select konstruct_release_claim(:id, 'test-worker', false)"), {"id": inbound_id})
    turn = await loaded(pipeline, tenant, inbound_id)
    assert turn.inbound.crashes == 0 and turn.target.retry  # not counted against it; a retry looks for what went out
    assert turn.previous is not None and turn.previous.id == replies[0].id  # the stored reply is what goes out next
    assert len(fake_llm.requests) == asked
