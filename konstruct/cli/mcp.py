"""konstruct mcp …: a tenant's MCP servers, whose tools its agents may call."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.markup import escape

from konstruct.agent import mcp_servers as service
from konstruct.cli.common import (
    JsonOption,
    TenantOption,
    YesOption,
    actor,
    confirm_deletion,
    out,
    print_fields,
    print_json,
    print_table,
    settings,
    tenant_for,
    who,
    with_database,
    with_tenant,
)
from konstruct.db.engine import Database
from konstruct.errors import ValidationError

app = typer.Typer(help="A tenant's MCP (Model Context Protocol) servers: tools its agents may call.", no_args_is_help=True)

NameArgument = typer.Argument(..., help="The server's name, the namespace of its tools (shop → shop__lookup_order).")


async def _connect(server: service.ServerInfo, cfg: Any) -> list[service.RemoteTool]:
    from konstruct.agent.tools.mcp_client import probe  # the SDK takes seconds to import: only when connecting
    from konstruct.agent.tools.registry import ToolError

    try:
        return await probe(server, cfg)
    except ToolError as exc:
        raise ValidationError(str(exc)) from None


def _spec(name: str, url: str | None, command: str | None, headers: list[str], env: list[str], agents: list[str],
          timeout: float | None) -> service.ServerSpec:  # fmt: skip
    service.check_name(name)
    if (url is None) == (command is None):
        raise ValidationError("give the server as --url URL (streamable HTTP) or --command 'PROGRAM ARGS' (stdio), one of them")
    if url is not None and env:
        raise ValidationError("--env is for a --command server; an HTTP server takes --header")
    if command is not None and headers:
        raise ValidationError("--header is for a --url server; a --command server takes --env")
    if timeout is not None and not 0 < timeout <= 600:
        raise ValidationError("--timeout: seconds for one call, more than 0 and at most 600")
    return service.ServerSpec(
        name, "http" if url else "stdio", url, tuple(service.parse_command(command)) if command else (),
        service.parse_assignments(headers, "header"), service.parse_assignments(env, "env"), tuple(dict.fromkeys(agents)), timeout,
    )  # fmt: skip


@app.command("add")
def add(
    ctx: typer.Context,
    name: str = NameArgument,
    tenant: str = TenantOption,
    url: str | None = typer.Option(None, "--url", help="The server's streamable HTTP endpoint, e.g. https://mcp.example.com/mcp."),
    command: str | None = typer.Option(None, "--command", help="Run the server as this command over stdio (platform admins only)."),
    headers: list[str] | None = typer.Option(
        None, "--header", help="An HTTP header, 'NAME=VALUE'; secrets from the environment: 'Authorization=Bearer $env:VAR' (repeat)."
    ),
    env: list[str] | None = typer.Option(None, "--env", help="An environment variable for a --command server, 'NAME=$env:VAR' (repeat)."),
    agents: list[str] | None = typer.Option(None, "--agent", help="Only this agent may use the server's tools (repeat; default: all)."),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds one tool call may take (default: [mcp] call_seconds)."),
    replace: bool = typer.Option(False, "--replace", help="Change the server of this name instead of refusing."),
    no_check: bool = typer.Option(False, "--no-check", help="Store it without connecting first (its tools are listed on first use)."),
    as_json: bool = JsonOption,
) -> None:
    """Add an MCP server to a tenant: connect, list its tools, keep it (headers encrypted, shown by hint)."""
    spec = _spec(name, url, command, headers or [], env or [], agents or [], timeout)
    cfg = settings(ctx)

    async def go(db: Database) -> tuple[service.ServerInfo, float]:
        t = await tenant_for(db, tenant, "mcp.write")
        principal = await who(db)
        existing = {s.name: s for s in await service.list_servers(db, t)}.get(name)
        if spec.transport == "stdio" or (existing is not None and existing.transport == "stdio"):
            principal.require("mcp.stdio")
        checked = spec if spec.url is None else service.ServerSpec(**{**spec.__dict__, "url": await service.check_url(spec.url, cfg)})
        started = time.perf_counter()
        tools = None if no_check else await _connect(service.draft(checked, cfg, t.id), cfg)
        took = time.perf_counter() - started
        return await service.save_server(db, cfg, t, checked, actor=actor(), replace=replace, tools=tools), took

    server, took = with_database(ctx, go)
    if as_json:
        print_json(server.as_json())
        return
    verb = "added" if not replace else "saved"
    listed = f"{len(server.tools)} tools ({took * 1000:.0f} ms)" if not no_check else "not connected yet (--no-check)"
    out.print(f"[green]{verb}[/green] MCP server {name} for {tenant}: {listed}")
    if server.tools:
        _tools_table(server.tools)
    out.print(f"agents use it when their tools name it: `konstruct agent update NAME --tenant {tenant} --tools {name}`")


def _tools_table(tools: Any) -> None:
    print_table(None, ["tool (as the model sees it)", "read-only", "description"],
                [(t.exposed, "yes" if t.read_only else "no", escape(_short(t.description))) for t in tools])  # fmt: skip


def _short(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _secrets(server: service.ServerInfo) -> str:
    shown = {**server.secret_hints.get("headers", {}), **server.secret_hints.get("env", {})}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or "(none)"


@app.command("list")
def list_(ctx: typer.Context, tenant: str = TenantOption, as_json: bool = JsonOption) -> None:
    """List a tenant's MCP servers."""
    servers = with_tenant(ctx, tenant, "mcp.read", service.list_servers)
    if as_json:
        print_json([s.as_json() for s in servers])
    elif not servers:
        out.print(f"tenant {tenant} has no MCP servers: `konstruct mcp add --tenant {tenant} NAME --url URL`")
    else:
        rows = [(s.name, s.transport, escape(s.where), ", ".join(s.agents) or "(all)", len(s.tools), escape(_secrets(s))) for s in servers]
        print_table(None, ["name", "transport", "url / command", "agents", "tools", "secrets"], rows)


@app.command("show")
def show(ctx: typer.Context, name: str = NameArgument, tenant: str = TenantOption, as_json: bool = JsonOption) -> None:
    """Show one MCP server: where it is, its secrets by hint, who may use it, its tools."""
    server = with_tenant(ctx, tenant, "mcp.read", lambda db, t: service.get_server(db, t, name))
    if as_json:
        print_json(server.as_json())
        return
    print_fields({
        "name": server.name, "transport": server.transport, "url / command": escape(server.where), "secrets": escape(_secrets(server)),
        "agents": ", ".join(server.agents) or "(all)", "timeout": f"{server.timeout_seconds:g} s",
        "tools listed": server.tools_seen_at or "never (run `konstruct mcp test`)",
    })  # fmt: skip
    if server.tools:
        _tools_table(server.tools)


@app.command("test")
def test(ctx: typer.Context, name: str = NameArgument, tenant: str = TenantOption, as_json: bool = JsonOption) -> None:
    """Connect to an MCP server now and list its tools with their descriptions (the stored listing is refreshed)."""
    cfg = settings(ctx)

    async def go(db: Database) -> tuple[service.ServerInfo, list[service.RemoteTool], float, bool]:
        t = await tenant_for(db, tenant, "mcp.read")
        server = await service.get_server(db, t, name)
        if server.transport == "stdio":
            (await who(db)).require("mcp.stdio")
        started = time.perf_counter()
        try:
            tools = await _connect(server, cfg)
        except ValidationError as exc:
            await service.tested(db, t, server, actor=actor(), ok=False, detail={"error": str(exc)[:300]})
            raise
        took = time.perf_counter() - started
        changed = await service.record_tools(db, t.id, server.id, tools)
        await service.tested(db, t, server, actor=actor(), ok=True, detail={"tools": len(tools), "ms": round(took * 1000)})
        return server, tools, took, changed

    server, tools, took, changed = with_database(ctx, go)
    if as_json:
        print_json({"name": server.name, "ok": True, "ms": round(took * 1000), "changed": changed, "tools": [t.as_json() for t in tools]})
        return
    note = " (the listing changed: stored)" if changed else ""
    out.print(f"[green]connected[/green] to {server.name} in {took * 1000:.0f} ms: {len(tools)} tools{note}")
    if tools:
        _tools_table(tools)


@app.command("remove")
def remove(ctx: typer.Context, name: str = NameArgument, tenant: str = TenantOption, yes: bool = YesOption) -> None:
    """Remove an MCP server; agents' tool lists stop naming it."""
    confirm_deletion(yes, f"MCP server {name!r} of {tenant}", "its tools from every agent")
    updated = with_tenant(ctx, tenant, "mcp.write", lambda db, t: service.remove_server(db, t, name, actor=actor()))
    also = f"; its tools left the tool lists of {', '.join(updated)}" if updated else ""
    out.print(f"[green]removed[/green] MCP server {name}{also}")
