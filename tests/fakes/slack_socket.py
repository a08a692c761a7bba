"""A loopback fake of Slack's Socket Mode websocket server.

`apps.connections.open` on the fake Web API (tests/fakes/slack.py) hands out `ws://127.0.0.1:PORT/link?ticket=…`
for a registered app-level token; a client that connects gets `{"type": "hello", …}` as Slack sends it, then
whatever envelopes the test sends (`{"envelope_id", "type": "events_api", "payload", "retry_attempt", …}`), and
must acknowledge each with `{"envelope_id": …}`. Acks are recorded (with an optional callback run the moment
one arrives); a test can also send `{"type": "disconnect"}`, as Slack does before it refreshes a connection.
Runs aiohttp in a thread of its own, so tests drive it from synchronous code.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web


@dataclass
class SocketConnection:
    token: str
    ws: web.WebSocketResponse
    opened_at: float = field(default_factory=time.time)
    closed_at: float | None = None


@dataclass
class Ack:
    envelope_id: str
    token: str
    at: float
    payload: Any = None


class FakeSocketMode:
    def __init__(self) -> None:
        self.tickets: dict[str, str] = {}  # single-use ticket → app token
        self.connections: list[SocketConnection] = []
        self.acks: list[Ack] = []
        self.sent: dict[str, dict[str, Any]] = {}  # envelope id → envelope
        self.on_ack: Callable[[Ack], None] | None = None  # run in the server's thread as each ack arrives
        self.ack_errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # The test's side.

    def url_for(self, token: str) -> str:
        """A fresh websocket URL for this app token (what `apps.connections.open` returns)."""
        ticket = secrets.token_hex(8)
        with self._lock:
            self.tickets[ticket] = token
        return f"ws://127.0.0.1:{self.port}/link/?ticket={ticket}&app_id=A0000000001"

    def open_connections(self, token: str) -> list[SocketConnection]:
        with self._lock:
            return [c for c in self.connections if c.token == token and c.closed_at is None]

    def send_event(self, token: str, payload: dict[str, Any], *, retry_attempt: int = 0, envelope_id: str | None = None) -> str:
        """Send an `events_api` envelope over the newest open connection of this token; returns its envelope id."""
        envelope_id = envelope_id or str(uuid.uuid4())
        envelope = {
            "envelope_id": envelope_id,
            "payload": payload,
            "type": "events_api",
            "accepts_response_payload": False,
            "retry_attempt": retry_attempt,
            "retry_reason": "timeout" if retry_attempt else "",
        }
        self._send(token, envelope)
        with self._lock:
            self.sent[envelope_id] = envelope
        return envelope_id

    def send_events_at(self, token: str, payloads: list[dict[str, Any]], rate: float) -> list[tuple[str, float]]:
        """Send `events_api` envelopes at a steady rate (for a benchmark) over the token's newest connection;
        returns each envelope id with the time.time() it was due, once all are sent."""
        connections = self.open_connections(token)
        if not connections:
            raise AssertionError(f"no open Socket Mode connection for {token[:10]}…")
        ws = connections[-1].ws

        async def send_all() -> list[tuple[str, float]]:
            sent: list[tuple[str, float]] = []
            start = time.time() + 0.1
            for i, payload in enumerate(payloads):
                due = start + i / rate
                if due > time.time():
                    await asyncio.sleep(due - time.time())
                envelope_id = str(uuid.uuid4())
                await ws.send_str(json.dumps({"envelope_id": envelope_id, "payload": payload, "type": "events_api", "retry_attempt": 0}))
                sent.append((envelope_id, due))
            return sent

        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(send_all(), self._loop).result()

    def send_envelope(self, token: str, kind: str, payload: dict[str, Any]) -> str:
        """Send an envelope of another type (`interactive`, `slash_commands`); returns its envelope id."""
        envelope_id = str(uuid.uuid4())
        envelope = {"envelope_id": envelope_id, "payload": payload, "type": kind, "accepts_response_payload": kind != "events_api"}
        self._send(token, envelope)
        with self._lock:
            self.sent[envelope_id] = envelope
        return envelope_id

    def send_disconnect(self, token: str, reason: str = "refresh_requested") -> None:
        self._send(token, {"type": "disconnect", "reason": reason, "debug_info": {"host": "applink-fake"}})

    def acked(self, envelope_id: str) -> list[Ack]:
        with self._lock:
            return [a for a in self.acks if a.envelope_id == envelope_id]

    def reset(self) -> None:
        with self._lock:
            self.tickets.clear()
            self.acks.clear()
            self.sent.clear()
            self.ack_errors.clear()
            self.on_ack = None

    def _send(self, token: str, message: dict[str, Any]) -> None:
        connections = self.open_connections(token)
        if not connections:
            raise AssertionError(f"no open Socket Mode connection for {token[:10]}…")
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(connections[-1].ws.send_str(json.dumps(message)), self._loop)
        future.result(timeout=5)

    # The server's side.

    async def _link(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            token = self.tickets.pop(request.query.get("ticket", ""), None)
        if token is None:
            return web.Response(status=401, text="invalid ticket")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        connection = SocketConnection(token, ws)
        with self._lock:
            self.connections.append(connection)
        hello = {
            "type": "hello",
            "num_connections": len(self.open_connections(token)),
            "debug_info": {"host": "applink-fake", "build_number": 1, "approximate_connection_time": 18060},
            "connection_info": {"app_id": "A0000000001"},
        }
        await ws.send_str(json.dumps(hello))
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    self._received(token, message.data)
        finally:
            connection.closed_at = time.time()
        return ws

    def _received(self, token: str, data: str) -> None:
        try:
            body = json.loads(data)
        except ValueError:
            return
        if not isinstance(body, dict) or not isinstance(body.get("envelope_id"), str):
            return
        ack = Ack(body["envelope_id"], token, time.time(), body.get("payload"))
        if self.on_ack is not None:
            try:
                self.on_ack(ack)
            except BaseException as exc:  # reported by the test, not lost in the server's thread
                self.ack_errors.append(exc)
        with self._lock:
            self.acks.append(ack)

    def start(self) -> FakeSocketMode:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_get("/link/", self._link)
            self._runner = web.AppRunner(app, handle_signals=False)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-slack-socket", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def close_all(self) -> None:
        """Close every open connection from the server's side (as Slack does when it drops one)."""
        assert self._loop is not None
        for connection in [c for c in self.connections if c.closed_at is None]:
            asyncio.run_coroutine_threadsafe(connection.ws.close(), self._loop).result(timeout=5)

    def stop(self) -> None:
        if self._loop is not None:
            self.close_all()
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
