"""uvicorn's httptools protocol with the two bounds it lacks: the size of a request's headers, and how long a
client may take to send them (or to send the next piece of a body).

uvicorn only times out idle keep-alive connections *after* a response: a client that opens a connection and
sends half a request line, a header of 32 MB, or a chunked body that never arrives, holds a connection (and
memory) for as long as it likes. Here the headers must arrive within `read_timeout` seconds and stay under
`max_header_bytes`, and a body may pause at most `read_timeout` seconds between two pieces.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from konstruct.config import GatewaySettings


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a header size limit (431) and a read timeout (408)."""

    max_header_bytes = 64 * 1024
    read_timeout = 15.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_bytes = 0
        self._awaiting_headers = True
        self._in_message = False
        self._read_timer: asyncio.TimerHandle | None = None
        self._deadline_armed_for_headers = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(headers=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers:
            self._header_bytes += len(data)
            if not self._deadline_armed_for_headers:
                self._arm(headers=True)  # the next request's headers: one deadline for all of them
        else:
            self._arm(headers=False)  # a body: each piece resets the clock
        super().data_received(data)
        if self._awaiting_headers and self._header_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._refuse(431, "Request header fields too large.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = True

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._header_bytes = 0
        self._arm(headers=False)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_message = False
        self._awaiting_headers = True
        self._header_bytes = 0
        self._disarm()

    def _arm(self, *, headers: bool) -> None:
        self._disarm()
        self._deadline_armed_for_headers = headers
        self._read_timer = self.loop.call_later(self.read_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        self._deadline_armed_for_headers = False

    def _timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:
            self._arm(headers=False)  # the app is behind, not the client
            return
        self._refuse(408, "Request timeout.")

    def _refuse(self, status: int, message: str) -> None:
        """Answer and close, unless a response has begun (then only close)."""
        self._disarm()
        if self.cycle is None or not self.cycle.response_started:
            body = message.encode("ascii")
            self.transport.write(
                b"".join(
                    [
                        STATUS_LINE[status],
                        b"content-type: text/plain; charset=utf-8\r\n",
                        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                        b"connection: close\r\n\r\n",
                        body,
                    ]
                )
            )
        self.transport.close()


def configure(gateway: GatewaySettings) -> None:
    """Apply the [gateway] limits to every connection of this process."""
    BoundedHttpToolsProtocol.max_header_bytes = gateway.max_header_bytes
    BoundedHttpToolsProtocol.read_timeout = gateway.read_timeout
