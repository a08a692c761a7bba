"""WhatsApp end to end: signed webhooks in Meta's shapes to a real gateway process, a real worker, the fake Graph API.

One gateway and one worker serve the module; each test has a tenant and a phone number id of its own. The handshake and
signature checks run the same app in-process over ASGI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import URL

from konstruct.agent.agents import create_agent
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.db.models import DeliveryStatus, LLMUsage, Message
from konstruct.db.models import InboundMessage as InboxRow
from konstruct.tenancy.tenants import create_tenant
from tests.fakes import whatsapp as wa
from tests.fakes.llm import FakeLLM
from tests.fakes.whatsapp import FakeGraph
from tests.helpers import Proc, cli_env, gateway_in_process, konstruct, konstruct_in_process, wait_for
from tests.shared import SharedStack, shared_stack, unique_slug, wait_finished

TOKEN = "EAAG-whatsapp-access-token-5150"
APP_SECRET = "meta-app-secret-0042"
VERIFY = "verify-me-please-9911"
PERSON = "15551234567"
TEMPLATE_TEXT = "Hello again! Sorry for the wait: reply to this message and we'll pick up where we left off."
TEMPLATE = {"template_name": "back_in_touch", "template_language": "en", "template_text": TEMPLATE_TEXT}


@pytest.fixture(scope="session")
def graph_server() -> Iterator[FakeGraph]:
    fake = FakeGraph().start()
    yield fake
    fake.stop()


@pytest.fixture
def graph(graph_server: FakeGraph) -> FakeGraph:
    graph_server.reset()
    return graph_server


def whatsapp_settings(graph: FakeGraph, **extra: object) -> dict[str, object]:
    return {"graph_url": graph.url, "recipient_interval": 0.0, "retry_backoff": 0.05, **extra}


@pytest.fixture(scope="module")
def stack(
    pg_server: URL, template_db: str, tmp_path_factory: pytest.TempPathFactory, fake_llm_server: FakeLLM, graph_server: FakeGraph
) -> Iterator[SharedStack]:
    """One gateway and one worker for the module; each test connects a number of its own to a tenant of its own."""
    with shared_stack(
        pg_server, template_db, tmp_path_factory.mktemp("whatsapp"), fake_llm_server.url,
        whatsapp=whatsapp_settings(graph_server, **TEMPLATE), gateway={"cache_ttl": 0.5},
    ) as shared:  # fmt: skip
        yield shared


@dataclass
class WhatsAppSystem:
    base: str
    config: Path
    db: Database
    graph: FakeGraph
    llm: FakeLLM
    tenant_id: uuid.UUID
    slug: str
    number: str
    stack: SharedStack
    data_dir: Path

    @property
    def worker(self) -> Proc:
        return self.stack.worker

    def post(self, payload: dict[str, Any], secret: str = APP_SECRET, signature: str | None = None) -> httpx.Response:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "X-Hub-Signature-256": signature or wa.sign(body, secret)}
        return httpx.post(f"{self.base}/whatsapp/webhook", content=body, headers=headers, timeout=10)

    def deliver(self, *messages: dict[str, Any], statuses: tuple[dict[str, Any], ...] = ()) -> httpx.Response:
        senders = {m["from"] for m in messages}
        contacts = [wa.contact(s, f"Person {s[-4:]}") for s in sorted(senders)]
        return self.post(wa.webhook(self.number, messages=messages, statuses=statuses, contacts=contacts))

    def replies(self, to: str = PERSON) -> list[dict[str, Any]]:
        return self.graph.messages_to(to)

    def wait_replies(self, n: int, to: str = PERSON, timeout: float = 30) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.replies(to)) >= n, timeout, f"{n} message(s) to {to}; worker log:\n{self.worker.log()}")
        return self.replies(to)

    async def inbox(self) -> list[InboxRow]:
        async with self.db.tenant(tenant_id=self.tenant_id) as session:
            return list(await session.scalars(select(InboxRow).order_by(InboxRow.received_at)))

    async def wait_inbox(self, predicate: Any, what: str, timeout: float = 30) -> list[InboxRow]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = await self.inbox()
            if predicate(rows):
                return rows
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; worker log:\n{self.worker.log()}")


def unique_number() -> str:
    return str(random.SystemRandom().randrange(10**14, 10**15))


@asynccontextmanager
async def connected(stack: SharedStack, graph: FakeGraph, llm: FakeLLM) -> AsyncIterator[WhatsAppSystem]:
    """A tenant of its own with one agent and a number of its own connected (through the CLI), on the stack."""
    settings = load_settings(stack.config)
    db = Database(settings)
    slug, number = unique_slug("acme"), unique_number()
    graph.add_number(number, TOKEN)
    tenant = await create_tenant(db, name="Acme", slug=slug, actor="test")
    await create_agent(db, tenant, name="Ava", role="Support", persona="Helpful and brief.", model=None, actor="test")
    env = cli_env(WA_TOKEN=TOKEN, WA_SECRET=APP_SECRET, WA_VERIFY=VERIFY)
    connect = konstruct_in_process(
        "channel", "connect", "whatsapp", "--tenant", slug, "--phone-number-id", number, "--access-token-env", "WA_TOKEN",
        "--app-secret-env", "WA_SECRET", "--verify-token-env", "WA_VERIFY", config=stack.config, env=env,
    )  # fmt: skip
    assert connect.returncode == 0, connect.stderr
    assert "/whatsapp/webhook" in connect.stdout
    try:
        yield WhatsAppSystem(stack.base, stack.config, db, graph, llm, tenant.id, slug, number, stack, settings.data_dir)
        # What this test set going is over before the next one looks at the fakes.
        stack.ensure_worker()
        await wait_finished(db, tenant.id, timeout=10)
    finally:
        await db.dispose()


@pytest.fixture
async def system(stack: SharedStack, fake_llm: FakeLLM, graph: FakeGraph) -> AsyncIterator[WhatsAppSystem]:
    async with connected(stack, graph, fake_llm) as started:
        yield started


@pytest.fixture
async def gateway_app(stack: SharedStack) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway in this process over ASGI, on the module's database: for checks a process adds nothing to."""
    async with gateway_in_process(load_settings(stack.config)) as client:
        yield client


async def test_verification_handshake(system: WhatsAppSystem, gateway_app: httpx.AsyncClient) -> None:
    """In-process over ASGI: the same app and database as the gateway process, without its process."""
    url = "/whatsapp/webhook"
    ok = await gateway_app.get(url, params={"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1158201444"})
    assert ok.status_code == 200 and ok.text == "1158201444"
    wrong = await gateway_app.get(url, params={"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"})
    assert wrong.status_code == 403
    unsubscribe = await gateway_app.get(url, params={"hub.mode": "unsubscribe", "hub.verify_token": VERIFY, "hub.challenge": "1"})
    assert unsubscribe.status_code == 403
    assert (await gateway_app.get(url, params={"hub.challenge": "1"})).status_code == 403


async def test_bad_or_missing_signature_is_refused_and_nothing_stored(system: WhatsAppSystem, gateway_app: httpx.AsyncClient) -> None:
    """In-process over ASGI, with Meta's signatures over the raw bytes and the module's real database."""

    async def post(payload: dict[str, Any] | bytes, secret: str | None = APP_SECRET, signature: str | None = None) -> int:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if secret or signature:
            headers["X-Hub-Signature-256"] = signature or wa.sign(body, secret or "")
        return (await gateway_app.post("/whatsapp/webhook", content=body, headers=headers)).status_code

    payload = wa.webhook(system.number, messages=[wa.text(PERSON, "hello?")], contacts=[wa.contact(PERSON, "Pat")])
    assert await post(payload, secret="not-the-app-secret") == 403
    assert await post(payload, signature="sha256=" + "0" * 64) == 403
    assert await post(payload, secret=None) == 403  # no signature at all
    unknown = wa.webhook("999999999999999", messages=[wa.text(PERSON, "hello?")])
    assert await post(unknown, secret="another-apps-secret") == 403  # nobody we know signed it
    assert await post(unknown) == 200  # our app's, for a number not connected: authentic, not ours to store
    assert await post({"object": "whatsapp_business_account"}, secret="nope") == 403
    assert await post(b"{" + b" " * 2_000_000 + b"}") == 413
    # Stored before acknowledged: what a refused (or not ours) delivery would have stored is there by its answer.
    assert await system.inbox() == [] and system.llm.requests == []
    # The same delivery, signed right, is stored (so the refusals above were the signatures' doing).
    assert await post(payload) == 200
    await system.wait_inbox(lambda rows: len(rows) == 1, "the signed delivery stored")


async def test_text_is_answered_read_and_duplicates_get_one_reply(system: WhatsAppSystem) -> None:
    system.llm.delay = 1.0  # the redeliveries arrive while the first is being answered
    message = wa.text(PERSON, "Do you ship to Canada?")
    statuses = await asyncio.gather(*(asyncio.to_thread(system.deliver, message) for _ in range(4)))
    assert [r.status_code for r in statuses] == [200] * 4
    replies = system.wait_replies(1)
    assert replies[0]["type"] == "text" and replies[0]["text"]["body"] == "[fake-model] You said: Do you ship to Canada?"
    # Once the one row is finished, no redelivery can bring a second reply (each found the row stored).
    await system.wait_inbox(lambda rows: len(rows) == 1 and rows[0].status == "replied", "the message to be finished")
    assert len(system.replies()) == 1 and len(system.llm.requests) == 1
    assert system.graph.read_receipts() == [message["id"]]
    assert {c.token for c in system.graph.calls} == {TOKEN}
    rows = await system.inbox()
    assert len(rows) == 1 and rows[0].status == "replied" and rows[0].sender == PERSON
    assert "You are an AI" in system.llm.requests[0].body["messages"][0]["content"]
    # The same person again: the same conversation, with its history.
    system.llm.delay = 0
    system.deliver(wa.text(PERSON, "And to Mexico?"))
    system.wait_replies(2)
    assert [m["role"] for m in system.llm.requests[-1].body["messages"][1:]] == ["user", "assistant", "user"]


async def test_image_reaches_the_model_and_media_is_stored_checked(system: WhatsAppSystem) -> None:
    media = system.data_dir / "media"
    before = {p.name for p in media.rglob("*") if p.is_file()}  # the data dir is the module's
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    digest = system.graph.add_media("1000001", png, "image/png")
    system.deliver(wa.image(PERSON, "1000001", mime_type="image/png", sha256=digest, caption="Is this damaged?"))
    system.wait_replies(1)
    content = system.llm.requests[-1].body["messages"][-1]["content"]
    assert content[0] == {"type": "text", "text": "Is this damaged?"}
    assert content[1]["type"] == "image_url" and content[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert (system.data_dir / "media" / digest[:2] / digest).read_bytes() == png
    assert system.graph.media_fetches == [("1000001", TOKEN)]

    pdf = b"%PDF-1.4 invoice"
    digest = system.graph.add_media("1000002", pdf, "application/pdf")
    system.deliver(wa.document("15550000002", "1000002", filename="invoice.pdf", sha256=digest))
    system.wait_replies(1, to="15550000002")
    note = system.llm.requests[-1].body["messages"][-1]["content"][-1]["text"]
    assert "invoice.pdf" in note and "application/pdf" in note and "document" in note

    system.graph.add_media("1000003", b"tampered bytes", "image/jpeg")
    system.graph.corrupt_media.add("1000003")
    claimed = wa.sha256_base64(b"tampered bytes")  # Meta has sent base64 digests too; both forms are checked
    system.deliver(wa.image("15550000003", "1000003", sha256=claimed))
    system.wait_replies(1, to="15550000003")
    note = system.llm.requests[-1].body["messages"][-1]["content"][-1]["text"]
    assert "could not be read" in note
    stored = {p.name for p in media.rglob("*") if p.is_file()} - before
    assert stored == {hashlib.sha256(png).hexdigest(), hashlib.sha256(pdf).hexdigest()}  # nothing unchecked is kept


async def test_every_message_type_is_normalised_and_one_payload_carries_many(system: WhatsAppSystem) -> None:
    people = [f"1555000{n:04d}" for n in range(12)]
    audio = system.graph.add_media("1000004", b"OggS voice", "audio/ogg")
    video = system.graph.add_media("1000005", b"\x00\x00\x00\x18ftypmp4", "video/mp4")
    sticker = system.graph.add_media("1000006", b"RIFF....WEBPVP8 ", "image/webp")
    messages = [
        wa.text(people[0], "plain words"),
        wa.audio(people[1], "1000004", sha256=audio),
        wa.video(people[2], "1000005", sha256=video, caption="unboxing"),
        wa.sticker(people[3], "1000006", sha256=sticker),
        wa.location(people[4], 52.52, 13.405, name="Shop", address="Main St 1"),
        wa.contacts_message(
            people[5], [{"name": {"formatted_name": "Jo Doe", "first_name": "Jo"}, "phones": [{"phone": "+1 555 0100", "type": "CELL"}]}]
        ),
        wa.button_reply(people[6], "yes-1", "Yes please"),
        wa.list_reply(people[7], "plan-pro", "Pro plan", "All features"),
        wa.button(people[8], "STOP_PROMOS", "Stop promotions"),
        wa.unsupported(people[9]),
        wa.reaction(people[10], "wamid.some-earlier-message", "👍"),
    ]
    response = system.post(wa.webhook(system.number, messages=messages, contacts=[wa.contact(p, f"P{p[-2:]}") for p in people[:11]]))
    assert response.status_code == 200
    rows = await system.wait_inbox(lambda rows: len(rows) == 11 and all(r.status in ("replied", "ignored") for r in rows), "11 handled")
    by_sender = {r.sender: r for r in rows}
    assert by_sender[people[0]].text == "plain words"
    assert by_sender[people[4]].text.startswith("[location: Shop, Main St 1")
    assert "Jo Doe" in by_sender[people[5]].text
    assert by_sender[people[6]].text == "Yes please"
    assert by_sender[people[7]].text == "Pro plan — All features"
    assert by_sender[people[8]].text == "Stop promotions"
    assert by_sender[people[9]].text.startswith("[")
    assert by_sender[people[10]].status == "ignored" and "👍" in by_sender[people[10]].text  # kept in history, not answered
    assert all(by_sender[p].status == "replied" for p in people[:10])
    assert all(len(system.replies(p)) == 1 for p in people[:10]) and system.replies(people[10]) == []
    kinds = {r.sender: r.payload["kind"] for r in rows}
    assert [kinds[p] for p in people[:11]] == [
        "text", "audio", "video", "sticker", "location", "contacts", "interactive", "interactive", "button", "unsupported", "reaction",
    ]  # fmt: skip
    prompts = {
        r.body["messages"][-1]["content"]
        if isinstance(r.body["messages"][-1]["content"], str)
        else json.dumps(r.body["messages"][-1]["content"])
        for r in system.llm.requests
    }
    assert any("audio" in p and "audio/ogg" in p for p in prompts) and any("unboxing" in p and "video/mp4" in p for p in prompts)
    assert any("image_url" in p and "image/webp" in p for p in prompts)  # a sticker is an image


async def test_statuses_in_any_order_end_in_the_furthest_state(system: WhatsAppSystem) -> None:
    system.deliver(wa.text(PERSON, "first question"))
    system.wait_replies(1)
    await system.wait_inbox(lambda rows: rows and rows[0].status == "replied", "the reply recorded")
    sent = system.graph.sent[-1].wamid
    # A status that beats the worker: the next reply's wamid is told "read" before the worker records it.
    upcoming = system.graph.next_wamid(PERSON)
    assert system.deliver(statuses=(wa.status(upcoming, "read", PERSON),)).status_code == 200
    system.deliver(wa.text(PERSON, "second question"))
    system.wait_replies(2)
    await system.wait_inbox(lambda rows: len(rows) == 2 and rows[1].status == "replied", "the second reply recorded")
    assert system.graph.sent[-1].wamid == upcoming

    order = ["sent", "delivered", "read"]
    random.Random(7).shuffle(order)
    for name in order:  # one webhook each, shuffled
        assert system.deliver(statuses=(wa.status(sent, name, PERSON),)).status_code == 200
    # Another outgoing message fails; a late "delivered" does not undo that.
    failing = "wamid.HBgLMTU1NTEyMzQ1NjcVAgARGBJGQUlMRUQtT05FAA=="
    errors = [
        {"code": 131026, "title": "Message undeliverable", "message": "Message undeliverable", "error_data": {"details": "no WhatsApp"}}
    ]
    system.deliver(statuses=(wa.status(failing, "failed", PERSON, errors=errors), wa.status(failing, "sent", PERSON)))
    system.deliver(statuses=(wa.status(failing, "delivered", PERSON),))
    async with system.db.tenant(tenant_id=system.tenant_id) as session:
        replies = {m.external_id: m for m in await session.scalars(select(Message).where(Message.direction == "out"))}
        recorded = {d.external_id: d for d in await session.scalars(select(DeliveryStatus))}
    assert replies[sent].status == "read" and replies[upcoming].status == "read"
    assert recorded[failing].status == "failed" and "131026" in (recorded[failing].error or "")


async def test_graph_errors_are_retried_or_recorded(system: WhatsAppSystem) -> None:
    system.graph.fail_next(130429, status=400, message="Rate limit hit", times=2)
    system.deliver(wa.text(PERSON, "busy times"))
    replies = system.wait_replies(1)
    assert replies[0]["text"]["body"].endswith("busy times")
    assert len([c for c in system.graph.calls if c.error_code == 130429]) == 2

    system.graph.fail_next(131026, message="Message undeliverable", times=1)
    system.deliver(wa.text("15550009999", "will not arrive"))
    rows = await system.wait_inbox(lambda rows: any(r.sender == "15550009999" and r.status == "failed" for r in rows), "a recorded failure")
    failed = next(r for r in rows if r.sender == "15550009999")
    assert "131026" in (failed.error or "")
    assert len([c for c in system.graph.calls if c.error_code == 131026]) == 1  # not retried: it would not help


async def test_outside_the_window_the_template_goes_instead(system: WhatsAppSystem) -> None:
    old = int(time.time()) - 25 * 3600  # the gateway was down for a day and Meta delivers late: the window has closed
    system.deliver(wa.text(PERSON, "hello from yesterday", timestamp=old))
    sent = system.wait_replies(1)
    assert sent[0]["type"] == "template" and sent[0]["template"]["name"] == "back_in_touch"
    assert sent[0]["template"]["language"] == {"code": "en"}
    # Only a template could go out, so the model was not asked (no call, no usage), and the conversation records the
    # template as what was sent, under the template's wamid.
    rows = await system.wait_inbox(lambda rows: rows and rows[0].status == "replied", "the turn finished")
    assert system.llm.requests == [] and "24 hours" in (rows[0].error or "")
    template_wamid = next(s.wamid for s in system.graph.sent if s.kind == "template")
    assert await replies_recorded(system) == [(TEMPLATE_TEXT, "notice", "template:back_in_touch", template_wamid)]
    async with system.db.tenant(tenant_id=system.tenant_id) as session:
        assert await session.scalar(select(func.count()).select_from(LLMUsage)) == 0
    # Meta itself says the window is closed (131047): the model had answered, but the template went instead of its text,
    # and that is what the conversation keeps.
    system.graph.fail_next(131047, message="Re-engagement message", kinds=("text",))
    system.deliver(wa.text(PERSON, "another one"))
    sent = system.wait_replies(2)
    assert sent[1]["type"] == "template" and len(system.llm.requests) == 1
    await system.wait_inbox(lambda rows: len(rows) == 2 and all(r.status == "replied" for r in rows), "both turns finished")
    second = [s.wamid for s in system.graph.sent if s.kind == "template"][1]
    recorded = await replies_recorded(system)
    assert recorded[1] == (TEMPLATE_TEXT, "notice", "template:back_in_touch", second)
    assert not any("another one" in text for text, *_ in recorded)  # the model's words the person never got are not kept as sent


async def replies_recorded(system: WhatsAppSystem) -> list[tuple[str, str, str | None, str | None]]:
    """The conversation's outgoing rows: (text, kind, model, wamid), oldest first, each recorded as sent."""
    async with system.db.tenant(tenant_id=system.tenant_id) as session:
        rows = list(await session.scalars(select(Message).where(Message.direction == "out").order_by(Message.created_at)))
    assert all(r.status in ("sent", "delivered", "read") for r in rows), [(r.status, r.error) for r in rows]
    return [(r.text, r.kind, r.model, r.external_id) for r in rows]


async def test_outside_the_window_without_a_template_the_failure_is_recorded(
    pg_server: URL, template_db: str, tmp_path: Path, fake_llm: FakeLLM, graph: FakeGraph
) -> None:
    """No template configured: a stack of its own (the template is an installation-wide setting)."""
    with shared_stack(pg_server, template_db, tmp_path, fake_llm.url, whatsapp=whatsapp_settings(graph)) as own:
        async with connected(own, graph, fake_llm) as system:
            await _no_template_failure_is_recorded(system)


async def _no_template_failure_is_recorded(system: WhatsAppSystem) -> None:
    system.deliver(wa.text(PERSON, "hello from yesterday", timestamp=int(time.time()) - 25 * 3600))
    rows = await system.wait_inbox(lambda rows: rows and rows[0].status == "failed", "the failure recorded")
    assert "24 hours" in (rows[0].error or "") and "template_name" in (rows[0].error or "")
    assert system.replies() == []
    # Nothing could go out, so the model was not asked, and no reply is recorded as if it had been said.
    assert system.llm.requests == []
    async with system.db.tenant(tenant_id=system.tenant_id) as session:
        assert await session.scalar(select(Message).where(Message.direction == "out")) is None


async def test_long_answers_are_split_within_whatsapps_limit(system: WhatsAppSystem) -> None:
    long_question = " ".join(f"word{n}" for n in range(900))  # the fake LLM echoes it: over 4,096 characters
    system.deliver(wa.text(PERSON, long_question))
    wait_for(lambda: len(system.replies()) >= 2, 30, "the split reply")
    bodies = [m["text"]["body"] for m in system.replies()]
    assert all(len(b) <= 4096 for b in bodies)
    assert " ".join(bodies).endswith("word899")


async def test_channel_cli_shows_hints_only_and_disconnect_stops_answers(system: WhatsAppSystem) -> None:
    listed = konstruct_in_process("channel", "list", "--tenant", system.slug, "--json", config=system.config)
    assert listed.returncode == 0, listed.stderr
    (connection,) = json.loads(listed.stdout)
    assert connection["kind"] == "whatsapp" and connection["external_id"] == system.number
    shown = konstruct_in_process("channel", "show", system.number, "--tenant", system.slug, "--json", config=system.config)
    details = json.loads(shown.stdout)["details"]
    assert details["access_token_hint"] == "…5150" and details["app_secret_hint"] == "…0042"
    for secret in (TOKEN, APP_SECRET, VERIFY):
        assert secret not in listed.stdout + shown.stdout
    async with system.db.tenant(tenant_id=system.tenant_id) as session:
        from konstruct.db.models import ChannelConnection

        blob = await session.scalar(select(ChannelConnection.credentials))
    assert blob is not None and TOKEN.encode() not in blob and APP_SECRET.encode() not in blob

    bad = konstruct(
        "channel", "connect", "whatsapp", "--tenant", system.slug, "--phone-number-id", "123", "--access-token-env", "WA_TOKEN",
        "--app-secret-env", "WA_SECRET", "--verify-token-env", "WA_VERIFY", config=system.config,
        env=cli_env(WA_TOKEN="wrong-token", WA_SECRET="x", WA_VERIFY="y"),
    )  # fmt: skip
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "rejected" in bad.stderr

    gone = konstruct_in_process("channel", "disconnect", system.number, "--tenant", system.slug, "--yes", config=system.config)
    assert gone.returncode == 0, gone.stderr
    # The gateway sees the disconnect once its cached look-up expires ([gateway] cache_ttl: 0.5 s here, 5 s by default);
    # then a delivery is acknowledged (authentic) and stored nowhere. The webhook stores before it answers, so the
    # count right after the 200 is final.
    await asyncio.sleep(load_settings(system.config).gateway.cache_ttl)
    assert system.deliver(wa.text(PERSON, "anyone there?")).status_code == 200  # authentic, so acknowledged
    async with system.db.tenant(tenant_id=system.tenant_id) as session:
        assert await session.scalar(select(func.count()).select_from(InboxRow)) == 0
