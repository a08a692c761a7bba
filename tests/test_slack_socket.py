"""Slack Socket Mode end to end: a real gateway holds the app's websocket to the fake Slack (tests/fakes/slack_socket.py),
events arrive as envelopes and are acknowledged only once stored, a real worker answers each once; with two gateways,
the socket moves to the survivor within seconds when its holder is SIGKILLed."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.engine import URL

from konstruct.agent.agents import create_agent
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.db.models import ReplyFeedback
from konstruct.tenancy.tenants import create_tenant
from tests.fakes.llm import FakeLLM
from tests.fakes.slack import FakeSlack
from tests.fakes.slack_socket import Ack, FakeSocketMode
from tests.helpers import Proc, cli_env, free_port, konstruct_in_process, wait_for
from tests.shared import SharedStack, shared_stack, unique_slug, wait_finished
from tests.test_slack import BOT_USER, mention, message, new_ts, unique_team
from tests.test_slack_feedback import PERSON, click_payload

SIGNING = "socket-app-signing-secret"
TAKEOVER_WITHIN = 10.0  # seconds: the survivors retry every 2 s, and the dead holder's session ends at once


@pytest.fixture(scope="module")
def fake_slack_server() -> Iterator[FakeSlack]:
    fake = FakeSlack().start()
    fake.start_socket_mode()
    yield fake
    fake.stop()


@pytest.fixture
def fake_slack(fake_slack_server: FakeSlack) -> FakeSlack:
    fake_slack_server.reset()
    fake_slack_server.retry_after = 0
    return fake_slack_server


@pytest.fixture(scope="module")
def stack(
    pg_server: URL, template_db: str, tmp_path_factory: pytest.TempPathFactory, fake_llm_server: FakeLLM, fake_slack_server: FakeSlack
) -> Iterator[SharedStack]:
    slack: dict[str, object] = {"api_url": fake_slack_server.url, "stream": False}  # the answers are read as chat.update
    with shared_stack(pg_server, template_db, tmp_path_factory.mktemp("slack-socket"), fake_llm_server.url, slack=slack) as shared:
        yield shared


@dataclass
class SocketSystem:
    stack: SharedStack
    db: Database
    slack: FakeSlack
    tenant_id: uuid.UUID
    slug: str
    team: str
    bot_token: str
    app_token: str

    @property
    def socket(self) -> FakeSocketMode:
        assert self.slack.socket is not None
        return self.slack.socket

    def event(self, event: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
        return {
            "token": "legacy-verification-token",
            "team_id": self.team,
            "api_app_id": "A0000000001",
            "event": event,
            "type": "event_callback",
            "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
            "event_time": int(time.time()),
        }

    def wait_connected(self, after: float = 0.0, timeout: float = 20) -> None:
        """Until a gateway has the app's websocket open (one opened after `after`)."""
        wait_for(
            lambda: [c for c in self.socket.open_connections(self.app_token) if c.opened_at >= after],
            timeout,
            f"a Socket Mode connection; gateway log:\n{self.stack.gateway.log()[-3000:]}",
        )

    def wait_acked(self, envelope_id: str, timeout: float = 15) -> list[Ack]:
        wait_for(
            lambda: self.socket.acked(envelope_id), timeout, f"the ack of {envelope_id}; gateway log:\n{self.stack.gateway.log()[-3000:]}"
        )
        return self.socket.acked(envelope_id)

    def updates(self) -> list[Any]:
        return [c for c in self.slack.calls_to("chat.update") if not c.rate_limited and c.token == self.bot_token]

    def socket_state(self) -> dict[str, Any]:
        listed = konstruct_in_process("channel", "list", "--tenant", self.slug, "--json", config=self.stack.config)
        assert listed.returncode == 0, listed.stderr
        (connection,) = json.loads(listed.stdout)
        state: dict[str, Any] = connection["socket"]
        return state

    def tried_lock(self, pid: int) -> bool:
        """Has gateway `pid`'s lock session tried for a Socket Mode lock (its last statement, in pg_stat_activity)?"""
        with psycopg.connect(self.stack.database_url) as conn:
            row = conn.execute(
                "select count(*) from pg_stat_activity where application_name = %s and query like %s",
                (f"konstruct gateway {pid} socket mode", "%pg_try_advisory_lock%"),
            ).fetchone()
        return bool(row and row[0])

    def stored(self, external_id: str) -> int:
        """Inbox rows for this message, read as the server's superuser (no tenant needed): what the ack check uses."""
        with psycopg.connect(self.stack.database_url) as conn:
            row = conn.execute(
                "select count(*) from inbound_messages where tenant_id = %s and external_id = %s", (self.tenant_id, external_id)
            ).fetchone()
        return int(row[0]) if row else 0


@pytest.fixture
async def socket_system(stack: SharedStack, fake_slack: FakeSlack) -> AsyncIterator[SocketSystem]:
    """A tenant with one agent and a single-workspace app connected with an app-level token (Socket Mode)."""
    db = Database(load_settings(stack.config))
    slug, team = unique_slug("sock"), unique_team()
    bot_token, app_token = f"xoxb-{uuid.uuid4().hex[:12]}", f"xapp-1-A0000000001-{uuid.uuid4().hex[:16]}"
    tenant = await create_tenant(db, name="Sock", slug=slug, actor="test")
    await create_agent(db, tenant, name="Ava", role="Support", persona="Helpful and brief.", model=None, actor="test")
    fake_slack.add_token(bot_token, team_id=team, team="Sock HQ", user_id=BOT_USER)
    fake_slack.add_app_token(app_token, team_id=team)
    env = cli_env(SLACK_BOT=bot_token, SLACK_SIGNING=SIGNING, SLACK_APP=app_token)
    connected = konstruct_in_process(
        "channel", "connect", "slack", "--tenant", slug, "--bot-token-env", "SLACK_BOT", "--signing-secret-env", "SLACK_SIGNING",
        "--app-token-env", "SLACK_APP", config=stack.config, env=env,
    )  # fmt: skip
    assert connected.returncode == 0, connected.stderr
    assert "Socket Mode" in connected.stdout and app_token not in connected.stdout
    system = SocketSystem(stack, db, fake_slack, tenant.id, slug, team, bot_token, app_token)
    yield system
    await wait_finished(db, tenant.id, timeout=10)
    # Disconnected, so no gateway keeps this test's socket open into the next test.
    konstruct_in_process("channel", "disconnect", team, "--tenant", slug, "--yes", config=stack.config)
    await db.dispose()


async def test_events_over_the_socket_are_stored_then_acked_and_answered_once(socket_system: SocketSystem) -> None:
    system = socket_system
    system.wait_connected()
    state = system.socket_state()
    assert state["held"] and state["pid"] == system.stack.gateway.process.pid, state
    wait_for(lambda: system.socket_state()["state"] == "connected", 10, "the socket reported connected")
    shown = konstruct_in_process("channel", "show", system.team, "--tenant", system.slug, config=system.stack.config)
    assert f"connected, held by gateway pid {system.stack.gateway.process.pid} on" in " ".join(shown.stdout.split()), shown.stdout
    assert system.app_token not in shown.stdout

    ts = new_ts()
    external_id = f"C0000000001:{ts}"
    stored_at_ack: dict[str, int] = {}
    system.socket.on_ack = lambda ack: stored_at_ack.__setitem__(ack.envelope_id, system.stored(external_id))
    payload = system.event(mention(ts), event_id="Ev0SOCKET001")
    first = system.socket.send_event(system.app_token, payload)
    system.wait_acked(first)
    # Slack's redelivery of the same event, and the `message` event it also sends for a mention.
    retry = system.socket.send_event(system.app_token, payload, retry_attempt=1)
    twin = system.socket.send_event(system.app_token, system.event(message(ts, "<@U0000000BOT> what is our refund policy?")))
    for envelope in (first, retry, twin):
        assert len(system.wait_acked(envelope)) == 1
    assert system.socket.ack_errors == []
    assert stored_at_ack[first] == 1, "acknowledged before the message was stored"

    wait_for(lambda: len(system.updates()) >= 1, 30, "the answer")
    assert await wait_finished(system.db, system.tenant_id, 1)
    assert len(system.updates()) == 1
    update = system.updates()[0]
    assert update.args["text"] == "[fake-model] You said: what is our refund policy?"
    posts = [c for c in system.slack.calls_to("chat.postMessage") if c.token == system.bot_token]
    assert len(posts) == 1 and posts[0].args["thread_ts"] == ts

    doctor = konstruct_in_process("doctor", "--json", config=system.stack.config)
    line = next(c for c in json.loads(doctor.stdout)["checks"] if c["check"] == "slack sockets")
    assert line["status"] == "ok" and system.slug in line["detail"] and f"pid {system.stack.gateway.process.pid}" in line["detail"]


async def test_a_feedback_click_over_the_socket_is_stored(socket_system: SocketSystem) -> None:
    """Socket Mode apps have no interactivity URL: the click comes as an `interactive` envelope, acted on once acked."""
    system = socket_system
    system.wait_connected()
    system.socket.send_event(system.app_token, system.event(mention(new_ts())))
    wait_for(lambda: len(system.updates()) >= 1, 30, "the answer")
    (block,) = [b for b in system.updates()[0].args["blocks"] if b["type"] == "context_actions"]
    payload = click_payload(system.team, block, "negative", channel="C0000000001")
    system.wait_acked(system.socket.send_envelope(system.app_token, "interactive", payload))
    async with system.db.tenant(tenant_id=system.tenant_id) as session:
        votes = [(v.voter, v.value) for v in await session.scalars(select(ReplyFeedback))]
    assert votes == [(PERSON, -1)]


async def test_slack_refreshing_the_connection_loses_nothing(socket_system: SocketSystem) -> None:
    """Slack sends `disconnect` before it moves a connection: the gateway opens a new one, events keep coming once."""
    system = socket_system
    system.wait_connected()
    refreshed_at = time.time()
    system.socket.send_disconnect(system.app_token)
    system.wait_connected(after=refreshed_at)
    wait_for(lambda: len(system.socket.open_connections(system.app_token)) == 1, 10, "the old connection closed")
    opens = [c for c in system.slack.calls_to("apps.connections.open") if c.token == system.app_token]
    assert len(opens) >= 2  # a fresh URL for the new connection
    envelope = system.socket.send_event(system.app_token, system.event(mention(new_ts(), "<@U0000000BOT> after the refresh")))
    assert len(system.wait_acked(envelope)) == 1
    wait_for(lambda: len(system.updates()) >= 1, 30, "the answer")
    assert await wait_finished(system.db, system.tenant_id, 1) and len(system.updates()) == 1
    # Envelopes nothing here handles are acknowledged all the same (else Slack delivers them again), and store nothing.
    other = system.socket.send_envelope(system.app_token, "slash_commands", {"command": "/konstruct", "team_id": system.team})
    assert len(system.wait_acked(other)) == 1
    assert await wait_finished(system.db, system.tenant_id, 1)


async def test_a_disconnected_app_lets_go_of_its_socket(socket_system: SocketSystem) -> None:
    system = socket_system
    system.wait_connected()
    disconnected = konstruct_in_process("channel", "disconnect", system.team, "--tenant", system.slug, "--yes", config=system.stack.config)
    assert disconnected.returncode == 0, disconnected.stderr
    wait_for(lambda: not system.socket.open_connections(system.app_token), 10, "the socket closed")


@pytest.mark.parametrize(
    "app_token, says",
    [("xoxb-not-an-app-token", "not an app-level token"), ("xapp-1-A0-unknown", "Slack rejected the app-level token (invalid_auth)")],
)
async def test_a_bad_app_token_is_one_red_line(stack: SharedStack, fake_slack: FakeSlack, app_token: str, says: str) -> None:
    db = Database(load_settings(stack.config))
    slug, bot_token = unique_slug("badapp"), f"xoxb-{uuid.uuid4().hex[:12]}"
    await create_tenant(db, name="Bad", slug=slug, actor="test")
    await db.dispose()
    fake_slack.add_token(bot_token, team_id=unique_team())
    env = cli_env(SLACK_BOT=bot_token, SLACK_SIGNING=SIGNING, SLACK_APP=app_token)
    result = konstruct_in_process(
        "channel", "connect", "slack", "--tenant", slug, "--bot-token-env", "SLACK_BOT", "--signing-secret-env", "SLACK_SIGNING",
        "--app-token-env", "SLACK_APP", config=stack.config, env=env,
    )  # fmt: skip
    assert result.returncode == 1 and says in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and app_token not in result.stderr


def second_gateway(stack: SharedStack) -> Proc:
    """Another gateway process on the same database and config, on a port of its own."""
    port = free_port()
    text = re.sub(r"(?m)^port = \d+$", f"port = {port}", stack.config.read_text())
    text = re.sub(r'(?m)^public_url = ".*"$', f'public_url = "http://127.0.0.1:{port}"', text)
    config = stack.config.with_name("second-gateway.toml")
    config.write_text(text)
    gateway = Proc("gateway-2", ["gateway"], config=config, log_dir=stack.log_dir)
    gateway.wait_for_log("Uvicorn running on")
    return gateway


async def test_the_socket_moves_to_another_gateway_when_its_holder_is_killed(socket_system: SocketSystem) -> None:
    """Last in the module: it kills the module's gateway (and starts a new one for what follows)."""
    system, stack = socket_system, socket_system.stack
    system.wait_connected()
    other = second_gateway(stack)
    try:
        first_holder = system.socket_state()["pid"]
        assert first_holder == stack.gateway.process.pid
        # The second gateway has tried for the lock (its lock session ran pg_try_advisory_lock), and did not get it.
        wait_for(lambda: system.tried_lock(other.process.pid), 10, "the second gateway trying for the socket")
        assert system.socket_state()["pid"] == first_holder
        assert len(system.socket.open_connections(system.app_token)) == 1
        killed_at = time.time()
        stack.gateway.kill()
        system.wait_connected(after=killed_at, timeout=TAKEOVER_WITHIN)
        taken_over = time.time() - killed_at
        wait_for(lambda: system.socket_state()["pid"] == other.process.pid, 10, "the second gateway named as the holder")
        assert len(system.socket.open_connections(system.app_token)) == 1
        assert taken_over < TAKEOVER_WITHIN

        ts = new_ts()
        envelope = system.socket.send_event(system.app_token, system.event(mention(ts, "<@U0000000BOT> still there?")))
        assert len(system.wait_acked(envelope)) == 1
        wait_for(lambda: len(system.updates()) >= 1, 30, "the answer through the second gateway")
        assert await wait_finished(system.db, system.tenant_id, 1)
        assert len(system.updates()) == 1 and system.updates()[0].args["text"].endswith("still there?")
    finally:
        other.stop()
        stack.gateway = Proc("gateway", ["gateway"], config=stack.config, log_dir=stack.log_dir)
        stack.gateway.wait_for_log("Uvicorn running on")
