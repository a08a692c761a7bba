"""Alembic migrations, installed as ``konstruct.migrations``."""
