"""WhatsApp webhook normalisation, on payloads built like Meta's; and the fake Graph API over real HTTP."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from konstruct.channels.whatsapp import normalize
from konstruct.channels.whatsapp.normalize import Media, Normalized, Status
from tests.fakes import whatsapp as wa
from tests.fakes.whatsapp import FakeGraph

NUMBER = "106540352242922"
ALICE, BOB = "16505551234", "447700900123"
SHA = "a" * 64


def one(message: dict[str, Any], *, name: str | None = "Alice") -> Normalized:
    contacts = [wa.contact(message["from"], name)] if name else []
    value = wa.webhook(NUMBER, messages=[message], contacts=contacts)["entry"][0]["changes"][0]["value"]
    [normalized] = normalize.messages(value)
    return normalized


def test_text() -> None:
    message = wa.text(ALICE, "Where is my order?", timestamp=1739321024)
    got = one(message)
    assert got == Normalized(
        wamid=message["id"],
        wa_id=ALICE,
        name="Alice",
        timestamp=1739321024,
        kind="text",
        text="Where is my order?",
        media=None,
        reply_to=None,
        answer=True,
    )
    assert got.wamid.startswith("wamid.HBgL")


@pytest.mark.parametrize(
    ("message", "text", "media"),
    [
        (
            wa.image(ALICE, "300001", sha256=SHA, caption="the broken part"),
            "the broken part",
            Media("300001", "image", "image/jpeg", SHA, "the broken part", None),
        ),
        (wa.image(ALICE, "300002", sha256=SHA, mime_type="image/png"), "[image]", Media("300002", "image", "image/png", SHA, None, None)),
        (wa.audio(ALICE, "300003", sha256=SHA), "[voice message]", Media("300003", "audio", "audio/ogg; codecs=opus", SHA, None, None)),
        (
            wa.audio(ALICE, "300004", sha256=SHA, voice=False, mime_type="audio/mpeg"),
            "[audio]",
            Media("300004", "audio", "audio/mpeg", SHA, None, None),
        ),
        (wa.video(ALICE, "300005", sha256=SHA), "[video]", Media("300005", "video", "video/mp4", SHA, None, None)),
        (wa.video(ALICE, "300006", sha256=SHA, caption="look"), "look", Media("300006", "video", "video/mp4", SHA, "look", None)),
        (
            wa.document(ALICE, "300007", filename="invoice.pdf", sha256=SHA),
            "[document: invoice.pdf]",
            Media("300007", "document", "application/pdf", SHA, None, "invoice.pdf"),
        ),
        (
            wa.document(ALICE, "300008", filename="q3.xlsx", sha256=SHA, caption="numbers", mime_type="application/vnd.ms-excel"),
            "numbers",
            Media("300008", "document", "application/vnd.ms-excel", SHA, "numbers", "q3.xlsx"),
        ),
        (wa.sticker(ALICE, "300009", sha256=SHA), "[sticker]", Media("300009", "sticker", "image/webp", SHA, None, None)),
        (wa.sticker(ALICE, "3000010", sha256=SHA, animated=True), "[sticker]", Media("3000010", "sticker", "image/webp", SHA, None, None)),
    ],
)
def test_media(message: dict[str, Any], text: str, media: Media) -> None:
    got = one(message)
    assert (got.kind, got.text, got.media, got.answer) == (media.kind, text, media, True)


def test_media_oddities() -> None:
    nameless = wa.document(ALICE, "300001", filename="x", sha256=SHA)
    del nameless["document"]["filename"], nameless["document"]["mime_type"], nameless["document"]["sha256"]
    got = one(nameless)
    assert got.text == "[document]"
    assert got.media == Media("300001", "document", "application/octet-stream", None, None, None)
    base64_sha = wa.sha256_base64(b"bytes")
    assert one(wa.image(ALICE, "300002", sha256=base64_sha)).media == Media("300002", "image", "image/jpeg", base64_sha, None, None)
    blank_caption = one(wa.image(ALICE, "300003", sha256=SHA, caption="  "))
    assert blank_caption.text == "[image]"
    assert blank_caption.media is not None and blank_caption.media.caption is None
    without_id = wa.image(ALICE, "300004", sha256=SHA)
    del without_id["image"]["id"]
    assert one(without_id).kind == "unsupported"
    assert one({**wa.video(ALICE, "300005", sha256=SHA), "video": "300005"}).kind == "unsupported"


@pytest.mark.parametrize(
    ("message", "text"),
    [
        (
            wa.location(ALICE, 37.48472, -122.148332, name="Philz Coffee", address="101 Forest Ave, Palo Alto, CA 94301"),
            "[location: Philz Coffee, 101 Forest Ave, Palo Alto, CA 94301 (37.48472, -122.148332)]",
        ),
        (wa.location(ALICE, 51.5, 0, name="Home"), "[location: Home (51.5, 0)]"),
        (wa.location(ALICE, -33.8688, 151.2093), "[location: -33.8688, 151.2093]"),
        (wa.location(ALICE, 200, 10, address="Main St\n  12"), "[location: Main St 12]"),
    ],
)
def test_location(message: dict[str, Any], text: str) -> None:
    got = one(message)
    assert (got.kind, got.text, got.answer) == ("location", text, True)


def test_location_without_anything_is_unsupported() -> None:
    message = wa.location(ALICE, 0, 0)
    message["location"] = {"latitude": "north", "longitude": None}
    assert one(message).kind == "unsupported"


def test_contacts() -> None:
    jane = wa.contact_card("Jane Doe", "+1 (650) 555-0100", "+1 650 555 0101")
    bob = {"name": {"first_name": "Bob", "last_name": "Smith"}, "phones": [{"wa_id": "447700900123", "type": "WORK"}]}
    nobody: dict[str, Any] = {"name": {}, "phones": []}
    got = one(wa.contacts_message(ALICE, [jane, bob, nobody, "junk"]))  # type: ignore[list-item]
    assert got.kind == "contacts"
    assert got.text == "[shared contact: Jane Doe +1 (650) 555-0100, +1 650 555 0101] [shared contact: Bob Smith +447700900123]"
    assert one(wa.contacts_message(ALICE, [wa.contact_card("Reception")])).text == "[shared contact: Reception]"
    assert one(wa.contacts_message(ALICE, [])).kind == "unsupported"


def test_interactive_and_buttons() -> None:
    got = one(wa.button_reply(ALICE, "yes-1", "Yes, please"))
    assert (got.kind, got.text) == ("interactive", "Yes, please")
    assert one(wa.list_reply(ALICE, "plan-pro", "Pro plan", "€20 a month")).text == "Pro plan — €20 a month"
    assert one(wa.list_reply(ALICE, "plan-pro", "Pro plan")).text == "Pro plan"
    flow = wa.button_reply(ALICE, "x", "y")
    flow["interactive"] = {"type": "nfm_reply", "nfm_reply": {"response_json": "{}", "body": "Sent", "name": "flow"}}
    assert one(flow).kind == "unsupported"
    template_wamid = wa.new_wamid(ALICE)
    tapped = one(wa.in_reply_to(wa.button(ALICE, "STOP_PROMOS", "Stop promotions"), template_wamid))
    assert (tapped.kind, tapped.text, tapped.reply_to) == ("button", "Stop promotions", template_wamid)


def test_reactions_are_recorded_not_answered() -> None:
    ours = wa.new_wamid(ALICE)
    liked = one(wa.reaction(ALICE, ours, "👍"))
    assert (liked.kind, liked.text, liked.reply_to, liked.answer) == ("reaction", "[reacted 👍 to a message]", ours, False)
    removed = one(wa.reaction(ALICE, ours, ""))
    assert (removed.text, removed.answer) == ("[removed a reaction]", False)


def test_unsupported_and_system() -> None:
    got = one(wa.unsupported(ALICE))
    assert (got.kind, got.text, got.answer) == ("unsupported", "[a message type Konstruct cannot read]", True)
    changed = one(wa.system(ALICE, "16505559999", name="Alice"), name=None)
    assert (changed.kind, changed.name, changed.answer) == ("system", None, False)
    assert changed.text == "[system: User Alice changed from 16505551234 to 16505559999]"
    order = wa.text(ALICE, "x")
    order.update(type="order", order={"catalog_id": "1", "product_items": []})
    del order["text"]
    assert one(order).kind == "unsupported"


def test_replies_carry_the_quoted_message() -> None:
    ours = wa.new_wamid(ALICE)
    assert one(wa.in_reply_to(wa.text(ALICE, "that one"), ours)).reply_to == ours
    assert one(wa.in_reply_to(wa.image(ALICE, "300001", sha256=SHA), ours)).reply_to == ours


def test_a_payload_with_many_messages_and_statuses() -> None:
    ours = [wa.new_wamid(BOB) for _ in range(5)]
    inbound = [
        wa.text(ALICE, "hi", timestamp=100),
        wa.text(BOB, "hello", timestamp=101),
        {"id": "wamid.nofrom", "type": "text", "text": {"body": "lost"}},
        wa.reaction(ALICE, ours[0], "❤️", timestamp=102),
        wa.image(BOB, "300001", sha256=SHA, timestamp="103"),
    ]
    updates = [
        wa.status(ours[0], "sent", BOB, timestamp=200),
        wa.status(ours[0], "delivered", BOB, timestamp=201),
        wa.status(ours[1], "read", BOB, timestamp=202),
        wa.status(ours[2], "failed", BOB, timestamp=203),
        wa.status(ours[3], "failed", BOB, errors=[wa.status_error(131047)], timestamp=204),
        wa.status(ours[4], "deleted", BOB),
        {"status": "read", "recipient_id": BOB},
    ]
    payload = wa.webhook(NUMBER, messages=inbound, statuses=updates, contacts=[wa.contact(ALICE, "Alice"), wa.contact(BOB, "Bob")])
    [value] = normalize.changes(payload)
    assert normalize.phone_number_id(value) == NUMBER
    got = normalize.messages(value)
    assert [(m.wa_id, m.name, m.kind, m.text, m.timestamp) for m in got] == [
        (ALICE, "Alice", "text", "hi", 100),
        (BOB, "Bob", "text", "hello", 101),
        (ALICE, "Alice", "reaction", "[reacted ❤️ to a message]", 102),
        (BOB, "Bob", "image", "[image]", 103),
    ]
    assert normalize.statuses(value) == [
        Status(ours[0], "sent", BOB, 200, None),
        Status(ours[0], "delivered", BOB, 201, None),
        Status(ours[1], "read", BOB, 202, None),
        Status(ours[2], "failed", BOB, 203, "131026: Message undeliverable (Unable to deliver message.)"),
        Status(
            ours[3],
            "failed",
            BOB,
            204,
            "131047: Re-engagement message (Message failed to send because more than 24 hours have passed since the customer "
            "last replied to this number.)",
        ),
    ]


def test_status_errors() -> None:
    def error_of(errors: Any) -> str | None:
        update = wa.status("wamid.x", "failed", BOB)
        update["errors"] = errors
        [status] = normalize.statuses({"statuses": [update]})
        return status.error

    assert (
        error_of([{"code": 131050, "title": "Unable to deliver", "error_data": {"details": "Unable to deliver"}}])
        == "131050: Unable to deliver"
    )
    assert error_of([{"code": "131000", "message": "Something went wrong"}, {"title": "Second"}]) == "131000: Something went wrong; Second"
    assert error_of(None) == "unknown error"
    assert error_of([1, "x", {}]) == "unknown error"
    [delivered] = normalize.statuses({"statuses": [wa.status("wamid.y", "delivered", BOB, errors=[wa.status_error(1)])]})
    assert delivered.error is None


def test_changes_takes_only_whatsapp_messages_changes() -> None:
    first = wa.webhook(NUMBER, messages=[wa.text(ALICE, "a")])
    second = wa.webhook("999", messages=[wa.text(BOB, "b")])
    payload = copy.deepcopy(first)
    payload["entry"].append(second["entry"][0])
    payload["entry"][0]["changes"].append({"field": "account_update", "value": {"event": "VERIFIED_ACCOUNT"}})
    payload["entry"][0]["changes"].append({"field": "messages", "value": "junk"})
    payload["entry"].extend([None, {"changes": None}, {"changes": [None, 3]}])
    values = normalize.changes(payload)
    assert [normalize.phone_number_id(value) for value in values] == [NUMBER, "999"]
    assert normalize.changes({**first, "object": "instagram"}) == []
    assert normalize.changes({"entry": first["entry"]}) == [first["entry"][0]["changes"][0]["value"]]  # no "object": taken


@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        "",
        "x",
        3,
        {},
        {"entry": None},
        {"entry": {}},
        {"entry": [[]]},
        {"object": ["x"], "entry": []},
        {"entry": [{"changes": "x"}]},
    ],
)
def test_changes_of_junk(payload: Any) -> None:
    assert normalize.changes(payload) == []


@pytest.mark.parametrize(
    "value",
    [
        None,
        [],
        "junk",
        {},
        {"metadata": "x", "contacts": "x", "messages": "x", "statuses": "x"},
        {"metadata": {"phone_number_id": ["x"]}, "contacts": [None, 1, {"profile": "x"}], "messages": [None, 1, "a", [], {}]},
        {"messages": [{"id": 7, "from": True}, {"id": None, "from": ALICE}, {"id": "wamid.1", "from": ""}]},
        {"statuses": [None, {}, {"id": "w", "status": ["read"]}, {"id": "w", "status": {"x": 1}}, {"id": [], "status": "read"}]},
    ],
)
def test_junk_values_give_nothing(value: Any) -> None:
    assert normalize.messages(value) == []
    assert normalize.statuses(value) == []
    assert normalize.phone_number_id(value) is None


def test_malformed_messages_become_unsupported() -> None:
    malformed = [
        {"id": "w1", "from": ALICE},
        {"id": "w2", "from": ALICE, "type": None},
        {"id": "w3", "from": ALICE, "type": ["text"]},
        {"id": "w4", "from": ALICE, "type": "text"},
        {"id": "w5", "from": ALICE, "type": "text", "text": {"body": None}},
        {"id": "w6", "from": ALICE, "type": "text", "text": {"body": "   "}},
        {"id": "w7", "from": ALICE, "type": "interactive", "interactive": {"type": "button_reply", "button_reply": "x"}},
        {"id": "w8", "from": ALICE, "type": "reaction", "reaction": "👍"},
        {"id": "w9", "from": ALICE, "type": "button", "button": {}},
        {"id": "w10", "from": ALICE, "type": "id"},
        {"id": "w11", "from": ALICE, "type": "contacts", "contacts": {"name": "x"}},
    ]
    got = normalize.messages({"messages": malformed, "contacts": [{"wa_id": ALICE}]})
    assert [(m.wamid, m.kind, m.text, m.answer, m.name) for m in got] == [
        (f"w{n}", "unsupported", "[a message type Konstruct cannot read]", True, None) for n in range(1, 12)
    ]


def test_numbers_and_timestamps_are_forgiven() -> None:
    message = {"id": 123, "from": 16505551234, "type": "text", "text": {"body": "x"}, "context": {"id": 5}}
    for stamp, expected in [("1700000000", 1700000000), (1700000001, 1700000001), (1.7e9, 1700000000), ("-5", 0), ("soon", 0), (None, 0)]:
        [got] = normalize.messages({"messages": [{**message, "timestamp": stamp}]})
        assert (got.wamid, got.wa_id, got.reply_to, got.timestamp) == ("123", "16505551234", "5", expected)
    for stamp in ["9" * 5000, float("nan"), float("inf"), True, [1], "١٢٣"]:
        [got] = normalize.messages({"messages": [{**message, "timestamp": stamp}]})
        assert got.timestamp == 0


def _junk(rng: random.Random) -> Any:
    return rng.choice(
        [None, True, 0, -1, 1.5, float("nan"), 10**30, "", " ", "x", "wamid.x", [], [None], {}, {"id": None}, [{}], {"type": "text"}]
    )


def _mutate(node: Any, rng: random.Random) -> Any:
    """Replace a few randomly chosen parts of a JSON tree with junk, or drop them."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, child in node.items():
            roll = rng.random()
            if roll < 0.08:
                continue
            out[key] = _junk(rng) if roll < 0.16 else _mutate(child, rng)
        return out
    if isinstance(node, list):
        items = [_junk(rng) if rng.random() < 0.1 else _mutate(child, rng) for child in node]
        if rng.random() < 0.1:
            items.insert(rng.randrange(len(items) + 1), _junk(rng))
        return items
    return node


def test_mutated_payloads_never_raise() -> None:
    ours = wa.new_wamid(BOB)
    inbound = [
        wa.text(ALICE, "hi"),
        wa.in_reply_to(wa.image(ALICE, "300001", sha256=SHA, caption="c"), ours),
        wa.audio(ALICE, "300002", sha256=SHA),
        wa.video(ALICE, "300003", sha256=SHA),
        wa.document(ALICE, "300004", filename="a.pdf", sha256=SHA),
        wa.sticker(ALICE, "300005", sha256=SHA),
        wa.location(ALICE, 1.0, 2.0, name="n", address="a"),
        wa.contacts_message(ALICE, [wa.contact_card("Jane Doe", "+1 555 0100")]),
        wa.button_reply(ALICE, "a", "b"),
        wa.list_reply(ALICE, "a", "b", "c"),
        wa.button(ALICE, "p", "t"),
        wa.reaction(ALICE, ours, "👍"),
        wa.unsupported(ALICE),
        wa.system(ALICE, BOB),
    ]
    updates = [wa.status(ours, s, BOB) for s in ("sent", "delivered", "read", "failed")]
    payload = wa.webhook(NUMBER, messages=inbound, statuses=updates, contacts=[wa.contact(ALICE, "Alice")])
    rng = random.Random(20250214)
    for _ in range(400):
        mutated = _mutate(payload, rng)
        for value in normalize.changes(mutated):
            normalize.phone_number_id(value)
            for message in normalize.messages(value):
                assert message.wamid and message.wa_id and isinstance(message.text, str) and message.text
                assert isinstance(message.timestamp, int) and message.timestamp >= 0
            for status in normalize.statuses(value):
                assert status.status in normalize.STATUSES


def test_builders() -> None:
    body = json.dumps(wa.webhook(NUMBER, messages=[wa.text(ALICE, "hi")])).encode()
    assert wa.sign(body, "app-secret") == "sha256=" + hmac.new(b"app-secret", body, hashlib.sha256).hexdigest()
    ids = {wa.new_wamid(ALICE) for _ in range(100)} | {wa.text(ALICE, "x")["id"] for _ in range(100)}
    assert len(ids) == 200
    value = wa.webhook(NUMBER)["entry"][0]["changes"][0]["value"]
    assert set(value) == {"messaging_product", "metadata"}
    assert wa.unsupported(ALICE)["errors"][0]["code"] == 131051


@pytest.fixture(scope="module")
def graph() -> Iterator[FakeGraph]:
    fake = FakeGraph().start()
    yield fake
    fake.stop()


def test_fake_graph_over_http(graph: FakeGraph) -> None:
    graph.reset()
    graph.add_number(NUMBER, "token-1")
    digest = graph.add_media("2000001", b"\x89PNG fake", "image/png")
    assert digest == hashlib.sha256(b"\x89PNG fake").hexdigest()
    graph.add_media("2000002", b"%PDF", "application/pdf")
    graph.corrupt_media.add("2000002")
    auth = {"Authorization": "Bearer token-1"}
    with httpx.Client(base_url=graph.url, timeout=5) as http:
        info = http.get("/v23.0/2000001", headers=auth).json()
        assert info == {
            "messaging_product": "whatsapp",
            "url": info["url"],
            "mime_type": "image/png",
            "sha256": digest,
            "file_size": 9,
            "id": "2000001",
        }
        assert http.get(info["url"]).status_code == 401
        download = http.get(info["url"], headers=auth)
        assert (download.status_code, download.content, download.headers["content-type"]) == (200, b"\x89PNG fake", "image/png")
        no_token = http.get("/v21.0/2000001")
        assert (no_token.status_code, no_token.json()["error"]["code"]) == (401, 190)
        unknown = http.get("/v21.0/2000009", headers=auth)
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, 100)
        corrupt = http.get(http.get("/v21.0/2000002", headers=auth).json()["url"], headers=auth)
        assert hashlib.sha256(corrupt.content).hexdigest() != graph.media["2000002"].sha256

        send = {"messaging_product": "whatsapp", "recipient_type": "individual", "to": ALICE, "type": "text"}
        sent = http.post(f"/v23.0/{NUMBER}/messages", headers=auth, json={**send, "text": {"body": "Hello!", "preview_url": False}})
        assert sent.status_code == 200
        first_id = sent.json()["messages"][0]["id"]
        assert sent.json() == {
            "messaging_product": "whatsapp",
            "contacts": [{"input": ALICE, "wa_id": ALICE}],
            "messages": [{"id": first_id}],
        }
        assert first_id.startswith("wamid.")

        inbound = wa.new_wamid(ALICE)
        receipt = {"messaging_product": "whatsapp", "status": "read", "message_id": inbound, "typing_indicator": {"type": "text"}}
        graph.fail_next(131047)
        assert http.post(f"/v23.0/{NUMBER}/messages", headers=auth, json=receipt).json() == {"success": True}
        refused = http.post(f"/v23.0/{NUMBER}/messages", headers=auth, json={**send, "text": {"body": "Still there?"}})
        error = refused.json()["error"]
        assert (refused.status_code, error["code"], error["type"]) == (400, 131047, "OAuthException")
        assert "24 hours" in error["error_data"]["details"] and error["fbtrace_id"]
        again = http.post(f"/v23.0/{NUMBER}/messages", headers=auth, json={**send, "text": {"body": "Third"}})
        assert again.status_code == 200 and again.json()["messages"][0]["id"] != first_id

        wrong = http.post(f"/v23.0/{NUMBER}/messages", headers={"Authorization": "Bearer nope"}, json={**send, "text": {"body": "x"}})
        assert (wrong.status_code, wrong.json()["error"]["code"]) == (401, 190)
        too_long = http.post(f"/v23.0/{NUMBER}/messages", headers=auth, json={**send, "text": {"body": "x" * 4097}})
        assert (too_long.status_code, too_long.json()["error"]["code"]) == (400, 100)

    assert [body["text"]["body"] for body in graph.messages_to(ALICE)] == ["Hello!", "Third"]
    assert graph.messages_to(f"+{ALICE}") == graph.messages_to(ALICE)
    assert graph.read_receipts() == [inbound]
    assert graph.media_fetches == [("2000001", "token-1"), ("2000001", None), ("2000009", "token-1"), ("2000002", "token-1")]
    posts = [call for call in graph.calls if call.method == "POST"]
    assert [(call.failed, call.error_code) for call in posts] == [
        (False, None),
        (False, None),
        (True, 131047),
        (False, None),
        (True, 190),
        (True, 100),
    ]
    assert posts[2].token == "token-1" and posts[2].body is not None and posts[2].body["text"]["body"] == "Still there?"


def test_fake_graph_failure_queue(graph: FakeGraph) -> None:
    graph.reset()
    graph.add_number(NUMBER, "token-1")
    graph.add_media("2000100", b"data", "image/jpeg", token="media-only")
    graph.fail_next(130429, times=2, status=429)
    graph.fail_next(131026, kinds=("template",))
    auth = {"Authorization": "Bearer token-1"}
    text_body = {"messaging_product": "whatsapp", "to": BOB, "type": "text", "text": {"body": "hi"}}
    template = {
        "messaging_product": "whatsapp",
        "to": BOB,
        "type": "template",
        "template": {"name": "hello", "language": {"code": "en_US"}},
    }
    with httpx.Client(base_url=graph.url, timeout=5) as http:
        assert http.get("/v23.0/2000100", headers={"Authorization": "Bearer media-only"}).status_code == 200
        codes = [
            http.post(f"/v23.0/{NUMBER}/messages", headers=auth, json=body).status_code
            for body in (text_body, text_body, template, text_body)
        ]
        assert codes == [429, 429, 400, 200]
        upcoming = graph.next_wamid(BOB)
        accepted = http.post(f"/v23.0/{NUMBER}/messages", headers=auth, json=template).json()["messages"][0]
        assert accepted == {"id": upcoming, "message_status": "accepted"}
        assert http.post("/v23.0/000/messages", headers=auth, json=text_body).json()["error"]["code"] == 100
    assert [body["type"] for body in graph.messages_to(BOB)] == ["text", "template"]
    assert graph.failures == []


def test_fake_graph_takes_concurrent_sends(graph: FakeGraph) -> None:
    graph.reset()
    graph.add_number(NUMBER, "token-1")
    body = {"messaging_product": "whatsapp", "to": ALICE, "type": "text"}

    def send(n: int) -> str:
        with httpx.Client(base_url=graph.url, timeout=5) as http:
            answer = http.post(
                f"/v23.0/{NUMBER}/messages", headers={"Authorization": "Bearer token-1"}, json={**body, "text": {"body": str(n)}}
            )
            return str(answer.json()["messages"][0]["id"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(send, range(40)))
    assert len(set(ids)) == 40
    assert sorted(int(b["text"]["body"]) for b in graph.messages_to(ALICE)) == list(range(40))
