"""What goes back to the model: the history of a conversation, in-process over a real database and the fake LLM.

A fixed text sent in the agent's place (an apology for a failed model call, "paused", "the budget is spent", a
hand-over) is shown to the person, but never given back to the model as the agent's own words; the person's
messages that got only such a text stay in the history as theirs.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from konstruct import inbox
from konstruct.agent import pipeline as steps
from konstruct.agent.agents import AgentInfo, create_agent
from konstruct.agent.pipeline import Pipeline
from konstruct.billing.state import Standing
from konstruct.channels.registry import channels
from konstruct.channels.terminal import clean_input, recent_turns
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Message
from konstruct.db.urls import resolve_urls
from konstruct.messaging import InboundMessage
from konstruct.tenancy.tenants import TenantInfo, create_tenant
from konstruct.worker.queue import make_queue
from tests.fakes.llm import FakeLLM

Site = tuple[Pipeline, TenantInfo, AgentInfo]


@pytest.fixture
async def site(db: Database, settings: Settings, fake_llm: FakeLLM) -> AsyncIterator[Site]:
    tenant = await create_tenant(db, name="Acme", slug="acme", actor="test")
    agent = await create_agent(db, tenant, name="Ava", role="Support", persona="Warm and brief.", model=None, actor="test")
    yield Pipeline(settings, db, channels(settings, db), worker_id="test-worker"), tenant, agent


async def send(pipeline: Pipeline, tenant: TenantInfo, agent: AgentInfo, text: str, conversation: str = "cli:pat") -> uuid.UUID:
    """Put one message from pat in the inbox, as `konstruct chat` does."""
    queue = make_queue(pipeline.settings, resolve_urls(pipeline.settings))
    try:
        stored = await inbox.accept(pipeline.db, queue, InboundMessage(tenant.id, agent.id, "terminal", uuid.uuid4().hex, conversation,
                                                                       "pat", text))  # fmt: skip
    finally:
        queue.close()
    assert stored is not None
    return stored.id


def turns_sent(fake: FakeLLM, index: int = -1) -> list[tuple[str, Any]]:
    """The (role, content) of what one request to the model carried after the system prompt."""
    return [(m["role"], m["content"]) for m in fake.requests[index].body["messages"][1:]]


async def reply_kinds(pipeline: Pipeline, tenant: TenantInfo) -> list[tuple[str, str]]:
    async with pipeline.db.tenant(tenant_id=tenant.id) as session:
        rows = await session.execute(select(Message.text, Message.kind).where(Message.direction == "out").order_by(Message.created_at))
        return [(r.text, r.kind) for r in rows]


async def test_an_apology_for_a_failed_model_call_is_not_sent_back_as_the_agents_words(site: Site, fake_llm: FakeLLM) -> None:
    pipeline, tenant, agent = site
    apology = pipeline.settings.agent.apology
    fake_llm.fail_status = 500  # the provider is down for the first message
    first = await send(pipeline, tenant, agent, "my order 1234 never arrived")
    assert await pipeline.process(tenant_id=tenant.id, inbound_id=first) == "failed"
    assert len(fake_llm.requests) == 1
    assert await reply_kinds(pipeline, tenant) == [(apology, "notice")]

    fake_llm.fail_status = None  # and back for the second
    second = await send(pipeline, tenant, agent, "hello? anyone?")
    assert await pipeline.process(tenant_id=tenant.id, inbound_id=second) == "replied"
    assert turns_sent(fake_llm) == [("user", "my order 1234 never arrived"), ("user", "hello? anyone?")]

    # The model's own answer does go back, as the agent's words.
    third = await send(pipeline, tenant, agent, "thanks")
    assert await pipeline.process(tenant_id=tenant.id, inbound_id=third) == "replied"
    sent = turns_sent(fake_llm)
    assert ("assistant", "[fake-model] You said: hello? anyone?") in sent
    assert all(content != apology for _, content in sent)
    assert await reply_kinds(pipeline, tenant) == [
        (apology, "notice"),
        ("[fake-model] You said: hello? anyone?", "message"),
        ("[fake-model] You said: thanks", "message"),
    ]


async def test_a_gates_fixed_reply_and_a_spent_budget_are_notices(site: Site, fake_llm: FakeLLM) -> None:
    pipeline, tenant, agent = site
    settings = pipeline.settings
    paused_id = await send(pipeline, tenant, agent, "is anyone there?")
    async with pipeline.db.tenant_driver(tenant_id=tenant.id) as conn:
        row = await steps.claim(conn, paused_id, pipeline.worker_id, solo=False)
        assert row is not None
        turn = await pipeline.load(conn, row)
    paused = dataclasses.replace(turn, billing=Standing(False, "no subscription", None))
    outcome = await steps.billing_paused(pipeline, paused)
    assert outcome is not None and outcome.reply == settings.billing.paused
    assert await pipeline.conclude(paused, outcome) == "replied"

    budget = await send(pipeline, tenant, agent, "what about now?")
    async with pipeline.db.tenant_driver(tenant_id=tenant.id) as conn:
        row = await steps.claim(conn, budget, pipeline.worker_id, solo=False)
        assert row is not None
        turn = await pipeline.load(conn, row)
    # What `answer` returns when the budget is spent, stored the way `process` stores it.
    spent = steps.Answer(settings.budget.unavailable, "budget", None, error="budget: spent", kind=steps.NOTICE)
    stored = await pipeline.store(turn, spent.text, spent.model, spent.latency_ms, kind=spent.kind)
    assert stored is not None
    await pipeline.deliver(turn, stored, spent.text, spent.status, spent.error)

    last = await send(pipeline, tenant, agent, "third try")
    assert await pipeline.process(tenant_id=tenant.id, inbound_id=last) == "replied"
    assert turns_sent(fake_llm) == [("user", "is anyone there?"), ("user", "what about now?"), ("user", "third try")]
    assert [kind for _, kind in await reply_kinds(pipeline, tenant)] == ["notice", "notice", "message"]

    # The person sees everything they were told, notices included, when they come back.
    shown = await recent_turns(pipeline.db, tenant, agent.id, "cli:pat", exchanges=5)
    assert [(t.direction, t.text) for t in shown] == [
        ("in", "is anyone there?"),
        ("out", settings.billing.paused),
        ("in", "what about now?"),
        ("out", settings.budget.unavailable),
        ("in", "third try"),
        ("out", "[fake-model] You said: third try"),
    ]


async def test_recent_turns_are_the_last_exchanges_of_that_conversation_only(site: Site, fake_llm: FakeLLM) -> None:
    pipeline, tenant, agent = site
    for n in range(4):
        assert await pipeline.process(tenant_id=tenant.id, inbound_id=await send(pipeline, tenant, agent, f"question {n}")) == "replied"
    await pipeline.process(tenant_id=tenant.id, inbound_id=await send(pipeline, tenant, agent, "elsewhere", conversation="cli:pat:x"))
    shown = await recent_turns(pipeline.db, tenant, agent.id, "cli:pat", exchanges=2)
    assert [t.text for t in shown] == ["question 2", "[fake-model] You said: question 2", "question 3", "[fake-model] You said: question 3"]
    assert await recent_turns(pipeline.db, tenant, agent.id, "cli:nobody", exchanges=5) == []


@pytest.mark.parametrize(
    ("typed", "sent"),
    [
        ("helo\x1b[Dl", "helol"),  # an arrow key without line editing: its bytes go, the letters stay
        ("hi\x1b[1;5Cthere", "hithere"),
        ("a\x1bOPb", "ab"),  # F1 (SS3)
        ("title\x1b]0;owned\x07 ok", "title ok"),  # an OSC sequence
        ("x\x08y\x00z\x7f", "xyz"),
        ("tab\tand\nnewline kept", "tab\tand\nnewline kept"),
        ("  ^[[D  stays as typed text  ", "^[[D  stays as typed text"),
        ("lone escape \x1b", "lone escape"),
    ],
)
def test_clean_input_strips_escape_and_control_sequences(typed: str, sent: str) -> None:
    assert clean_input(typed) == sent
