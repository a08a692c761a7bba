"""Data migrations, run down and up on a real database: what was stored before is carried over."""

from __future__ import annotations

import uuid
from pathlib import Path

from alembic import command
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from konstruct.config import Settings
from konstruct.db import migrate
from tests.conftest import APP_PASSWORD


def test_the_head_the_migration_files_declare_is_alembics(tmp_path: Path) -> None:
    """What a warm `up` compares the database with, read from the files without alembic."""
    assert migrate.declared_head() == migrate.head_revision() is not None
    (tmp_path / "a.py").write_text('revision = "a"\ndown_revision = None\n')
    (tmp_path / "b.py").write_text('revision: str = "b"\ndown_revision: str | None = "a"\n')
    assert migrate.declared_head(tmp_path) == "b"
    (tmp_path / "c.py").write_text('revision = "c"\ndown_revision = ("a",)\n')  # a branch: two heads
    assert migrate.declared_head(tmp_path) is None
    (tmp_path / "c.py").write_text('revision = "c"\ndown_revision = ("b",)\n')
    assert migrate.declared_head(tmp_path) == "c"
    (tmp_path / "d.py").write_text("revision = make_one()\n")  # not a literal, no down_revision: alembic decides
    assert migrate.declared_head(tmp_path) is None


def test_a_database_behind_the_head_is_upgraded_and_one_at_it_left_as_it_is(database_url: str, tmp_path: Path) -> None:
    settings = Settings(database={"url": database_url, "app_password": APP_PASSWORD}, data={"dir": tmp_path})  # type: ignore[arg-type]
    head = migrate.head_revision()
    engine = create_engine(make_url(database_url).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            command.downgrade(migrate._alembic_config(conn), "0021")
        result = migrate.upgrade(settings)
        assert (result.before, result.after) == ("0021", head)
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT to_regclass('knowledge_chunks_embedding')")) is not None  # 0022's index
        assert (migrate.upgrade(settings).before, migrate.upgrade(settings).after) == (head, head)
    finally:
        engine.dispose()


def test_key_hints_stored_before_one_format_are_carried_over(database_url: str) -> None:
    engine = create_engine(make_url(database_url).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    tenant = uuid.uuid4()
    try:
        with engine.connect() as conn:
            command.downgrade(migrate._alembic_config(conn), "0010")
            conn.execute(text("ALTER TABLE llm_keys NO FORCE ROW LEVEL SECURITY"))  # so the test writes as the owner
            conn.execute(text("INSERT INTO tenants (id, slug, name) VALUES (:t, 'acme', 'Acme')"), {"t": tenant})
            for provider, hint in (("openai", "****abcd"), ("anthropic", "****"), ("mistral", "…wxyz")):
                conn.execute(
                    text("INSERT INTO llm_keys (tenant_id, provider, secret, hint, added_by) VALUES (:t, :p, 'x', :h, 'test')"),
                    {"t": tenant, "p": provider, "h": hint},
                )
            command.upgrade(migrate._alembic_config(conn), "head")
            forced = conn.scalar(text("SELECT relforcerowsecurity FROM pg_class WHERE relname = 'llm_keys'"))
            conn.execute(text("ALTER TABLE llm_keys NO FORCE ROW LEVEL SECURITY"))
            hints: dict[str, str] = dict(conn.execute(text("SELECT provider, hint FROM llm_keys")).tuples().all())
            conn.execute(text("ALTER TABLE llm_keys FORCE ROW LEVEL SECURITY"))
    finally:
        engine.dispose()
    assert forced is True  # the migration puts FORCE ROW LEVEL SECURITY back
    assert hints == {"openai": "…abcd", "anthropic": "…", "mistral": "…wxyz"}


def test_replies_stored_before_message_kinds_get_theirs(database_url: str) -> None:
    """0012: the fixed replies (billing, budget, hand-over, gave-up) and the apologies of failed model calls become
    notices; what the person and the model said stays a message."""
    engine = create_engine(make_url(database_url).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    tenant, agent, conversation = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    # (inbox row's status, the reply's model, the reply's status) -> the kind it must get
    replies = {
        ("replied", "openai/gpt-4o", "sent"): "message",
        ("failed", "openai/gpt-4o", "sent"): "notice",  # the apology for a failed model call
        ("failed", "openai/gpt-4o", "failed"): "message",  # an answer whose delivery failed (never in the history)
        ("replied", "billing", "sent"): "notice",
        ("replied", "budget", "sent"): "notice",
        ("replied", "escalation", "sent"): "notice",
        ("failed", "gave-up", "sent"): "notice",
    }
    try:
        with engine.connect() as conn:
            command.downgrade(migrate._alembic_config(conn), "0011")
            conn.execute(text("INSERT INTO tenants (id, slug, name) VALUES (:t, 'acme', 'Acme')"), {"t": tenant})
            conn.execute(
                text("INSERT INTO agents (id, tenant_id, name, role, persona) VALUES (:a, :t, 'Ava', 'r', 'p')"), {"a": agent, "t": tenant}
            )
            conn.execute(
                text(
                    "INSERT INTO conversations (id, tenant_id, agent_id, channel, external_id, person) VALUES (:c, :t, :a, 'terminal', 'k', 'pat')"
                ),
                {"c": conversation, "t": tenant, "a": agent},
            )
            for n, (inbox_status, model, status) in enumerate(replies):
                inbound = uuid.uuid4()
                conn.execute(
                    text("INSERT INTO inbound_messages (id, tenant_id, conversation_id, channel, external_id, sender, text, status) "
                         "VALUES (:i, :t, :c, 'terminal', :e, 'pat', 'hi', :s)"),
                    {"i": inbound, "t": tenant, "c": conversation, "e": f"m{n}", "s": inbox_status},
                )  # fmt: skip
                for direction, author, message_status, message_model in (("in", "pat", "received", None), ("out", "Ava", status, model)):
                    conn.execute(
                        text("INSERT INTO messages (tenant_id, conversation_id, inbound_id, direction, author, text, status, model) "
                             "VALUES (:t, :c, :i, :d, :a, :x, :s, :m)"),
                        {"t": tenant, "c": conversation, "i": inbound, "d": direction, "a": author, "x": f"{n}:{direction}",
                         "s": message_status, "m": message_model},
                    )  # fmt: skip
            command.upgrade(migrate._alembic_config(conn), "head")
            kinds: dict[str, str] = dict(conn.execute(text("SELECT text, kind FROM messages")).tuples().all())
    finally:
        engine.dispose()
    assert kinds == {
        **{f"{n}:in": "message" for n in range(len(replies))},
        **{f"{n}:out": kind for n, kind in enumerate(replies.values())},
    }
