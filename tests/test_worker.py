"""The inbox → queue → worker path with real worker processes and the fake LLM.

Tests that only need messages answered share one worker per module (`shared`: a tenant of their own in a shared
database); tests about the worker process itself (killed, restarted, swept, stopped, absent) start their own."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.engine import URL

from konstruct import inbox
from konstruct.agent.agents import AgentInfo, create_agent
from konstruct.agent.prompt import AI_DISCLOSURE
from konstruct.config import Settings, load_settings
from konstruct.db.engine import Database
from konstruct.db.models import AuditEvent, Message
from konstruct.db.models import InboundMessage as InboxRow
from konstruct.db.urls import resolve_urls
from konstruct.inbox import Stored
from konstruct.messaging import InboundMessage
from konstruct.tenancy.tenants import TenantInfo, create_tenant, set_status
from konstruct.worker.queue import Queue, make_queue
from tests.conftest import write_config
from tests.fakes.llm import FakeLLM
from tests.helpers import Proc, konstruct, konstruct_in_process, wait_for, wait_until
from tests.shared import SharedWorker, shared_worker, unique_slug


async def accept(db: Database, queue: Any, new: Any) -> Stored:
    """inbox.accept for a message naming its agent: always stored (or found stored)."""
    stored = await inbox.accept(db, queue, new)
    assert stored is not None
    return stored


async def store(db: Database, new: Any) -> Stored:
    """inbox.store (no doorbell) for a message naming its agent."""
    stored = await inbox.store(db, new)
    assert stored is not None
    return stored


@pytest.fixture
async def acme(db: Database) -> tuple[TenantInfo, AgentInfo]:
    tenant = await create_tenant(db, name="Acme", slug="acme", actor="test")
    agent = await create_agent(db, tenant, name="Ava", role="Support lead", persona="You are warm and brief.", model=None, actor="test")
    return tenant, agent


@pytest.fixture
def queue(settings: Settings) -> Iterator[Queue]:
    """The queue as the gateway and `konstruct chat` use it, to put messages in from the test."""
    q = make_queue(settings, resolve_urls(settings))
    yield q
    q.close()


@pytest.fixture
def start_worker(config_path: Path, tmp_path: Path) -> Iterator[object]:
    procs: list[Proc] = []

    def start() -> Proc:
        proc = Proc("worker", ["worker"], config=config_path, log_dir=tmp_path)
        procs.append(proc)
        proc.wait_for_log(" ready: ")
        return proc

    yield start
    for proc in procs:
        if proc.process.poll() is None:
            proc.stop()


@pytest.fixture(scope="module")
def module_worker(
    pg_server: URL, template_db: str, fake_llm_server: FakeLLM, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedWorker]:
    with shared_worker(pg_server, template_db, tmp_path_factory.mktemp("worker"), fake_llm_server.url) as shared:
        yield shared


@dataclass
class Shared:
    """The module's worker, and a tenant of this test's own with its agent Ava."""

    config: Path
    settings: Settings
    db: Database
    queue: Queue
    tenant: TenantInfo
    agent: AgentInfo
    worker: Proc

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The CLI in-process, "acme" meaning this test's tenant."""
        return konstruct_in_process(*(self.tenant.slug if a == "acme" else a for a in args), config=self.config)

    async def settle(self) -> None:
        """Send a later message and wait for its answer: every doorbell rung before it has been taken by then."""
        marker = await accept(self.db, self.queue, message(self.tenant, self.agent, f"marker-{uuid.uuid4()}", "marker", "marker"))
        assert marker is not None and (await wait_final(self.db, self.tenant, marker.id)).status == "replied"


@pytest.fixture
async def shared(module_worker: SharedWorker, fake_llm: FakeLLM) -> AsyncIterator[Shared]:
    settings = load_settings(module_worker.config)
    db = Database(settings)
    queue = make_queue(settings, resolve_urls(settings))
    try:
        tenant = await create_tenant(db, name="Acme", slug=unique_slug("acme"), actor="test")
        agent = await create_agent(db, tenant, name="Ava", role="Support lead", persona="You are warm and brief.", model=None, actor="test")
        yield Shared(module_worker.config, settings, db, queue, tenant, agent, module_worker.worker)
    finally:
        queue.close()
        await db.dispose()


def asked(fake_llm: FakeLLM, text: str) -> int:
    """How many model calls were about `text` (the last user message)."""
    return sum(1 for r in fake_llm.requests if r.body["messages"][-1].get("content") == text)


async def replies_for(db: Database, tenant: TenantInfo, inbound_id: object) -> list[Message]:
    async with db.tenant(tenant_id=tenant.id) as session:
        return list(await session.scalars(select(Message).where(Message.inbound_id == inbound_id, Message.direction == "out")))


async def inbox_row(db: Database, tenant: TenantInfo, inbound_id: object) -> InboxRow:
    async with db.tenant(tenant_id=tenant.id) as session:
        row = await session.get(InboxRow, inbound_id)
        assert row is not None
        return row


async def wait_final(db: Database, tenant: TenantInfo, inbound_id: object, timeout: float = 30) -> InboxRow:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = await inbox_row(db, tenant, inbound_id)
        if row.status in ("replied", "failed", "ignored"):
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"message {inbound_id} still {row.status} after {timeout}s")


def message(tenant: TenantInfo, agent: AgentInfo, external_id: str, text: str, conversation: str = "cli:test") -> InboundMessage:
    return InboundMessage(
        tenant_id=tenant.id,
        agent_id=agent.id,
        channel="terminal",
        external_id=external_id,
        conversation_key=conversation,
        sender="pat",
        text=text,
    )


async def test_chat_round_trip_with_history_and_disclosure(shared: Shared, fake_llm: FakeLLM) -> None:
    first = shared.cli("chat", "--tenant", "acme", "--agent", "Ava", "--message", "What are your opening hours?")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "[fake-model] You said: What are your opening hours?"
    second = shared.cli("chat", "-t", "acme", "-a", "Ava", "-m", "And on Sundays?", "--json")
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    assert result["status"] == "replied" and result["reply"].endswith("And on Sundays?")

    sent = fake_llm.requests[-1].body
    assert fake_llm.requests[-1].headers["authorization"] == "Bearer sk-test-key-0001"
    system = sent["messages"][0]
    assert system["role"] == "system" and AI_DISCLOSURE in system["content"] and "You are warm and brief." in system["content"]
    # The conversation's history went along: first question, first answer, the new question.
    assert [m["role"] for m in sent["messages"][1:]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"] == "What are your opening hours?"

    async with shared.db.tenant(tenant_id=shared.tenant.id) as session:
        actions = list(await session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
        directions = list(await session.scalars(select(Message.direction).order_by(Message.created_at, Message.direction.desc())))
    assert actions.count("message.received") == 2 and actions.count("message.replied") == 2
    assert directions == ["in", "out", "in", "out"]


async def test_same_message_twice_gets_one_reply(shared: Shared, fake_llm: FakeLLM) -> None:
    args = ["chat", "-t", "acme", "-a", "Ava", "-m", "Refund please", "--message-id", "msg-42", "--json"]
    first, second = shared.cli(*args), shared.cli(*args)
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    assert one["message_id"] == two["message_id"] and two["duplicate"] is True and one["duplicate"] is False
    assert one["reply"] == two["reply"]
    assert len(fake_llm.requests) == 1
    assert len(await replies_for(shared.db, shared.tenant, one["message_id"])) == 1


async def test_duplicate_deliveries_at_once_get_one_reply(shared: Shared, fake_llm: FakeLLM) -> None:
    db, tenant, agent = shared.db, shared.tenant, shared.agent
    results = await asyncio.gather(*(accept(db, shared.queue, message(tenant, agent, "same-event", "hi")) for _ in range(8)))
    assert len({r.id for r in results}) == 1 and sum(not r.duplicate for r in results) == 1
    row = await wait_final(db, tenant, results[0].id)
    assert row.status == "replied"
    await shared.settle()  # any second doorbell has been taken by now
    assert len(await replies_for(db, tenant, row.id)) == 1
    assert asked(fake_llm, "hi") == 1 and len(fake_llm.requests) == 2  # the message once, and the later one


async def test_worker_killed_mid_call_answers_exactly_once_after_restart(
    acme: tuple[TenantInfo, AgentInfo], settings: Settings, queue: Queue, start_worker: object, fake_llm: FakeLLM, db: Database
) -> None:
    tenant, agent = acme
    fake_llm.delay = 2.0
    worker = start_worker()  # type: ignore[operator]
    stored = await accept(db, queue, message(tenant, agent, "crash-1", "Are you there?"))
    wait_for(lambda: fake_llm.in_flight >= 1, 20, "the LLM call to start")
    assert (await inbox_row(db, tenant, stored.id)).status == "processing"
    worker.kill()  # type: ignore[attr-defined]  # SIGKILL: no cleanup, no goodbye
    fake_llm.delay = 0.0
    restarted = start_worker()  # type: ignore[operator]
    row = await wait_final(db, tenant, stored.id)
    assert row.status == "replied" and row.attempts == 2
    # A later message answered, then a graceful stop (in-flight work finishes first): every doorbell is done with.
    marker = await accept(db, queue, message(tenant, agent, "after-crash", "still there?", conversation="marker"))
    assert (await wait_final(db, tenant, marker.id)).status == "replied"
    assert restarted.stop(signal.SIGINT) == 0  # type: ignore[attr-defined]
    replies = await replies_for(db, tenant, stored.id)
    assert len(replies) == 1 and replies[0].text == "[fake-model] You said: Are you there?"


async def test_lost_doorbell_is_rung_again_by_the_sweeper(
    acme: tuple[TenantInfo, AgentInfo], tmp_path: Path, database_url: str, fake_llm: FakeLLM, db: Database
) -> None:
    tenant, agent = acme
    stored = await store(db, message(tenant, agent, "never-queued", "hello?"))  # stored, but never enqueued
    grace = 0.2

    async def age() -> float:
        async with db.tenant(tenant_id=tenant.id) as session:
            seconds = await session.scalar(select(func.extract("epoch", func.now() - InboxRow.received_at)).where(InboxRow.id == stored.id))
            assert seconds is not None
            return float(seconds)

    await wait_until(age, lambda seconds: seconds > grace, 10, "the message to be older than worker.received_grace")
    config = write_config(tmp_path / "sweep", database_url, fake_llm.url, worker={"received_grace": grace})
    proc = Proc("worker", ["worker"], config=config, log_dir=tmp_path)
    try:
        proc.wait_for_log(" ready: ")
        row = await wait_final(db, tenant, stored.id)
    finally:
        proc.stop()
    assert row.status == "replied"
    assert "re-queued 1 stuck message" in proc.log()


async def test_failed_llm_leaves_message_failed_and_apologises(shared: Shared, fake_llm: FakeLLM) -> None:
    fake_llm.fail_status = 503
    settings = shared.settings
    result = shared.cli("chat", "-t", "acme", "-a", "Ava", "-m", "hello", "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["status"] == "failed" and data["reply"] == settings.agent.apology
    assert "503" in data["error"] or "ServiceUnavailable" in data["error"]
    assert "sk-test-key-0001" not in result.stdout + result.stderr
    row = await inbox_row(shared.db, shared.tenant, data["message_id"])
    assert row.status == "failed" and row.error


async def test_suspended_tenant_does_not_answer(shared: Shared, fake_llm: FakeLLM) -> None:
    db, tenant, agent = shared.db, shared.tenant, shared.agent
    stored = await store(db, message(tenant, agent, "before-suspend", "hi"))
    await set_status(db, tenant.slug, "suspended", actor="test")
    shared.queue.enqueue(tenant.id, stored.id)
    row = await wait_final(db, tenant, stored.id)
    assert row.status == "ignored" and "suspended" in (row.error or "")
    assert fake_llm.requests == [] and await replies_for(db, tenant, stored.id) == []
    # A real process: what a shell sees is exit code 1 and one clear line.
    refused = konstruct("chat", "-t", tenant.slug, "-a", "Ava", "-m", "hi", config=shared.config)
    assert refused.returncode == 1 and "suspended" in refused.stderr and "Traceback" not in refused.stderr


async def test_one_worker_keeps_many_conversations_in_flight(shared: Shared, fake_llm: FakeLLM) -> None:
    db, queue, tenant, agent = shared.db, shared.queue, shared.tenant, shared.agent
    warm = await accept(db, queue, message(tenant, agent, "warm-up", "hi", conversation="warm"))
    await wait_final(db, tenant, warm.id)  # the worker has imported litellm
    fake_llm.delay, fake_llm.max_in_flight = 1.0, 0
    started = time.monotonic()
    stored = [await accept(db, queue, message(tenant, agent, f"m{n}", f"q{n}", conversation=f"c{n}")) for n in range(30)]
    rows = [await wait_final(db, tenant, s.id) for s in stored]
    took = time.monotonic() - started
    assert all(r.status == "replied" for r in rows)
    assert fake_llm.max_in_flight >= 20, f"only {fake_llm.max_in_flight} LLM calls at once"
    assert took < 20, f"30 one-second answers took {took:.1f}s: one after another would take 30s"


async def test_no_worker_is_a_clear_error(acme: tuple[TenantInfo, AgentInfo], config_path: Path, db: Database) -> None:
    result = konstruct("chat", "-t", "acme", "-a", "Ava", "-m", "anyone?", config=config_path)
    assert result.returncode == 1
    assert "no worker is running" in result.stderr and "Traceback" not in result.stderr
    async with db.tenant(tenant_id=acme[0].id) as session:
        assert await session.scalar(select(func.count()).select_from(InboxRow)) == 0


async def test_worker_stops_gracefully_on_sigint(acme: tuple[TenantInfo, AgentInfo], start_worker: object, db: Database) -> None:
    worker = start_worker()  # type: ignore[operator]
    assert worker.stop(signal.SIGINT) == 0  # type: ignore[attr-defined]
    assert "worker stopped" in worker.log()  # type: ignore[attr-defined]


async def test_a_message_that_keeps_crashing_its_worker_is_given_up(shared: Shared, fake_llm: FakeLLM) -> None:
    """Not an endless loop: after worker.max_attempts crashes while it ran alone, the row is failed, the person gets
    the apology, and the model is not asked again (tests/test_crash_safety.py makes the crashes for real)."""
    db, settings, tenant, agent = shared.db, shared.settings, shared.tenant, shared.agent
    stored = await store(db, message(tenant, agent, "poison", "boom"))
    async with db.tenant(tenant_id=tenant.id) as session:  # as if five workers had died on it already
        await session.execute(update(InboxRow).where(InboxRow.id == stored.id).values(crashes=settings.worker.max_attempts))
    shared.queue.enqueue(tenant.id, stored.id)
    row = await wait_final(db, tenant, stored.id)
    assert row.status == "failed" and "gave up after 5 attempts" in (row.error or "")
    assert fake_llm.requests == []
    assert [r.text for r in await replies_for(db, tenant, stored.id)] == [settings.agent.apology]


def test_a_worker_is_ready_without_the_channels_sdks_and_loads_them_just_after() -> None:
    """What `konstruct worker` imports before it is ready leaves out what it loads in threads just after (and what
    the spare loads before it forks): the channels' SDKs and HTTP clients, numpy, litellm, and `up`'s supervisor.
    Imported with the rest they made its start-up 0.93 s instead of 0.72 s, on `up`'s path to ready."""
    import sys

    late = ("slack_sdk", "aiohttp", "httpx", "numpy", "litellm", "konstruct.cli.supervisor")
    probe = (
        "import sys; import konstruct.cli.serve, konstruct.worker.main; "
        f"late = {late!r}; print(sorted(m for m in late if m in sys.modules)); "
        "from konstruct.channels import registry; registry.preload(); print(sorted(m for m in late if m in sys.modules))"
    )
    before, after = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert before == "[]", before
    assert all(f"'{module}'" in after for module in ("slack_sdk", "aiohttp", "httpx")), after


def test_the_warm_up_makes_no_full_collector_pass_and_is_frozen_out_of_it() -> None:
    """The warm-up after ready imports litellm and the SDKs (hundreds of thousands of objects) beside the first answers:
    the collector's full passes, each walking all of them and each stopping every conversation, are held off until it
    is done, and what it imported is frozen. The young generations are still collected meanwhile."""
    import sys

    from tests.helpers import cli_env

    probe = (
        "import gc, konstruct.worker.main as main; gc.collect(); gc.freeze(); before = gc.get_freeze_count(); "
        "threshold = gc.get_threshold(); passes = []; "
        "gc.callbacks.append(lambda phase, info: phase == 'stop' and passes.append(info['generation'])); "
        "main._warm_up_and_freeze('openai/gpt-4o-mini'); "
        "print(passes.count(2), passes.count(0) > 0, gc.get_freeze_count() - before > 100_000, gc.get_threshold() == threshold)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    # no full pass; young passes still ran; the imports frozen; the collector's thresholds as they were
    assert done.stdout.split() == ["0", "True", "True", "True"], done.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread is Linux's")
def test_the_warm_up_runs_in_a_thread_of_its_own_at_a_lower_priority() -> None:
    import os
    import threading

    from konstruct.worker.runtime import BEHIND_NICE, behind

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen: dict[str, Any] = {}

    def work() -> None:
        seen.update(name=threading.current_thread().name, nice=nice())

    caller = nice()
    behind(work).result(timeout=10)
    assert seen["name"].startswith("konstruct-warm-up") and seen["nice"] == min(19, caller + BEHIND_NICE)
    assert nice() == caller  # only the warm-up's thread is lowered

    def fails() -> None:
        raise RuntimeError("import failed")

    with pytest.raises(RuntimeError, match="import failed"):
        behind(fails).result(timeout=10)


async def test_channels_are_built_when_first_looked_up(settings: Settings, db: Database) -> None:
    from konstruct.channels.registry import channels
    from konstruct.channels.slack.channel import SlackChannel

    found = channels(settings, db)
    assert list(found) == ["terminal", "slack", "whatsapp"] and len(found) == 3 and found.built() == []
    slack = found["slack"]
    assert isinstance(slack, SlackChannel) and found.get("slack") is slack and found.built() == [slack]
    assert found.get("fax") is None and "fax" not in found
    with pytest.raises(KeyError):
        found["fax"]
