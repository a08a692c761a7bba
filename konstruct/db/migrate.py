"""Bring the database up to date as the owner role, and check that it is."""

from __future__ import annotations

import ast
import fcntl
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from konstruct.config import Settings
from konstruct.db.urls import APP_ROLE, DatabaseURLs, resolve_urls
from konstruct.errors import DatabaseError

if TYPE_CHECKING:
    from alembic.config import Config

# alembic and psycopg are imported where they are used: every CLI command imports this module, few of them migrate.


def migrations_dir() -> Path:
    import konstruct.migrations

    return Path(konstruct.migrations.__file__).parent


def _alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


_ASSIGNED = re.compile(r"^(revision|down_revision)\s*(?::[^=\n]*)?=\s*(.+?)\s*$", re.M)


def declared_head(versions: Path | None = None) -> str | None:
    """The head revision as the migration files declare it (their `revision` and `down_revision` lines), read
    without importing alembic or the migrations: that import (alembic, then the models through env.py) was 0.36 s
    of every warm `up`, spent finding a database already at head. None when the files do not tell one head that
    way (a branch, a line of another shape): alembic then decides, as for any database not at this head."""
    revisions: set[str] = set()
    below: set[str] = set()
    for path in (versions or migrations_dir() / "versions").glob("*.py"):
        found = {match[1]: match[2] for match in _ASSIGNED.finditer(path.read_text())}
        if path.name == "__init__.py" and not found:
            continue
        try:
            revision, down = ast.literal_eval(found["revision"]), ast.literal_eval(found["down_revision"])
        except (KeyError, ValueError, SyntaxError):
            return None
        if not isinstance(revision, str):
            return None
        revisions.add(revision)
        below.update([down] if isinstance(down, str) else down or ())
    heads = revisions - below
    return heads.pop() if len(heads) == 1 else None


def _recorded_revision(conn: Connection) -> str | None:
    """The one revision alembic_version holds; None when there is no table, no row or several (alembic decides)."""
    if conn.execute(text("select to_regclass('alembic_version')")).scalar() is None:
        return None
    rows = conn.execute(text("select version_num from alembic_version")).scalars().all()
    return rows[0] if len(rows) == 1 else None


@dataclass
class UpgradeResult:
    before: str | None
    after: str | None


def upgrade(settings: Settings) -> UpgradeResult:
    """Create the database if it is embedded, check pgvector, apply migrations, set the app role's password."""
    from psycopg import sql

    urls = resolve_urls(settings, create_password=True)
    if settings.embedded_database:
        _create_database_if_missing(urls)
    engine = create_engine(urls.owner_sync(), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            _require_pgvector(conn, urls)
            before: str | None = _recorded_revision(conn)
            after: str | None = before
            if before is None or before != declared_head():  # not a warm start: alembic applies what is missing
                from alembic import command
                from alembic.runtime.migration import MigrationContext

                before = MigrationContext.configure(conn).get_current_revision()
                command.upgrade(_alembic_config(conn), "head")
                after = MigrationContext.configure(conn).get_current_revision()
            raw = conn.connection.dbapi_connection
            password = urls.app.password or ""
            conn.exec_driver_sql(
                sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(sql.Identifier(APP_ROLE), sql.Literal(password)).as_string(raw)  # type: ignore[arg-type]
            )
            conn.exec_driver_sql(
                sql.SQL("GRANT CONNECT ON DATABASE {} TO {}")
                .format(sql.Identifier(urls.owner.database or "postgres"), sql.Identifier(APP_ROLE))
                .as_string(raw)  # type: ignore[arg-type]
            )
    except OperationalError as exc:
        raise DatabaseError(f"cannot reach the database as the owner role: {exc.orig}") from None
    finally:
        engine.dispose()
    if settings.embedded_database:
        _migrated_marker(settings).write_text(f"{after}\n")  # what prepare_embedded trusts: written last
    return UpgradeResult(before=before, after=after)


def _migrated_marker(settings: Settings) -> Path:
    """The revision an upgrade of the embedded database last completed (absent: none completed)."""
    return settings.data_dir / "migrated"


def prepare_embedded(settings: Settings) -> UpgradeResult | None:
    """Before the first `konstruct up`: start the embedded database and create and migrate it, as `up` would, when no
    upgrade of it has completed yet (one that died part-way is done again). Returns what was done, or None when there
    was nothing to do."""
    if not settings.embedded_database or settings.database.app_password is not None:
        return None
    if _upgraded(settings):
        return None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with (settings.data_dir / "migrate.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two first commands at once: one migrates, the other waits and finds it done
        if _upgraded(settings):
            return None
        return upgrade(settings)


def _upgraded(settings: Settings) -> bool:
    """An upgrade of the embedded database completed (an installation from before the marker upgrades once more:
    at head, that changes nothing)."""
    return _migrated_marker(settings).exists()


def current_revision(urls: DatabaseURLs) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(urls.owner_sync())
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise DatabaseError(f"cannot reach the database as the owner role: {exc.orig}") from None
    finally:
        engine.dispose()


def _create_database_if_missing(urls: DatabaseURLs) -> None:
    name = urls.owner.database or "postgres"
    admin = make_url(urls.owner_sync()).set(database="postgres")
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            exists = conn.execute(text("select 1 from pg_database where datname = :n"), {"n": name}).scalar()
            if not exists:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()


def _require_pgvector(conn: Connection, urls: DatabaseURLs) -> None:
    available = conn.execute(text("select default_version from pg_available_extensions where name = 'vector'")).scalar()
    if available is None:
        host = urls.owner.host or urls.owner.query.get("host") or "the server"
        raise DatabaseError(
            f"PostgreSQL at {host} has no pgvector extension: install pgvector 0.8 or newer, or leave database.url empty for the embedded server"
        )
