"""Nothing lost when a part dies: `up` supervises everything (the embedded PostgreSQL too), a worker's death is
charged only to the message that caused it, a database outage is ridden through with quick 503s.

Real processes throughout: `up`, its gateway, worker and standby, the embedded PostgreSQL, SIGKILL."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import psutil
import psycopg
import pytest
from sqlalchemy import select

from konstruct.agent.agents import AgentInfo, create_agent
from konstruct.config import Settings, load_settings
from konstruct.db.embedded import EmbeddedServer, postmaster_pid
from konstruct.db.engine import Database, unavailable
from konstruct.db.models import InboundMessage as InboxRow
from konstruct.db.models import Message
from konstruct.db.urls import resolve_urls
from konstruct.errors import DatabaseUnavailable
from konstruct.inbox import accept, requeue_stuck
from konstruct.logs import OutageFilter
from konstruct.messaging import InboundMessage
from konstruct.supervision import read_state
from konstruct.tenancy.tenants import TenantInfo, create_tenant
from konstruct.worker.queue import Queue, make_queue
from tests.chaos import Chaos
from tests.conftest import write_config
from tests.fakes.llm import FakeLLM
from tests.fakes.slack import FakeSlack, sign
from tests.helpers import Proc, cli_env, konstruct, wait_for


@pytest.fixture(scope="module")
def chaos_slack() -> Iterator[FakeSlack]:
    fake = FakeSlack().start()
    fake.retry_after = 0
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def chaos_llm() -> Iterator[FakeLLM]:
    fake = FakeLLM().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory, chaos_llm: FakeLLM, chaos_slack: FakeSlack) -> Iterator[Chaos]:
    with Chaos(tmp_path_factory.mktemp("chaos"), chaos_llm, chaos_slack) as run:
        yield run


@pytest.mark.alone  # it measures time: run with nothing beside it (the Makefile's second pass)
def test_a_killed_worker_is_replaced_and_answers_within_two_seconds(chaos: Chaos) -> None:
    """The warm standby takes over: a message waiting when the worker dies is answered within 2 s of the kill."""
    chaos.llm.delay = 0.0
    first = chaos.send_event(0)
    assert first.acked
    wait_for(chaos.settled, 30, "the first answer")
    assert chaos.kill_worker()
    killed = time.monotonic()
    waiting = chaos.send_event(1)  # stored by the gateway while no worker runs
    assert waiting.acked
    wait_for(chaos.settled, 10, "the answer after the kill", interval=0.02)
    took = time.monotonic() - killed
    assert took < 2.0, f"{took:.2f}s from the kill to the answer"
    assert "standby: started worker pid" in chaos.up.log()  # type: ignore[union-attr]  # forked, ready, by the spare


@pytest.mark.alone  # it measures time: run with nothing beside it (the Makefile's second pass)
def test_chaos_every_message_answered_exactly_once(chaos: Chaos) -> None:
    """Slack events and terminal chats stream in; the worker is SIGKILLed 10 times and the embedded PostgreSQL once."""
    chaos.llm.delay = 0.3
    kills_before = chaos.worker_kills  # the module's earlier test killed one too
    chaos.run(events=120, rate=4.0, chats=6, worker_kills=10, database_kills=1)
    report = chaos.report(settle=120)
    detail = "\n".join(report.lines()) + "\n" + "\n".join(report.unanswered[:10] + report.answered_twice[:10])
    assert report.worker_kills - kills_before == 10 and report.database_kills == 1, detail
    assert report.events_acked == report.events_sent, detail  # Slack's retries got through the outage
    assert report.unanswered == [] and report.answered_twice == [], detail
    assert report.answered_once == report.events_sent + report.chats_sent, detail
    assert report.stray_placeholders == 0 and report.failed_rows == 0 and report.chats_answered_late == 0, detail
    assert report.up_alive, detail
    assert max(report.recoveries) < 10, detail
    log = chaos.up.log()  # type: ignore[union-attr]
    assert "embedded PostgreSQL is back" in log
    # An outage is told in a few lines, not a traceback per request.
    assert log.count("Traceback") == 0, log[-5000:]

    doctor = konstruct("doctor", "--json", config=chaos.config)
    checks = {c["check"]: c for c in json.loads(doctor.stdout)["checks"]}
    restarts = (chaos.state() or {})["parts"]["worker"]["restarts"]
    assert restarts >= 10
    assert f"worker running, {restarts} restarts in the last 10 min" in checks["supervisor"]["detail"], checks
    assert "database restarted 1 time(s)" in checks["supervisor"]["detail"], checks
    assert checks["messages"]["status"] == "ok", checks

    # `up` stops cleanly: every part, the embedded PostgreSQL included, and no stale pid files.
    assert chaos.up is not None
    assert chaos.up.stop(signal.SIGINT, timeout=60) == 0
    data = chaos.settings.data_dir
    assert postmaster_pid(data) is None, "the embedded PostgreSQL was left running"
    assert not (data / "up.json").exists()
    assert json.loads((data / "pg" / ".handle_pids.json").read_text() or "[]") == []


def _poison_plugin(root: Path) -> Path:
    """A tool plugin, installed the way pip installs one (a module and its dist-info with an entry point), whose
    tool kills the process that runs it: a native crash, as a broken C extension would cause."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "konstruct_crash_tool.py").write_text(
        textwrap.dedent("""
        import os, signal
        from konstruct.agent.tools import Tool

        async def crash(args, ctx):
            os.kill(os.getpid(), signal.SIGKILL)

        tool = Tool(name="crash", description="Crashes.", parameters={"type": "object", "properties": {}}, run=crash)
        """)
    )
    info = root / "konstruct_crash_tool-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: konstruct-crash-tool\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[konstruct.tools]\ncrash = konstruct_crash_tool:tool\n")
    return root


async def test_a_poison_message_is_given_up_alone_and_the_others_are_answered(
    tmp_path: Path, database_url: str, fake_llm: FakeLLM, db: Database
) -> None:
    config = write_config(tmp_path / "site", database_url, fake_llm.url, worker={"max_attempts": 3, "heartbeat_interval": 0.5, "stale_after": 10},
                          up={"stable_after": 0.5, "max_backoff": 2.0})  # fmt: skip
    env = cli_env(PYTHONPATH=str(_poison_plugin(tmp_path / "plugins")))
    tenant = await create_tenant(db, name="Acme", slug="acme", actor="test")
    ava = await create_agent(db, tenant, name="Ava", role="Support", persona="Brief.", model=None, actor="test")
    updated = konstruct("agent", "update", "Ava", "--tenant", "acme", "--tools", "crash", config=config, env=env)
    assert updated.returncode == 0, updated.stderr
    up = Proc("up", ["up"], config=config, log_dir=tmp_path, env=env)
    try:
        up.wait_for_log("Konstruct is up", timeout=90)
        settings = load_settings(config)
        queue = make_queue(settings, resolve_urls(settings))
        fake_llm.delay = 0.5  # the others are in flight when the poison strikes
        poison = await accept(db, queue, _message(tenant, ava, "poison", "please [[call crash {}]]"))
        others = [await accept(db, queue, _message(tenant, ava, f"fine-{n}", f"fine question {n}")) for n in range(6)]
        assert poison is not None and all(others)
        rows = [await _wait_final(db, tenant, stored.id, timeout=120) for stored in [poison, *others]]  # type: ignore[union-attr]
        assert rows[0].status == "failed" and "gave up after 3 attempts" in (rows[0].error or ""), up.log()[-4000:]
        assert all(row.status == "replied" for row in rows[1:]), [(r.external_id, r.status, r.error) for r in rows]
        async with db.tenant(tenant_id=tenant.id) as session:
            replies = list(await session.execute(select(Message.inbound_id, Message.text).where(Message.direction == "out")))
        by_inbound: dict[uuid.UUID | None, list[str]] = {}
        for inbound_id, reply in replies:
            by_inbound.setdefault(inbound_id, []).append(reply)
        assert by_inbound[rows[0].id] == [settings.agent.apology]  # the person is told, once
        assert all(len(by_inbound[row.id]) == 1 for row in rows[1:])
        # None of the innocent messages was charged: they were never alone when a worker died.
        assert all(row.crashes == 0 for row in rows[1:]), [(r.external_id, r.crashes) for r in rows]
        assert rows[0].crashes == 3
        assert "Konstruct is up" in up.log() and up.process.poll() is None
        queue.close()
    finally:
        up.stop(timeout=60)


def _message(tenant: TenantInfo, agent: AgentInfo, external_id: str, body: str) -> InboundMessage:
    return InboundMessage(tenant.id, agent.id, "terminal", external_id, f"cli:{external_id}", "pat", body)


async def _wait_final(db: Database, tenant: TenantInfo, inbound_id: uuid.UUID, timeout: float) -> InboxRow:
    deadline = time.monotonic() + timeout
    while True:
        async with db.tenant(tenant_id=tenant.id) as session:
            row = await session.get(InboxRow, inbound_id)
        assert row is not None
        if row.status in ("replied", "failed", "ignored") or time.monotonic() > deadline:
            return row
        await asyncio.sleep(0.1)


def test_gateway_answers_503_quickly_while_the_database_is_down_and_recovers(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """No `up` here, so nothing restarts the database: the gateway alone rides through the outage."""
    config = write_config(tmp_path, None, fake_llm.url)
    settings = load_settings(config)
    migrated = konstruct("db", "upgrade", config=config)
    assert migrated.returncode == 0, migrated.stderr
    gateway = Proc("gateway", ["gateway"], config=config, log_dir=tmp_path)
    base = f"http://127.0.0.1:{settings.gateway.port}"
    try:
        gateway.wait_for_log("Uvicorn running on")
        assert httpx.get(f"{base}/healthz").status_code == 200
        pid = postmaster_pid(settings.data_dir)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: postmaster_pid(settings.data_dir) is None, 10, "the postmaster to die")
        body = json.dumps({"object": "whatsapp_business_account", "entry": []}).encode()
        timings = []
        for _ in range(40):
            started = time.monotonic()
            # Well-formed (signed with some secret): the gateway must look the team up, so it meets the outage.
            slack_body = b'{"team_id": "T0000000001", "type": "event_callback"}'
            response = httpx.post(f"{base}/slack/events", content=slack_body, headers=sign(slack_body, "some-secret"), timeout=10)
            timings.append(time.monotonic() - started)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert (
                httpx.post(f"{base}/whatsapp/webhook", content=body, headers={"X-Hub-Signature-256": "sha256=" + "0" * 64}).status_code
                == 503
            )
        assert max(timings) < 1.0, timings
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 503, 5, "/healthz to say unhealthy")
        assert "unavailable" in httpx.get(f"{base}/healthz").json()["database"]
        # Brought back from outside, at once: right after a SIGKILL the dead postmaster may not be reaped yet (a zombie
        # that pgserver and PostgreSQL take for a running server), and restart() must start a server all the same.
        server = EmbeddedServer(settings.data_dir)
        server.restart()
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, 10, "/healthz to be healthy again")
        assert (
            httpx.post(f"{base}/slack/events", content=b'{"team_id": "T1"}', headers={"Content-Type": "application/json"}).status_code
            == 401
        )
        log = gateway.log()
        assert "Traceback" not in log, log
        # 80 refused requests, told in a handful of lines.
        assert 1 <= log.count("503, the database is unavailable") <= 3, log
        assert "the database is back" in log
    finally:
        gateway.stop(signal.SIGTERM)
        pid = postmaster_pid(settings.data_dir)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)


async def test_the_sweeper_does_not_queue_what_is_still_queued(settings: Settings, db: Database) -> None:
    """With huey's Postgres queue a backlog is not re-queued every sweep: only rows whose doorbell was lost are."""
    tenant = await create_tenant(db, name="Acme", slug="acme", actor="test")
    ava = await create_agent(db, tenant, name="Ava", role="Support", persona="Brief.", model=None, actor="test")
    queue: Queue = make_queue(settings, resolve_urls(settings))
    try:
        stored = [await accept(db, queue, _message(tenant, ava, f"backlog-{n}", "hi")) for n in range(20)]
        assert queue.pending() == 20
        with psycopg.connect(_owner(settings), autocommit=True) as conn:
            conn.execute("update inbound_messages set received_at = now() - interval '1 hour'")
        assert await requeue_stuck(db, queue, stale_after=30, received_grace=0.1) == []
        assert await requeue_stuck(db, queue, stale_after=30, received_grace=0.1) == []
        assert queue.pending() == 20
        lost = [s.id for s in stored[:5] if s]
        with psycopg.connect(_owner(settings), autocommit=True) as conn:  # as if a worker dequeued these and died
            conn.execute("delete from huey_task where inbound_id = any(%s)", (lost,))
        assert sorted(await requeue_stuck(db, queue, stale_after=30, received_grace=0.1)) == sorted(lost)
        assert await requeue_stuck(db, queue, stale_after=30, received_grace=0.1) == []
        assert queue.pending() == 20
    finally:
        queue.close()


async def test_webhooks_arriving_together_are_committed_together_and_each_answered_for_itself(settings: Settings, db: Database) -> None:
    """Group commit: messages stored at the same time share a transaction per tenant (RLS for that tenant only); each
    caller learns what became of its own message (stored, a redelivery of one stored, or refused), and one message the
    database refuses does not take the others of its batch down."""
    acme = await create_tenant(db, name="Acme", slug="acme", actor="test")
    globex = await create_tenant(db, name="Globex", slug="globex", actor="test")
    ava = await create_agent(db, acme, name="Ava", role="Support", persona="Brief.", model=None, actor="test")
    gus = await create_agent(db, globex, name="Gus", role="Support", persona="Brief.", model=None, actor="test")
    queue: Queue = make_queue(settings, resolve_urls(settings))
    try:
        messages = [_message(acme, ava, f"a-{n}", f"acme {n}") for n in range(30)] + [
            _message(globex, gus, f"g-{n}", f"globex {n}") for n in range(30)
        ]
        messages += [_message(acme, ava, "a-3", "acme 3 again"), _message(globex, gus, "g-4", "globex 4 again")]  # redeliveries
        messages.append(_message(acme, ava, "a-poison", "a NUL \x00 PostgreSQL refuses"))
        results = await asyncio.gather(*(accept(db, queue, m) for m in messages), return_exceptions=True)
        poison = results.pop()
        assert isinstance(poison, Exception) and not isinstance(poison, DatabaseUnavailable), poison
        assert all(r is not None and not isinstance(r, BaseException) for r in results), results
        stored = [r for r in results if r is not None and not isinstance(r, BaseException)]
        first = {m.external_id: s for m, s in zip(messages[:60], stored[:60], strict=True)}
        assert not any(s.duplicate for s in stored[:60]) and all(s.queued and s.status == "received" for s in stored[:60])
        again_a, again_g = stored[60:]
        assert again_a.duplicate and again_a.id == first["a-3"].id and not again_a.queued
        assert again_g.duplicate and again_g.id == first["g-4"].id and again_g.tenant_id == globex.id
        assert queue.pending() == 60  # each message queued once, the redeliveries not again
        with psycopg.connect(_owner(settings), autocommit=True) as conn:
            by_tenant: dict[uuid.UUID, list[str]] = dict(conn.execute(
                "select tenant_id, array_agg(distinct xmin::text) from inbound_messages group by tenant_id").fetchall())  # fmt: skip
            assert conn.execute("select count(*) from inbound_messages where external_id = 'a-poison'").fetchone() == (0,)
            assert conn.execute("select count(*) from messages where direction = 'in'").fetchone() == (60,)
            assert conn.execute("select count(*) from audit_events where action = 'message.received'").fetchone() == (60,)
        # 30 messages of a tenant arrived together: far fewer transactions than messages (Acme's batch was split in halves
        # down to the refused one: about two per halving), and none shared by two tenants.
        assert len(by_tenant[globex.id]) <= 2 and len(by_tenant[acme.id]) <= 12, by_tenant
        assert not set(by_tenant[acme.id]) & set(by_tenant[globex.id])
        async with db.tenant(tenant_id=acme.id) as session:  # RLS held inside the shared writer: Acme sees only its own
            rows = (await session.execute(select(InboxRow.external_id))).scalars().all()
        assert sorted(rows) == sorted(f"a-{n}" for n in range(30))
    finally:
        queue.close()


def _owner(settings: Settings) -> str:
    return resolve_urls(settings).owner_sync().replace("postgresql+psycopg://", "postgresql://")


def test_outage_errors_are_logged_once_per_interval_without_traceback() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("konstruct.test.outage")
    logger.propagate = False
    handler = Keep()
    handler.addFilter(OutageFilter(interval=60))
    logger.addHandler(handler)
    try:
        for _ in range(50):
            try:
                raise DatabaseUnavailable("the database is unavailable")
            except DatabaseUnavailable:
                logger.exception("message failed")
        try:
            raise ValueError("a real bug")
        except ValueError:
            logger.exception("unexpected")
    finally:
        logger.removeHandler(handler)
    assert len(records) == 2
    assert records[0].exc_info is None and "database is unavailable" in records[0].getMessage()
    assert records[1].exc_info is not None  # anything else keeps its traceback


def test_unavailable_tells_an_outage_from_a_bad_statement() -> None:
    assert unavailable(ConnectionRefusedError())
    assert unavailable(psycopg.OperationalError("connection failed"))
    assert unavailable(asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"))  # full for now
    assert not unavailable(ValueError("bad input"))
    assert not unavailable(psycopg.errors.UndefinedTable("no such table"))


def test_up_state_is_read_only_while_up_runs(tmp_path: Path) -> None:
    (tmp_path / "up.json").write_text(json.dumps({"pid": 2**22 + 12345, "parts": {}}))
    assert read_state(tmp_path) is None  # a dead `up` left it: not believed
    (tmp_path / "up.json").write_text(json.dumps({"pid": os.getpid(), "parts": {}}))
    assert read_state(tmp_path) == {"pid": os.getpid(), "parts": {}}


def test_parts_do_not_outlive_a_killed_up(tmp_path: Path, database_url: str, fake_llm: FakeLLM) -> None:
    """Even a SIGKILLed `up` leaves nothing running: its parts get SIGTERM from the kernel, and the spare stops
    the worker it forked before it goes."""
    config = write_config(tmp_path, database_url, fake_llm.url)
    settings = load_settings(config)
    up = Proc("up", ["up"], config=config, log_dir=tmp_path)
    up.wait_for_log("Konstruct is up", timeout=90)
    state = wait_for(
        lambda: (s := read_state(settings.data_dir)) and s["parts"].get("standby", {}).get("state") == "running" and s,
        60,
        "a warm spare",
    )
    pids = [part["pid"] for part in state["parts"].values()]
    assert len(pids) == 3 and all(pids)
    up.kill()

    def gone() -> bool:
        return not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)

    wait_for(gone, 30, f"the parts {pids} to stop after `up` was killed")
