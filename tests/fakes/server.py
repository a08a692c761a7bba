"""What the loopback fakes share: a threaded HTTP server on 127.0.0.1 and a quiet handler base."""

from __future__ import annotations

import contextlib
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, no access log, and a response writer that tolerates a client that left."""

    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as a real server sets it: the status line and headers go out in one write and the body in another,
    # and with Nagle's algorithm the body waits for the client's delayed ACK of the headers (40 ms on Linux).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        return

    def read_body(self) -> bytes:
        """The request body, with Content-Length or chunked (httpx streams some bodies chunked)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_bytes(self, status: int, content_type: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (timeout, killed worker)
            self.wfile.write(data)


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-request (a killed worker) is normal here; anything else is printed."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def serve(handler: type[BaseHTTPRequestHandler], port: int, name: str) -> LoopbackServer:
    """Start serving on 127.0.0.1:port (0: any free port) in a daemon thread."""
    server = LoopbackServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


def shutdown(server: ThreadingHTTPServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
