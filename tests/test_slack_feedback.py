"""Feedback on Slack answers: the thumbs up/down block every answer carries, and clicks on it at /slack/interactive.

The gateway runs in-process over ASGI on the module's database; one real worker answers (the fake LLM, the fake Slack
Web API). Each test connects workspaces of its own to tenants of its own. Clicks are built from the very block the
fake Slack received, signed as Slack signs them, and sent form-encoded (`payload=`) as Slack sends them."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.engine import URL

from konstruct import audit
from konstruct.agent.agents import create_agent
from konstruct.channels import connections
from konstruct.channels.slack.feedback import ACTION_ID, feedback_block, feedback_click
from konstruct.config import Settings, load_settings
from konstruct.db.engine import Database
from konstruct.db.models import InboundMessage, Message, ReplyFeedback
from konstruct.tenancy.tenants import TenantInfo, create_tenant
from konstruct.tenancy.users import add_member, create_user
from konstruct.web import sessions
from tests.fakes.llm import FakeLLM
from tests.fakes.slack import FakeSlack, sign
from tests.helpers import gateway_in_process, konstruct_in_process
from tests.shared import SharedWorker, shared_worker, unique_slug, wait_finished

APP_SECRET = "distributed-app-signing-secret"
BOT_USER, PERSON, DM = "U0000000BOT", "U0000000001", "D0000000001"
FORM = "application/x-www-form-urlencoded"
PASSWORD = "a long enough password"


@pytest.fixture(scope="module")
def fake_slack() -> Iterator[FakeSlack]:
    fake = FakeSlack().start()
    fake.retry_after = 0
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def worker(
    pg_server: URL, template_db: str, tmp_path_factory: pytest.TempPathFactory, fake_llm_server: FakeLLM, fake_slack: FakeSlack
) -> Iterator[SharedWorker]:
    slack: dict[str, object] = {"api_url": fake_slack.url, "signing_secret": APP_SECRET}
    with shared_worker(pg_server, template_db, tmp_path_factory.mktemp("feedback"), fake_llm_server.url, slack=slack) as shared:
        yield shared


@pytest.fixture
def settings(worker: SharedWorker) -> Settings:
    return load_settings(worker.config)


@pytest.fixture
async def mdb(settings: Settings) -> AsyncIterator[Database]:
    db = Database(settings)
    yield db
    await db.dispose()


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_in_process(settings) as client:
        yield client


@dataclass
class Workspace:
    tenant: TenantInfo
    team: str
    secret: str
    token: str


async def workspace(db: Database, fake: FakeSlack, tenant: TenantInfo | None = None, *, mode: str = "single") -> Workspace:
    """A Slack workspace connected to a new tenant or to `tenant`: with its own app (team id, bot token, signing secret),
    or (mode "oauth") installed from the distributed app, whose signing secret signs for every workspace."""
    if tenant is None:
        tenant = await create_tenant(db, name="Acme", slug=unique_slug("acme"), actor="test")
        await create_agent(db, tenant, name="Ava", role="Support", persona="Helpful and brief.", model=None, actor="test")
    team, token = "T" + uuid.uuid4().hex[:10].upper(), f"xoxb-{uuid.uuid4().hex[:12]}"
    secret = f"signing-{uuid.uuid4().hex}" if mode == "single" else APP_SECRET
    credentials = {"bot_token": token, "signing_secret": secret} if mode == "single" else {"bot_token": token}
    fake.add_token(token, team_id=team, team="Acme HQ", user_id=BOT_USER)
    await connections.connect(
        db, db.settings, tenant, kind="slack", external_id=team, name=team, mode=mode, credentials=credentials,
        details={"bot_user_id": BOT_USER}, default_agent=None, actor="test",
    )  # fmt: skip
    return Workspace(tenant, team, secret, token)


def blocks_of(args: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = args["blocks"]
    return list(json.loads(blocks) if isinstance(blocks, str) else blocks)


async def answered(gateway: httpx.AsyncClient, db: Database, fake: FakeSlack, ws: Workspace, text: str) -> tuple[uuid.UUID, dict[str, Any]]:
    """Ask the agent in a DM through the gateway; once answered, (the stored reply's id, the answer as Slack shows it)."""
    async with db.tenant(tenant_id=ws.tenant.id) as session:
        before = len(list(await session.scalars(select(InboundMessage.id))))
    ts = f"{time.time():.6f}"
    event = {"type": "message", "user": PERSON, "text": text, "ts": ts, "channel": DM, "channel_type": "im", "event_ts": ts}
    body = json.dumps({"type": "event_callback", "team_id": ws.team, "event_id": f"Ev{uuid.uuid4().hex[:10]}", "event": event}).encode()
    response = await gateway.post("/slack/events", content=body, headers=sign(body, ws.secret))
    assert response.status_code == 200, response.text
    assert await wait_finished(db, ws.tenant.id, before + 1), "the message was not answered"
    async with db.tenant(tenant_id=ws.tenant.id) as session:
        reply_id = await session.scalar(
            select(Message.id)
            .join(InboundMessage, InboundMessage.id == Message.inbound_id)
            .where(InboundMessage.external_id == f"{DM}:{ts}", Message.direction == "out")
        )
    assert reply_id is not None
    # In a DM the answer is streamed into the thread the message starts: the message as Slack shows it, now whole.
    with fake._lock:
        shown = [m for (c, _), m in fake.messages.items() if c == DM and m.get("thread_ts") == ts and m.get("bot_id")]
    return reply_id, dict(shown[-1])


def click(team: str, block: dict[str, Any], vote: str = "positive", *, user: str = PERSON, channel: str = DM) -> bytes:
    """The form body Slack sends when `user` clicks a button of this feedback block."""
    return urlencode({"payload": json.dumps(click_payload(team, block, vote, user=user, channel=channel))}).encode()


def click_payload(team: str, block: dict[str, Any], vote: str = "positive", *, user: str = PERSON, channel: str = DM) -> dict[str, Any]:
    """The block_actions payload of that click (over HTTP form-encoded; over Socket Mode an envelope's payload)."""
    element = block["elements"][0]
    button = element[f"{vote}_button"]
    payload = {
        "type": "block_actions",
        "user": {"id": user, "username": "ann", "team_id": team},
        "api_app_id": "A0000000001",
        "token": "legacy-verification-token",
        "container": {"type": "message", "message_ts": "1700000000.000200", "channel_id": channel, "is_ephemeral": False},
        "trigger_id": "123.456.abc",
        "team": {"id": team, "domain": "acme"},
        "channel": {"id": channel, "name": "directmessage"},
        "actions": [
            {
                "type": element["type"],
                "action_id": element["action_id"],
                "block_id": block["block_id"],
                "value": button["value"],
                "text": button["text"],
                "action_ts": f"{time.time():.6f}",
            }
        ],
    }
    return payload


async def post_click(gateway: httpx.AsyncClient, body: bytes, secret: str | None, timestamp: int | None = None) -> httpx.Response:
    headers = {**sign(body, secret, timestamp), "Content-Type": FORM} if secret else {"Content-Type": FORM}
    return await gateway.post("/slack/interactive", content=body, headers=headers)


async def votes(db: Database, tenant: TenantInfo) -> list[tuple[uuid.UUID, str, int]]:
    async with db.tenant(tenant_id=tenant.id) as session:
        rows = await session.execute(select(ReplyFeedback.message_id, ReplyFeedback.voter, ReplyFeedback.value))
        return [(message_id, voter, value) for message_id, voter, value in rows.all()]


async def vote_events(db: Database, tenant: TenantInfo) -> list[dict[str, Any]]:
    return [{"actor": e.actor, "target": e.target, **e.detail} for e in await audit.events(db, tenant.id) if e.action == "feedback.vote"]


# -- the block --


def test_the_feedback_block_is_slacks_context_actions_with_feedback_buttons() -> None:
    reply = uuid.uuid4()
    block = feedback_block(reply)
    assert block == {
        "type": "context_actions",
        "block_id": f"konstruct_feedback:{reply}",
        "elements": [
            {
                "type": "feedback_buttons",
                "action_id": ACTION_ID,
                "positive_button": {"text": {"type": "plain_text", "text": "👍", "emoji": True}, "accessibility_label": "Good answer",
                                    "value": "positive"},
                "negative_button": {"text": {"type": "plain_text", "text": "👎", "emoji": True}, "accessibility_label": "Bad answer",
                                    "value": "negative"},
            }
        ],
    }  # fmt: skip
    parsed = feedback_click(json.loads(parse_qs(click("T1", block, "negative").decode())["payload"][0]))
    assert parsed is not None and parsed.reply_id == reply and parsed.value == -1 and parsed.voter == PERSON and parsed.channel == DM


# -- through the gateway and a worker --


async def test_an_answer_carries_the_buttons_and_a_signed_click_is_stored_once(
    gateway: httpx.AsyncClient, mdb: Database, fake_slack: FakeSlack
) -> None:
    ws = await workspace(mdb, fake_slack)
    reply_id, answer = await answered(gateway, mdb, fake_slack, ws, "what is the refund policy?")
    assert blocks_of(answer) == [{"type": "markdown", "text": answer["text"]}, feedback_block(reply_id)]
    block = blocks_of(answer)[-1]
    for _ in range(2):  # a second identical click (a double click) changes nothing
        response = await post_click(gateway, click(ws.team, block), ws.secret)
        assert response.status_code == 200, response.text
    assert await votes(mdb, ws.tenant) == [(reply_id, PERSON, 1)]
    assert await vote_events(mdb, ws.tenant) == [{"actor": f"slack:{PERSON}", "target": str(reply_id), "value": 1, "previous": None}]
    # Another person's vote on the same reply is theirs.
    assert (await post_click(gateway, click(ws.team, block, "negative", user="U0000000002"), ws.secret)).status_code == 200
    assert sorted(await votes(mdb, ws.tenant)) == sorted([(reply_id, PERSON, 1), (reply_id, "U0000000002", -1)])


async def test_a_changed_vote_replaces_the_first(gateway: httpx.AsyncClient, mdb: Database, fake_slack: FakeSlack) -> None:
    ws = await workspace(mdb, fake_slack)
    reply_id, answer = await answered(gateway, mdb, fake_slack, ws, "hello")
    block = blocks_of(answer)[-1]
    assert (await post_click(gateway, click(ws.team, block, "positive"), ws.secret)).status_code == 200
    assert (await post_click(gateway, click(ws.team, block, "negative"), ws.secret)).status_code == 200
    assert await votes(mdb, ws.tenant) == [(reply_id, PERSON, -1)]
    async with mdb.tenant(tenant_id=ws.tenant.id) as session:
        row = (await session.scalars(select(ReplyFeedback))).one()
        assert row.updated_at > row.created_at
    assert [(e["value"], e["previous"]) for e in await vote_events(mdb, ws.tenant)] == [(1, None), (-1, 1)]


async def test_unsigned_forged_and_stale_clicks_are_refused_and_nothing_is_stored(
    gateway: httpx.AsyncClient, mdb: Database, fake_slack: FakeSlack
) -> None:
    ws = await workspace(mdb, fake_slack)
    _, answer = await answered(gateway, mdb, fake_slack, ws, "hello")
    body = click(ws.team, blocks_of(answer)[-1])
    assert (await post_click(gateway, body, None)).status_code == 401  # unsigned
    assert (await post_click(gateway, body, "not-the-secret")).status_code == 401  # forged
    assert (await post_click(gateway, body, APP_SECRET)).status_code == 401  # a single-workspace app: only its own secret
    assert (await post_click(gateway, body, ws.secret, timestamp=int(time.time()) - 600)).status_code == 401  # stale
    garbled = [(b"x-slack-request-timestamp", b"soon"), (b"x-slack-signature", "v0=é".encode()), (b"content-type", FORM.encode())]
    assert (await gateway.post("/slack/interactive", content=body, headers=garbled)).status_code == 401
    assert await votes(mdb, ws.tenant) == [] and await vote_events(mdb, ws.tenant) == []
    # The same click, signed right, is stored: the refusals were the signatures' doing.
    assert (await post_click(gateway, body, ws.secret)).status_code == 200
    assert len(await votes(mdb, ws.tenant)) == 1


async def test_a_vote_from_another_workspace_tenant_or_channel_is_refused(
    gateway: httpx.AsyncClient, mdb: Database, fake_slack: FakeSlack
) -> None:
    ws = await workspace(mdb, fake_slack)
    reply_id, answer = await answered(gateway, mdb, fake_slack, ws, "hello")
    block = blocks_of(answer)[-1]
    other_tenant = await workspace(mdb, fake_slack)
    second_workspace = await workspace(mdb, fake_slack, tenant=ws.tenant)  # the same tenant's other workspace
    for forger in (other_tenant, second_workspace):
        response = await post_click(gateway, click(forger.team, block), forger.secret)  # correctly signed by its own app
        assert response.status_code == 404, response.text
    response = await post_click(gateway, click(ws.team, block, channel="C0000000OTHER"), ws.secret)  # not where it was answered
    assert response.status_code == 404
    body = click(ws.team, {**block, "block_id": f"konstruct_feedback:{uuid.uuid4()}"})  # a reply that does not exist
    assert (await post_click(gateway, body, ws.secret)).status_code == 404
    for tenant in (ws.tenant, other_tenant.tenant):
        assert await votes(mdb, tenant) == [] and await vote_events(mdb, tenant) == []
    # The reply's own workspace and channel may (so the refusals above were about where the votes came from).
    assert (await post_click(gateway, click(ws.team, block), ws.secret)).status_code == 200
    assert await votes(mdb, ws.tenant) == [(reply_id, PERSON, 1)]


async def test_with_the_distributed_app_a_click_counts_only_for_the_workspace_it_came_from(
    gateway: httpx.AsyncClient, mdb: Database, fake_slack: FakeSlack
) -> None:
    """One signing secret signs for every installed workspace: the workspace named in the click picks the tenant."""
    ws, other = await workspace(mdb, fake_slack, mode="oauth"), await workspace(mdb, fake_slack, mode="oauth")
    reply_id, answer = await answered(gateway, mdb, fake_slack, ws, "hello")
    block = blocks_of(answer)[-1]
    assert (await post_click(gateway, click(other.team, block), APP_SECRET)).status_code == 404
    assert (await post_click(gateway, click(ws.team, block), "a-single-app-secret")).status_code == 401
    assert await votes(mdb, ws.tenant) == [] and await votes(mdb, other.tenant) == []
    assert (await post_click(gateway, click(ws.team, block), APP_SECRET)).status_code == 200
    assert await votes(mdb, ws.tenant) == [(reply_id, PERSON, 1)]


async def test_a_disconnected_workspace_cannot_vote(gateway: httpx.AsyncClient, mdb: Database, fake_slack: FakeSlack) -> None:
    ws = await workspace(mdb, fake_slack)
    _, answer = await answered(gateway, mdb, fake_slack, ws, "hi")
    resolved = await connections.resolve(mdb, "slack", ws.team)
    assert resolved is not None
    # Disconnected before any click: the interactivity endpoint has not looked this workspace up yet.
    await connections.set_status(mdb, ws.tenant.id, resolved.id, "disconnected", actor="test", reason="test")
    response = await post_click(gateway, click(ws.team, blocks_of(answer)[-1]), ws.secret)
    assert response.status_code == 403 and await votes(mdb, ws.tenant) == []


def signed_form(payload: Any) -> bytes:
    return urlencode({"payload": payload if isinstance(payload, str) else json.dumps(payload)}).encode()


def feedback_action(**action: Any) -> dict[str, Any]:
    base = {"type": "feedback_buttons", "action_id": ACTION_ID, "block_id": f"konstruct_feedback:{uuid.uuid4()}", "value": "positive"}
    return {**base, **action}


def interaction(team: str, **fields: Any) -> dict[str, Any]:
    base = {"type": "block_actions", "team": {"id": team}, "user": {"id": PERSON}, "actions": [feedback_action()]}
    return {**base, **fields}


MALFORMED: list[Any] = [
    "not json",
    "[1, 2, 3]",
    "{" * 200 + "}" * 200,
    {"actions": [feedback_action(block_id=7)]},
    {"actions": "lots"},
    {"actions": []},
    {"actions": [feedback_action(type="button")]},
    {"actions": [feedback_action(value="meh")]},
    {"actions": [feedback_action(value=["positive"])]},
    {"actions": [feedback_action(block_id="konstruct_feedback:not-a-uuid")]},
    {"actions": [feedback_action(block_id=None)]},
    {"user": None},
    {"user": {"id": "U" * 500}},
    {"user": {"id": 7}},
    {"channel": {"id": "C\x00"}},
    {"container": {"channel_id": ["C1"]}},
]


@pytest.mark.parametrize("case", range(len(MALFORMED)))
async def test_signed_malformed_interactions_are_400_and_store_nothing(
    gateway: httpx.AsyncClient, mdb: Database, fake_slack: FakeSlack, case: int
) -> None:
    ws = await workspace(mdb, fake_slack)
    shape = MALFORMED[case]
    payload = shape if isinstance(shape, str) else interaction(ws.team, **shape)
    if isinstance(shape, str):  # not a JSON object at all: the team is unknown, so the distributed app's secret signs it
        response = await post_click(gateway, signed_form(payload), APP_SECRET)
    else:
        response = await post_click(gateway, signed_form(payload), ws.secret)
    assert response.status_code == 400, response.text
    assert await votes(mdb, ws.tenant) == []


async def test_hostile_bodies_never_get_a_5xx(gateway: httpx.AsyncClient, mdb: Database, fake_slack: FakeSlack) -> None:
    ws = await workspace(mdb, fake_slack)
    bodies = [b"", b"\xff\xfe\x00", b"payload=%ZZ", b"&".join(b"a=%d" % n for n in range(500)), b"payload=" + b"%7B" * 5000]
    for body in bodies:
        for secret in (None, APP_SECRET, ws.secret):
            response = await post_click(gateway, body, secret)
            assert response.status_code in (400, 401), (body[:40], secret, response.status_code)
    huge = b"payload=" + b"x" * 1_100_000
    assert (await post_click(gateway, huge, ws.secret)).status_code == 413


async def test_other_interactions_are_acknowledged_and_ignored(gateway: httpx.AsyncClient, mdb: Database, fake_slack: FakeSlack) -> None:
    ws = await workspace(mdb, fake_slack)
    for payload in (
        {"type": "view_submission", "team": {"id": ws.team}, "user": {"id": PERSON}, "view": {"id": "V1"}},
        interaction(ws.team, actions=[{"type": "button", "action_id": "someone_else", "block_id": "b", "value": "x"}]),
    ):
        response = await post_click(gateway, signed_form(payload), ws.secret)
        assert response.status_code == 200, response.text
    assert await votes(mdb, ws.tenant) == []


# -- where the votes show --


async def two_votes(gateway: httpx.AsyncClient, mdb: Database, fake_slack: FakeSlack) -> tuple[Workspace, uuid.UUID]:
    ws = await workspace(mdb, fake_slack)
    good, good_answer = await answered(gateway, mdb, fake_slack, ws, "what is the refund policy for digital goods?")
    _, bad_answer = await answered(gateway, mdb, fake_slack, ws, "and [bold]for[/bold] shoes?")
    assert (await post_click(gateway, click(ws.team, blocks_of(good_answer)[-1], "positive"), ws.secret)).status_code == 200
    assert (await post_click(gateway, click(ws.team, blocks_of(bad_answer)[-1], "negative"), ws.secret)).status_code == 200
    return ws, good


async def test_feedback_listing_and_usage_counts(
    gateway: httpx.AsyncClient, mdb: Database, fake_slack: FakeSlack, worker: SharedWorker
) -> None:
    ws, good = await two_votes(gateway, mdb, fake_slack)
    listed = konstruct_in_process("feedback", "--tenant", ws.tenant.slug, "--json", config=worker.config)
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data["counts"] == {"up": 1, "down": 1}
    assert [(v["vote"], v["voter"], v["channel"], v["agent"]) for v in data["votes"]] == [
        ("down", PERSON, "slack", "Ava"),
        ("up", PERSON, "slack", "Ava"),
    ]
    up = data["votes"][1]
    assert up["message_id"] == str(good) and up["question"] == "what is the refund policy for digital goods?"
    assert up["answer"] == "[fake-model] You said: what is the refund policy for digital goods?"
    table = konstruct_in_process("feedback", "--tenant", ws.tenant.slug, config=worker.config)
    assert table.returncode == 0 and "👍 1  👎 1" in table.stdout and "and [bold]for[/bold] shoes?" in table.stdout  # shown, not markup
    usage = konstruct_in_process("usage", "--tenant", ws.tenant.slug, "--json", config=worker.config)
    assert usage.returncode == 0 and json.loads(usage.stdout)["feedback"] == {"up": 1, "down": 1}
    shown = konstruct_in_process("usage", "--tenant", ws.tenant.slug, config=worker.config)
    assert "feedback on replies  👍 1  👎 1 (50% positive)" in shown.stdout
    # Since tomorrow: nothing; a mistake is one line and exit 1.
    assert (
        "no feedback since"
        in konstruct_in_process("feedback", "--tenant", ws.tenant.slug, "--since", "2999-01-01", config=worker.config).stdout
    )
    for args in (("--tenant", "nobody-here"), ("--tenant", ws.tenant.slug, "--since", "lately")):
        wrong = konstruct_in_process("feedback", *args, config=worker.config)
        assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1 and "Traceback" not in wrong.stderr, wrong.stderr


async def test_the_status_page_shows_the_counts(
    gateway: httpx.AsyncClient, mdb: Database, fake_slack: FakeSlack, settings: Settings, tmp_path: Path
) -> None:
    ws, _ = await two_votes(gateway, mdb, fake_slack)
    email = f"ann-{uuid.uuid4().hex[:6]}@acme.test"
    user = await create_user(mdb, email=email, name="Ann", password=PASSWORD, platform_admin=False, actor="test")
    async with mdb.tenant(tenant_id=ws.tenant.id) as session:
        await add_member(session, ws.tenant.id, user, "customer_operator", actor="test")
    token, _ = await sessions.sign_in(mdb, settings, email, PASSWORD, "127.0.0.1")
    page = await gateway.get(f"/tenants/{ws.tenant.slug}", headers={"Cookie": f"{sessions.COOKIE}={token}", "Accept": "text/html"})
    assert page.status_code == 200, page.text
    assert re.search(r'id="feedback-up">1<', page.text) and re.search(r'id="feedback-down">1<', page.text)
    assert "50%" in page.text
