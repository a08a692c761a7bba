"""The fake MCP server (tests/fakes/mcp_stdio.py's tools, the SDK's own server) over streamable HTTP: uvicorn on
127.0.0.1 in a thread, restartable on its port. It counts handshakes (`initialize` or `server/discover`: a new client
session) and tool calls, and keeps the last Authorization header it received.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from tests.fakes.mcp_stdio import build
from tests.helpers import free_port


@dataclass
class LoopbackMcp:
    """The HTTP server: `url`, counters, `stop()` and `start()` again on the same port (a server restart)."""

    port: int = field(default_factory=free_port)
    handshakes: int = 0
    calls: list[str] = field(default_factory=list)
    authorization: str | None = None
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def _app(self) -> Any:
        inner = build().streamable_http_app()

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                await inner(scope, receive, send)
                return
            self.authorization = dict(scope["headers"]).get(b"authorization", b"").decode() or None
            chunks, more = [], True
            while more:
                message = await receive()
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            body = b"".join(chunks)
            self._count(body)
            sent = False

            async def replay() -> dict[str, Any]:
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            await inner(scope, replay, send)

        return app

    def _count(self, body: bytes) -> None:
        try:
            message = json.loads(body)
        except ValueError:
            return
        for item in message if isinstance(message, list) else [message]:
            method = item.get("method") if isinstance(item, dict) else None
            if method in ("initialize", "server/discover"):
                self.handshakes += 1
            elif method == "tools/call":
                self.calls.append(item.get("params", {}).get("name", ""))

    def start(self) -> LoopbackMcp:
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-mcp", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake MCP server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None


if __name__ == "__main__":  # python -m tests.fakes.mcp_server PORT: serve until killed
    fake = LoopbackMcp(port=int(sys.argv[1])).start()
    print(fake.url, flush=True)
    threading.Event().wait()
