"""The audit log's hash chain: intact when untouched, broken by any edit, deletion or reordering, also by the owner."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from konstruct import audit
from konstruct.agent.agents import create_agent
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.urls import resolve_urls
from konstruct.tenancy.tenants import TenantInfo, create_tenant
from tests.helpers import konstruct


@pytest.fixture
def owner(settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(resolve_urls(settings).owner_sync().replace("+psycopg", ""), autocommit=True) as conn:
        yield conn


@pytest.fixture
async def acme(db: Database) -> TenantInfo:
    tenant = await create_tenant(db, name="Acme", slug="acme", actor="test")
    await create_agent(db, tenant, name="Ava", role="Support", persona="Helpful.", model=None, actor="test")
    for n in range(5):
        async with db.tenant(tenant_id=tenant.id) as session:
            await audit.record(session, tenant_id=tenant.id, actor="test", action="thing.done", target=f"t{n}", detail={"n": n})
    return tenant


def tamper(owner: psycopg.Connection, statement: str, *args: object) -> None:
    """What a person with the owner role could do: switch the append-only trigger off and rewrite history."""
    owner.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only")
    try:
        owner.execute(statement, args)
    finally:
        owner.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_append_only")


async def test_an_untouched_chain_verifies_and_concurrent_writers_do_not_fork_it(db: Database, acme: TenantInfo) -> None:
    async def write(n: int) -> None:
        async with db.tenant(tenant_id=acme.id) as session:
            await audit.record(session, tenant_id=acme.id, actor="writer", action="race", target=str(n))

    await asyncio.gather(*(write(n) for n in range(40)))
    report = await audit.verify(db, acme.id)
    assert report.intact, report.problems
    assert report.events == 2 + 5 + 40  # tenant.created, agent.created, the five, the forty
    events = await audit.events(db, acme.id)
    assert [e.seq for e in events] == list(range(1, report.events + 1))
    assert all(later.prev_hash == earlier.hash for earlier, later in itertools.pairwise(events))


async def test_edits_deletions_and_reordering_are_detected(db: Database, acme: TenantInfo, owner: psycopg.Connection) -> None:
    events = await audit.events(db, acme.id)
    tamper(owner, "UPDATE audit_events SET detail = '{\"n\": 99}' WHERE id = %s", events[3].id)
    report = await audit.verify(db, acme.id)
    assert not report.intact and any(f"#{events[3].seq}" in p and "altered" in p for p in report.problems)
    tamper(owner, "UPDATE audit_events SET detail = %s WHERE id = %s", json.dumps(events[3].detail), events[3].id)
    assert (await audit.verify(db, acme.id)).intact  # put back exactly: intact again

    tamper(owner, "DELETE FROM audit_events WHERE id = %s", events[2].id)
    report = await audit.verify(db, acme.id)
    assert any("missing" in p for p in report.problems) and any("deleted or reordered" in p for p in report.problems)


async def test_swapping_two_events_is_detected(db: Database, acme: TenantInfo, owner: psycopg.Connection) -> None:
    events = await audit.events(db, acme.id)
    a, b = events[1], events[4]
    tamper(owner, "UPDATE audit_events SET seq = -seq WHERE id IN (%s, %s)", a.id, b.id)
    tamper(owner, "UPDATE audit_events SET seq = %s WHERE id = %s", b.seq, a.id)
    tamper(owner, "UPDATE audit_events SET seq = %s WHERE id = %s", a.seq, b.id)
    report = await audit.verify(db, acme.id)
    assert not report.intact and any("reordered" in p for p in report.problems)


async def test_the_app_role_cannot_tamper_and_the_cli_reports(
    db: Database, acme: TenantInfo, owner: psycopg.Connection, config_path: Path
) -> None:
    ok = konstruct("audit", "verify", "--json", config=config_path)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == [{"tenant": "acme", "events": 7, "intact": True, "problems": []}]
    tail = konstruct("audit", "tail", "--tenant", "acme", "-n", "3", "--json", config=config_path)
    assert [e["target"] for e in json.loads(tail.stdout)] == ["t2", "t3", "t4"]
    export = konstruct("audit", "export", "--tenant", "acme", "--json", config=config_path)
    lines = [json.loads(line) for line in export.stdout.splitlines()]
    assert [e["seq"] for e in lines] == list(range(1, 8)) and lines[1]["prev_hash"] == lines[0]["hash"]
    csv_export = konstruct("audit", "export", "--tenant", "acme", config=config_path)
    assert csv_export.stdout.splitlines()[0].startswith("seq,id,at,actor,action") and len(csv_export.stdout.splitlines()) == 8

    events = await audit.events(db, acme.id)
    tamper(owner, "UPDATE audit_events SET actor = 'someone else' WHERE id = %s", events[0].id)
    broken = konstruct("audit", "verify", "--tenant", "acme", config=config_path)
    assert broken.returncode == 1 and "BROKEN" in broken.stdout and "altered" in broken.stdout
    assert "Traceback" not in broken.stderr
