"""Socket Mode: each single-workspace Slack app with an app-level token gets one websocket to Slack, held by exactly
one gateway process at a time across all gateways.

Who holds it is a PostgreSQL session-level advisory lock per connection, taken on a connection of its own: every
gateway tries the locks it does not hold every couple of seconds, so when the holder dies (even SIGKILLed) its
session ends, the lock is free, and another gateway has the socket within seconds. The holder writes who it is and
how the socket is doing into `slack_sockets` for `doctor` and `channel list`. Events arrive as envelopes, go
through the same store-then-ack path as the Events API over HTTP, and are acknowledged only once stored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from slack_sdk.errors import SlackApiError
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.async_client import AsyncBaseSocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from sqlalchemy import text

from konstruct.channels.connections import unseal
from konstruct.channels.slack.client import web_client
from konstruct.channels.slack.events import SlackEvents
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.errors import DatabaseUnavailable, KonstructError
from konstruct.logs import Throttled

log = logging.getLogger("konstruct.slack.socket")
throttled = Throttled(log)

LOCK_CLASS = 7_301_015  # the first key of pg_try_advisory_lock(int, int); the second is hashtext(connection id)
RETRY_INTERVAL = 2.0  # seconds between a gateway's tries for the sockets it does not hold
PING_INTERVAL = 5.0  # slack_sdk pings Slack this often and reconnects when pongs stop
MAX_BACKOFF = 60.0  # longest wait before asking Slack again for a URL it refused
CONNECT_TIMEOUT = 15.0  # seconds for a websocket URL to open before asking Slack for another

# What to do with each kind of envelope besides events (e.g. "interactive"): returns once handled; raising
# leaves the envelope unacknowledged, so Slack delivers it again.
EnvelopeHandler = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class SocketConnection:
    id: uuid.UUID
    tenant_id: uuid.UUID
    tenant_slug: str
    team_id: str
    name: str
    app_token: str


async def socket_connections(db: Database, settings: Settings) -> list[SocketConnection]:
    """Every connected single-workspace Slack app with an app-level token, in every tenant."""
    async with db.system() as session:
        rows = (await session.execute(text("select * from konstruct_socket_connections()"))).all()
    found = []
    for row in rows:
        try:
            token = unseal(settings, bytes(row.credentials)).get("app_token")
        except KonstructError as exc:  # one connection's credentials unreadable: not every socket's problem
            throttled.warning(f"unseal:{row.id}", f"Socket Mode {row.name}: cannot read its credentials ({exc})")
            continue
        if token:
            found.append(SocketConnection(row.id, row.tenant_id, row.tenant_slug, row.external_id, row.name, token))
    return found


@dataclass
class Held:
    """A socket this process holds: the lock is ours until release."""

    connection: SocketConnection
    client: SocketModeClient
    since: datetime = field(default_factory=lambda: datetime.now(UTC))
    problem: str = ""
    opener: asyncio.Future[None] | None = None


class SocketHolder:
    """In each gateway process: takes the sockets no process holds, keeps them, lets go on shutdown."""

    def __init__(self, settings: Settings, db: Database, events: SlackEvents, *, interval: float = RETRY_INTERVAL) -> None:
        self.settings, self.db, self.events, self.interval = settings, db, events, interval
        self.handlers: dict[str, EnvelopeHandler] = {}
        self._held: dict[uuid.UUID, Held] = {}
        self._locks: psycopg.AsyncConnection[Any] | None = None
        self._host, self._pid = socket.gethostname(), os.getpid()

    async def run(self) -> None:
        """Until cancelled: every interval, let go of what is no longer wanted, try for the rest, say how each is."""
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is gone: so are our locks, and with them the right to the sockets
                reason = str(exc) if isinstance(exc, DatabaseUnavailable) else f"{type(exc).__name__}: {exc}"
                if self._held:
                    throttled.warning("socket-mode", f"Socket Mode: letting go of {len(self._held)} socket(s): {reason}")
                else:  # nothing held: the gateway's own health check already says the database is down
                    log.debug("Socket Mode: cannot look for sockets to hold: %s", reason)
                await self._let_go_of_everything()
            await asyncio.sleep(self.interval)

    async def tick(self) -> None:
        wanted = {c.id: c for c in await socket_connections(self.db, self.settings)}
        if not wanted and not self._held:
            if self._locks is not None:  # no Socket Mode app (any more): no database session kept for it
                await self._locks.close()
                self._locks = None
            return
        locks = await self._lock_connection()
        for connection_id, held in list(self._held.items()):
            if wanted.get(connection_id) != held.connection:  # disconnected, or connected again with another token
                await self._release(connection_id)
        for connection_id, connection in wanted.items():
            if connection_id not in self._held and await self._try_lock(locks, connection_id):
                self._held[connection_id] = self._open(connection)
                log.info("Socket Mode: holding %s (%s) for %s", connection.name, connection.team_id, connection.tenant_slug)
        await self._report(locks)

    async def stop(self) -> None:
        """Close every socket and release its lock (another gateway takes it within seconds)."""
        held = list(self._held)
        for connection_id in held:
            await self._release(connection_id)
        if self._locks is not None:
            await self._locks.close()
            self._locks = None

    @property
    def held(self) -> list[uuid.UUID]:
        return list(self._held)

    async def _lock_connection(self) -> psycopg.AsyncConnection[Any]:
        if self._locks is None or self._locks.closed or self._locks.broken:
            await self._let_go_of_everything()
            try:
                self._locks = await psycopg.AsyncConnection.connect(
                    self.db.urls.app_libpq(),
                    autocommit=True,
                    connect_timeout=max(int(self.settings.database.connect_timeout), 1),
                    application_name=f"konstruct gateway {self._pid} socket mode",  # who holds what, in pg_stat_activity
                )
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailable(f"cannot reach the database for the Socket Mode locks ({type(exc).__name__})") from None
        return self._locks

    @staticmethod
    async def _try_lock(locks: psycopg.AsyncConnection[Any], connection_id: uuid.UUID) -> bool:
        cursor = await locks.execute("select pg_try_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, str(connection_id)))
        row = await cursor.fetchone()
        return bool(row and row[0])

    def _open(self, connection: SocketConnection) -> Held:
        client = SocketModeClient(
            app_token=connection.app_token,
            web_client=web_client(self.settings),
            logger=logging.getLogger("konstruct.slack.socket.sdk"),
            ping_interval=PING_INTERVAL,
        )
        held = Held(connection, client)

        async def on_request(client: AsyncBaseSocketModeClient, request: SocketModeRequest) -> None:
            await self._envelope(held, client, request)

        client.socket_mode_request_listeners.append(on_request)
        held.opener = asyncio.ensure_future(self._connect(held))
        return held

    async def _connect(self, held: Held) -> None:
        """Ask Slack for a websocket URL (apps.connections.open) until it gives one, then connect; from then on
        slack_sdk keeps the connection (pings, and a new URL when Slack says `disconnect` or the socket drops)."""
        backoff = self.interval
        while True:
            try:
                held.client.wss_uri = await held.client.issue_new_wss_url()
                # slack_sdk retries a websocket that will not open with the same URL, forever: bounded here, and
                # the next try starts with a fresh URL. asyncio.timeout: 3.11's wait_for can drop a cancel (gh-86296).
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await held.client.connect()
                held.problem = ""
                return
            except SlackApiError as exc:
                held.problem = f"Slack refused the app-level token ({exc.response.get('error')}): connect again with a valid one"
            except TimeoutError:
                held.problem = f"the websocket Slack gave did not open within {CONNECT_TIMEOUT:g} s"
            except Exception as exc:
                held.problem = f"cannot reach Slack ({type(exc).__name__})"
            throttled.warning(f"socket:{held.connection.id}", f"Socket Mode {held.connection.name}: {held.problem}")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _envelope(self, held: Held, client: AsyncBaseSocketModeClient, request: SocketModeRequest) -> None:
        """Handle one envelope, and acknowledge it only once that is done (stored, for an event)."""
        try:
            if request.type == "events_api":
                await self.events.socket_event(request.payload, held.connection.team_id)
            elif request.type in self.handlers:
                await self.handlers[request.type](held.connection.team_id, request.payload)
            else:
                log.info("Socket Mode %s: acknowledging a %s envelope nothing here handles", held.connection.name, request.type)
        except DatabaseUnavailable as exc:
            throttled.warning("socket-envelope", f"Socket Mode: not acknowledged, Slack delivers it again: {exc}")
            return
        except Exception:
            log.exception("Socket Mode %s: a %s envelope failed; not acknowledged", held.connection.name, request.type)
            return
        await client.send_socket_mode_response(SocketModeResponse(envelope_id=request.envelope_id))

    async def _report(self, locks: psycopg.AsyncConnection[Any]) -> None:
        """Who holds what, and how each socket is, on the lock's own connection (so this fails when the lock is gone)."""
        for connection_id, held in self._held.items():
            connected = await held.client.is_connected()
            state = "connected" if connected else ("failing" if held.problem else "connecting")
            await locks.execute(
                "insert into slack_sockets (connection_id, host, pid, state, detail, since, seen_at) "
                "values (%s, %s, %s, %s, %s, %s, now()) on conflict (connection_id) do update set host = excluded.host, "
                "pid = excluded.pid, state = excluded.state, detail = excluded.detail, since = excluded.since, seen_at = now()",
                (connection_id, self._host, self._pid, state, "" if connected else held.problem, held.since),
            )

    async def _release(self, connection_id: uuid.UUID) -> None:
        held = self._held.pop(connection_id)
        await self._close(held)
        if self._locks is not None and not self._locks.closed:
            try:
                await self._locks.execute(
                    "delete from slack_sockets where connection_id = %s and pid = %s and host = %s", (connection_id, self._pid, self._host)
                )
                await self._locks.execute("select pg_advisory_unlock(%s, hashtext(%s))", (LOCK_CLASS, str(connection_id)))
            except psycopg.Error:
                await self._locks.close()  # the session ends, and every lock with it
        log.info("Socket Mode: let go of %s (%s)", held.connection.name, held.connection.team_id)

    async def _let_go_of_everything(self) -> None:
        """The lock connection is (or may be) gone: close every socket before another gateway opens it."""
        for held in self._held.values():
            await self._close(held)
        self._held.clear()
        if self._locks is not None:
            await self._locks.close()
            self._locks = None

    @staticmethod
    async def _close(held: Held) -> None:
        if held.opener is not None:
            held.opener.cancel()
        try:
            await held.client.close()
        except Exception as exc:  # a socket already broken: closed all the same
            log.debug("closing a Socket Mode client: %s", exc)


@dataclass(frozen=True)
class SocketState:
    """How one connection's socket is: held (its lock is taken) by whom, or waiting for a gateway."""

    connection_id: uuid.UUID
    held: bool
    host: str | None
    pid: int | None
    state: str | None
    detail: str
    since: datetime | None
    seen_at: datetime | None

    def describe(self) -> str:
        if self.held and self.pid is not None and self.since is not None:
            said = f"{self.state}, held by gateway pid {self.pid} on {self.host} since {self.since:%Y-%m-%d %H:%M:%S}Z"
            return f"{said}: {self.detail}" if self.detail else said
        if self.pid is not None and self.seen_at is not None:
            return f"waiting for a gateway (pid {self.pid} on {self.host} held it until {self.seen_at:%Y-%m-%d %H:%M:%S}Z)"
        return "waiting for a gateway"

    def as_json(self) -> dict[str, Any]:
        return {
            "held": self.held,
            "state": self.state if self.held else "waiting",
            "host": self.host,
            "pid": self.pid,
            "detail": self.detail,
            "since": self.since.isoformat() + "Z" if self.since else None,
            "seen_at": self.seen_at.isoformat() + "Z" if self.seen_at else None,
            "description": self.describe(),
        }


_STATES = f"""
select c.id, s.host, s.pid, s.state, s.detail, s.since at time zone 'UTC' as since, s.seen_at at time zone 'UTC' as seen_at,
    exists (select 1 from pg_locks l
            where l.locktype = 'advisory' and l.granted and l.objsubid = 2 and l.classid = {LOCK_CLASS}
              and l.database = (select oid from pg_database where datname = current_database())
              and l.objid::bigint = (hashtext(c.id::text)::bigint & 4294967295)) as held
from unnest(cast(:ids as uuid[])) as c(id) left join slack_sockets s on s.connection_id = c.id
"""


async def socket_states(db: Database, connection_ids: list[uuid.UUID]) -> dict[uuid.UUID, SocketState]:
    """The socket state of each of these connections (the lock says whether anyone holds it; the row says who)."""
    if not connection_ids:
        return {}
    async with db.system() as session:
        rows = (await session.execute(text(_STATES), {"ids": connection_ids})).all()
    return {
        row.id: SocketState(row.id, bool(row.held), row.host, row.pid, row.state, row.detail or "", row.since, row.seen_at) for row in rows
    }
