"""A tenant's MCP servers: what `konstruct mcp add|list|show|remove|test` and plan/apply change, and what a turn reads.

A server is streamable HTTP at a URL (checked against private addresses unless `[mcp] allow_private`), or a command
the worker runs over stdio (only a platform admin adds one). Its headers (http) or environment variables (stdio) are
stored encrypted and only ever shown by hint. Its tools reach the model namespaced by the server, `shop__lookup_order`
(OpenAI's rule for names: letters, digits, `_` and `-`, at most 64): `exposed_names` sanitises them and keeps the
mapping, collisions included. An agent uses a server's tools when its tool list names them (`shop` or `shop__*` for
all, `shop__lookup_order` for one) and the server's `agents` (empty: all) include it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from konstruct import audit
from konstruct.config import Settings, hint
from konstruct.db.engine import Database
from konstruct.db.models import Agent, McpServer
from konstruct.errors import ConflictError, NotFoundError, ValidationError
from konstruct.netguard import AddressError, normalise_host, private_address
from konstruct.secrets import decrypt, encrypt
from konstruct.tenancy.tenants import TenantInfo

SEPARATOR = "__"
MAX_TOOL_NAME = 64
MAX_TOOLS = 128  # per server: more would crowd the prompt
MAX_DESCRIPTION = 1024
_SERVER_NAME = re.compile(r"^[a-z][a-z0-9-]{0,29}$")
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_-]")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,100}$")
_ENV_REF = re.compile(r"\$env:([A-Za-z_][A-Za-z0-9_]*)")
_SECRET_LOOKING = re.compile(r"(auth|token|key|secret|password|cookie|session)", re.IGNORECASE)


@dataclass(frozen=True)
class RemoteTool:
    """One tool a server listed: its own name, the name the model sees, and what the model is told about it."""

    name: str
    exposed: str
    description: str
    input_schema: dict[str, Any]
    read_only: bool = False  # the server's readOnlyHint: it changes nothing

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "exposed": self.exposed, "description": self.description, "input_schema": self.input_schema,
                "read_only": self.read_only}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RemoteTool:
        return cls(data["name"], data["exposed"], data.get("description") or "", dict(data.get("input_schema") or {}),
                   bool(data.get("read_only")))  # fmt: skip


@dataclass(frozen=True)
class ServerInfo:
    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    transport: str  # http | stdio
    url: str | None
    command: tuple[str, ...]
    secret_hints: dict[str, dict[str, str]]  # {"headers": {name: hint}, "env": {name: hint}}
    agents: tuple[str, ...]
    timeout_seconds: float
    tools: tuple[RemoteTool, ...]
    tools_seen_at: datetime | None
    updated_at: datetime
    sealed: bytes | None = field(default=None, repr=False)  # the encrypted secrets, opened only to connect

    @classmethod
    def from_row(cls, row: McpServer) -> ServerInfo:
        return cls(row.id, row.tenant_id, row.name, row.transport, row.url, tuple(row.command or ()), dict(row.secret_hints or {}),
                   tuple(row.agents or ()), float(row.timeout_seconds), tuple(RemoteTool.from_json(t) for t in row.tools or ()),
                   row.tools_seen_at, row.updated_at, bytes(row.secrets) if row.secrets is not None else None)  # fmt: skip

    @property
    def key(self) -> tuple[uuid.UUID, datetime]:
        """What a pooled connection is kept under: a changed server (new URL, headers) gets a new connection."""
        return (self.id, self.updated_at)

    @property
    def where(self) -> str:
        return self.url or shlex.join(self.command)

    def secrets(self, settings: Settings) -> dict[str, dict[str, str]]:
        """The headers and environment, decrypted (for connecting only: never printed or logged)."""
        if self.sealed is None:
            return {"headers": {}, "env": {}}
        opened = _loads(decrypt(settings, self.sealed))
        return {"headers": dict(opened.get("headers") or {}), "env": dict(opened.get("env") or {})}

    def serves(self, agent: str) -> bool:
        return not self.agents or agent in self.agents

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "transport": self.transport,
            "url": self.url,
            "command": list(self.command) or None,
            "headers": self.secret_hints.get("headers", {}),
            "env": self.secret_hints.get("env", {}),
            "agents": list(self.agents),
            "timeout_seconds": self.timeout_seconds,
            "tools": [t.as_json() for t in self.tools],
            "tools_seen_at": self.tools_seen_at.isoformat() if self.tools_seen_at else None,
            "updated_at": self.updated_at.isoformat(),
        }


def _loads(text: str) -> dict[str, Any]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


# -- names --


def check_name(name: str) -> str:
    if not _SERVER_NAME.match(name):
        raise ValidationError(f"MCP server name {name!r}: lower case letters, digits and -, starting with a letter, at most 30 (e.g. shop)")
    from konstruct.agent.tools.registry import default_registry

    if default_registry().get(name) is not None:
        raise ValidationError(f"MCP server name {name!r} is a built-in tool's name: choose another")
    return name


def exposed_names(server: str, names: Sequence[str]) -> dict[str, str]:
    """Each tool name → the name the model sees: `server__tool`, sanitised to OpenAI's rule (letters, digits, _ and -, at
    most 64). Deterministic: names that need no change keep it; a changed one that would collide (or was cut) ends in
    a short hash of its own name."""
    prefix = server + SEPARATOR
    room = MAX_TOOL_NAME - len(prefix)
    out = {name: prefix + name for name in set(names) if not _NOT_ALLOWED.search(name) and len(name) <= room}
    taken = set(out.values())
    for name in sorted(set(names) - set(out)):
        clean = _NOT_ALLOWED.sub("_", name) or "tool"
        candidate = prefix + clean
        if candidate in taken or len(clean) > room:
            candidate = prefix + clean[: room - 7] + "_" + hashlib.sha1(name.encode()).hexdigest()[:6]
        while candidate in taken:  # a hash collision too: extremely unlikely, still handled
            candidate = candidate[:-1] + "x"
        taken.add(candidate)
        out[name] = candidate
    return out


def remote_tools(server: str, listed: Sequence[Mapping[str, Any]]) -> list[RemoteTool]:
    """The tools a server listed ({name, description, input_schema, read_only}), named for the model, at most MAX_TOOLS."""
    listed = [t for t in listed if isinstance(t.get("name"), str) and t["name"]][:MAX_TOOLS]
    names = exposed_names(server, [t["name"] for t in listed])
    tools = []
    for item in listed:
        schema = dict(item.get("input_schema") or {})
        schema["type"] = "object"  # MCP requires it; a server that forgot still gets a valid OpenAI function
        schema.setdefault("properties", {})
        description = str(item.get("description") or "")[:MAX_DESCRIPTION]
        tools.append(RemoteTool(item["name"], names[item["name"]], description, schema, bool(item.get("read_only"))))
    return sorted(tools, key=lambda t: t.exposed)


def wanted(names: Sequence[str], server: ServerInfo) -> list[RemoteTool]:
    """The server's tools an agent's tool list asks for: `shop` or `shop__*` for all, `shop__x` for one."""
    if server.name in names or f"{server.name}{SEPARATOR}*" in names:
        return list(server.tools)
    return [t for t in server.tools if t.exposed in names]


def server_of(name: str) -> str | None:
    """The server a tool-list entry names (`shop`, `shop__*`, `shop__x` → shop), or None for a plain tool name."""
    if SEPARATOR in name:
        return name.split(SEPARATOR, 1)[0]
    return name if _SERVER_NAME.match(name) else None


# -- headers, environment, URLs --


def parse_assignments(items: Sequence[str], what: str) -> dict[str, str]:
    """`NAME=VALUE` items (`--header`, `--env`) with every `$env:VAR` in a value read from the environment. A value
    that looks secret must come from the environment, so it never lands in shell history."""
    pattern = _HEADER_NAME if what == "header" else _ENV_NAME
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not pattern.match(name):
            raise ValidationError(f"--{what} {item!r}: give NAME=VALUE, e.g. --{what} 'Authorization=Bearer $env:SHOP_TOKEN'")
        out[name] = resolve_value(name, value.strip(), what)
    return out


def looks_secret(name: str) -> bool:
    """A header or variable whose value must come from the environment (Authorization, X-Api-Key, …)."""
    return bool(_SECRET_LOOKING.search(name))


def resolve_value(name: str, value: str, what: str = "header") -> str:
    if value.startswith(":") and _ENV_NAME.match(value[1:]):
        raise ValidationError(f"--{what} {name}: the shell expanded $env; quote it: --{what} '{name}=$env:{value[1:]}'")
    refs = _ENV_REF.findall(value)
    for ref in refs:
        if not os.environ.get(ref, "").strip():
            raise ValidationError(f"--{what} {name}: environment variable {ref} is not set or empty")
    if not refs and looks_secret(name):
        raise ValidationError(
            f"--{what} {name}: a secret comes from the environment: --{what} '{name}=Bearer $env:VAR' or '{name}=$env:VAR'"
        )
    resolved = _ENV_REF.sub(lambda m: os.environ[m[1]].strip(), value)
    if not resolved or any(c in resolved for c in "\r\n\0"):
        raise ValidationError(f"--{what} {name}: the value is empty or spans lines")
    return resolved


def parse_command(command: str | Sequence[str]) -> list[str]:
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if not argv or not argv[0].strip():
        raise ValidationError("--command: give the program and its arguments, e.g. --command 'python /opt/mcp/shop.py'")
    return argv


async def check_url(url: str, settings: Settings) -> str:
    """An http(s) URL whose host resolves to public addresses only (unless [mcp] allow_private)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"--url {url!r}: give the server's http:// or https:// endpoint, e.g. https://mcp.example.com/mcp")
    if parts.username or parts.password:
        raise ValidationError("--url: no user name or password in the URL; pass credentials with --header 'Authorization=Bearer $env:VAR'")
    if not settings.mcp.allow_private:
        await check_public(normalise_host(parts.hostname), parts.port or (443 if parts.scheme == "https" else 80))
    return url.strip()


async def check_public(host: str, port: int) -> None:
    try:
        refused = await private_address(host, port)
    except AddressError as exc:
        raise ValidationError(f"--url: {exc}") from None
    if refused is not None:
        raise ValidationError(
            f"--url: {host} resolves to a private or reserved address ({refused}); refused (a platform admin can allow "
            "private MCP servers with [mcp] allow_private = true)"
        )


def hints(secrets: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    return {kind: {name: hint(value) for name, value in values.items()} for kind, values in secrets.items() if values}


# -- storage --


@dataclass(frozen=True)
class ServerSpec:
    """What `mcp add` (or a declaration) asks for, checked."""

    name: str
    transport: str
    url: str | None = None
    command: tuple[str, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    agents: tuple[str, ...] = ()
    timeout_seconds: float | None = None


async def _check_agents(session: Any, tenant: TenantInfo, agents: Sequence[str]) -> None:
    have = set(await session.scalars(select(Agent.name)))
    missing = [a for a in agents if a not in have]
    if missing:
        raise NotFoundError(f"tenant {tenant.slug} has no agent {missing[0]!r} (its agents: {', '.join(sorted(have)) or 'none'})")


async def save_server(
    db: Database, settings: Settings, tenant: TenantInfo, spec: ServerSpec, *, actor: str, replace: bool = False,
    tools: Sequence[RemoteTool] | None = None,
) -> ServerInfo:  # fmt: skip
    """Add a server (or, with replace, change the one of that name), audited; `tools`: a listing just taken."""
    secrets = {"headers": spec.headers, "env": spec.env}
    values: dict[str, Any] = {
        "transport": spec.transport, "url": spec.url, "command": list(spec.command) or None, "agents": list(spec.agents),
        "secrets": encrypt(settings, json.dumps(secrets)) if spec.headers or spec.env else None,
        "secret_hints": hints(secrets), "timeout_seconds": spec.timeout_seconds or settings.mcp.call_seconds, "updated_at": func.now(),
    }  # fmt: skip
    if tools is not None:
        values.update(tools=[t.as_json() for t in tools], tools_seen_at=func.now())
    async with db.tenant(tenant_id=tenant.id) as session:
        await _check_agents(session, tenant, spec.agents)
        existing = await session.scalar(select(McpServer).where(McpServer.name == spec.name).with_for_update())
        if existing is not None and not replace:
            raise ConflictError(f"tenant {tenant.slug} already has an MCP server {spec.name!r}: pass --replace to change it")
        statement: Any
        if existing is None:
            statement = insert(McpServer).values(tenant_id=tenant.id, name=spec.name, created_by=actor, **values)
        else:
            statement = update(McpServer).where(McpServer.id == existing.id).values(**values)
        try:
            row = await session.scalar(statement.returning(McpServer))
        except IntegrityError as exc:
            if "unique" not in str(exc.orig).lower():
                raise
            raise ConflictError(f"tenant {tenant.slug} already has an MCP server {spec.name!r}") from None
        assert row is not None
        info = ServerInfo.from_row(row)
        detail = {"transport": spec.transport, "where": info.where, "headers": sorted(spec.headers), "env": sorted(spec.env),
                  "agents": list(spec.agents), "tools": len(info.tools)}  # fmt: skip
        action = "mcp.added" if existing is None else "mcp.changed"
        await audit.record(session, tenant_id=tenant.id, actor=actor, action=action, target=spec.name, detail=detail)
        return info


async def list_servers(db: Database, tenant: TenantInfo | uuid.UUID) -> list[ServerInfo]:
    tenant_id = tenant if isinstance(tenant, uuid.UUID) else tenant.id
    async with db.tenant(tenant_id=tenant_id) as session:
        return [ServerInfo.from_row(row) for row in await session.scalars(select(McpServer).order_by(McpServer.name))]


async def get_server(db: Database, tenant: TenantInfo, name: str) -> ServerInfo:
    async with db.tenant(tenant_id=tenant.id) as session:
        row = await session.scalar(select(McpServer).where(McpServer.name == name))
        if row is None:
            names = list(await session.scalars(select(McpServer.name).order_by(McpServer.name)))
            have = (
                f" (its servers: {', '.join(names)})"
                if names
                else f": add one with `konstruct mcp add --tenant {tenant.slug} NAME --url URL`"
            )
            raise NotFoundError(f"tenant {tenant.slug} has no MCP server {name!r}{have}")
        return ServerInfo.from_row(row)


async def remove_server(db: Database, tenant: TenantInfo, name: str, *, actor: str) -> list[str]:
    """Remove a server, and its names from the agents' tool lists (in one transaction). Returns those agents."""
    server = await get_server(db, tenant, name)
    changed: list[str] = []
    async with db.tenant(tenant_id=tenant.id) as session:
        for agent in await session.scalars(select(Agent).with_for_update()):
            tools = list((agent.settings or {}).get("tools") or [])
            kept = [t for t in tools if server_of(t) != name or t in _plain_tool_names()]
            if kept != tools:
                await session.execute(update(Agent).where(Agent.id == agent.id).values(settings={**agent.settings, "tools": kept}))
                changed.append(agent.name)
        await session.execute(delete(McpServer).where(McpServer.id == server.id))
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="mcp.removed", target=name, detail={"agents_updated": changed})
    return changed


async def record_tools(db: Database, tenant_id: uuid.UUID, server_id: uuid.UUID, tools: Sequence[RemoteTool]) -> bool:
    """Keep a fresh listing (when it changed). Returns whether it did."""
    listing = [t.as_json() for t in tools]
    async with db.tenant(tenant_id=tenant_id) as session:
        result = await session.execute(
            update(McpServer).where(McpServer.id == server_id, McpServer.tools != listing).values(tools=listing, tools_seen_at=func.now())
        )
        return bool(getattr(result, "rowcount", 0))


def _plain_tool_names() -> set[str]:
    from konstruct.agent.tools.registry import default_registry

    return set(default_registry().names())


async def check_tool_names(db: Database, tenant: TenantInfo, agent: str, names: Sequence[str]) -> None:
    """Tool-list entries that name MCP tools must name a server of the tenant that serves this agent (and, for one
    tool, a tool it listed). `names`: the entries that are not built-in or plugin tools."""
    servers = {s.name: s for s in await list_servers(db, tenant)}
    for name in names:
        server = servers.get(server_of(name) or "")
        if server is None:
            known = ", ".join(sorted(_plain_tool_names() | set(servers)))
            raise ValidationError(f"unknown tool {name!r}: available are {known} (and an MCP server's tools as SERVER__TOOL)")
        if not server.serves(agent):
            raise ValidationError(f"MCP server {server.name} is not for agent {agent} (its agents: {', '.join(server.agents)})")
        listed = server.tools_seen_at is not None  # never listed (added without a check): any of its tool names may come
        if listed and name not in (server.name, f"{server.name}{SEPARATOR}*") and name not in {t.exposed for t in server.tools}:
            have = ", ".join(t.exposed for t in server.tools) or "none"
            raise ValidationError(f"MCP server {server.name} has no tool {name!r} (its tools: {have})")


def draft(spec: ServerSpec, settings: Settings, tenant_id: uuid.UUID) -> ServerInfo:
    """A server not stored yet (to connect to it before `mcp add` keeps it)."""
    secrets = {"headers": spec.headers, "env": spec.env}
    sealed = encrypt(settings, json.dumps(secrets)) if spec.headers or spec.env else None
    now = datetime.now().astimezone()
    return ServerInfo(uuid.uuid4(), tenant_id, spec.name, spec.transport, spec.url, spec.command, hints(secrets), spec.agents,
                      spec.timeout_seconds or settings.mcp.call_seconds, (), None, now, sealed)  # fmt: skip


async def tested(db: Database, tenant: TenantInfo, server: ServerInfo, *, actor: str, ok: bool, detail: dict[str, Any]) -> None:
    async with db.tenant(tenant_id=tenant.id) as session:
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="mcp.tested", target=server.name, detail={"ok": ok, **detail})
