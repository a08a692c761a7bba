"""Alembic environment: runs on the owner-role connection handed over by konstruct.db.migrate."""

from __future__ import annotations

from alembic import context

from konstruct.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `konstruct db upgrade`, which connects as the owner role")

context.configure(connection=connection, target_metadata=Base.metadata, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
