"""Tenant isolation is the database's job: try to break it as the app role.

Tables are found from the catalog, so a new table with a tenant_id column is covered (and must be
seeded here, or the test fails) without anyone remembering to add it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors, sql
from psycopg.types.json import Jsonb

from konstruct import feedback
from konstruct.agent.agents import create_agent
from konstruct.channels import connections
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import (
    BudgetReservation,
    DeliveryStatus,
    DeskMirror,
    Handoff,
    KnowledgeChunk,
    KnowledgeJob,
    KnowledgeSource,
    LLMUsage,
    McpServer,
    Memory,
    Message,
    Subscription,
    ToolApproval,
)
from konstruct.db.urls import resolve_urls
from konstruct.errors import TenantNotSetError
from konstruct.inbox import store
from konstruct.llm.budget import set_budget
from konstruct.llm.keys import add_key
from konstruct.messaging import InboundMessage
from konstruct.tenancy import invitations
from konstruct.tenancy.tenants import TenantInfo, create_tenant
from konstruct.tenancy.users import add_member, create_user
from tests.helpers import meter


async def seed(db: Database, slug: str) -> TenantInfo:
    tenant = await create_tenant(db, name=f"Tenant {slug}", slug=slug, actor="test")
    agent = await create_agent(db, tenant, name="Ava", role="Support", persona="Helpful.", model=None, actor="test")
    slack, _ = await connections.connect(
        db, db.settings, tenant, kind="slack", external_id=f"T-{slug}", name=slug, mode="single",
        credentials={"bot_token": f"xoxb-{slug}-secret", "signing_secret": f"{slug}-signing"}, details={}, default_agent=None, actor="test",
    )  # fmt: skip
    await connections.set_route(db, tenant, slack, "C-general", "Ava", actor="test")
    stored = [
        await store(
            db,
            InboundMessage(
                tenant_id=tenant.id,
                agent_id=agent.id,
                channel="terminal",
                external_id=f"{slug}-{n}",
                conversation_key=f"cli:{slug}",
                sender="someone",
                text=f"secret of {slug} #{n}",
            ),
        )
        for n in range(2)
    ]
    first = stored[0]
    assert first is not None
    reply = Message(id=uuid.uuid4(), tenant_id=tenant.id, conversation_id=first.conversation_id, inbound_id=first.id,
                    direction="out", author="Ava", text=f"answer for {slug}", status="sent")  # fmt: skip
    async with db.tenant(tenant_id=tenant.id) as session:
        session.add(reply)
    await feedback.vote(db, tenant_id=tenant.id, message_id=reply.id, channel="terminal", voter="someone", value=feedback.UP, origin={})
    async with db.tenant(tenant_id=tenant.id) as session:
        session.add(DeliveryStatus(tenant_id=tenant.id, channel="whatsapp", external_id=f"wamid.{slug}", status="delivered"))
        session.add(Memory(tenant_id=tenant.id, agent_id=agent.id, person="someone", content=f"{slug} likes tea", embedding=[0.05] * 384))
        session.add(
            LLMUsage(tenant_id=tenant.id, agent_id=agent.id, model="openai/gpt-4o-mini", prompt_tokens=10, cost_usd=Decimal("0.01"))
        )
        session.add(BudgetReservation(tenant_id=tenant.id, estimate_usd=Decimal("0.02"), expires_at=datetime.now(UTC) + timedelta(hours=1)))
        session.add(Subscription(id=f"sub_{slug}", tenant_id=tenant.id, customer_id=f"cus_{slug}", status="active"))
        source = KnowledgeSource(id=uuid.uuid4(), tenant_id=tenant.id, uri=f"/docs/{slug}/refunds.md", name="refunds.md", kind="markdown")
        session.add(source)
        await session.flush()
        session.add(KnowledgeChunk(tenant_id=tenant.id, source_id=source.id, ordinal=0, content=f"{slug} refunds", embedding=[0.1] * 384))
        session.add(KnowledgeJob(tenant_id=tenant.id, kind="add", request={"paths": [f"/docs/{slug}"]}))
        session.add(McpServer(tenant_id=tenant.id, name="shop", transport="http", url=f"https://mcp.{slug}.test/mcp", agents=["Ava"]))
        handoff = Handoff(id=uuid.uuid4(), tenant_id=tenant.id, conversation_id=first.conversation_id, reason=f"{slug} asked")
        session.add(handoff)
        await session.flush()
        session.add(DeskMirror(tenant_id=tenant.id, handoff_id=handoff.id, message_id=reply.id, desk_ts="1700000000.000100"))
        session.add(ToolApproval(tenant_id=tenant.id, agent_id=agent.id, conversation_id=first.conversation_id, inbound_id=first.id,
                                 tool_call_id=f"call_{slug}", tool="web_fetch", arguments={"url": f"https://{slug}.test"},
                                 approver="person", channel="terminal", person="someone", expires_at=datetime.now(UTC) + timedelta(hours=1)))  # fmt: skip
    await add_key(db, db.settings, tenant, provider="openai", key=f"sk-{slug}-own-key-1234", api_base=None, actor="test")
    await set_budget(db, tenant, usd=10, alerts=[80], action="block", downgrade_model=None, settings=db.settings, actor="test")
    await meter(db, tenant.id, Decimal("0.01"))
    user_id = await create_user(db, email=f"someone@{slug}.test", name=slug, password=None, platform_admin=False, actor="test")
    async with db.tenant(tenant_id=tenant.id) as session:
        await add_member(session, tenant.id, user_id, "customer_admin", actor="test")
    await invitations.create(db, tenant, email=f"invited@{slug}.test", role="customer_operator", actor="test")
    return tenant


@pytest.fixture
async def two_tenants(db: Database) -> tuple[TenantInfo, TenantInfo]:
    return await seed(db, "alpha"), await seed(db, "beta")


@pytest.fixture
def app_conn(settings: Settings) -> Iterator[psycopg.Connection]:
    """A raw connection as konstruct_app: no help from our code, only the database's rules."""
    with psycopg.connect(resolve_urls(settings).app_libpq()) as conn:
        yield conn


@pytest.fixture
def owner_conn(settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(resolve_urls(settings).owner_sync().replace("+psycopg", ""), autocommit=True) as conn:
        yield conn


def tenant_tables(conn: psycopg.Connection) -> dict[str, str]:
    """Every public table with tenant data, and the column naming its tenant."""
    rows = conn.execute(
        "select table_name from information_schema.columns where table_schema = 'public' and column_name = 'tenant_id'"
    ).fetchall()
    tables = {row[0]: "tenant_id" for row in rows}
    tables["tenants"] = "id"
    return tables


def as_tenant(conn: psycopg.Connection, tenant: uuid.UUID | None) -> None:
    conn.rollback()
    if tenant is not None:
        conn.execute("select set_config('app.current_tenant', %s, true)", (str(tenant),))


def test_app_role_is_neither_superuser_nor_bypassrls_nor_owner(app_conn: psycopg.Connection) -> None:
    row = app_conn.execute("select rolsuper, rolbypassrls from pg_roles where rolname = current_user").fetchone()
    assert row == (False, False)
    owners = app_conn.execute("select count(*) from pg_tables where schemaname = 'public' and tableowner = current_user").fetchone()
    assert owners == (0,)


def test_every_tenant_table_forces_row_level_security(two_tenants: Any, app_conn: psycopg.Connection) -> None:
    tables = tenant_tables(app_conn)
    assert {
        "tenants",
        "agents",
        "conversations",
        "inbound_messages",
        "messages",
        "audit_events",
        "channel_connections",
        "channel_routes",
        "reply_feedback",
    } <= set(tables)
    for table in tables:
        row = app_conn.execute("select relrowsecurity, relforcerowsecurity from pg_class where relname = %s", (table,)).fetchone()
        assert row == (True, True), f"{table} lacks ENABLE/FORCE ROW LEVEL SECURITY"


def test_a_tenant_sees_and_changes_only_its_own_rows(
    two_tenants: tuple[TenantInfo, TenantInfo], app_conn: psycopg.Connection, owner_conn: psycopg.Connection
) -> None:
    a, b = two_tenants
    for table, column in tenant_tables(app_conn).items():
        ident, col = sql.Identifier(table), sql.Identifier(column)
        own = owner_conn.execute(sql.SQL("select count(*) from {} where {} = %s").format(ident, col), (a.id,)).fetchone()
        assert own and own[0] > 0, f"seed() puts no rows in {table}: extend it so the table is tested"

        as_tenant(app_conn, a.id)
        visible = app_conn.execute(sql.SQL("select count(*) from {}").format(ident)).fetchone()
        assert visible == own, f"{table}: tenant A should see exactly its own {own[0]} rows, saw {visible}"
        assert app_conn.execute(sql.SQL("select count(*) from {} where {} = %s").format(ident, col), (b.id,)).fetchone() == (0,)

        # Writing a row that belongs to B is refused by the policy's WITH CHECK.
        row = app_conn.execute(sql.SQL("select to_jsonb(t) from {} t limit 1").format(ident)).fetchone()
        assert row is not None
        forged = dict(row[0])
        forged[column] = str(b.id)
        identity = {  # identity and generated columns take no value on insert
            r[0]
            for r in app_conn.execute(
                "select attname from pg_attribute where attrelid = %s::regclass and (attidentity <> '' or attgenerated <> '')",
                (table,),
            ).fetchall()
        }
        if column != "id" and "id" in forged and "id" not in identity:
            forged["id"] = str(uuid.uuid4())
        columns = [name for name in forged if name not in identity]
        insert = sql.SQL("insert into {} ({}) select {} from jsonb_populate_record(null::{}, %s)").format(
            ident, sql.SQL(", ").join(map(sql.Identifier, columns)), sql.SQL(", ").join(map(sql.Identifier, columns)), ident
        )
        with pytest.raises(errors.InsufficientPrivilege):
            app_conn.execute(insert, (Jsonb(forged),))

        if table == "llm_usage":  # a record: the app role may add rows, never edit them
            as_tenant(app_conn, a.id)
            with pytest.raises(errors.InsufficientPrivilege):
                app_conn.execute(sql.SQL("update {} set {} = {}").format(ident, col, col))
        elif table != "audit_events":  # audit rows cannot be updated or deleted at all: see the test below
            as_tenant(app_conn, a.id)
            with pytest.raises(errors.InsufficientPrivilege):  # moving A's row into B
                app_conn.execute(sql.SQL("update {} set {} = %s").format(ident, col), (b.id,))
            as_tenant(app_conn, a.id)
            cur = app_conn.execute(sql.SQL("update {} set {} = {} where {} = %s").format(ident, col, col, col), (b.id,))
            assert cur.rowcount == 0
            cur = app_conn.execute(sql.SQL("delete from {} where {} = %s").format(ident, col), (b.id,))
            assert cur.rowcount == 0

        # No tenant set: nothing at all.
        as_tenant(app_conn, None)
        assert app_conn.execute(sql.SQL("select count(*) from {}").format(ident)).fetchone() == (0,), table
    remaining = owner_conn.execute("select count(*) from messages where tenant_id = %s", (b.id,)).fetchone()
    assert remaining and remaining[0] > 0


def test_the_app_role_cannot_switch_off_the_rules(two_tenants: Any, app_conn: psycopg.Connection) -> None:
    for statement in (
        "alter table messages disable row level security",
        "alter table messages no force row level security",
        "drop policy tenant_isolation on messages",
        "set role postgres",
        "truncate messages",
        "create table sneaky (id int)",
    ):
        app_conn.rollback()
        with pytest.raises((errors.InsufficientPrivilege, errors.UndefinedObject)):
            app_conn.execute(statement)


def test_audit_log_is_append_only(
    two_tenants: tuple[TenantInfo, TenantInfo], app_conn: psycopg.Connection, owner_conn: psycopg.Connection
) -> None:
    a, _ = two_tenants
    as_tenant(app_conn, a.id)
    count = app_conn.execute("select count(*) from audit_events").fetchone()
    assert count and count[0] >= 3  # tenant.created, agent.created, message.received…
    app_conn.execute("insert into audit_events (tenant_id, actor, action) values (%s, 'test', 'test.appended')", (a.id,))
    for statement in ("update audit_events set action = 'rewritten'", "delete from audit_events", "truncate audit_events"):
        as_tenant(app_conn, a.id)
        with pytest.raises(errors.InsufficientPrivilege):
            app_conn.execute(statement)
    # Even the owner role is stopped by the trigger (it would have to drop it first, visibly).
    for statement in ("update audit_events set action = 'rewritten'", "delete from audit_events", "truncate audit_events"):
        with pytest.raises(errors.InsufficientPrivilege, match="append-only"):
            owner_conn.execute(statement)


def test_lookups_before_a_tenant_is_known_expose_no_content(two_tenants: Any, app_conn: psycopg.Connection) -> None:
    as_tenant(app_conn, None)
    rows = app_conn.execute("select * from konstruct_tenant_directory()").fetchall()
    assert sorted(r[1] for r in rows) == ["alpha", "beta"]
    assert len(rows[0]) == 5  # id, slug, name, status, created_at: no messages, agents or keys
    found = app_conn.execute("select * from konstruct_resolve_connection('slack', 'T-alpha')").fetchall()
    assert len(found) == 1 and b"xoxb-alpha-secret" not in bytes(found[0][4])  # credentials stay encrypted
    assert app_conn.execute("select * from konstruct_resolve_connection('slack', 'T-nobody')").fetchall() == []


async def test_code_touching_tenant_data_without_a_tenant_raises(db: Database) -> None:
    from sqlalchemy import text

    async with db.system() as session:
        with pytest.raises(TenantNotSetError):
            await session.execute(text("select * from messages"))
    with pytest.raises(TenantNotSetError):
        async with db.tenant(tenant_id="not-a-uuid"):  # type: ignore[arg-type]
            pass


async def test_the_driver_connection_path_keeps_the_rules_and_leaves_nothing_behind(two_tenants: Any, db: Database) -> None:
    alpha, beta = two_tenants
    async with db.tenant_driver(tenant_id=alpha.id, local={"application_name": "it's mine"}) as conn:
        assert {row["tenant_id"] for row in await conn.fetch("select tenant_id from knowledge_chunks")} == {alpha.id}
        assert await conn.fetchval("select current_setting('application_name')") == "it's mine"  # quoted, not injected
        assert await conn.fetchval("select count(*) from messages where tenant_id = $1", beta.id) == 0
    with pytest.raises(asyncpg.exceptions.RaiseError):  # a failed statement: the transaction is rolled back, not committed
        async with db.tenant_driver(tenant_id=alpha.id) as conn:
            await conn.execute("update knowledge_chunks set content = 'changed'")
            await conn.execute("do $$ begin raise exception 'boom'; end $$")
    with pytest.raises(ZeroDivisionError):  # the caller's own error, too
        async with db.tenant_driver(tenant_id=alpha.id) as conn:
            await conn.execute("update knowledge_chunks set content = 'changed'")
            raise ZeroDivisionError
    async with db.tenant_driver(tenant_id=alpha.id) as conn:
        assert await conn.fetchval("select content from knowledge_chunks") == "alpha refunds"
    for _ in range(db.settings.database.pool_size + 1):  # every pooled connection: no tenant, no transaction left over
        async with db.engine.connect() as pooled:
            raw = (await pooled.get_raw_connection()).driver_connection
            assert raw is not None and not raw.is_in_transaction()
            assert await raw.fetchval("select coalesce(current_setting('app.current_tenant', true), '')") == ""
            assert await raw.fetchval("select count(*) from knowledge_chunks") == 0
    with pytest.raises(TenantNotSetError):
        async with db.tenant_driver(tenant_id="not-a-uuid"):  # type: ignore[arg-type]
            raise AssertionError("not reached")
