"""The app role's engine, and sessions scoped to one tenant by row-level security."""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError, InterfaceError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from konstruct.config import Settings
from konstruct.db.models import TENANT_TABLES
from konstruct.db.urls import DatabaseURLs, resolve_urls
from konstruct.errors import DatabaseError, DatabaseUnavailable, TenantNotSetError

_TENANT_KEY = "konstruct_tenant_id"
_TENANT_TABLE_RE = re.compile(r"\b(" + "|".join(sorted(TENANT_TABLES)) + r")\b", re.IGNORECASE)


def _guard_tenant_tables(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
    # The database would return no rows anyway (RLS); raising makes the bug loud instead of silent.
    if _TENANT_KEY not in conn.info and _TENANT_TABLE_RE.search(statement):
        table = _TENANT_TABLE_RE.search(statement).group(1)  # type: ignore[union-attr]
        raise TenantNotSetError(f"tenant table {table!r} used outside a tenant session (a bug: use db.tenant(tenant_id=...))")


def _literal(value: str) -> str:
    """A string literal for SQL (standard_conforming_strings, PostgreSQL's default since 9.1)."""
    if "\x00" in value:
        raise ValueError("a NUL character cannot be in a PostgreSQL string")
    return "'" + value.replace("'", "''") + "'"


def _raise_if_unmigrated(exc: BaseException) -> None:
    if (isinstance(exc, ProgrammingError) and "does not exist" in str(exc.orig)) or (
        isinstance(exc, asyncpg.exceptions.PostgresError) and str(exc.sqlstate).startswith("42") and "does not exist" in str(exc)
    ):
        raise DatabaseError("the database schema is missing or old: run `konstruct db upgrade`") from exc


# SQLSTATE class 57 (operator intervention: shutdown, crash shutdown, cannot connect now), 08 (connection exceptions) and
# 53300 (too many connections: the server is full for now, as when more processes than max_connections allows open pools).
_UNAVAILABLE_STATES = ("57P01", "57P02", "57P03", "08000", "08001", "08003", "08004", "08006", "53300")


def unavailable(exc: BaseException) -> bool:
    """Whether an error means the database is down or restarting (not that the statement was wrong)."""
    if isinstance(exc, DatabaseUnavailable | PoolTimeout):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        return unavailable(exc.orig) if exc.orig is not None and exc.orig is not exc else isinstance(exc, InterfaceError)
    if isinstance(exc, OSError | asyncio.TimeoutError | asyncpg.exceptions.ConnectionDoesNotExistError | asyncpg.exceptions.InterfaceError):
        return True
    psycopg = sys.modules.get("psycopg")  # huey's Postgres queue raises its errors; none without it imported
    if psycopg is not None and isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) and exc.sqlstate is None:
        return True
    state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    if isinstance(state, str) and state in _UNAVAILABLE_STATES:
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and unavailable(cause)


def _raise_if_unavailable(exc: BaseException) -> None:
    if not isinstance(exc, DatabaseUnavailable) and unavailable(exc):
        raise DatabaseUnavailable(f"the database is unavailable ({type(exc).__name__}); try again shortly") from exc


class Database:
    """Connections as the app role. Tenant data only inside ``tenant(tenant_id=...)``."""

    def __init__(self, settings: Settings, urls: DatabaseURLs | None = None) -> None:
        self.settings = settings
        self.urls = urls or resolve_urls(settings)
        self.engine: AsyncEngine = create_async_engine(
            self.urls.app_async(),
            # Opened as needed and kept: a connection opened for a burst and closed after it (an "overflow" one)
            # cost a PostgreSQL backend's start, asyncpg's type introspection and every statement prepared anew,
            # ~2 ms of CPU per LLM call at 32 in flight (bench/llm_overhead.py: 0.56x → 0.81x of litellm alone).
            pool_size=settings.database.pool_size,
            max_overflow=0,
            # No ping on every checkout (a round trip per transaction); a dropped connection is detected on
            # use and the pool invalidated, and connections are recycled regularly.
            pool_recycle=1800,
            pool_timeout=30,
            # Fail fast when the database is down, so webhooks get a quick 503 and Slack or Meta deliver again.
            connect_args={"timeout": settings.database.connect_timeout},
        )
        event.listen(self.engine.sync_engine, "before_cursor_execute", _guard_tenant_tables)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @asynccontextmanager
    async def tenant(self, *, tenant_id: uuid.UUID, local: Mapping[str, str] | None = None) -> AsyncIterator[AsyncSession]:
        """One transaction in which row-level security shows only this tenant's rows. `local`: more settings for this
        transaction only (e.g. plan_cache_mode), set in the same round trip."""
        if not isinstance(tenant_id, uuid.UUID):
            raise TenantNotSetError(f"tenant_id must be a UUID, got {tenant_id!r}")
        session = self._sessions()
        info: dict[str, Any] | None = None
        try:
            conn = await session.connection()
            # Transaction-local (is_local=true) and a bound parameter: nothing leaks to the next user of the connection.
            params = {"tenant": str(tenant_id)}
            sql = "select set_config('app.current_tenant', :tenant, true)"
            for i, (name, value) in enumerate((local or {}).items()):
                sql += f", set_config(:name{i}, :value{i}, true)"
                params |= {f"name{i}": name, f"value{i}": value}
            await conn.execute(text(sql), params)
            info = conn.sync_connection.info  # type: ignore[union-attr]
            info[_TENANT_KEY] = tenant_id
            yield session
            await session.commit()
        except BaseException as exc:
            try:
                await session.rollback()
            except Exception as rollback_error:  # the connection died with the server: the pool drops it
                if not unavailable(rollback_error):
                    raise
            _raise_if_unmigrated(exc)
            _raise_if_unavailable(exc)
            raise
        finally:
            if info is not None:
                info.pop(_TENANT_KEY, None)
            await session.close()

    @asynccontextmanager
    async def tenant_driver(self, *, tenant_id: uuid.UUID, local: Mapping[str, str] | None = None) -> AsyncIterator[asyncpg.Connection]:
        """The transaction `tenant` gives, on the driver's own connection (asyncpg: `fetch(sql, *args)` with $n
        parameters), for a hot read path where SQLAlchemy's work per statement costs as much as the statement. BEGIN
        and the settings travel in one round trip (a simple query: the values are literals, quoted here)."""
        if not isinstance(tenant_id, uuid.UUID):
            raise TenantNotSetError(f"tenant_id must be a UUID, got {tenant_id!r}")
        settings = {"app.current_tenant": str(tenant_id), **(local or {})}
        begin = "BEGIN; SELECT " + ", ".join(f"set_config({_literal(name)}, {_literal(value)}, true)" for name, value in settings.items())
        try:
            async with self.engine.connect() as conn:
                raw: asyncpg.Connection = (await conn.get_raw_connection()).driver_connection  # type: ignore[assignment]
                try:
                    await raw.execute(begin)
                    yield raw
                    await raw.execute("COMMIT")
                except BaseException:
                    if raw.is_in_transaction():  # asyncpg knows from the server's ReadyForQuery
                        try:
                            await raw.execute("ROLLBACK")
                        except Exception:  # the connection cannot be trusted: the pool drops it, not hands it on
                            await conn.invalidate()
                    raise
        except Exception as exc:
            _raise_if_unmigrated(exc)
            _raise_if_unavailable(exc)
            raise

    @asynccontextmanager
    async def system(self) -> AsyncIterator[AsyncSession]:
        """A transaction with no tenant set: for tables without tenant data and look-up functions."""
        try:
            async with self._sessions() as session, session.begin():
                yield session
        except Exception as exc:
            _raise_if_unmigrated(exc)
            _raise_if_unavailable(exc)
            raise

    async def ping(self) -> None:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("select 1"))
        except Exception as exc:
            kind = DatabaseUnavailable if unavailable(exc) else DatabaseError
            raise kind(f"cannot reach the database as {self.urls.app.username}: {type(exc).__name__}: {exc}") from None

    async def warm(self, connections: int) -> None:
        """Open this many pooled connections now, so the first burst of traffic does not wait for
        PostgreSQL to start a backend per connection."""
        held: list[Any] = []
        try:
            held = list(await asyncio.gather(*(self.engine.connect() for _ in range(connections))))
            await asyncio.gather(*(conn.execute(text("select 1")) for conn in held))
        finally:
            await asyncio.gather(*(conn.close() for conn in held))

    async def dispose(self) -> None:
        await self.engine.dispose()
