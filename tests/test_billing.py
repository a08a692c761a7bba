"""Stripe billing: the subscription state decided from events in any order, the signed webhook through a
real gateway (each event once), Checkout and the portal through the CLI against the fake Stripe, and a
real worker that pauses a tenant's agents without a subscription (no model is asked)."""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
import re
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import stripe

from konstruct import audit
from konstruct.agent.agents import create_agent
from konstruct.billing import stripe_api
from konstruct.billing.events import evidence
from konstruct.billing.state import RANK, Evidence, Standing, SubState, decide, standing
from konstruct.config import Settings, load_settings
from konstruct.db.engine import Database
from konstruct.db.urls import resolve_urls
from konstruct.tenancy.tenants import TenantInfo, create_tenant
from tests.conftest import write_config
from tests.fakes import stripe as fs
from tests.fakes.llm import FakeLLM
from tests.helpers import Proc, konstruct, konstruct_in_process

SECRET = "whsec_test_billing_secret"
PAUSED = "Acme's assistant is paused until the subscription is sorted out."
PLANS = [{"name": "starter", "price_id": "price_starter", "budget_usd": 5.0}, {"name": "pro", "price_id": "price_pro", "budget_usd": 50.0}]
DAY = fs.DAY


# ---------------------------------------------------------------------------------------------- one subscription's life


@dataclass(frozen=True)
class History:
    """The events Stripe sends over one subscription's life, in Stripe's order, and the times they carry."""

    sub: str
    customer: str
    t0: int  # checkout completed; the subscription created (incomplete) in the same second
    t1: int  # the first invoice paid: active (both events in the same second)
    t2: int  # the renewal fails: invoice.payment_failed and past_due in the same second
    t3: int  # the renewal paid: invoice.paid and active in the same second
    t4: int  # deleted: canceled
    p1: int  # the first period's end
    p2: int  # the second period's end (from the renewal on)
    first_invoice: str
    renewal_invoice: str
    events: list[dict[str, Any]] = field(hash=False)


PAST_DUE, ACTIVE, CANCELED = 6, 8, 9  # how many of the history's events lead to each final state


def history(
    sub: str = "sub_unit",
    customer: str = "cus_unit",
    tenant_id: str = "tenant-unit",
    *,
    session: str = "cs_test_unit",
    start: int = 1_767_225_600,
) -> History:
    t0, t1 = start, start + 20
    t2 = t0 + 30 * DAY + 3600
    t3, t4 = t2 + 2 * DAY, t2 + 9 * DAY
    p1, p2 = t0 + 30 * DAY, t0 + 60 * DAY
    first, renewal = f"in_{sub}_1", f"in_{sub}_2"

    def sub_object(status: str, period_end: int, **extra: Any) -> dict[str, Any]:
        return fs.subscription(sub, customer, status, tenant_id=tenant_id, created=t0, current_period_end=period_end, **extra)

    events = [
        fs.event("checkout.session.completed", fs.checkout_completed(session, customer, sub, tenant_id=tenant_id, created=t0), created=t0),
        fs.event("customer.subscription.created", sub_object("incomplete", p1), created=t0),
        fs.event("customer.subscription.updated", sub_object("active", p1), created=t1),
        fs.event("invoice.paid", fs.invoice(first, customer, sub, status="paid", created=t0, paid_at=t1, amount=900), created=t1),
        fs.event("invoice.payment_failed", fs.invoice(renewal, customer, sub, status="open", created=t2, amount=900), created=t2),
        fs.event("customer.subscription.updated", sub_object("past_due", p2), created=t2),
        fs.event("invoice.paid", fs.invoice(renewal, customer, sub, status="paid", created=t2, paid_at=t3, amount=900), created=t3),
        fs.event("customer.subscription.updated", sub_object("active", p2), created=t3),
        fs.event("customer.subscription.deleted", sub_object("canceled", p2, canceled_at=t4), created=t4),
    ]
    return History(sub, customer, t0, t1, t2, t3, t4, p1, p2, first, renewal, events)


def expected_state(h: History, count: int) -> SubState:
    """What the subscription is after the first `count` events, whatever order they came in."""
    if count == PAST_DUE:
        return SubState("past_due", h.t2, RANK["past_due"], "price_starter", h.p2, False, h.t2, h.renewal_invoice)
    if count == ACTIVE:
        return SubState("active", h.t3, RANK["active"], "price_starter", h.p2, False, None, h.renewal_invoice)
    assert count == CANCELED
    return SubState("canceled", h.t4, RANK["canceled"], "price_starter", h.p2, False, None, h.renewal_invoice)


UNIT = history()
EVIDENCE: list[Evidence] = []
for _event in UNIT.events:
    _found = evidence(_event)
    assert _found is not None and _found[:2] == (UNIT.sub, UNIT.customer), _event["type"]
    EVIDENCE.append(_found[2])


def fold(indices: Sequence[int]) -> SubState:
    state: SubState | None = None
    for index in indices:
        state = decide(state, EVIDENCE[index])
    assert state is not None
    return state


@functools.cache
def folds(count: int) -> tuple[tuple[tuple[int, ...], SubState], ...]:
    """Every delivery order of the first `count` events (a few thousand seeded shuffles past 8), each with two
    events delivered once more somewhere, and the state each order ends in."""
    rng = random.Random(count)
    orders: Any = itertools.permutations(range(count)) if count <= 8 else (tuple(rng.sample(range(count), count)) for _ in range(3000))
    result = []
    for order in orders:
        delivered = list(order)
        for _ in range(2):
            delivered.insert(rng.randrange(len(delivered) + 1), rng.choice(order))
        result.append((tuple(delivered), fold(delivered)))
    return tuple(result)


def status_part(state: SubState) -> tuple[Any, ...]:
    return state.status, state.state_at, state.state_rank, state.price_id, state.cancel_at_period_end, state.past_due_since


def whole(state: SubState) -> tuple[Any, ...]:
    """Everything a subscription's row keeps (by name, so that bookkeeping fields added later do not count)."""
    return (*status_part(state), state.current_period_end, state.last_invoice)


# ---------------------------------------------------------------------------------------------- 1. the state, without a database


@pytest.mark.parametrize("count", [PAST_DUE, ACTIVE, CANCELED], ids=["past_due", "active", "canceled"])
def test_every_delivery_order_agrees_on_the_status(count: int) -> None:
    want = expected_state(UNIT, count)
    assert status_part(fold(range(count))) == status_part(want)
    outcomes = folds(count)
    assert len(outcomes) == (3000 if count > 8 else math.factorial(count))
    wrong = [(order, state) for order, state in outcomes if status_part(state) != status_part(want)]
    assert not wrong, f"{len(wrong)} of {len(outcomes)} orders differ, e.g. {wrong[:3]}"


@pytest.mark.parametrize("count", [PAST_DUE, ACTIVE, CANCELED], ids=["past_due", "active", "canceled"])
def test_every_delivery_order_ends_in_the_same_whole_state(count: int) -> None:
    want = expected_state(UNIT, count)
    assert whole(fold(range(count))) == whole(want)  # Stripe's own order
    wrong = [(order, state) for order, state in folds(count) if whole(state) != whole(want)]
    assert not wrong, f"{len(wrong)} of {len(folds(count))} orders differ, e.g. {wrong[:3]}"


def test_a_late_payment_failure_does_not_undo_a_newer_active() -> None:
    active = fold(range(ACTIVE))
    assert active.status == "active"
    failed_late = decide(active, EVIDENCE[4])  # invoice.payment_failed of t2, delivered after the active of t3
    assert failed_late == active
    # The same failure, newer than the active, does make it past_due (so the line above can tell).
    newer = Evidence(UNIT.t3 + 60, "past_due", authoritative=False, invoice="in_later", applies_to=frozenset({"active", "trialing"}))
    moved = decide(active, newer)
    assert (moved.status, moved.state_at, moved.past_due_since, moved.last_invoice) == ("past_due", UNIT.t3 + 60, UNIT.t3 + 60, "in_later")
    # A late past_due subscription object is older too: still active.
    assert decide(active, EVIDENCE[5]).status == "active"


def test_canceled_is_terminal() -> None:
    canceled = fold(range(CANCELED))
    assert (canceled.status, canceled.state_at) == ("canceled", UNIT.t4)
    later = UNIT.t4 + DAY
    for ev in (
        Evidence(later, "active", price_id="price_pro", current_period_end=later + 30 * DAY),
        Evidence(later, "active", authoritative=False, invoice="in_late", applies_to=frozenset({"past_due", "unpaid", "incomplete"})),
        Evidence(later, "active", authoritative=False),  # a checkout inference applies to any status
        Evidence(later, "past_due", authoritative=False, invoice="in_late2", applies_to=frozenset({"active", "trialing"})),
        Evidence(later, "trialing"),
    ):
        after = decide(canceled, ev)
        assert (after.status, after.state_at, after.state_rank, after.past_due_since) == ("canceled", UNIT.t4, RANK["canceled"], None), ev
    # Every event of its life delivered again after the deletion leaves it canceled.
    again = canceled
    for ev in EVIDENCE:
        again = decide(again, ev)
    assert status_part(again) == status_part(canceled)


def _sub(status: str, at: int, past_due_since: int | None = None) -> SubState:
    return SubState(status, at, RANK[status], "price_starter", at + 30 * DAY, False, past_due_since)


def test_standing() -> None:
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    ts = int(now.timestamp())
    none = standing([], exempt=False, grace_days=7, now=now)
    assert (none.ok, none.reason, none.status) == (False, "no subscription", None)
    assert standing([], exempt=True, grace_days=7, now=now).ok
    assert standing([_sub("canceled", ts - DAY)], exempt=True, grace_days=0, now=now).ok

    two_days_late = _sub("past_due", ts - 2 * DAY, past_due_since=ts - 2 * DAY)
    inside = standing([two_days_late], exempt=False, grace_days=7, now=now)
    assert (inside.ok, inside.status) == (True, "past_due") and "within the 7-day grace" in inside.reason
    outside = standing([two_days_late], exempt=False, grace_days=1, now=now)
    assert (outside.ok, outside.status) == (False, "past_due") and "beyond the 1-day grace" in outside.reason
    assert not standing([_sub("past_due", ts - 1, past_due_since=ts - 1)], exempt=False, grace_days=0, now=now).ok
    # Grace counts from when it became past_due, not from the latest past_due event.
    long_late = _sub("past_due", ts - 60, past_due_since=ts - 10 * DAY)
    assert not standing([long_late], exempt=False, grace_days=7, now=now).ok
    assert not standing([_sub("past_due", ts - 7 * DAY, past_due_since=ts - 7 * DAY)], exempt=False, grace_days=7, now=now).ok

    for good in ("active", "trialing"):
        assert standing([_sub("canceled", ts), _sub(good, ts - DAY)], exempt=False, grace_days=0, now=now) == Standing(True, good, good)
    for bad in ("canceled", "unpaid", "incomplete", "incomplete_expired", "paused"):
        result = standing([_sub(bad, ts)], exempt=False, grace_days=7, now=now)
        assert (result.ok, result.status, result.reason) == (False, bad, f"subscription {bad}")


def test_the_history_is_what_the_tests_think_it_is() -> None:
    """The builder's events, as the tests above rely on them: five moments, four of them shared by two events."""
    assert len({e["created"] for e in UNIT.events}) == 5
    assert [ev.status for ev in EVIDENCE] == [
        "active",
        "incomplete",
        "active",
        "active",
        "past_due",
        "past_due",
        "active",
        "active",
        "canceled",
    ]
    assert [ev.authoritative for ev in EVIDENCE] == [False, True, True, False, False, True, False, True, True]


# ---------------------------------------------------------------------------------------------- processes, the fake Stripe


@pytest.fixture(scope="module")
def stripe_server() -> Iterator[fs.FakeStripe]:
    fake = fs.FakeStripe().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_stripe(stripe_server: fs.FakeStripe, monkeypatch: pytest.MonkeyPatch) -> fs.FakeStripe:
    monkeypatch.setattr(stripe, "enable_telemetry", False)
    stripe_server.reset()
    return stripe_server


@dataclass
class Site:
    config: Path
    settings: Settings
    db: Database
    stripe: fs.FakeStripe
    llm: FakeLLM
    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    @property
    def webhook(self) -> str:
        return f"http://127.0.0.1:{self.settings.gateway.port}/stripe/webhook"

    def start(self, name: str) -> Proc:
        proc = Proc(name, [name], config=self.config, log_dir=self.tmp)
        self.procs.append(proc)
        proc.wait_for_log("Uvicorn running on" if name == "gateway" else " ready: ")
        return proc

    def stop(self, proc: Proc) -> None:
        assert proc.stop() == 0, proc.log()
        self.procs.remove(proc)

    def post(self, event: dict[str, Any], *, secret: str = SECRET, timestamp: int | None = None) -> httpx.Response:
        return fs.post_event(self.webhook, event, secret, timestamp=timestamp)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The CLI in-process (its real entry point): the process boundary is not what these tests are about."""
        return konstruct_in_process(*args, config=self.config)

    def chat(self, text: str, tenant: str = "acme") -> Any:
        result = konstruct_in_process(
            "chat", "--tenant", tenant, "--agent", "Ava", "--message", text, "--json", "--new", "--timeout", "60", config=self.config
        )
        assert result.returncode == 0 and result.stdout, result.stderr + "".join(p.log() for p in self.procs)
        return json.loads(result.stdout)

    def owner_rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows as the database owner sees them (row-level security does not hide other tenants' rows)."""
        with psycopg.connect(resolve_urls(self.settings).owner_sync().replace("+psycopg", "")) as conn:
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


@pytest.fixture
async def make_site(tmp_path: Path, database_url: str, fake_llm: FakeLLM, fake_stripe: fs.FakeStripe, db: Database) -> AsyncIterator[Any]:
    """Write a konstruct.toml with billing on against the fake Stripe (`billing` overrides its keys; None drops one)."""
    sites: list[Site] = []

    def make(**billing: Any) -> Site:
        values: dict[str, Any] = {
            "stripe_api_key": fake_stripe.api_key,
            "webhook_secret": SECRET,
            "api_base": fake_stripe.url,
            "plans": PLANS,
        }
        values.update(paused=PAUSED, grace_days=7)
        values.update(billing)
        config = write_config(
            tmp_path / f"site{len(sites)}", database_url, fake_llm.url, billing={k: v for k, v in values.items() if v is not None}
        )
        site = Site(config, load_settings(config), db, fake_stripe, fake_llm, tmp_path)
        sites.append(site)
        return site

    yield make
    for site in sites:
        for proc in reversed(site.procs):
            proc.stop()


async def checkout_in_process(site: Site, tenant: TenantInfo) -> stripe_api.CheckoutLink:
    return await stripe_api.checkout(site.db, site.settings, tenant, "starter", actor="test")


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], result.stderr


# ---------------------------------------------------------------------------------------------- 2. signatures


async def test_a_webhook_without_a_valid_signature_is_refused_and_nothing_stored(make_site: Any) -> None:
    now = int(time.time())
    site: Site = make_site()
    gateway = site.start("gateway")
    acme = await create_tenant(site.db, name="Acme", slug="acme", actor="test")
    link = await checkout_in_process(site, acme)
    h = history("sub_sig", link.customer_id, str(acme.id), session=link.session_id, start=now - 3 * DAY)
    created = h.events[1]  # customer.subscription.created, of a customer that is acme's
    body = json.dumps(created, separators=(",", ":")).encode()
    tampered = body.replace(b'"status":"incomplete"', b'"status":"active"')
    assert tampered != body

    def send(payload: bytes, headers: dict[str, str]) -> httpx.Response:
        return httpx.post(site.webhook, content=payload, headers={"Content-Type": "application/json", **headers}, timeout=10)

    refused = {
        "wrong secret": send(body, {"Stripe-Signature": fs.sign(body, "whsec_someone_else")}),
        "tampered body": send(tampered, {"Stripe-Signature": fs.sign(body, SECRET)}),
        "missing header": send(body, {}),
        "empty header": send(body, {"Stripe-Signature": ""}),
        "expired timestamp": send(body, {"Stripe-Signature": fs.sign(body, SECRET, now - site.settings.billing.tolerance - 60)}),
        "garbage header": send(body, {"Stripe-Signature": "t=abc,v1=zz"}),
    }
    for what, response in refused.items():
        assert response.status_code == 400, (what, response.text)
        assert response.json() == {"error": "invalid signature"}, what
    too_big = send(b"{" + b" " * 1_000_001 + b"}", {"Stripe-Signature": fs.sign(b"{}", SECRET)})
    assert too_big.status_code == 413

    assert site.owner_rows("select id from stripe_events") == []
    assert site.owner_rows("select id from subscriptions") == []
    assert "stripe webhook refused" in gateway.log()
    assert not [e for e in await audit.events(site.db, acme.id) if e.actor == "stripe"]

    # The very same event, signed right (and one signed a little in the past, within tolerance), is taken.
    ok = site.post(created, timestamp=now - 60)
    assert ok.status_code == 200 and ok.json() == {"received": True, "outcome": "processed"}, ok.text
    assert site.owner_rows("select id, type, outcome from stripe_events") == [(created["id"], "customer.subscription.created", "processed")]
    assert site.owner_rows("select id, tenant_id, status from subscriptions") == [(h.sub, acme.id, "incomplete")]


# ---------------------------------------------------------------------------------------------- 3. any order, twice


def deliver(site: Site, events: list[dict[str, Any]], seed: int) -> dict[str, list[str]]:
    """Each event twice in a seeded shuffle: every third one twice at once (two threads), the rest once in the
    shuffle and once more at the end, in another order. The outcomes per event id."""
    rng = random.Random(seed)
    order = rng.sample(events, len(events))
    outcomes: dict[str, list[str]] = {e["id"]: [] for e in events}
    lock = threading.Lock()

    def send(event: dict[str, Any], barrier: threading.Barrier | None = None) -> None:
        if barrier is not None:
            barrier.wait(10)
        response = site.post(event)
        assert response.status_code == 200, response.text
        assert response.json()["received"] is True
        with lock:
            outcomes[event["id"]].append(response.json()["outcome"])

    again = []
    for n, event in enumerate(order):
        if n % 3 == 0:
            barrier = threading.Barrier(2)
            threads = [threading.Thread(target=send, args=(event, barrier)) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
        else:
            send(event)
            again.append(event)
    for event in rng.sample(again, len(again)):
        send(event)
    return outcomes


async def test_events_in_any_order_and_twice_end_in_the_right_state(make_site: Any) -> None:
    now = int(time.time())
    site: Site = make_site()
    site.start("gateway")
    cases = [("acme", 1, ACTIVE), ("globex", 2, ACTIVE), ("initech", 3, CANCELED)]
    tenants: dict[str, TenantInfo] = {}
    histories: dict[str, History] = {}
    for slug, seed, _ in cases:
        tenant = tenants[slug] = await create_tenant(site.db, name=slug.title(), slug=slug, actor="test")
        link = await checkout_in_process(site, tenant)
        histories[slug] = history(f"sub_{slug}_{seed}", link.customer_id, str(tenant.id), session=link.session_id, start=now - 50 * DAY)

    results: dict[str, dict[str, list[str]]] = {}
    errors: list[BaseException] = []

    def run(slug: str, seed: int, count: int) -> None:
        try:
            results[slug] = deliver(site, histories[slug].events[:count], seed)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=case) for case in cases]  # the tenants at the same time
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors

    all_ids = []
    for slug, _, count in cases:
        assert len(results[slug]) == count
        for event_id, outcome in results[slug].items():
            assert sorted(outcome) == ["duplicate", "processed"], (slug, event_id, outcome)
        all_ids += list(results[slug])
    stored = site.owner_rows("select id, type, outcome from stripe_events")
    assert sorted(r[0] for r in stored) == sorted(all_ids)  # each id once: no more rows than events
    sent = {e["id"]: e["type"] for slug, _, count in cases for e in histories[slug].events[:count]}
    assert {r[0]: r[1] for r in stored} == sent and {r[2] for r in stored} == {"processed"}

    rows = site.owner_rows(
        "select tenant_id, id, customer_id, status, plan, price_id, current_period_end, cancel_at_period_end, past_due_since, state_at "
        "from subscriptions"
    )
    by_tenant = {row[0]: row[1:] for row in rows}
    assert len(rows) == len(cases)
    for slug, _, count in cases:
        h, want = histories[slug], expected_state(histories[slug], count)
        sub_id, customer, status, plan, price, period_end, cancel, past_due_since, state_at = by_tenant[tenants[slug].id]
        assert (sub_id, customer, status, plan, price) == (h.sub, h.customer, want.status, "starter", "price_starter"), slug
        assert (cancel, past_due_since, state_at) == (False, None, want.state_at), slug
        # Each event acted on once: one audit entry per distinct event.
        acted = [e for e in await audit.events(site.db, tenants[slug].id) if e.actor == "stripe"]
        assert sorted(e.detail["event"] for e in acted) == sorted(results[slug]), slug
        assert {e.target for e in acted} == {h.sub}
        assert period_end == datetime.fromtimestamp(h.p2, UTC), (slug, period_end, datetime.fromtimestamp(h.p1, UTC))

    one = site.cli("billing", "status", "--tenant", "acme", "--json")
    assert one.returncode == 0, one.stderr
    shown = json.loads(one.stdout)
    assert shown["billing"] == "on" and [t["tenant"] for t in shown["tenants"]] == ["acme"]
    acme = shown["tenants"][0]
    assert (acme["customer"], acme["exempt"], acme["agents_running"], acme["reason"]) == (histories["acme"].customer, False, True, "active")
    [sub] = acme["subscriptions"]
    assert (sub["id"], sub["status"], sub["plan"], sub["good"]) == (histories["acme"].sub, "active", "starter", True)
    assert datetime.fromisoformat(sub["current_period_end"]) == datetime.fromtimestamp(histories["acme"].p2, UTC)

    every = json.loads(site.cli("billing", "status", "--json").stdout)
    running = {t["tenant"]: (t["agents_running"], [s["status"] for s in t["subscriptions"]]) for t in every["tenants"]}
    assert running == {"acme": (True, ["active"]), "globex": (True, ["active"]), "initech": (False, ["canceled"])}


# ---------------------------------------------------------------------------------------------- 4. Checkout and the portal


async def test_checkout_and_portal_through_the_cli(make_site: Any) -> None:
    site: Site = make_site()
    acme = await create_tenant(site.db, name="Acme", slug="acme", actor="test")
    fake = site.stripe

    before = site.cli("billing", "portal", "--tenant", "acme")
    assert_one_line_error(before, "acme has no Stripe customer yet", "konstruct billing checkout")
    assert fake.customers == {} and fake.portal_sessions == {}

    first = site.cli("billing", "checkout", "--tenant", "acme", "--plan", "starter", "--json")
    assert first.returncode == 0, first.stderr
    link = json.loads(first.stdout)
    assert list(fake.customers) == [link["customer"]]
    customer = fake.customers[link["customer"]]
    assert customer["metadata"] == {"tenant_id": str(acme.id), "tenant_slug": "acme"} and customer["name"] == "Acme"
    session = fake.checkout_sessions[link["session_id"]]
    assert link["url"] == session["url"] and link["url"].startswith(f"{fake.url}/checkout/cs_test_")
    assert httpx.get(link["url"], timeout=5).status_code == 200  # the hosted page exists on the fake
    [call] = [r for r in fake.requests if r.path == "/v1/checkout/sessions"]
    assert call.form["mode"] == "subscription" and call.form["customer"] == link["customer"]
    assert call.form["line_items"] == [{"price": "price_starter", "quantity": "1"}]
    assert call.form["client_reference_id"] == str(acme.id)
    assert call.form["subscription_data"] == {"metadata": {"tenant_id": str(acme.id), "plan": "starter"}}
    assert call.form["success_url"].startswith(site.settings.gateway.public_url)
    assert site.owner_rows("select stripe_customer_id from tenants where id = %s", acme.id) == [(link["customer"],)]

    second = site.cli("billing", "checkout", "--tenant", "acme", "--plan", "pro")  # plain output: just the URL
    assert second.returncode == 0, second.stderr
    assert len(fake.customers) == 1 and len(fake.checkout_sessions) == 2
    [new_session] = [s for s in fake.checkout_sessions.values() if s["id"] != link["session_id"]]
    assert second.stdout.strip() == new_session["url"] and new_session["customer"] == link["customer"]
    assert [r.form["line_items"] for r in fake.requests if r.path == "/v1/checkout/sessions"][-1] == [
        {"price": "price_pro", "quantity": "1"}
    ]

    requests_before = len(fake.requests)
    unknown = site.cli("billing", "checkout", "--tenant", "acme", "--plan", "gold")
    assert_one_line_error(unknown, "no plan 'gold'", "starter, pro")
    assert len(fake.requests) == requests_before  # nothing asked of Stripe

    portal = site.cli("billing", "portal", "--tenant", "acme", "--json")
    assert portal.returncode == 0, portal.stderr
    url = json.loads(portal.stdout)["url"]
    [portal_session] = fake.portal_sessions.values()
    assert url == portal_session["url"] and portal_session["customer"] == link["customer"]
    assert portal_session["return_url"] == site.settings.gateway.public_url.rstrip("/") + "/"

    actions = [e.action for e in await audit.events(site.db, acme.id)]
    assert actions.count("billing.customer_created") == 1 and actions.count("billing.checkout_started") == 2
    assert actions.count("billing.portal_opened") == 1


async def test_billing_off_refuses_checkout_and_the_webhook(make_site: Any) -> None:
    site: Site = make_site(stripe_api_key=None)  # plans and a webhook secret, but no Stripe key: billing is off
    assert not site.settings.billing.enabled
    await create_tenant(site.db, name="Acme", slug="acme", actor="test")
    site.start("gateway")
    event = history("sub_off", "cus_off").events[1]
    response = site.post(event)
    assert response.status_code == 404 and "billing is off" in response.json()["error"]
    assert site.owner_rows("select id from stripe_events") == []

    checkout = konstruct("billing", "checkout", "--tenant", "acme", "--plan", "starter", config=site.config)  # as a shell sees it
    assert_one_line_error(checkout, "billing is off", "stripe_api_key")
    assert site.stripe.requests == []
    assert site.owner_rows("select stripe_customer_id from tenants") == [(None,)]


# ---------------------------------------------------------------------------------------------- 5. agents paused


async def test_agents_pause_without_a_subscription_and_answer_with_one(make_site: Any) -> None:
    now = int(time.time())
    site: Site = make_site(grace_days=7)
    acme = await create_tenant(site.db, name="Acme", slug="acme", actor="test")
    await create_agent(site.db, acme, name="Ava", role="Support", persona="Brief.", model=None, actor="test")
    customer = await stripe_api.customer_for(site.db, site.settings, acme, actor="test")
    site.start("gateway")
    worker = site.start("worker")

    paused = site.chat("hello, anyone there?")
    assert (paused["status"], paused["reply"]) == ("replied", PAUSED)
    assert paused["error"].startswith("paused:") and "no subscription" in paused["error"]
    assert site.llm.requests == []

    sub = "sub_paused"
    active = fs.event(
        "customer.subscription.created", fs.subscription(sub, customer, "active", created=now - 3 * DAY), created=now - 3 * DAY
    )
    assert site.post(active).json()["outcome"] == "processed"
    answered = site.chat("now with a subscription")
    assert (answered["status"], answered["error"]) == ("replied", None)
    assert answered["reply"] == "[fake-model] You said: now with a subscription" and len(site.llm.requests) == 1

    late = now - 2 * DAY
    failed = fs.event("invoice.payment_failed", fs.invoice("in_paused_2", customer, sub, status="open", created=late), created=late)
    assert site.post(failed).json()["outcome"] == "processed"
    assert site.owner_rows("select status, past_due_since from subscriptions") == [("past_due", datetime.fromtimestamp(late, UTC))]
    in_grace = site.chat("two days late, seven days of grace")
    assert in_grace["reply"] == "[fake-model] You said: two days late, seven days of grace" and len(site.llm.requests) == 2

    site.stop(worker)
    site.config.write_text(re.sub(r"(?m)^grace_days = .*$", "grace_days = 0", site.config.read_text()))
    assert load_settings(site.config).billing.grace_days == 0
    site.start("worker")
    no_grace = site.chat("and without grace?")
    assert (no_grace["status"], no_grace["reply"]) == ("replied", PAUSED) and "beyond the 0-day grace" in no_grace["error"]
    assert len(site.llm.requests) == 2

    exempt = site.cli("billing", "exempt", "--tenant", "acme")
    assert exempt.returncode == 0, exempt.stderr
    assert site.owner_rows("select billing_exempt from tenants where id = %s", acme.id) == [(True,)]
    freed = site.chat("exempt now")
    assert freed["reply"] == "[fake-model] You said: exempt now" and len(site.llm.requests) == 3
    assert "billing.exempt" in [e.action for e in await audit.events(site.db, acme.id)]
