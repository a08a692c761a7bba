"""The LLM service's own retries and fallbacks (against the fake provider), and under many calls at once: nothing
below worker.concurrency caps the calls in flight."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from konstruct.config import Settings, WorkerSettings
from konstruct.db.engine import Database
from konstruct.db.models import LLMUsage
from konstruct.llm.client import LLMError, load_litellm
from konstruct.llm.service import CallContext, LLMService
from konstruct.tenancy.tenants import create_tenant
from tests.fakes.llm import FakeLLM

MODEL, FALLBACK = "openai/gpt-4o-mini", "openai/gpt-4o"
QUESTION = [{"role": "user", "content": "are you there?"}]


def retrying(settings: Settings, **llm: object) -> Settings:
    return settings.model_copy(update={"llm": settings.llm.model_copy(update={"retries": 2, **llm})})


async def usage_models(db: Database, tenant_id: uuid.UUID) -> list[tuple[str, str | None]]:
    async with db.tenant(tenant_id=tenant_id) as session:
        rows = await session.execute(select(LLMUsage.model, LLMUsage.error).order_by(LLMUsage.created_at))
    return [(model, error and error.split(":")[0]) for model, error in rows]


async def test_a_failure_a_retry_may_mend_is_retried_then_the_fallback_answers(settings: Settings, db: Database, fake_llm: FakeLLM) -> None:
    tenant = await create_tenant(db, name="Acme", slug="acme-retry", actor="test")
    service = LLMService(retrying(settings), db)
    fake_llm.fail_models = {"gpt-4o-mini": 503}
    result = await service.complete(CallContext(tenant.id), model=MODEL, messages=QUESTION, fallbacks=[FALLBACK])
    assert result.text.startswith("[gpt-4o]") and result.model == FALLBACK
    assert [r.body["model"] for r in fake_llm.requests] == ["gpt-4o-mini"] * 3 + ["gpt-4o"]  # 1 + 2 retries, then the next
    assert await usage_models(db, tenant.id) == [(FALLBACK, None)]

    # A bad request is not retried: the same request would fail the same way; the fallback is tried at once.
    fake_llm.requests.clear()
    fake_llm.fail_models = {"gpt-4o-mini": 400}
    assert (await service.complete(CallContext(tenant.id), model=MODEL, messages=QUESTION, fallbacks=[FALLBACK])).model == FALLBACK
    assert [r.body["model"] for r in fake_llm.requests] == ["gpt-4o-mini", "gpt-4o"]


async def test_when_every_model_fails_the_first_ones_failure_is_recorded(settings: Settings, db: Database, fake_llm: FakeLLM) -> None:
    tenant = await create_tenant(db, name="Acme", slug="acme-down", actor="test")
    fake_llm.fail_models = {"gpt-4o-mini": 401, "gpt-4o": 503}
    with pytest.raises(LLMError, match="AuthenticationError"):
        await LLMService(retrying(settings), db).complete(CallContext(tenant.id), model=MODEL, messages=QUESTION, fallbacks=[FALLBACK])
    assert [r.body["model"] for r in fake_llm.requests] == ["gpt-4o-mini"] + ["gpt-4o"] * 3  # a refused key: not retried
    assert await usage_models(db, tenant.id) == [(MODEL, "AuthenticationError")]


async def test_a_failing_model_is_skipped_for_the_cooldown_while_another_is_ready(
    settings: Settings, db: Database, fake_llm: FakeLLM
) -> None:
    tenant = await create_tenant(db, name="Acme", slug="acme-cool", actor="test")
    ctx = CallContext(tenant.id)
    cooled = LLMService(retrying(settings, retries=0, cooldown=60), db)
    fake_llm.fail_models = {"gpt-4o-mini": 503}
    for _ in range(3):
        assert (await cooled.complete(ctx, model=MODEL, messages=QUESTION, fallbacks=[FALLBACK])).model == FALLBACK
    assert [r.body["model"] for r in fake_llm.requests] == ["gpt-4o-mini", "gpt-4o", "gpt-4o", "gpt-4o"]
    # With nothing else ready, a cooling model is tried all the same (and answers once it is back).
    fake_llm.fail_models = {}
    assert (await cooled.complete(ctx, model=MODEL, messages=QUESTION, fallbacks=[])).model == MODEL
    # Without a cooldown every call tries the first model first.
    fake_llm.requests.clear()
    fake_llm.fail_models = {"gpt-4o-mini": 503}
    plain = LLMService(retrying(settings, retries=0), db)
    for _ in range(2):
        await plain.complete(ctx, model=MODEL, messages=QUESTION, fallbacks=[FALLBACK])
    assert [r.body["model"] for r in fake_llm.requests] == ["gpt-4o-mini", "gpt-4o"] * 2


def test_litellms_connection_caps_are_above_the_highest_worker_concurrency() -> None:
    """litellm's HTTP client held 500 connections per provider host (read once, at its import), so a worker at
    concurrency 1,000 had only 500 calls in flight: bench/worker_throughput.py with a 20 s fake LLM peaked at exactly
    500, and at 1,000 with the caps raised. (A behaviour test needs 1,000 slow calls started faster than the first
    returns: ~10 s of CPU here, so the caps are checked where litellm reads them.)"""
    load_litellm()
    from litellm import constants

    highest = WorkerSettings.model_fields["concurrency"].metadata
    ceiling = max(getattr(m, "le", 0) or 0 for m in highest)
    assert ceiling == 1000
    assert ceiling <= constants.AIOHTTP_CONNECTOR_LIMIT_PER_HOST
    assert ceiling <= constants.AIOHTTP_CONNECTOR_LIMIT
