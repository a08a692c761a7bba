"""What a running worker sees, for `konstruct doctor`: whether it has the platform LLM key, and its config file's age.

- worker_heartbeats.has_platform_key: whether the worker could read a non-empty platform key for the default model
  (never the key); null: no key is configured.
- worker_heartbeats.config_mtime: the modification time of the konstruct.toml the worker loaded (null: none), so doctor
  can tell a worker running an older config than the file on disk.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE worker_heartbeats ADD COLUMN has_platform_key boolean, ADD COLUMN config_mtime timestamptz")


def downgrade() -> None:
    op.execute("ALTER TABLE worker_heartbeats DROP COLUMN has_platform_key, DROP COLUMN config_mtime")
