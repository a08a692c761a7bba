"""Connection URLs for the owner role (migrations) and the app role (run time)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from konstruct.config import Settings
from konstruct.db.embedded import DATABASE_NAME, start_embedded
from konstruct.errors import ConfigError

APP_ROLE = "konstruct_app"
APP_PASSWORD_FILE = "db_app_password"


@dataclass(frozen=True)
class DatabaseURLs:
    owner: URL  # runs migrations; owns the tables
    app: URL  # NOSUPERUSER, NOBYPASSRLS, not the owner: what the app runs as

    def owner_sync(self) -> str:
        return self.owner.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)

    def owner_dsn(self) -> str:
        """The owner's URL as psycopg.connect takes it (for DDL and the few owner-only writes)."""
        return self.owner.set(drivername="postgresql").render_as_string(hide_password=False)

    def app_async(self) -> URL:
        return self.app.set(drivername="postgresql+asyncpg")

    def app_libpq(self) -> str:
        """A plain libpq URI for the app role (psycopg, huey's Postgres storage)."""
        return self.app.set(drivername="postgresql").render_as_string(hide_password=False)


def resolve_urls(settings: Settings, *, create_password: bool = False) -> DatabaseURLs:
    """Work out both URLs, starting the embedded server when no database.url is set."""
    if settings.embedded_database:
        base = make_url(start_embedded(settings.data_dir)).set(database=DATABASE_NAME)
    else:
        assert settings.database.url is not None
        url = settings.database.url.get_secret_value()  # a reference that cannot be read says so itself
        try:
            base = make_url(url)
        except Exception:
            raise ConfigError("database.url: not a valid URL (postgresql://user:password@host:5432/dbname)") from None
        if not base.drivername.startswith("postgresql"):
            raise ConfigError("database.url: only PostgreSQL is supported (postgresql://…)")
    password = app_password(settings, create=create_password)
    return DatabaseURLs(owner=base, app=base.set(username=APP_ROLE, password=password))


def app_password(settings: Settings, *, create: bool) -> str:
    """The app role's password: from config, or made once and kept 0600 in the data directory."""
    if settings.database.app_password is not None:
        return settings.database.app_password.get_secret_value()
    path: Path = settings.data_dir / APP_PASSWORD_FILE
    if path.exists():
        return path.read_text().strip()
    if not create:
        raise ConfigError(f"no password for the {APP_ROLE} role: run `konstruct db upgrade`, or set database.app_password")
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    # Written whole under a temporary name, then linked into place: a second process making it at the same moment
    # (`up` and a first CLI command) finds the file complete and uses that one.
    tmp = path.with_name(f".{APP_PASSWORD_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        return path.read_text().strip()
    finally:
        tmp.unlink()
    return value
