"""Streamed LLM calls (LLMService.complete with on_text) against the fake LLM's server-sent events: the same router,
keys, fallbacks, budget reservation and settlement, usage row and cost as a call that is not streamed."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from sqlalchemy import func, select

from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import BudgetMonth, BudgetReservation, LLMUsage
from konstruct.llm.service import CallContext, LLMService
from konstruct.tenancy.tenants import create_tenant
from tests.fakes.llm import FakeLLM
from tests.helpers import konstruct_in_process

PRICED = "openai/gpt-4"  # litellm has a price for it: the cost must come from the stream's usage
CHEAP = "openai/gpt-4o-mini"
QUESTION = [{"role": "user", "content": "tell me about streaming answers in three words or more"}]


async def test_a_streamed_call_is_budgeted_recorded_and_priced_as_a_plain_one(
    settings: Settings, db: Database, fake_llm: FakeLLM, config_path: Path
) -> None:
    tenant = await create_tenant(db, name="Acme", slug="acme-stream", actor="test")
    assert konstruct_in_process("budget", "set", "--tenant", "acme-stream", "--usd", "5", config=config_path).returncode == 0
    fake_llm.stream_delay = 0.01
    service = LLMService(settings, db)
    pieces: list[str] = []

    async def on_text(text: str) -> None:
        pieces.append(text)

    streamed = await service.complete(CallContext(tenant.id, purpose="reply"), model=PRICED, messages=QUESTION, on_text=on_text)
    plain = await service.complete(CallContext(tenant.id, purpose="reply"), model=PRICED, messages=QUESTION)
    assert streamed.text == plain.text == "[gpt-4] You said: " + QUESTION[0]["content"]
    assert "".join(pieces) == streamed.text and len(pieces) == len(streamed.text.split())  # a word at a time
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (plain.prompt_tokens, plain.completion_tokens) != (0, 0)
    assert [r.body.get("stream") for r in fake_llm.requests] == [True, None]
    async with db.tenant(tenant_id=tenant.id) as session:
        costs = list(await session.scalars(select(LLMUsage.cost_usd).order_by(LLMUsage.created_at)))
        spent = await session.scalar(select(BudgetMonth.spent_usd))
        held = await session.scalar(select(func.count()).select_from(BudgetReservation))
    assert len(costs) == 2 and costs[0] == costs[1] > 0  # priced from the final chunk's usage, as the plain call
    assert spent == sum(costs, Decimal(0)) and held == 0  # settled: the reservations are released


async def test_a_streamed_call_falls_back_when_the_first_model_fails(settings: Settings, db: Database, fake_llm: FakeLLM) -> None:
    tenant = await create_tenant(db, name="Acme", slug="acme-fallback", actor="test")
    fake_llm.fail_models = {"gpt-4": 503}
    pieces: list[str] = []

    async def on_text(text: str) -> None:
        pieces.append(text)

    result = await LLMService(settings, db).complete(CallContext(tenant.id), model=PRICED, messages=QUESTION, fallbacks=[CHEAP],
                                                     on_text=on_text)  # fmt: skip
    assert result.text.startswith("[gpt-4o-mini]") and "".join(pieces) == result.text  # only the model that answered streamed
    assert [r.body["model"] for r in fake_llm.requests][-1] == "gpt-4o-mini"


async def test_a_failing_receiver_does_not_cost_the_answer(settings: Settings, db: Database, fake_llm: FakeLLM) -> None:
    tenant = await create_tenant(db, name="Acme", slug="acme-receiver", actor="test")
    seen: list[str] = []

    async def on_text(text: str) -> None:
        seen.append(text)
        raise RuntimeError("the channel went away")

    result = await LLMService(settings, db).complete(CallContext(tenant.id), model=CHEAP, messages=QUESTION, on_text=on_text)
    assert result.text.endswith("three words or more") and len(seen) == 1  # dropped after its first failure
    async with db.tenant(tenant_id=tenant.id) as session:
        usage = (await session.scalars(select(LLMUsage))).one()
    assert usage.error is None and usage.completion_tokens > 0
