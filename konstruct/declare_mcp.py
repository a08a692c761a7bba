"""`[[tenants.mcp]]` in a declaration: a tenant's MCP servers for plan/apply, with the fields `konstruct mcp add` takes.

A secret is never written in the file: a header or environment value names an environment variable (`Bearer
$env:SHOP_TOKEN`), read when the file is loaded, as the command reads `--header`. The plan compares the stored
(decrypted) values with the declared ones and shows both by hint only; apply connects and lists the tools first
(unless `check = false`), then stores the server through the same service (and audit events) as the command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from konstruct.agent import mcp_servers as service
from konstruct.config import Settings, hint
from konstruct.db.engine import Database
from konstruct.errors import ValidationError
from konstruct.tenancy.tenants import TenantInfo

Planned = tuple[str, str, dict[str, tuple[Any, Any]], Any]  # (action, server name, fields: (now, then), spec)


class McpSpec(BaseModel):
    """An MCP server (`konstruct mcp add`): `url` (streamable HTTP) or `command` (stdio, run by the worker)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    url: str | None = None
    command: str | list[str] | None = None
    headers: dict[str, str] = Field(default_factory=dict)  # NAME = "… $env:VAR …" (http)
    env: dict[str, str] = Field(default_factory=dict)  # NAME = "$env:VAR" (stdio)
    agents: list[str] = Field(default_factory=list)
    timeout: float | None = Field(default=None, gt=0, le=600)
    check: bool = True  # connect and list the tools when applied (`mcp add` without --no-check)
    _server: service.ServerSpec | None = PrivateAttr(default=None)

    @property
    def server(self) -> service.ServerSpec:
        assert self._server is not None, "checked by load()"
        return self._server


def check(slug: str, entries: list[McpSpec], declared_agents: set[str]) -> None:
    """Each server checked as `mcp add` checks its options, its secrets read from the environment now."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValidationError(f"tenant {slug}: an MCP server is declared twice: each name once")
    for entry in entries:
        where = f"tenant {slug}, MCP server {entry.name}"
        try:
            entry._server = _server(entry)
        except ValidationError as exc:
            raise ValidationError(f"{where}: {exc}") from None
        unknown = sorted(set(entry.agents) - declared_agents)
        if unknown and declared_agents:  # with no agents declared they may exist already: apply checks them
            raise ValidationError(f"{where}: no agent {unknown[0]!r} is declared")


def _server(entry: McpSpec) -> service.ServerSpec:
    service.check_name(entry.name)
    if (entry.url is None) == (entry.command is None):
        raise ValidationError("give url (streamable HTTP) or command (stdio), one of them")
    if entry.url is not None and entry.env:
        raise ValidationError("env is for a command server; an HTTP server takes headers")
    if entry.command is not None and entry.headers:
        raise ValidationError("headers are for a url server; a command server takes env")
    headers, env = _resolved(entry.headers, "header"), _resolved(entry.env, "env")
    command = tuple(service.parse_command(entry.command)) if entry.command is not None else ()
    url = entry.url.strip() if entry.url is not None else None  # as check_url stores it
    return service.ServerSpec(entry.name, "http" if url is not None else "stdio", url, command, headers, env, tuple(dict.fromkeys(entry.agents)),
                              entry.timeout)  # fmt: skip


def _resolved(values: dict[str, str], what: str) -> dict[str, str]:
    """Header (or environment) values with `$env:VAR` read, checked as `--header` is; a secret's value only by reference."""
    key = "headers" if what == "header" else "env"
    for name, value in values.items():
        if "$env:" not in value and service.looks_secret(name):
            raise ValidationError(
                f'{key}.{name}: a secret is never written in the file: give it as "Bearer $env:VAR" or "$env:VAR" and set VAR in the environment'
            )
    try:
        return service.parse_assignments([f"{k}={v}" for k, v in values.items()], what)
    except ValidationError as exc:
        raise ValidationError(str(exc).replace(f"--{what} ", f"{key}.")) from None


def _state(spec: service.ServerSpec, settings: Settings) -> dict[str, Any]:
    return {"transport": spec.transport, "url": spec.url, "command": list(spec.command) or None, "agents": list(spec.agents),
            "timeout_seconds": float(spec.timeout_seconds or settings.mcp.call_seconds), "headers": spec.headers,
            "env": spec.env}  # fmt: skip


def _stored(server: service.ServerInfo, settings: Settings) -> dict[str, Any]:
    opened = server.secrets(settings)  # compared only; what is shown are hints
    return {"transport": server.transport, "url": server.url, "command": list(server.command) or None, "agents": list(server.agents),
            "timeout_seconds": server.timeout_seconds, "headers": opened["headers"], "env": opened["env"]}  # fmt: skip


def _fields(now: dict[str, Any], then: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """What changes; each header or variable on its own (`headers.Authorization`), by hint only."""
    plain = {
        k: (now.get(k), v) for k, v in then.items() if k not in ("headers", "env") and now.get(k) != v and (now or v not in (None, []))
    }
    return {**plain, **_secret_fields("headers", now.get("headers") or {}, then["headers"]),
            **_secret_fields("env", now.get("env") or {}, then["env"])}  # fmt: skip


def _secret_fields(key: str, have: Mapping[str, str], want: Mapping[str, str]) -> dict[str, tuple[Any, Any]]:
    """`…3f9a → …77aa`; a new value that ends alike shows as `…3f9a (changed)`; a removed one → None."""
    fields: dict[str, tuple[Any, Any]] = {}
    for name in sorted(set(have) | set(want)):
        old, new = have.get(name), want.get(name)
        if old == new:
            continue
        shown_new = None if new is None else hint(new)
        if old is not None and shown_new == hint(old):
            shown_new = f"{shown_new} (changed)"
        fields[f"{key}.{name}"] = (None if old is None else hint(old), shown_new)
    return fields


async def changes(db: Database, settings: Settings, tenant: TenantInfo | None, entries: list[McpSpec], *, prune: bool) -> list[Planned]:
    """What apply would do to the tenant's MCP servers (`tenant` None: a tenant yet to be created)."""
    stored = {s.name: s for s in await service.list_servers(db, tenant)} if tenant is not None else {}
    planned: list[Planned] = []
    for entry in entries:
        have = stored.get(entry.name)
        fields = _fields(_stored(have, settings) if have is not None else {}, _state(entry.server, settings))
        if have is not None and not fields:
            continue
        if "url" in fields and entry.server.url is not None:
            await service.check_url(entry.server.url, settings)  # refused in the plan rather than half-way through apply
        planned.append(("create" if have is None else "change", entry.name, fields, entry))
    if prune:
        declared = {e.name for e in entries}
        planned += [("delete", name, {}, None) for name in sorted(stored) if name not in declared]
    return planned


async def apply(db: Database, settings: Settings, tenant: TenantInfo, action: str, name: str, entry: McpSpec | None, *, actor: str) -> None:
    """One planned change, through the service `konstruct mcp add|remove` use (audited there)."""
    if action == "delete" or entry is None:
        await service.remove_server(db, tenant, name, actor=actor)
        return
    spec = entry.server
    if spec.url is not None:
        spec = dataclasses.replace(spec, url=await service.check_url(spec.url, settings))
    tools = await _listed(service.draft(spec, settings, tenant.id), settings) if entry.check else None
    await service.save_server(db, settings, tenant, spec, actor=actor, replace=action == "change", tools=tools)


async def _listed(server: service.ServerInfo, settings: Settings) -> list[service.RemoteTool]:
    from konstruct.agent.tools.mcp_client import probe  # the SDK takes seconds to import: only when connecting
    from konstruct.agent.tools.registry import ToolError

    try:
        return await probe(server, settings)
    except ToolError as exc:
        raise ValidationError(f"{exc} (or declare it with check = false to store it without connecting)") from None
