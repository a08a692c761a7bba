"""MCP servers' tools for the model: connections (official `mcp` SDK), a per-worker pool, and the registry's provider.

A turn offers an agent the tools of the tenant's MCP servers its tool list names (`provide_tools`, the registry's
provider hook), from the listing a live connection took or the one stored with the server, so a turn that calls no
MCP tool connects to nothing. A call goes through the worker's pool: one connection per server (per event loop),
opened on first use, kept and reused by every turn, closed when idle for `[mcp] idle_seconds` and replaced when it
broke or the server was changed. Each connection is owned by a task of its own (the SDK's transports are anyio task
groups that must be entered and left in one task); calls from turns are multiplexed over it.

HTTP connections go through `_GuardedBackend`: every TCP connection resolves the name and refuses a private address
(unless `[mcp] allow_private`), then connects to the address it checked, so DNS cannot answer differently between
check and use. JSON responses are cut at `[mcp] max_response_bytes`, server-sent events at the same size each. Stdio
servers run with a clean environment: the SDK's short safe list (PATH, HOME, USER, LOGNAME, SHELL, TERM) and the
server's own `--env`, nothing else of the worker's (no master key, no database URL).

Errors never raise past a tool: a server that cannot be reached, a timeout, an error result or a broken connection
become `ToolError`s the model reads. A read-only tool whose connection broke mid-call is retried once on a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from typing import Any

import httpcore2
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, Implementation

from konstruct.agent.mcp_servers import MAX_TOOLS, RemoteTool, ServerInfo, list_servers, record_tools, remote_tools, server_of, wanted
from konstruct.agent.tools.registry import MAX_ERROR, ProviderRequest, Tool, ToolContext, ToolError, truncate
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.netguard import AddressError, is_public, normalise_host, resolve

log = logging.getLogger("konstruct.mcp")
CLIENT_INFO = Implementation(name="konstruct", version="0.1")
MAX_PAGES = 10


class Broken(Exception):
    """The connection to the server went away (during or before a call)."""


# -- HTTP: checked addresses, bounded responses --


class _GuardedBackend(httpcore2.AsyncNetworkBackend):
    """Resolves once, refuses private addresses (unless allowed), connects to an address it checked."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._inner = httpcore2.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore2.AsyncNetworkStream:  # fmt: skip
        try:
            addresses = await resolve(normalise_host(host), port)
        except AddressError as exc:
            raise httpcore2.ConnectError(str(exc)) from None
        if not self.allow_private:
            refused = [a for a in addresses if not is_public(a)]
            if refused:
                raise httpcore2.ConnectError(f"{host} resolves to a private or reserved address ({refused[0]}); refused")
        failure: Exception = httpcore2.ConnectError(f"could not connect to {host}")
        for address in addresses:
            try:
                return await self._inner.connect_tcp(str(address), port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)  # fmt: skip
            except httpcore2.ConnectError as exc:
                failure = exc
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore2.AsyncNetworkStream:  # fmt: skip
        raise httpcore2.ConnectError("MCP servers are reached over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Bounded(httpx2.AsyncByteStream):
    def __init__(self, inner: Any, limit: int) -> None:
        self.inner, self.limit = inner, limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        async for chunk in self.inner:
            size += len(chunk)
            if size > self.limit:
                raise httpx2.ReadError(f"the MCP server's response is larger than {self.limit} bytes ([mcp] max_response_bytes)")
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


class _BoundedTransport(httpx2.AsyncBaseTransport):
    """JSON answers cut at `limit` bytes (an event stream is bounded per event by the SDK instead)."""

    def __init__(self, inner: httpx2.AsyncHTTPTransport, limit: int) -> None:
        self.inner, self.limit = inner, limit

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self.inner.handle_async_request(request)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return response
        return httpx2.Response(response.status_code, headers=response.headers, stream=_Bounded(response.stream, self.limit),
                               extensions=response.extensions)  # fmt: skip

    async def aclose(self) -> None:
        await self.inner.aclose()


def http_client(headers: dict[str, str], settings: Settings) -> httpx2.AsyncClient:
    inner = httpx2.AsyncHTTPTransport(trust_env=False)
    inner._pool = httpcore2.AsyncConnectionPool(
        ssl_context=httpx2.create_ssl_context(trust_env=False), network_backend=_GuardedBackend(settings.mcp.allow_private)
    )  # the transport's own pool, with the guarded backend (httpx2 takes no backend argument)
    return httpx2.AsyncClient(
        headers=headers, timeout=httpx2.Timeout(settings.mcp.connect_seconds, read=600), trust_env=False, follow_redirects=False,
        transport=_BoundedTransport(inner, settings.mcp.max_response_bytes),
    )  # fmt: skip


@contextlib.asynccontextmanager
async def open_client(server: ServerInfo, settings: Settings) -> AsyncIterator[Client]:
    """A connected SDK client (the protocol version negotiated), closed on leaving: must be left in the task that entered."""
    secrets = server.secrets(settings)
    if server.transport == "http":
        assert server.url is not None
        async with http_client(secrets["headers"], settings) as http:
            transport = streamable_http_client(server.url, http_client=http, max_sse_event_size=settings.mcp.max_response_bytes)
            async with Client(transport, cache=None, client_info=CLIENT_INFO) as client:
                yield client
        return
    params = StdioServerParameters(command=server.command[0], args=list(server.command[1:]), env=secrets["env"], cwd=settings.base_dir)
    async with Client(params, cache=None, client_info=CLIENT_INFO) as client:
        yield client


async def list_tools(client: Client, server: str) -> list[RemoteTool]:
    """Every tool the server lists (up to MAX_TOOLS), named for the model."""
    listed: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        page = await client.list_tools(cursor=cursor)
        for tool in page.tools:
            read_only = bool(tool.annotations is not None and tool.annotations.read_only_hint)
            listed.append({"name": tool.name, "description": tool.description or tool.title or "", "input_schema": tool.input_schema,
                           "read_only": read_only})  # fmt: skip
        cursor = page.next_cursor
        if not cursor or len(listed) >= MAX_TOOLS:
            break
    return remote_tools(server, listed)


def describe(exc: BaseException) -> str:
    """A short, secret-free account of why a connection failed (the innermost cause of a task group's error)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, MCPError):
        return exc.error.message
    text = str(exc).strip()
    return truncate(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, MAX_ERROR)


async def probe(server: ServerInfo, settings: Settings) -> list[RemoteTool]:
    """Connect afresh and list the tools (`mcp add`, `mcp test`); ToolError saying why when it cannot."""
    try:
        async with asyncio.timeout(settings.mcp.connect_seconds):
            async with open_client(server, settings) as client:
                return await list_tools(client, server.name)
    except TimeoutError:
        raise ToolError(f"MCP server {server.name} did not answer within {settings.mcp.connect_seconds:g} seconds") from None
    except Exception as exc:
        raise ToolError(f"could not connect to MCP server {server.name}: {describe(exc)}") from None


# -- results --


def render(result: Any, limit: int) -> str:
    """A tool result as text for the model: text blocks, text resources, a note for what cannot be shown; an error
    result raises ToolError with its text."""
    parts: list[str] = []
    for block in result.content:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource":
            text = getattr(block.resource, "text", None)
            parts.append(text if text is not None else f"(resource {block.resource.uri}: binary, not shown)")
        elif kind == "resource_link":
            parts.append(f"(link: {block.uri})")
        else:
            parts.append(f"({kind or 'content'} {getattr(block, 'mime_type', '')}, not shown)")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, default=str))
    text = "\n".join(parts) or "(no output)"
    if result.is_error:
        raise ToolError(truncate(text, MAX_ERROR))
    return truncate(text, limit)


# -- connections and the pool --


class Connection:
    """One open client to one server, owned by a task of its own; calls from any task of the loop."""

    def __init__(self, server: ServerInfo, settings: Settings) -> None:
        self.server, self.settings = server, settings
        self.client: Client | None = None
        self.tools: list[RemoteTool] = []
        self.error = ""
        self.used = time.monotonic()
        self.opened = 0.0
        self._ready, self._stop = asyncio.Event(), asyncio.Event()
        self._task = asyncio.create_task(self._own(), name=f"mcp:{server.name}")

    @property
    def dead(self) -> bool:
        return self._task.done()

    async def _own(self) -> None:
        started = time.monotonic()
        try:
            async with open_client(self.server, self.settings) as client:
                self.tools = await list_tools(client, self.server.name)
                self.client, self.opened = client, time.monotonic() - started
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # the transport's task group failed (or we were told to stop): this connection is over
            self.error = describe(exc) if not isinstance(exc, asyncio.CancelledError) else "closed"
            if self.client is not None:
                log.warning("MCP server %s: the connection broke: %s", self.server.name, self.error)
        finally:
            self.client = None
            self._ready.set()

    async def ready(self) -> Client:
        try:
            async with asyncio.timeout(self.settings.mcp.connect_seconds):
                await self._ready.wait()
        except TimeoutError:
            await self.close()
            raise ToolError(f"MCP server {self.server.name} did not answer within {self.settings.mcp.connect_seconds:g} seconds") from None
        if self.client is None:
            raise ToolError(f"could not connect to MCP server {self.server.name}: {self.error or 'closed'}")
        return self.client

    async def call(self, tool: RemoteTool, arguments: dict[str, Any], timeout: float) -> str:
        client = await self.ready()
        self.used = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                result = await client.call_tool(tool.name, arguments)
        except TimeoutError:
            raise ToolError(f"MCP server {self.server.name} did not answer {tool.name} within {timeout:g} seconds") from None
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED or self.dead:
                raise Broken(exc.error.message) from None
            raise ToolError(f"{self.server.name}: {truncate(exc.error.message, MAX_ERROR)}") from None
        except ToolError:
            raise
        except Exception as exc:
            raise Broken(describe(exc)) from None
        finally:
            self.used = time.monotonic()
        return render(result, self.settings.mcp.max_result_chars)

    async def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._task), 5)
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


class Pool:
    """A worker's connections, one per server (and version of it), reused by every turn."""

    def __init__(self) -> None:
        self.connections: dict[tuple[uuid.UUID, Any], Connection] = {}
        self.opened = 0  # connections made, for tests and benchmarks
        self._closing: set[asyncio.Task[None]] = set()

    def live(self, server: ServerInfo) -> Connection | None:
        conn = self.connections.get(server.key)
        return conn if conn is not None and conn.client is not None and not conn.dead else None

    async def connection(self, server: ServerInfo, settings: Settings, db: Database | None = None) -> Connection:
        self._sweep(settings.mcp.idle_seconds)
        conn = self.connections.get(server.key)
        if conn is None or conn.dead:
            for key in [k for k in self.connections if k[0] == server.id]:  # a broken one, or an older version of the server
                self._close_later(self.connections.pop(key))
            conn = self.connections[server.key] = Connection(server, settings)
            self.opened += 1
            await conn.ready()
            if db is not None and [t.as_json() for t in conn.tools] != [t.as_json() for t in server.tools]:
                await record_tools(db, server.tenant_id, server.id, conn.tools)
        await conn.ready()
        return conn

    async def call(self, server: ServerInfo, tool: RemoteTool, arguments: dict[str, Any], settings: Settings, db: Database | None) -> str:
        """Call a tool over the pooled connection; a broken connection is replaced (and a read-only call retried once)."""
        for attempt in (1, 2):
            conn = await self.connection(server, settings, db)
            try:
                return await conn.call(tool, arguments, server.timeout_seconds)
            except Broken as exc:
                self._close_later(self.connections.pop(server.key, conn))
                if attempt == 2 or not tool.read_only:
                    raise ToolError(
                        f"the connection to MCP server {server.name} broke during the call ({exc}); it may not have run. "
                        "It reconnects on the next call."
                    ) from None
                log.info("MCP server %s: connection broke; retrying read-only %s once", server.name, tool.name)
        raise AssertionError("unreachable")

    def _sweep(self, idle_seconds: float) -> None:
        now = time.monotonic()
        for key, conn in list(self.connections.items()):
            if conn.dead or (conn.client is not None and now - conn.used > idle_seconds):
                self._close_later(self.connections.pop(key))

    def _close_later(self, conn: Connection) -> None:
        task = asyncio.ensure_future(conn.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        conns, self.connections = list(self.connections.values()), {}
        await asyncio.gather(*(c.close() for c in conns), *self._closing, return_exceptions=True)


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Pool] = weakref.WeakKeyDictionary()


def pool() -> Pool:
    """This event loop's pool (a worker has one loop, so one pool)."""
    loop = asyncio.get_running_loop()
    found = _pools.get(loop)
    if found is None:
        found = _pools[loop] = Pool()
    return found


async def close_pool() -> None:
    """Close this loop's connections (stdio servers stop): the worker's shutdown, a test's end."""
    found = _pools.pop(asyncio.get_running_loop(), None)
    if found is not None:
        await found.close()


# -- the registry's provider --


def _secret_args(schema: dict[str, Any]) -> tuple[str, ...]:
    """Arguments the audit log must not keep: marked writeOnly or format password in the server's schema."""
    properties = schema.get("properties") or {}
    return tuple(k for k, v in properties.items() if isinstance(v, dict) and (v.get("writeOnly") or v.get("format") == "password"))


def as_tool(server: ServerInfo, remote: RemoteTool, settings: Settings, db: Database | None) -> Tool:
    async def run(arguments: dict[str, Any], ctx: ToolContext) -> str:
        return await pool().call(server, remote, arguments, settings, db)

    description = remote.description or f"{remote.name} (a tool of the {server.name} MCP server)"
    return Tool(remote.exposed, description, remote.input_schema, run, secret_args=_secret_args(remote.input_schema),
                origin=f"mcp:{server.name}", read_only=remote.read_only)  # fmt: skip


async def _listing(server: ServerInfo, settings: Settings, db: Database) -> list[RemoteTool]:
    """The freshest listing at hand: a live connection's, else the stored one, else (never listed) connect now."""
    live = pool().live(server)
    if live is not None:
        return live.tools
    if server.tools_seen_at is not None:
        return list(server.tools)
    try:
        return (await pool().connection(server, settings, db)).tools
    except ToolError as exc:
        log.warning("MCP server %s: its tools are not offered this turn: %s", server.name, exc)
        return []


async def provide_tools(request: ProviderRequest) -> list[Tool]:
    """The tools of the tenant's MCP servers that the agent's tool list names (and that serve this agent)."""
    names = {server_of(name) for name in request.names} - {None}
    if not names:
        return []
    settings, db = request.settings, request.db
    tools: list[Tool] = []
    for server in await list_servers(db, request.ctx.tenant_id):
        if server.name not in names or not server.serves(request.agent_name):
            continue
        listed = replace(server, tools=tuple(await _listing(server, settings, db)))
        tools += [as_tool(server, remote, settings, db) for remote in wanted(request.names, listed)]
    return tools
