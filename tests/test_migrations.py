"""Data migrations, run down and up on a real database: what was stored before is carried over."""

from __future__ import annotations

import uuid

from alembic import command
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from konstruct.db import migrate


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
