"""Human handoff end to end (issue 17): an escalated person's desk thread in Slack, their messages mirrored into it,
humans answering from it (and from the CLI) on the person's own channel, the buttons, the reminder, the agent silent
until it is handed back and then resuming with what the humans said in its prompt.

One gateway process and one worker process serve the module, with the fake Slack, the fake Graph API and the fake
LLM; each test has a tenant, Slack workspace, WhatsApp number and desk channel of its own.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.engine import URL

from konstruct.agent.agents import create_agent
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.db.models import Conversation, DeskMirror, Handoff, Message
from konstruct.db.models import InboundMessage as InboxRow
from konstruct.tenancy.tenants import create_tenant
from konstruct.web import overview
from tests.fakes import whatsapp as wa
from tests.fakes.llm import FakeLLM
from tests.fakes.slack import FakeSlack, sign
from tests.fakes.whatsapp import FakeGraph
from tests.helpers import cli_env, konstruct_in_process, wait_for
from tests.shared import SharedStack, shared_stack, unique_slug, wait_finished

SIGNING = "handoff-single-signing-secret"
WA_TOKEN = "EAAG-handoff-access-token-7070"
WA_SECRET = "handoff-meta-app-secret"
BOT_USER = "U0000000BOT"
HUMAN, OTHER_HUMAN = "U0HUMAN0001", "U0HUMAN0002"
METRICS = "handoff-metrics-token-123456"
TEMPLATE = "back_in_touch"


@pytest.fixture(scope="module")
def slack_server() -> Iterator[FakeSlack]:
    fake = FakeSlack().start()
    fake.retry_after = 0
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def graph_server() -> Iterator[FakeGraph]:
    fake = FakeGraph().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def stack(
    pg_server: URL, template_db: str, tmp_path_factory: pytest.TempPathFactory, fake_llm_server: FakeLLM, slack_server: FakeSlack,
    graph_server: FakeGraph,
) -> Iterator[SharedStack]:  # fmt: skip
    with shared_stack(
        pg_server, template_db, tmp_path_factory.mktemp("handoff"), fake_llm_server.url,
        slack={"api_url": slack_server.url}, gateway={"cache_ttl": 0.5},
        whatsapp={"graph_url": graph_server.url, "recipient_interval": 0.0, "retry_backoff": 0.05, "send_retries": 0,
                  "template_name": TEMPLATE, "template_language": "en"},
        escalation={"check_interval": 0.3, "answer_within": 30}, web={"metrics_token": METRICS},
    ) as shared:  # fmt: skip
        yield shared


def new_ts() -> str:
    return f"{time.time():.6f}"


@dataclass
class Site:
    """One tenant with a Slack workspace (its desk channel the escalation target), a WhatsApp number and an agent."""

    stack: SharedStack
    db: Database
    slack: FakeSlack
    graph: FakeGraph
    llm: FakeLLM
    tenant_id: uuid.UUID
    slug: str
    team: str
    number: str
    desk: str  # the desk channel
    person: str  # the WhatsApp customer

    @property
    def config(self) -> Path:
        return self.stack.config

    def cli(self, *args: str) -> Any:
        return konstruct_in_process(*args, config=self.config)

    # -- Slack: signed events and clicks --

    def event(self, event: dict[str, Any], event_id: str | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        body = json.dumps({"token": "x", "team_id": self.team, "api_app_id": "A1", "event": event, "type": "event_callback",
                           "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}", "event_time": int(time.time())}).encode()  # fmt: skip
        return httpx.post(f"{self.stack.base}/slack/events", content=body, headers={**sign(body, SIGNING), **(headers or {})}, timeout=10)

    def say_in_desk(self, text: str, *, user: str = HUMAN, ts: str | None = None, event_id: str | None = None,
                    headers: dict[str, str] | None = None) -> tuple[httpx.Response, str]:  # fmt: skip
        ts = ts or new_ts()
        event = {"type": "message", "user": user, "text": text, "ts": ts, "thread_ts": self.card()["ts"], "channel": self.desk,
                 "channel_type": "channel", "event_ts": ts}  # fmt: skip
        return self.event(event, event_id, headers), ts

    def interact(self, payload: dict[str, Any], secret: str | None = SIGNING) -> httpx.Response:
        body = urlencode({"payload": json.dumps(payload)}).encode()
        headers = {**(sign(body, secret) if secret else {}), "Content-Type": "application/x-www-form-urlencoded"}
        return httpx.post(f"{self.stack.base}/slack/interactive", content=body, headers=headers, timeout=10)

    def click(self, action: str, *, user: str = HUMAN, secret: str | None = SIGNING, handoff: str | None = None) -> httpx.Response:
        card = self.card()
        value = handoff or card["metadata"]["event_payload"]["handoff"]
        return self.interact({
            "type": "block_actions", "team": {"id": self.team}, "user": {"id": user}, "trigger_id": f"{random.randrange(10**9)}.1.abc",
            "container": {"type": "message", "channel_id": self.desk, "message_ts": card["ts"]}, "channel": {"id": self.desk},
            "actions": [{"type": "button", "action_id": f"desk:{action}", "block_id": f"desk:{value}", "value": value, "action_ts": new_ts()}],
        }, secret)  # fmt: skip

    # -- what the desk shows --

    def card(self) -> dict[str, Any]:
        return wait_for(self._card, 30, f"the desk card in {self.desk}; worker log:\n{self.stack.worker.log()[-3000:]}")

    def _card(self) -> dict[str, Any] | None:
        roots = [m for m in self.slack.messages_in(self.desk) if (m.get("metadata") or {}).get("event_type") == "konstruct_desk"]
        assert len(roots) <= 1, roots
        return roots[0] if roots else None

    def thread(self) -> list[dict[str, Any]]:
        """What the bot posted in the desk thread, oldest first."""
        root = self.card()["ts"]
        return [m for m in self.slack.messages_in(self.desk) if m.get("thread_ts") == root]

    def marked(self, prefix: str) -> list[dict[str, Any]]:
        return [
            m for m in self.thread() if str(((m.get("metadata") or {}).get("event_payload") or {}).get("marker", "")).startswith(prefix)
        ]

    def wait_marked(self, prefix: str, n: int, timeout: float = 30) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.marked(prefix)) >= n, timeout, f"{n} {prefix} post(s); worker log:\n{self.stack.worker.log()[-3000:]}")
        return self.marked(prefix)

    # -- WhatsApp --

    def whatsapp(self, *messages: dict[str, Any], statuses: tuple[dict[str, Any], ...] = ()) -> None:
        body = json.dumps(
            wa.webhook(self.number, messages=messages, statuses=statuses, contacts=[wa.contact(self.person, "Pat Doe")])
        ).encode()
        answer = httpx.post(f"{self.stack.base}/whatsapp/webhook", content=body,
                            headers={"Content-Type": "application/json", "X-Hub-Signature-256": wa.sign(body, WA_SECRET)}, timeout=10)  # fmt: skip
        assert answer.status_code == 200, answer.text

    def to_person(self) -> list[dict[str, Any]]:
        return self.graph.messages_to(self.person)

    def wait_to_person(self, n: int, timeout: float = 30) -> list[dict[str, Any]]:
        wait_for(
            lambda: len(self.to_person()) >= n, timeout, f"{n} message(s) to the person; worker log:\n{self.stack.worker.log()[-3000:]}"
        )
        return self.to_person()

    # -- the database --

    async def conversation(self, channel: str = "whatsapp") -> Conversation:
        async with self.db.tenant(tenant_id=self.tenant_id) as session:
            found = await session.scalar(select(Conversation).where(Conversation.channel == channel))
        assert found is not None
        return found

    async def handoffs(self) -> list[Handoff]:
        async with self.db.tenant(tenant_id=self.tenant_id) as session:
            return list(await session.scalars(select(Handoff).order_by(Handoff.created_at)))

    async def history(self, conversation_id: uuid.UUID) -> list[Message]:
        async with self.db.tenant(tenant_id=self.tenant_id) as session:
            return list(
                await session.scalars(select(Message).where(Message.conversation_id == conversation_id).order_by(Message.created_at))
            )

    async def settle(self) -> None:
        assert await wait_finished(self.db, self.tenant_id, timeout=30), (
            f"inbox not finished; worker log:\n{self.stack.worker.log()[-3000:]}"
        )


@pytest.fixture
async def site(stack: SharedStack, fake_llm: FakeLLM, slack_server: FakeSlack, graph_server: FakeGraph) -> AsyncIterator[Site]:
    db = Database(load_settings(stack.config))
    slug, team = unique_slug("desk"), "T" + uuid.uuid4().hex[:10].upper()
    number, person = str(random.SystemRandom().randrange(10**14, 10**15)), str(random.SystemRandom().randrange(10**10, 10**11))
    desk_channel = "C" + uuid.uuid4().hex[:10].upper()
    token = f"xoxb-{uuid.uuid4().hex[:12]}-desk"
    slack_server.add_token(token, team_id=team, team="Desk HQ", user_id=BOT_USER)
    graph_server.add_number(number, WA_TOKEN)
    tenant = await create_tenant(db, name="Acme", slug=slug, actor="test")
    await create_agent(db, tenant, name="Ava", role="Support", persona="Helpful and brief.", model=None, actor="test")
    site = Site(stack, db, slack_server, graph_server, fake_llm, tenant.id, slug, team, number, desk_channel, person)
    env = cli_env(SLACK_BOT=token, SLACK_SIGNING=SIGNING, WA_TOKEN=WA_TOKEN, WA_SECRET=WA_SECRET, WA_VERIFY="verify-handoff")
    for args in (
        ("channel", "connect", "slack", "--tenant", slug, "--bot-token-env", "SLACK_BOT", "--signing-secret-env", "SLACK_SIGNING"),
        ("channel", "connect", "whatsapp", "--tenant", slug, "--phone-number-id", number, "--access-token-env", "WA_TOKEN",
         "--app-secret-env", "WA_SECRET", "--verify-token-env", "WA_VERIFY"),
        ("tenant", "configure", slug, "--escalation-target", f"slack:{desk_channel}"),
        ("agent", "update", "Ava", "--tenant", slug, "--escalation-rule", "human OR manager"),
    ):  # fmt: skip
        done = konstruct_in_process(*args, config=stack.config, env=env)
        assert done.returncode == 0, done.stderr
    try:
        yield site
        stack.ensure_worker()
        await wait_finished(db, tenant.id, timeout=10)
    finally:
        await db.dispose()


def prompts_since(llm: FakeLLM, n: int) -> list[str]:
    """The prompts of the model calls after the first n, each as one text."""
    return [json.dumps(r.body.get("messages")) for r in llm.requests[n:]]


async def test_whatsapp_customer_desk_thread_human_reply_and_the_agent_resuming(site: Site) -> None:
    site.whatsapp(wa.text(site.person, "Hi, my parcel 4411 is lost"))
    site.wait_to_person(1)
    site.whatsapp(wa.text(site.person, "I want to talk to a human"))
    handed = site.wait_to_person(2)[-1]
    assert "human colleague" in handed["text"]["body"]
    card = site.card()
    shown = json.dumps(card["blocks"])
    assert "Pat Doe" in shown and site.person in shown and "whatsapp" in shown and "rule 'human OR manager' fired" in shown
    assert "parcel 4411" in shown and "Last turns" in shown  # the conversation so far
    assert [b["type"] for b in card["blocks"]][-1] == "actions"
    asked = len(site.llm.requests)

    # The person goes on: every message is mirrored into the thread, in order, once; the agent says nothing.
    digest = site.graph.add_media("778899", b"\x89PNG fake image bytes", "image/png", token=WA_TOKEN)
    site.whatsapp(wa.text(site.person, "hello? first"))
    site.whatsapp(wa.text(site.person, "second, the order is 4411"))
    site.whatsapp(wa.image(site.person, "778899", mime_type="image/png", sha256=digest, caption="the label"))
    mirrored = site.wait_marked("mirror:", 3)
    await site.settle()
    assert [m["text"].split(":* ", 1)[-1].split("\n")[0] for m in mirrored] == ["hello? first", "second, the order is 4411", "the label"]
    uploads = [m for m in site.slack.messages_in(site.desk) if m.get("files")]
    assert len(uploads) == 1 and uploads[0]["thread_ts"] == card["ts"]  # the image, attached in the thread
    assert len(site.llm.requests) == asked and len(site.to_person()) == 2

    # A mirror an attempt posted but did not record is found by its marker, never posted twice.
    async with site.db.tenant(tenant_id=site.tenant_id) as session:
        await session.execute(delete(DeskMirror).where(DeskMirror.desk_ts == mirrored[0]["ts"]))

    async def recorded_again() -> bool:
        async with site.db.tenant(tenant_id=site.tenant_id) as session:
            return await session.scalar(select(DeskMirror.id).where(DeskMirror.desk_ts == mirrored[0]["ts"])) is not None

    await _until(recorded_again, "the deleted mirror record found again")
    assert len(site.marked("mirror:")) == 3

    # A human answers in the thread: the person gets it from the business number, once, also when Slack retries.
    first, ts = site.say_in_desk("Sorry about that, Pat. I have reissued parcel 4411.", event_id="EvHUMANREPLY1")
    assert first.status_code == 200
    site.wait_to_person(3)
    again, _ = site.say_in_desk("Sorry about that, Pat. I have reissued parcel 4411.", ts=ts, event_id="EvHUMANREPLY1",
                                headers={"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})  # fmt: skip
    assert again.status_code == 200
    await site.settle()
    sent = site.to_person()
    assert len(sent) == 3 and sent[-1]["text"]["body"] == "Sorry about that, Pat. I have reissued parcel 4411."
    assert site.graph.sent[-1].phone_number_id == site.number
    assert len(site.llm.requests) == asked  # the agent still silent

    # Its delivery statuses show under it in the thread.
    line = site.wait_marked("status:", 1)[0]
    assert "✓ sent" in line["text"]
    conversation = await site.conversation()
    human = [m for m in await site.history(conversation.id) if m.kind == "human"]
    assert len(human) == 1 and human[0].author == f"slack:{HUMAN}" and human[0].external_id
    site.whatsapp(
        statuses=(wa.status(str(human[0].external_id), "delivered", site.person), wa.status(str(human[0].external_id), "read", site.person))
    )
    wait_for(lambda: "read" in site.slack.messages[(site.desk, line["ts"])]["text"], 30, "the status line to say read")
    (handoff,) = await site.handoffs()
    assert handoff.owner == f"slack:{HUMAN}" and handoff.first_human_reply_at is not None

    # Hand back through the button and its modal, with a note the agent sees; the card shows the end.
    assert site.click("handback").status_code == 200
    (modal,) = site.slack.views
    hid = str(handoff.id)
    submitted = site.interact({"type": "view_submission", "team": {"id": site.team}, "user": {"id": HUMAN},
                               "view": {"id": "V1", "callback_id": modal["view"]["callback_id"],
                                        "state": {"values": {"desk_note": {"note": {"type": "plain_text_input", "value": "Offer a 10% voucher if asked."}}}}}})  # fmt: skip
    assert submitted.status_code == 200 and modal["view"]["callback_id"] == f"desk:handback:{hid}"
    wait_for(
        lambda: "handed back" in json.dumps(site.slack.messages[(site.desk, card["ts"])].get("blocks")), 10, "the card to show the end"
    )
    assert "actions" not in [b["type"] for b in site.slack.messages[(site.desk, card["ts"])]["blocks"]]

    site.whatsapp(wa.text(site.person, "Thanks! Anything else I should do?"))
    answered = site.wait_to_person(4)[-1]["text"]["body"]
    assert answered.endswith("Anything else I should do?")
    prompt = prompts_since(site.llm, asked)[-1]
    assert "I have reissued parcel 4411" in prompt and "human colleague" in prompt and "Offer a 10% voucher" in prompt
    assert "second, the order is 4411" in prompt  # what the person said meanwhile

    listed = json.loads(site.cli("conversation", "list", "--tenant", site.slug, "--escalated", "--ended", "--json").stdout)
    assert [(r["outcome"], r["owner"], r["status"]) for r in listed] == [("handed_back", f"slack:{HUMAN}", "ended")]
    assert listed[0]["seconds_to_answer"] > 0 and listed[0]["conversation"] == f"{site.number}:{site.person}"
    assert json.loads(site.cli("conversation", "list", "--tenant", site.slug, "--escalated", "--json").stdout) == []
    metrics = httpx.get(f"{site.stack.base}/metrics", headers={"Authorization": f"Bearer {METRICS}"}, timeout=10).text
    assert 'konstruct_handoffs_total{outcome="handed_back"}' in metrics and "konstruct_handoff_answer_seconds_count" in metrics


async def _until(probe: Any, what: str, timeout: float = 30) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_outside_the_window_the_template_goes_and_a_failure_is_said_in_the_thread(site: Site) -> None:
    old = int(time.time()) - 25 * 3600
    site.whatsapp(wa.text(site.person, "I need a human", timestamp=old))
    site.wait_to_person(1)  # the hand-over notice: the template, the window being closed
    site.say_in_desk("We have refunded you.")
    sent = site.wait_to_person(2)
    assert sent[-1]["type"] == "template" and sent[-1]["template"]["name"] == TEMPLATE
    line = site.wait_marked("status:", 1)[0]["text"]
    assert "what went out instead: [WhatsApp template 'back_in_touch' (en)]" in line
    conversation = await site.conversation()
    human = [m for m in await site.history(conversation.id) if m.kind == "human"]
    assert [m.text for m in human] == ["[WhatsApp template 'back_in_touch' (en)]"]  # what the person received, not what was typed

    site.graph.fail_next(131026, status=400, kinds=("template",))
    site.say_in_desk("Second try")
    wait_for(lambda: any("Not delivered to the person" in m["text"] for m in site.marked("status:")), 30, "the failure said in the thread")
    await site.settle()
    assert len(site.to_person()) == 2


async def test_buttons_take_close_and_an_unsigned_click_refused_from_the_terminal(site: Site) -> None:
    said = site.cli("chat", "--tenant", site.slug, "--agent", "Ava", "--person", "tess", "-m", "get me a manager", "--json")
    assert json.loads(said.stdout)["status"] == "replied", said.stderr
    card = site.card()
    assert "terminal" in json.dumps(card["blocks"])
    asked = len(site.llm.requests)

    assert site.click("take", secret=None).status_code == 401
    assert site.click("take", secret="not-the-signing-secret").status_code == 401
    assert site.click("take", handoff=str(uuid.uuid4())).status_code == 404  # not this tenant's escalation
    assert site.click("take").status_code == 200
    assert site.click("take", user=OTHER_HUMAN).status_code == 200  # one owner: the first
    wait_for(lambda: f"<@{HUMAN}>" in json.dumps(site.slack.messages[(site.desk, card["ts"])].get("blocks")), 10, "the owner on the card")
    (handoff,) = await site.handoffs()
    assert handoff.owner == f"slack:{HUMAN}" and handoff.taken_at is not None
    # The owner shows in the transcript and in the status page's open escalations.
    transcript = json.loads(site.cli("conversation", "show", str(handoff.conversation_id), "--tenant", site.slug, "--json").stdout)
    assert transcript["owner"] == f"slack:{HUMAN}"
    async with site.db.tenant(tenant_id=site.tenant_id) as session:
        [waiting] = await overview.open_escalations(session)
    assert (waiting["id"], waiting["owner"], waiting["escalation_category"]) == (handoff.conversation_id, f"slack:{HUMAN}", "rule")

    # The person writes; a human answers from the CLI; `konstruct chat` shows it.
    silent = json.loads(
        site.cli("chat", "--tenant", site.slug, "--agent", "Ava", "--person", "tess", "-m", "is anyone there?", "--json").stdout
    )
    assert silent["status"] == "ignored"
    site.wait_marked("mirror:", 1)
    conversation = await site.conversation("terminal")
    replied = site.cli(
        "conversation", "reply", str(conversation.id)[:8], "Yes, Sam here. Your refund is on its way.", "--tenant", site.slug
    )
    assert replied.returncode == 0 and "sent" in replied.stdout, replied.stderr
    quoted = site.wait_marked("status:", 1)[0]["text"]
    assert "Your refund is on its way" in quoted and "✓ sent" in quoted
    shown = site.cli("chat", "--tenant", site.slug, "--agent", "Ava", "--person", "tess", "-m", "great, thanks")
    assert "(human)> Yes, Sam here. Your refund is on its way." in shown.stdout, shown.stdout
    assert len(site.llm.requests) == asked

    assert site.click("close").status_code == 200
    wait_for(lambda: "resolved by human" in json.dumps(site.slack.messages[(site.desk, card["ts"])].get("blocks")), 10, "the card closed")
    back = json.loads(
        site.cli("chat", "--tenant", site.slug, "--agent", "Ava", "--person", "tess", "-m", "one more question", "--json").stdout
    )
    assert back["status"] == "replied" and back["reply"].endswith("one more question")
    assert "Your refund is on its way" in prompts_since(site.llm, asked)[-1]
    (handoff,) = await site.handoffs()
    assert handoff.outcome == "resolved_by_human" and handoff.ended_by == f"slack:{HUMAN}"
    assert site.click("close").status_code == 200  # a click on an ended one changes nothing
    assert (await site.handoffs())[0].outcome == "resolved_by_human"


async def test_a_slack_conversation_is_answered_in_its_own_thread(site: Site) -> None:
    root = new_ts()
    general = "C" + uuid.uuid4().hex[:10].upper()
    mention = {"type": "app_mention", "user": "U0CUSTOMER1", "text": f"<@{BOT_USER}> I need a human", "ts": root, "channel": general,
               "event_ts": root}  # fmt: skip
    assert site.event(mention).status_code == 200
    card = site.card()
    assert "slack" in json.dumps(card["blocks"])
    await site.settle()
    follow = new_ts()
    site.event({"type": "message", "user": "U0CUSTOMER1", "text": "still waiting here", "ts": follow, "thread_ts": root,
                "channel": general, "channel_type": "channel", "event_ts": follow})  # fmt: skip
    assert "still waiting here" in site.wait_marked("mirror:", 1)[0]["text"]
    answered_before = len([m for m in site.slack.messages_in(general) if m.get("thread_ts") == root])
    _, ts = site.say_in_desk("Hello from the support team", event_id="EvSLACKHUMAN1")
    site.say_in_desk("Hello from the support team", ts=ts, event_id="EvSLACKHUMAN2")  # Slack's other event for the same message

    def answers() -> list[dict[str, Any]]:
        return [m for m in site.slack.messages_in(general) if m.get("thread_ts") == root and "Hello from the support team" in m["text"]]

    wait_for(answers, 30, "the human's answer in the person's thread")
    await site.settle()
    assert len(answers()) == 1 and len([m for m in site.slack.messages_in(general) if m.get("thread_ts") == root]) == answered_before + 1


async def test_nobody_answering_in_time_tells_the_person_and_reminds_the_desk_once(site: Site) -> None:
    site.whatsapp(wa.text(site.person, "a human please"))
    site.wait_to_person(1)
    site.card()
    async with site.db.tenant(tenant_id=site.tenant_id) as session:  # answer_within (30 minutes) has passed
        await session.execute(update(Handoff).values(created_at=Handoff.created_at - timedelta(minutes=31)))
    reminder = site.wait_marked("reminder:", 1)[0]
    assert "Nobody has taken or answered this in 30 minutes" in reminder["text"]
    told = site.wait_to_person(2)[-1]["text"]["body"]
    assert told == load_settings(site.config).escalation.waiting_message
    # Still once: by the time a later check has redrawn the card after a take, no second reminder came.
    card = site.card()
    taken = site.cli("conversation", "take", str((await site.conversation()).id)[:8], "--tenant", site.slug)
    assert taken.returncode == 0 and "taken" in taken.stdout, taken.stderr
    wait_for(lambda: "operator:" in json.dumps(site.slack.messages[(site.desk, card["ts"])].get("blocks")), 10, "the CLI owner on the card")
    assert len(site.marked("reminder:")) == 1 and len(site.to_person()) == 2
    closed = site.cli("conversation", "close", str((await site.conversation()).id)[:8], "--tenant", site.slug)
    assert closed.returncode == 0 and "closed" in closed.stdout
    assert (await site.handoffs())[0].outcome == "closed"
    again = site.cli("conversation", "close", str((await site.conversation()).id)[:8], "--tenant", site.slug)
    assert again.returncode == 1 and "not escalated" in again.stderr and "Traceback" not in again.stderr
    async with site.db.tenant(tenant_id=site.tenant_id) as session:
        kinds = list(await session.scalars(select(InboxRow.channel)))
    assert "desk" not in kinds  # no human answered: nothing went through the desk's inbox


def test_outcomes() -> None:
    """How an ending counts: a human's answer makes a close a resolution; nobody after the reminder, abandonment."""
    from datetime import datetime

    from konstruct.handoff.state import CLOSE, HAND_BACK, outcome_of

    now = datetime.now().astimezone()
    assert outcome_of(Handoff(first_human_reply_at=now, taken_at=now), CLOSE) == "resolved_by_human"
    assert outcome_of(Handoff(taken_at=now), CLOSE) == "closed"
    assert outcome_of(Handoff(), HAND_BACK) == "handed_back"
    assert outcome_of(Handoff(reminded_at=now), CLOSE) == outcome_of(Handoff(reminded_at=now), HAND_BACK) == "abandoned"
    assert outcome_of(Handoff(reminded_at=now, taken_at=now), HAND_BACK) == "handed_back"
