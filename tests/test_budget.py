"""Budgets: checked before each call with an estimate, accounted after it, safe under concurrency; alerts
emailed once per threshold per month; block and downgrade at the limit. Real worker, fake LLM, fake SMTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import URL

from konstruct import audit
from konstruct.agent.agents import AgentInfo, create_agent
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.db.models import BudgetReservation, LLMUsage, Message
from konstruct.db.models import InboundMessage as InboxRow
from konstruct.db.urls import resolve_urls
from konstruct.inbox import accept
from konstruct.llm import budget, ledger
from konstruct.llm.service import BudgetExhausted, CallContext, LLMService
from konstruct.mail import Notice
from konstruct.messaging import InboundMessage
from konstruct.tenancy.tenants import TenantInfo, create_tenant, update_settings
from konstruct.worker.queue import Queue, make_queue
from tests.conftest import write_config
from tests.fakes.llm import FakeLLM
from tests.fakes.smtp import FakeSMTP, Mail
from tests.helpers import Proc, konstruct_in_process, wait_until
from tests.shared import SharedWorker, shared_worker, unique_slug

PRICED = "openai/gpt-4"  # litellm prices it at $30 / $60 per million tokens: a few cents per call here
CHEAP = "openai/gpt-4o-mini"


@pytest.fixture(scope="module")
def smtp() -> Iterator[FakeSMTP]:
    server = FakeSMTP().start()
    yield server
    server.stop()


@dataclass
class Site:
    config: Path
    db: Database
    llm: FakeLLM
    smtp: FakeSMTP
    tenant: TenantInfo
    agent: AgentInfo
    queue: Queue
    worker: Proc

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The CLI in-process, "acme" meaning this test's tenant."""
        return konstruct_in_process(*(self.tenant.slug if a == "acme" else a for a in args), config=self.config)

    def mails(self) -> list[Mail]:
        """The mails sent to this test's tenant (the SMTP server and worker serve the whole module)."""
        return [m for m in self.smtp.messages if m.recipients == [self.contact]]

    @property
    def contact(self) -> str:
        return f"admin@{self.tenant.slug}.test"

    async def settled(self, *, alerts: int) -> list[audit.AuditEvent]:
        """Wait until the worker has done everything the messages so far set off: at least `alerts` alerts decided
        (budget.alert, budget.exhausted), each with its notification sent, and nothing left on the queue. Every message
        is final by then (wait_done), so no alert can still be decided: nothing more can come."""

        async def state() -> tuple[list[str], int]:
            actions = [e.action for e in await audit.events(self.db, self.tenant.id)]
            return actions, await asyncio.to_thread(self.queue.pending)

        def done(found: tuple[list[str], int]) -> bool:
            actions, pending = found
            decided = actions.count("budget.alert") + actions.count("budget.exhausted")
            return decided >= alerts and actions.count("notification.sent") == decided and pending == 0

        await wait_until(state, done, 30, f"at least {alerts} alert(s) decided, all notified, an empty queue")
        return await audit.events(self.db, self.tenant.id)

    async def send(self, n: int, prefix: str) -> list[uuid.UUID]:
        """n messages from n people, stored and queued as a gateway does, all at once."""
        ids = []
        for i in range(n):
            message = InboundMessage(
                tenant_id=self.tenant.id, agent_id=self.agent.id, channel="terminal", external_id=f"{prefix}-{i}",
                conversation_key=f"cli:{prefix}-{i}", sender=f"person-{i}", text=f"question number {i}",
            )  # fmt: skip
            stored = await accept(self.db, self.queue, message)
            assert stored is not None
            ids.append(stored.id)
        return ids

    async def wait_done(self, ids: list[uuid.UUID], timeout: float = 90) -> list[InboxRow]:
        deadline = time.monotonic() + timeout
        while True:
            async with self.db.tenant(tenant_id=self.tenant.id) as session:
                rows = list(await session.scalars(select(InboxRow).where(InboxRow.id.in_(ids))))
            if all(r.status in ("replied", "failed", "ignored") for r in rows) and len(rows) == len(ids):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"not finished: {[r.status for r in rows]}\n{self.worker.log()[-3000:]}")
            await asyncio.sleep(0.1)

    async def replies(self, ids: list[uuid.UUID]) -> list[Message]:
        async with self.db.tenant(tenant_id=self.tenant.id) as session:
            return list(await session.scalars(select(Message).where(Message.inbound_id.in_(ids), Message.direction == "out")))

    async def usage(self) -> list[LLMUsage]:
        async with self.db.tenant(tenant_id=self.tenant.id) as session:
            return list(await session.scalars(select(LLMUsage)))


@pytest.fixture(scope="module")
def budget_worker(
    pg_server: URL, template_db: str, fake_llm_server: FakeLLM, smtp: FakeSMTP, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedWorker]:
    """One worker for the module; each test has a tenant (and contact address) of its own."""
    with shared_worker(
        pg_server, template_db, tmp_path_factory.mktemp("budget"), fake_llm_server.url, llm={"model": PRICED, "max_tokens": 64},
        smtp={"host": smtp.host, "port": smtp.port, "security": "none", "sender": "alerts@konstruct.test"},
    ) as shared:  # fmt: skip
        yield shared


@pytest.fixture
async def site(budget_worker: SharedWorker, fake_llm: FakeLLM, smtp: FakeSMTP) -> AsyncIterator[Site]:
    settings = load_settings(budget_worker.config)
    db = Database(settings)
    queue = make_queue(settings, resolve_urls(settings))
    try:
        slug = unique_slug("acme")
        tenant = await create_tenant(db, name="Acme", slug=slug, actor="test")
        await update_settings(db, tenant, escalation_target=None, allowed_hosts=None, contact_email=f"admin@{slug}.test", actor="test")
        agent = await create_agent(db, tenant, name="Ava", role="Support", persona="Brief.", model=None, actor="test")
        yield Site(budget_worker.config, db, fake_llm, smtp, tenant, agent, queue, budget_worker.worker)
    finally:
        queue.close()
        await db.dispose()


async def test_admission_never_lets_concurrent_calls_overshoot_by_more_than_one(db: Database) -> None:
    """The accounting alone, hammered: 60 concurrent callers against a limit worth about 10 calls."""
    tenant = await create_tenant(db, name="Hammer", slug="hammer", actor="test")
    limit = budget.Limit(monthly_usd=Decimal("1.00"), alerts=[50, 80], action="block", downgrade_model=None)
    cost, estimate = Decimal("0.10"), Decimal("0.12")  # every estimate is an upper bound of the real cost
    admitted: list[int] = []
    alerts: list[int] = []

    books = ledger.ledger(db)

    async def caller(n: int) -> None:
        admission = await books.admit(ledger.Request(tenant.id, limit, estimate, 60))
        if not admission.allowed:
            return
        admitted.append(n)
        await asyncio.sleep(0.01 * (n % 5))  # the "LLM call"
        entry = ledger.Entry(
            tenant.id, None, None, "reply", "agent", "openai/gpt-4o-mini", "platform", 10, 10, cost, 5, admission.reservation, limit
        )
        alerts.extend(await books.account(entry))

    for _ in range(3):  # three waves: later waves find the budget already spent
        await asyncio.gather(*(caller(n) for n in range(20)))
    info = await budget.get_budget(db, tenant, db.settings)
    assert info.spent_usd == cost * len(admitted)
    assert info.spent_usd >= limit.monthly_usd  # the budget was really reached
    assert info.spent_usd - limit.monthly_usd <= cost  # ... and overshot by at most one call
    assert info.reserved_usd == 0
    assert sorted(alerts) == [50, 80, 100]  # each threshold handed out to exactly one caller


async def test_concurrent_messages_against_a_nearly_spent_budget(site: Site) -> None:
    site.llm.delay = 0.2
    set_ = site.cli("budget", "set", "--tenant", "acme", "--usd", "0.05", "--alert", "50", "--alert", "80", "--json")
    assert set_.returncode == 0, set_.stderr
    ids = await site.send(30, "burst")
    rows = await site.wait_done(ids)
    usage = await site.usage()
    info = await budget.get_budget(site.db, site.tenant, load_settings(site.config))
    biggest = max(u.cost_usd for u in usage)
    assert info.spent_usd == sum(u.cost_usd for u in usage)
    assert info.spent_usd >= Decimal("0.05"), "the burst should use the budget up"
    assert info.spent_usd - Decimal("0.05") <= biggest, f"overshot by more than one call: {info.spent_usd}"
    assert len(site.llm.requests) == len(usage)  # every call the provider saw is accounted
    assert info.reserved_usd == 0

    settings = load_settings(site.config)
    replies = await site.replies(ids)
    answered = [r for r in replies if r.text.startswith("[gpt-4]")]
    blocked = [r for r in replies if r.text == settings.budget.unavailable]
    assert len(answered) == len(usage) and len(answered) + len(blocked) == 30 and blocked
    assert all(r.status == "replied" for r in rows)
    assert {r.error for r in rows if r.error} == {"budget: the monthly budget of $0.05 is used up"}

    events = await site.settled(alerts=4)  # three thresholds and "used up": nothing more may come after that
    mails = site.mails()
    subjects = sorted(m.subject for m in mails)
    assert subjects == [
        "[Konstruct] LLM budget used up",
        "[Konstruct] LLM budget: 100% used this month",
        "[Konstruct] LLM budget: 50% used this month",
        "[Konstruct] LLM budget: 80% used this month",
    ]
    assert all(m.recipients == [site.contact] for m in mails)
    assert sorted(e.target or "" for e in events if e.action == "budget.alert") == ["100%", "50%", "80%"]
    assert [e.action for e in events].count("budget.exhausted") == 1
    assert [e.action for e in events].count("notification.sent") == 4

    # Later messages this month: still blocked, and nobody is emailed again.
    more = await site.send(3, "later")
    await site.wait_done(more)
    assert all(r.text == settings.budget.unavailable for r in await site.replies(more))
    await site.settled(alerts=4)  # the later messages decided no alert: still four, all notified, the queue empty
    assert len(site.mails()) == 4
    shown = json.loads(site.cli("budget", "show", "--tenant", "acme", "--json").stdout)
    assert shown["alerts_sent"] == [50, 80, 100] and shown["used_percent"] >= 100


async def test_downgrade_switches_to_the_cheaper_model_at_the_limit(site: Site) -> None:
    result = site.cli("budget", "set", "--tenant", "acme", "--usd", "0.001", "--action", "downgrade", "--downgrade-model", CHEAP)
    assert result.returncode == 0, result.stderr
    first = await site.send(1, "first")
    await site.wait_done(first)
    assert site.llm.requests[-1].body["model"] == "gpt-4"  # under the limit: the agent's model
    second = await site.send(2, "second")
    await site.wait_done(second)
    assert [r.body["model"] for r in site.llm.requests[-2:]] == ["gpt-4o-mini", "gpt-4o-mini"]
    assert all(r.text.startswith("[gpt-4o-mini]") for r in await site.replies(second))
    await site.settled(alerts=1)
    assert any("used up" in m.subject and CHEAP in m.body for m in site.mails())


async def test_budget_commands_refuse_bad_input(site: Site) -> None:
    for args, words in (
        (["--usd", "-5"], "--usd"),
        (["--usd", "5", "--alert", "150"], "percentages"),
        (["--usd", "5", "--action", "explode"], "--action"),
        (["--usd", "5", "--action", "downgrade"], "--downgrade-model"),
    ):
        result = site.cli("budget", "set", "--tenant", "acme", *args)
        assert result.returncode != 0 and words in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    shown = json.loads(site.cli("budget", "show", "--tenant", "acme", "--json").stdout)
    assert shown["monthly_usd"] is None  # nothing was written
    assert site.cli("budget", "clear", "--tenant", "acme", "--yes").returncode != 0


async def test_a_call_refused_while_calls_in_flight_hold_the_rest_is_said_once(
    tmp_path: Path, database_url: str, fake_llm: FakeLLM
) -> None:
    """Nothing spent yet, but a call in flight holds the rest of the budget (its reservation): a new call waits up to
    llm.timeout for room, then is refused. That refusal is the month's first: recorded and told once, like a refusal
    at the limit (under load every refusal of a burst can come this way)."""
    config = write_config(tmp_path, database_url, fake_llm.url, llm={"timeout": 0.5})
    settings = load_settings(config)
    db = Database(settings)
    try:
        tenant = await create_tenant(db, name="Acme", slug="acme-held", actor="test")
        assert konstruct_in_process("budget", "set", "--tenant", "acme-held", "--usd", "0.05", config=config).returncode == 0
        async with db.tenant(tenant_id=tenant.id) as session:
            session.add(
                BudgetReservation(tenant_id=tenant.id, estimate_usd=Decimal("0.05"), expires_at=datetime.now(UTC) + timedelta(hours=1))
            )
        notices: list[Notice] = []
        service = LLMService(settings, db, notify=notices.append)
        question = [{"role": "user", "content": "hello"}]
        for _ in range(2):
            with pytest.raises(BudgetExhausted):
                await service.complete(CallContext(tenant.id, purpose="reply"), model="openai/gpt-4", messages=question)
        assert fake_llm.requests == []  # never asked: the budget had no room
        actions = [e.action for e in await audit.events(db, tenant.id)]
        assert actions.count("budget.exhausted") == 1
        assert [n.kind for n in notices] == ["budget.exhausted"]
    finally:
        await db.dispose()
