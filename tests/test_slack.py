"""Slack end to end: signed events to a real gateway process, a real worker, the fake Slack Web API.

One gateway and one worker serve the whole module; each test has a tenant, workspace (team id) and bot token of its
own, as customers share one installation. Signature checks run the same app in-process over ASGI."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.engine import URL

from konstruct.agent.agents import create_agent
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.db.models import InboundMessage as InboxRow
from konstruct.tenancy.tenants import create_tenant, get_tenant
from tests.fakes.llm import FakeLLM
from tests.fakes.slack import FakeSlack, sign
from tests.helpers import Proc, cli_env, gateway_in_process, konstruct, konstruct_in_process, wait_for
from tests.shared import SharedStack, shared_stack, unique_slug, wait_finished

BOT_USER = "U0000000BOT"
SINGLE_SECRET = "single-app-signing-secret"
APP_SECRET = "distributed-app-signing-secret"


@pytest.fixture(scope="session")
def fake_slack_server() -> Iterator[FakeSlack]:
    fake = FakeSlack().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_slack(fake_slack_server: FakeSlack) -> FakeSlack:
    fake_slack_server.reset()
    fake_slack_server.retry_after = 0
    return fake_slack_server


# This module is about the answers Slack gets whole (a placeholder replaced, or a post): streaming, which a Slack that
# refuses it falls back to this from, is off here (streamed answers: tests/test_slack_stream.py, test_slack_agent.py).
SLACK_STREAM = False


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest,
    pg_server: URL,
    template_db: str,
    tmp_path_factory: pytest.TempPathFactory,
    fake_llm_server: FakeLLM,
    fake_slack_server: FakeSlack,
) -> Iterator[SharedStack]:
    """One gateway and one worker for the module; each test connects a workspace of its own to a tenant of its own.
    A module using it streams answers unless it sets SLACK_STREAM = False."""
    slack: dict[str, object] = {
        "stream": getattr(request.module, "SLACK_STREAM", True),
        "api_url": fake_slack_server.url,
        "authorize_url": f"{fake_slack_server.origin}/oauth/v2/authorize",
        "client_id": fake_slack_server.client_id,
        "client_secret": fake_slack_server.client_secret,
        "signing_secret": APP_SECRET,
    }
    with shared_stack(pg_server, template_db, tmp_path_factory.mktemp("slack"), fake_llm_server.url, slack=slack) as shared:
        yield shared


def unique_team() -> str:
    return "T" + uuid.uuid4().hex[:10].upper()


@dataclass
class SlackSystem:
    base: str
    config: Path
    db: Database
    slack: FakeSlack
    llm: FakeLLM
    tenant_id: uuid.UUID
    slug: str
    team: str
    bot_token: str
    stack: SharedStack

    @property
    def worker(self) -> Proc:
        return self.stack.worker

    def post(self, payload: dict[str, Any], secret: str = SINGLE_SECRET, headers: dict[str, str] | None = None) -> httpx.Response:
        body = json.dumps(payload).encode()
        return httpx.post(f"{self.base}/slack/events", content=body, headers={**sign(body, secret), **(headers or {})}, timeout=10)

    def event(self, event: dict[str, Any], event_id: str | None = None, team: str | None = None) -> dict[str, Any]:
        return {
            "token": "legacy-verification-token",
            "team_id": team or self.team,
            "api_app_id": "A0000000001",
            "event": event,
            "type": "event_callback",
            "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
            "event_time": int(time.time()),
        }

    async def wait_finished(self, count: int, timeout: float = 30) -> None:
        """Until the tenant's inbox holds `count` rows, every one finished: nothing they bring is still to come."""
        finished = await wait_finished(self.db, self.tenant_id, count, timeout)
        assert finished, f"{count} finished inbox rows; worker log:\n{self.worker.log()}"

    async def inbox_count(self) -> int:
        async with self.db.tenant(tenant_id=self.tenant_id) as session:
            return int(await session.scalar(select(func.count()).select_from(InboxRow)) or 0)

    def updates(self) -> list[Any]:
        return [c for c in self.slack.calls_to("chat.update") if not c.rate_limited]

    def wait_updates(self, n: int, timeout: float = 30) -> list[Any]:
        wait_for(lambda: len(self.updates()) >= n, timeout, f"{n} chat.update call(s); worker log:\n{self.worker.log()}")
        return self.updates()


def mention(ts: str, text: str = "<@U0000000BOT> what is our refund policy?", **extra: Any) -> dict[str, Any]:
    return {"type": "app_mention", "user": "U0000000001", "text": text, "ts": ts, "channel": "C0000000001", "event_ts": ts, **extra}


def message(ts: str, text: str, channel: str = "C0000000001", **extra: Any) -> dict[str, Any]:
    return {
        "type": "message",
        "user": "U0000000001",
        "text": text,
        "ts": ts,
        "channel": channel,
        "channel_type": "channel",
        "event_ts": ts,
        **extra,
    }


def new_ts() -> str:
    return f"{time.time():.6f}"


@pytest.fixture
async def slack_system(stack: SharedStack, fake_llm: FakeLLM, fake_slack: FakeSlack) -> AsyncIterator[SlackSystem]:
    """A tenant of its own with one agent and a single-workspace connection (a team id and bot token of its own)."""
    db = Database(load_settings(stack.config))
    slug, team, token = unique_slug("acme"), unique_team(), f"xoxb-{uuid.uuid4().hex[:12]}-7777"
    tenant = await create_tenant(db, name="Acme", slug=slug, actor="test")
    await create_agent(db, tenant, name="Ava", role="Support", persona="Helpful and brief.", model=None, actor="test")
    fake_slack.add_token(token, team_id=team, team="Acme HQ", user_id=BOT_USER)
    env = cli_env(SLACK_BOT=token, SLACK_SIGNING=SINGLE_SECRET)
    connected = konstruct_in_process(
        "channel", "connect", "slack", "--tenant", slug, "--bot-token-env", "SLACK_BOT", "--signing-secret-env", "SLACK_SIGNING",
        config=stack.config, env=env,
    )  # fmt: skip
    assert connected.returncode == 0, connected.stderr
    yield SlackSystem(stack.base, stack.config, db, fake_slack, fake_llm, tenant.id, slug, team, token, stack)
    # What this test set going is over before the next one looks at the fakes.
    stack.ensure_worker()
    await wait_finished(db, tenant.id, timeout=10)
    await db.dispose()


@pytest.fixture
async def gateway_app(stack: SharedStack) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway in this process over ASGI, on the module's database: for checks a process adds nothing to."""
    async with gateway_in_process(load_settings(stack.config)) as client:
        yield client


async def test_url_verification_and_signature_checks(slack_system: SlackSystem, gateway_app: httpx.AsyncClient) -> None:
    """In-process over ASGI: the same app, signatures and database as the gateway process, without its process."""

    async def post(payload: dict[str, Any], secret: str | None = SINGLE_SECRET, timestamp: int | None = None) -> httpx.Response:
        body = json.dumps(payload).encode()
        headers = sign(body, secret, timestamp=timestamp) if secret else {"Content-Type": "application/json"}
        return await gateway_app.post("/slack/events", content=body, headers=headers)

    challenge = {"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"}
    response = await post(challenge)
    assert response.status_code == 200 and challenge["challenge"] in response.text
    assert (await post(challenge, secret=APP_SECRET)).status_code == 200  # the distributed app's own secret works too
    assert (await post(challenge, secret="nobody-we-know")).status_code == 401

    event = slack_system.event(mention(new_ts()))
    assert (await post(event, secret="not-the-secret")).status_code == 401
    assert (await post(event, timestamp=int(time.time()) - 600)).status_code == 401  # stale
    assert (await post(event, secret=None)).status_code == 401  # unsigned
    # Stored before acknowledged: a refused event would be in the inbox by the time its 401 came back.
    assert await slack_system.inbox_count() == 0
    assert slack_system.llm.requests == []
    # The same event, signed right, is stored (so the refusals above were the signatures' doing).
    assert (await post(event)).status_code == 200
    await slack_system.wait_finished(1)
    assert await slack_system.inbox_count() == 1


async def test_mention_is_answered_in_a_thread_with_a_placeholder_replaced(slack_system: SlackSystem) -> None:
    ts = new_ts()
    response = slack_system.post(slack_system.event(mention(ts)))
    assert response.status_code == 200
    update = slack_system.wait_updates(1)[0]
    posts = slack_system.slack.calls_to("chat.postMessage")
    assert len(posts) == 1 and posts[0].args["thread_ts"] == ts and posts[0].args["text"] == "_thinking…_"
    assert posts[0].token == slack_system.bot_token
    assert update.args["ts"] == slack_system.slack.messages[("C0000000001", update.args["ts"])]["ts"]
    assert update.args["text"] == "[fake-model] You said: what is our refund policy?"  # the mention itself is stripped
    # Slack renders the Markdown; the buttons under it rate the stored reply.
    assert update.args["blocks"][0] == {"type": "markdown", "text": update.args["text"]}
    assert [b["type"] for b in update.args["blocks"]] == ["markdown", "context_actions"]
    system_prompt = slack_system.llm.requests[-1].body["messages"][0]["content"]
    assert "You are an AI" in system_prompt


async def test_thread_follow_ups_dms_and_what_is_never_answered(slack_system: SlackSystem) -> None:
    root = new_ts()
    slack_system.post(slack_system.event(mention(root)))
    slack_system.wait_updates(1)
    # A follow-up in that thread, without a mention, is answered, with the thread's history.
    slack_system.post(slack_system.event(message(new_ts(), "and for digital goods?", thread_ts=root)))
    slack_system.wait_updates(2)
    history = slack_system.llm.requests[-1].body["messages"]
    assert [m["role"] for m in history[1:]] == ["user", "assistant", "user"]
    # A direct message is answered in the thread it starts (with a thinking status there, not a placeholder: see
    # tests/test_slack_agent.py).
    dm = new_ts()
    slack_system.post(slack_system.event(message(dm, "hi in private", channel="D0000000001", channel_type="im")))
    await slack_system.wait_finished(3)  # the answer is whole (posted: streaming is off here, see SLACK_STREAM)
    [answer] = slack_system.slack.messages_in("D0000000001")
    assert answer["thread_ts"] == dm and answer["text"].endswith("hi in private")
    # Never answered: bots (ourselves included), edits, joins, threads the agent is not in, plain channel chatter.
    ignored = [
        message(new_ts(), "I am a bot", bot_id="B0000000099", thread_ts=root),
        {**message(new_ts(), "my own words", thread_ts=root), "user": BOT_USER},
        message(new_ts(), "edited", subtype="message_changed", thread_ts=root),
        message(new_ts(), "<@U0000000001> joined", subtype="channel_join"),
        message(new_ts(), "someone else's thread", thread_ts="1700000000.000001"),
        message(new_ts(), "chatter in the channel"),
    ]
    for event in ignored:
        assert slack_system.post(slack_system.event(event)).status_code == 200
    await slack_system.wait_finished(3)  # the ignored events stored nothing (an event is stored before its 200)
    assert len(slack_system.updates()) == 2 and len(slack_system.llm.requests) == 3
    assert await slack_system.inbox_count() == 3


async def test_retries_and_double_events_get_exactly_one_answer(slack_system: SlackSystem) -> None:
    ts = new_ts()
    slack_system.llm.delay = 1.0  # the retries arrive while the first delivery is being answered
    payload = slack_system.event(mention(ts), event_id="Ev0RETRY000")

    def deliver(n: int) -> int:
        headers = {"X-Slack-Retry-Num": str(n), "X-Slack-Retry-Reason": "http_timeout"} if n else {}
        return slack_system.post(payload, headers=headers).status_code

    statuses = await asyncio.gather(*(asyncio.to_thread(deliver, n) for n in range(4)))
    assert statuses == [200, 200, 200, 200]
    # Slack also sends a `message` event (another event id) for the same mention.
    slack_system.post(slack_system.event(message(ts, "<@U0000000BOT> what is our refund policy?")))
    slack_system.wait_updates(1)
    await slack_system.wait_finished(1)  # the one row is finished: no retry can bring a second answer now
    assert len(slack_system.updates()) == 1
    assert len(slack_system.llm.requests) == 1
    assert await slack_system.inbox_count() == 1


async def test_image_reaches_the_model_and_other_files_are_named(slack_system: SlackSystem) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    image = slack_system.slack.add_file("chart.png", "image/png", png, team_id=slack_system.team)
    pdf = slack_system.slack.add_file("terms.pdf", "application/pdf", b"%PDF-1.4", team_id=slack_system.team)
    slack_system.post(
        slack_system.event(mention(new_ts(), "<@U0000000BOT> what does this show?", files=[image, pdf], subtype="file_share"))
    )
    slack_system.wait_updates(1)
    content = slack_system.llm.requests[-1].body["messages"][-1]["content"]
    assert isinstance(content, list)
    assert content[0] == {"type": "text", "text": "what does this show?"}
    image_parts = [p for p in content if p["type"] == "image_url"]
    assert len(image_parts) == 1 and image_parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert any("terms.pdf" in p.get("text", "") and "application/pdf" in p.get("text", "") for p in content)
    assert [token for _, token in slack_system.slack.downloads] == [slack_system.bot_token]  # downloaded with the bot token, once


async def test_the_workers_slack_calls_reuse_kept_alive_connections(slack_system: SlackSystem) -> None:
    """One HTTP session per worker for the Web API: answers' calls go over the connections it keeps, not one
    connection (a TCP and, with the real Slack, a TLS handshake) per call."""
    start = len(slack_system.slack.calls)
    for n in range(3):
        slack_system.post(slack_system.event(mention(new_ts(), f"<@U0000000BOT> question {n}")))
        await slack_system.wait_finished(n + 1)
    calls = [c for c in slack_system.slack.calls[start:] if c.token == slack_system.bot_token]
    assert len(calls) >= 6, [c.method for c in calls]  # placeholders and answers, at least
    assert len({c.peer for c in calls}) <= 2, [(c.method, c.peer) for c in calls]


async def test_rate_limits_are_honoured_and_long_answers_split(slack_system: SlackSystem) -> None:
    slack_system.slack.rate_limit = {"chat.postMessage": 1, "chat.update": 1}
    long_question = " ".join(f"word{n}" for n in range(2000))  # the fake echoes it: over 12,000 characters
    slack_system.post(slack_system.event(mention(new_ts(), f"<@U0000000BOT> {long_question}")))
    slack_system.wait_updates(1)
    # The placeholder, then (after the update) the second part of the answer.
    wait_for(lambda: len([c for c in slack_system.slack.calls_to("chat.postMessage") if not c.rate_limited]) >= 2, 20, "the split reply")
    posts = slack_system.slack.calls_to("chat.postMessage")
    assert [c.rate_limited for c in posts][:2] == [True, False]  # the 429, then the same post again
    answer = [slack_system.updates()[0].args, *[c.args for c in posts if not c.rate_limited][1:]]
    assert all(a["blocks"] == [{"type": "markdown", "text": a["blocks"][0]["text"]}] for a in answer[:-1]) and len(answer) >= 2
    assert [b["type"] for b in answer[-1]["blocks"]] == ["markdown", "context_actions"]  # the feedback buttons: under the last part
    texts = [a["blocks"][0]["text"] for a in answer]
    assert all(len(t) <= 12_000 for t in texts) and all(len(a["text"]) <= 4_000 for a in answer)  # text: the fallback
    assert "".join(texts).replace(" ", "").endswith("word1999")


async def test_oauth_install_end_to_end(slack_system: SlackSystem) -> None:
    globex = unique_team()
    link = konstruct("channel", "connect", "slack", "--tenant", slack_system.slug, "--json", config=slack_system.config)
    assert link.returncode == 0, link.stderr
    install_url = json.loads(link.stdout)["install_url"]
    assert install_url.startswith(f"{slack_system.base}/slack/install?state=")
    with httpx.Client(follow_redirects=False) as browser:
        step1 = browser.get(install_url)
        assert step1.status_code == 302
        consent = urlsplit(step1.headers["location"])
        query = parse_qs(consent.query)
        assert consent.path == "/oauth/v2/authorize" and query["client_id"] == [slack_system.slack.client_id]
        assert query["redirect_uri"] == [f"{slack_system.base}/slack/oauth_redirect"]
        # The admin approves; Slack sends the browser back with a code and the same state.
        slack_system.slack.add_oauth_code(
            "code-123", team_id=globex, team="Globex Slack", bot_user_id="U000000OBOT", access_token="xoxb-oauth-4242"
        )
        done = browser.get(f"{slack_system.base}/slack/oauth_redirect", params={"code": "code-123", "state": query["state"][0]})
        assert done.status_code == 200 and "installed" in done.text, done.text
        # The same code (a replayed redirect) and a forged state are refused.
        assert (
            browser.get(f"{slack_system.base}/slack/oauth_redirect", params={"code": "code-123", "state": "forged.state"}).status_code
            == 400
        )
    without_cookie = httpx.get(f"{slack_system.base}/slack/oauth_redirect", params={"code": "x", "state": query["state"][0]})
    assert without_cookie.status_code == 400

    listed = json.loads(konstruct_in_process("channel", "list", "--tenant", slack_system.slug, "--json", config=slack_system.config).stdout)
    oauth = next(c for c in listed if c["external_id"] == globex)
    assert oauth["mode"] == "oauth" and oauth["status"] == "connected" and oauth["details"]["bot_token_hint"] == "…4242"
    assert "xoxb-oauth-4242" not in json.dumps(listed)

    # Events from the installed workspace are signed with the distributed app's secret and answered with its token.
    event = slack_system.event(mention(new_ts(), "<@U000000OBOT> hello from Globex"), team=globex)
    assert slack_system.post(event, secret=APP_SECRET).status_code == 200
    update = slack_system.wait_updates(1)[0]
    assert update.token == "xoxb-oauth-4242" and update.args["text"].endswith("hello from Globex")

    # Installing again (a new code, a new token) updates the same connection.
    link = json.loads(
        konstruct_in_process("channel", "connect", "slack", "--tenant", slack_system.slug, "--json", config=slack_system.config).stdout
    )["install_url"]
    with httpx.Client(follow_redirects=False) as browser:
        state = parse_qs(urlsplit(browser.get(link).headers["location"]).query)["state"][0]
        slack_system.slack.add_oauth_code(
            "code-456", team_id=globex, team="Globex Slack", bot_user_id="U000000OBOT", access_token="xoxb-oauth-9999"
        )
        assert browser.get(f"{slack_system.base}/slack/oauth_redirect", params={"code": "code-456", "state": state}).status_code == 200
    listed = json.loads(konstruct_in_process("channel", "list", "--tenant", slack_system.slug, "--json", config=slack_system.config).stdout)
    installed = [c for c in listed if c["external_id"] == globex]
    assert len(installed) == 1 and installed[0]["details"]["bot_token_hint"] == "…9999"

    # Uninstalling marks the connection disconnected; it no longer answers.
    uninstall = slack_system.event({"type": "app_uninstalled"}, team=globex)
    assert slack_system.post(uninstall, secret=APP_SECRET).status_code == 200
    listed = json.loads(konstruct_in_process("channel", "list", "--tenant", slack_system.slug, "--json", config=slack_system.config).stdout)
    assert next(c for c in listed if c["external_id"] == globex)["status"] == "disconnected"


async def test_channel_routes_choose_the_agent(slack_system: SlackSystem) -> None:
    tenant_info = await get_tenant(slack_system.db, slack_system.slug)
    await create_agent(slack_system.db, tenant_info, name="Max", role="Sales", persona="Sells.", model="openai/sales-model", actor="test")
    routed = konstruct_in_process(
        "channel", "route", "--tenant", slack_system.slug, "--slack-channel", "C0000000SAL", "--agent", "Max", config=slack_system.config
    )
    assert routed.returncode == 0, routed.stderr
    slack_system.post(slack_system.event({**mention(new_ts()), "channel": "C0000000SAL"}))
    slack_system.wait_updates(1)
    assert slack_system.llm.requests[-1].body["model"] == "sales-model"
    shown = json.loads(
        konstruct_in_process(
            "channel", "show", slack_system.team, "--tenant", slack_system.slug, "--json", config=slack_system.config
        ).stdout
    )
    assert shown["routes"] == [{"channel": "C0000000SAL", "agent": "Max"}]
    assert shown["details"]["signing_secret_hint"] == "…" + SINGLE_SECRET[-4:]
    assert SINGLE_SECRET not in json.dumps(shown) and slack_system.bot_token not in json.dumps(shown)


async def test_a_model_without_vision_gets_a_note_instead_of_the_image(slack_system: SlackSystem) -> None:
    updated = konstruct_in_process(
        "agent", "update", "Ava", "--tenant", slack_system.slug, "--model", "openai/gpt-3.5-turbo", config=slack_system.config
    )
    assert updated.returncode == 0, updated.stderr
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    image = slack_system.slack.add_file("photo.png", "image/png", png, team_id=slack_system.team)
    slack_system.post(slack_system.event(mention(new_ts(), "<@U0000000BOT> what is in this photo?", files=[image], subtype="file_share")))
    update = slack_system.wait_updates(1)[0]
    assert update.args["text"].startswith("[gpt-3.5-turbo]")  # answered, not an error
    content = slack_system.llm.requests[-1].body["messages"][-1]["content"]
    assert not any(part["type"] == "image_url" for part in content)
    assert any("cannot see images" in part.get("text", "") for part in content)


async def test_a_retry_reuses_the_placeholder_an_earlier_attempt_posted_but_never_recorded(
    slack_system: SlackSystem,
) -> None:
    """A worker died after posting `_thinking…_` and before writing its ts down: the next attempt finds that
    placeholder by its message metadata and answers in it, instead of leaving it in the thread for good."""
    slack_system.worker.stop()
    ts = new_ts()
    assert slack_system.post(slack_system.event(mention(ts))).status_code == 200
    async with slack_system.db.tenant(tenant_id=slack_system.tenant_id) as session:
        row = (await session.scalars(select(InboxRow))).one()
        # As the dead attempt left it: claimed once, given back by the sweeper, its placeholder's ts not recorded.
        await session.execute(update(InboxRow).where(InboxRow.id == row.id).values(attempts=1, reply_ref=None))
    with slack_system.slack._lock:
        placeholder = slack_system.slack._chat_post_message(
            slack_system.slack.tokens[slack_system.bot_token],
            {"channel": "C0000000001", "text": "_thinking…_", "thread_ts": ts,
             "metadata": {"event_type": "konstruct_placeholder", "event_payload": {"answers": row.external_id}}},
        )  # fmt: skip
    slack_system.stack.replace_worker()  # a new worker, as after the dead one
    slack_system.wait_updates(1)
    assert [c.args["ts"] for c in slack_system.updates()] == [placeholder["ts"]]
    assert slack_system.slack.calls_to("chat.postMessage") == []  # no second placeholder
    texts = [m["text"] for m in slack_system.slack.messages.values() if m.get("bot_id")]
    assert texts == ["[fake-model] You said: what is our refund policy?"]
