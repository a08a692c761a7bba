"""konstruct channel …: connect Slack workspaces, choose which agent answers where."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import typer
from slack_sdk.errors import SlackApiError

from konstruct.agent.agents import list_agents
from konstruct.channels import connections as service
from konstruct.channels.connections import ConnectionInfo
from konstruct.channels.slack.client import web_client
from konstruct.channels.slack.manifest import agent_description, app_manifest
from konstruct.channels.slack.oauth import install_link
from konstruct.channels.slack.sockets import SocketConnection, SocketState, socket_connections, socket_states
from konstruct.channels.whatsapp.graph import Graph, GraphError
from konstruct.cli.common import (
    EveryTenantOption,
    JsonOption,
    TenantOption,
    YesOption,
    actor,
    confirm_deletion,
    database,
    out,
    print_fields,
    print_json,
    print_table,
    run,
    secret_input,
    settings,
    tenants_for,
    with_database,
    with_tenant,
)
from konstruct.config import Settings, hint
from konstruct.db.engine import Database
from konstruct.errors import KonstructError, ValidationError
from konstruct.tenancy.tenants import TenantInfo

app = typer.Typer(help="Connect channels (Slack, WhatsApp) to tenants and route them to agents.", no_args_is_help=True)


@app.command("connect")
def connect(
    ctx: typer.Context,
    kind: str = typer.Argument(..., help="The channel: slack or whatsapp."),
    tenant: str = TenantOption,
    single_workspace: bool = typer.Option(
        False, "--single-workspace", help="Slack: connect one workspace with its own app's bot token (asked, hidden)."
    ),
    bot_token_env: str | None = typer.Option(
        None, "--bot-token-env", help="Slack single-workspace: environment variable holding the bot token (xoxb-…)."
    ),
    signing_secret_env: str | None = typer.Option(
        None, "--signing-secret-env", help="Slack single-workspace: environment variable holding the app's signing secret."
    ),
    app_token_env: str | None = typer.Option(
        None,
        "--app-token-env",
        help="Slack single-workspace, Socket Mode: environment variable holding the app-level token (xapp-…, connections:write).",
    ),
    phone_number_id: str | None = typer.Option(None, "--phone-number-id", help="WhatsApp: the business number's phone-number id."),
    access_token_env: str | None = typer.Option(
        None, "--access-token-env", help="WhatsApp: environment variable holding the access token (else asked, hidden)."
    ),
    app_secret_env: str | None = typer.Option(
        None, "--app-secret-env", help="WhatsApp: environment variable holding the Meta app secret (else asked, hidden)."
    ),
    verify_token_env: str | None = typer.Option(
        None, "--verify-token-env", help="WhatsApp: environment variable holding the webhook verify token (else asked, hidden)."
    ),
    agent: str | None = typer.Option(
        None, "--agent", help="The agent answering where no route says otherwise (default: the tenant's first)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Connect Slack (an install link, or one workspace by its bot token) or a WhatsApp Business number."""
    if kind not in ("slack", "whatsapp"):
        raise ValidationError(f"unknown channel {kind!r}: choose slack or whatsapp")
    cfg = settings(ctx)
    if kind == "whatsapp":
        number = whatsapp_number(phone_number_id)
        connection, created = with_tenant(ctx, tenant, "channel.write", lambda db, t: connect_whatsapp(
            db, cfg, t, number, access_token_env=access_token_env, app_secret_env=app_secret_env,
            verify_token_env=verify_token_env, agent=agent))  # fmt: skip
        report_whatsapp(cfg, tenant, connection, created, as_json)
        return
    if phone_number_id or access_token_env or app_secret_env or verify_token_env:
        raise ValidationError("--phone-number-id and the --…-env options for WhatsApp do not apply to slack")
    if not (single_workspace or bot_token_env or signing_secret_env or app_token_env):
        link = with_tenant(ctx, tenant, "channel.write", lambda db, t: slack_install_link(cfg, t, agent))
        report_install_link(cfg, tenant, link, as_json)
        return
    connection, created = with_tenant(ctx, tenant, "channel.write", lambda db, t: connect_slack(
        db, cfg, t, bot_token_env=bot_token_env, signing_secret_env=signing_secret_env, agent=agent,
        app_token_env=app_token_env))  # fmt: skip
    report_slack(cfg, tenant, connection, created, as_json)


# The steps of `connect`, one per way of connecting, for the command and the onboarding wizard alike.


async def slack_install_link(cfg: Settings, tenant: TenantInfo, agent: str | None) -> str:
    """The link a Slack admin installs the app with (OAuth); the workspace is connected when they do."""
    if agent:
        raise ValidationError("--agent applies once the workspace is installed: use `konstruct channel route` or connect again with it")
    return install_link(cfg, tenant.id)


async def connect_slack(
    db: Database,
    cfg: Settings,
    tenant: TenantInfo,
    *,
    bot_token_env: str | None,
    signing_secret_env: str | None,
    agent: str | None,
    app_token_env: str | None = None,
) -> tuple[ConnectionInfo, bool]:
    """Connect one Slack workspace by its own app's bot token and signing secret (asked, hidden, when no variable is
    named), once Slack says whose the token is; with an app-level token, over Socket Mode. Returns the connection and
    whether it is new."""
    token = secret_input(bot_token_env, "Slack bot token (xoxb-…)", "bot token", "--bot-token-env")
    signing_secret = secret_input(signing_secret_env, "Slack signing secret", "signing secret", "--signing-secret-env")
    app_token = (
        secret_input(app_token_env, "Slack app-level token (xapp-…)", "app-level token", "--app-token-env") if app_token_env else None
    )
    identity = await _auth_test(cfg, token)
    credentials = {"bot_token": token, "signing_secret": signing_secret}
    details = {"bot_user_id": identity.get("user_id"), "bot_id": identity.get("bot_id"), "bot_token_hint": hint(token),
               "signing_secret_hint": hint(signing_secret)}  # fmt: skip
    if app_token is not None:
        await _check_app_token(cfg, app_token)
        credentials["app_token"], details["app_token_hint"] = app_token, hint(app_token)
    return await service.connect(
        db, cfg, tenant, kind="slack", external_id=identity["team_id"], name=identity.get("team") or identity["team_id"],
        mode="single", credentials=credentials, details=details, default_agent=agent, actor=actor(),
    )  # fmt: skip


async def _check_app_token(cfg: Settings, app_token: str) -> None:
    """Slack gives this token a Socket Mode URL (the one call an app-level token can make)."""
    if not app_token.startswith("xapp-"):
        raise ValidationError("that is not an app-level token (xapp-…): create one under Basic Information → App-Level Tokens")
    try:
        await web_client(cfg).apps_connections_open(app_token=app_token)
    except SlackApiError as exc:
        raise ValidationError(
            f"Slack rejected the app-level token ({exc.response.get('error')}): it needs the connections:write scope, "
            "and Socket Mode turned on for the app (konstruct channel slack-manifest --socket-mode)"
        ) from None
    except Exception as exc:
        raise ValidationError(f"cannot reach Slack at {cfg.slack.api_url} ({type(exc).__name__})") from None


def whatsapp_number(phone_number_id: str | None) -> str:
    """The business number's phone-number id, checked to be one."""
    if not phone_number_id or not phone_number_id.strip().isdigit():
        raise ValidationError("give --phone-number-id: the numeric id of the business number (WhatsApp Manager → API setup)")
    return phone_number_id.strip()


async def connect_whatsapp(
    db: Database,
    cfg: Settings,
    tenant: TenantInfo,
    number: str,
    *,
    access_token_env: str | None,
    app_secret_env: str | None,
    verify_token_env: str | None,
    agent: str | None,
) -> tuple[ConnectionInfo, bool]:
    """Connect a WhatsApp Business number (its secrets asked, hidden, when no variable is named), once the Graph API
    accepts its access token. Returns the connection and whether it is new."""
    token = secret_input(access_token_env, "WhatsApp access token", "access token", "--access-token-env")
    app_secret = secret_input(app_secret_env, "Meta app secret", "app secret", "--app-secret-env")
    verify_token = secret_input(verify_token_env, "Webhook verify token (you choose it)", "verify token", "--verify-token-env")
    identity = await _phone_number(cfg, number, token)
    name = str(identity.get("verified_name") or identity.get("display_phone_number") or number)
    return await service.connect(
        db, cfg, tenant, kind="whatsapp", external_id=number, name=name, mode="single",
        credentials={"access_token": token, "app_secret": app_secret, "verify_token": verify_token},
        details={"display_phone_number": identity.get("display_phone_number"), "access_token_hint": hint(token),
                 "app_secret_hint": hint(app_secret), "verify_token_hint": hint(verify_token)},
        default_agent=agent, actor=actor(),
    )  # fmt: skip


def report_install_link(cfg: Settings, tenant: str, link: str, as_json: bool) -> None:
    if as_json:
        print_json({"install_url": link})
    else:
        out.print(f"Send this install link to a Slack admin of {tenant} (valid {cfg.slack.install_link_ttl / 3600:g} h):")
        typer.echo(link)


def report_slack(cfg: Settings, tenant: str, connection: ConnectionInfo, created: bool, as_json: bool) -> None:
    if as_json:
        print_json(connection.as_json())
        return
    out.print(
        f"[green]{'connected' if created else 'reconnected'}[/green] Slack workspace {connection.name} ({connection.external_id}) to {tenant}"
    )
    if "app_token_hint" in connection.details:
        out.print("Socket Mode: a running gateway opens the connection to Slack within seconds (no public URL needed)")
    else:
        out.print(f"Set the app's Event Subscriptions Request URL to {cfg.gateway.public_url.rstrip('/')}/slack/events")


def report_whatsapp(cfg: Settings, tenant: str, connection: ConnectionInfo, created: bool, as_json: bool) -> None:
    if as_json:
        print_json(connection.as_json())
        return
    out.print(
        f"[green]{'connected' if created else 'reconnected'}[/green] WhatsApp number {connection.name} ({connection.external_id}) to {tenant}"
    )
    out.print(
        f"In the Meta app's WhatsApp → Configuration, set the callback URL to {cfg.gateway.public_url.rstrip('/')}/whatsapp/webhook "
        "with the same verify token, and subscribe to the messages field"
    )


async def _phone_number(cfg: Settings, number: str, token: str) -> dict[str, Any]:
    graph = Graph(cfg.whatsapp)
    try:
        return await graph.phone_number(number, token)
    except GraphError as exc:
        if exc.code == 0 and not exc.http_status:
            raise ValidationError(f"cannot reach the Graph API at {cfg.whatsapp.graph_url} ({exc})") from None
        raise ValidationError(f"Meta rejected the access token for number {number} ({exc}): check both and try again") from None
    finally:
        await graph.close()


async def _auth_test(cfg: Settings, token: str) -> dict[str, str]:
    try:
        response = await web_client(cfg, token).auth_test()
    except SlackApiError as exc:
        raise ValidationError(f"Slack rejected the bot token ({exc.response.get('error')}): check it and try again") from None
    except Exception as exc:
        raise ValidationError(f"cannot reach Slack at {cfg.slack.api_url} ({type(exc).__name__})") from None
    return dict(response.data) if isinstance(response.data, dict) else {}


@app.command("slack-manifest")
def slack_manifest(
    ctx: typer.Context,
    tenant: str | None = typer.Option(None, "--tenant", help="Name the app after this tenant and describe its agents."),
    socket_mode: bool = typer.Option(False, "--socket-mode", help="Socket Mode: no request URLs, the gateway connects to Slack."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON (the default)."),
    as_yaml: bool = typer.Option(False, "--yaml", help="Print the manifest as YAML."),
) -> None:
    """Print the Slack app manifest: paste it at api.slack.com/apps → Create New App → From a manifest."""
    if as_json and as_yaml:
        raise ValidationError("choose one of --json and --yaml")
    cfg = settings(ctx)
    name, description = "Konstruct", agent_description(None, [])
    if tenant:
        name, description = with_tenant(ctx, tenant, "channel.read", _manifest_identity)
    manifest = app_manifest(cfg.gateway.public_url, name=name, description=description, socket_mode=socket_mode)
    if as_yaml:
        import yaml  # only here: the rest of the CLI does not need it

        typer.echo(yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True), nl=False)
    else:
        print_json(manifest)


async def _manifest_identity(db: Database, tenant: TenantInfo) -> tuple[str, str]:
    agents = await list_agents(db, tenant)
    return tenant.name, agent_description(tenant.name, [(a.name, a.role) for a in agents])


@app.command("list")
def list_(
    ctx: typer.Context,
    tenant: str | None = EveryTenantOption,
    as_json: bool = JsonOption,
) -> None:
    """List channel connections."""

    async def go(db: Database) -> tuple[list[tuple[str, ConnectionInfo]], dict[uuid.UUID, SocketState]]:
        rows = [(t.slug, c) for t in await tenants_for(db, "channel.read", tenant) for c in await service.list_connections(db, t)]
        return rows, await socket_states(db, [c.id for _, c in rows if c.status == "connected" and "app_token_hint" in c.details])

    rows, sockets = with_database(ctx, go)
    if as_json:
        print_json([{"tenant": slug, **c.as_json(), **_socket_json(sockets, c)} for slug, c in rows])
    elif not rows:
        out.print("no channels connected: `konstruct channel connect slack|whatsapp --tenant SLUG`")
    else:
        print_table(
            None,
            ["tenant", "kind", "name", "id", "mode", "status", "socket mode"],
            [(s, c.kind, c.name, c.external_id, c.mode, c.status, sockets[c.id].describe() if c.id in sockets else "") for s, c in rows],
        )


def _socket_json(sockets: dict[uuid.UUID, SocketState], connection: ConnectionInfo) -> dict[str, Any]:
    return {"socket": sockets[connection.id].as_json()} if connection.id in sockets else {}


def doctor_slack_sockets(cfg: Settings, add: Callable[[str, str, str], None]) -> None:
    """doctor's line on Socket Mode: each socket held by a gateway, or waiting for one."""
    try:
        found = run(_all_socket_states(cfg))
    except KonstructError as exc:
        add("slack sockets", "warn", f"not checked: {exc}")
        return
    if not found:
        add("slack sockets", "ok", "no Socket Mode connections")
        return
    waiting = [f"{c.tenant_slug}/{c.name}" for c, s in found if not s.held]
    detail = "; ".join(f"{c.tenant_slug}/{c.name} ({c.team_id}): {s.describe()}" for c, s in found)
    if waiting:
        detail += " — start `konstruct up` or `konstruct gateway` so a gateway holds them"
    add("slack sockets", "warn" if waiting else "ok", detail)


async def _all_socket_states(cfg: Settings) -> list[tuple[SocketConnection, SocketState]]:
    async with database(cfg) as db:
        connections = await socket_connections(db, cfg)
        states = await socket_states(db, [c.id for c in connections])
    return [(c, states[c.id]) for c in connections]


@app.command("show")
def show(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Slack team id, WhatsApp phone-number id, or connection id."),
    tenant: str = TenantOption,
    as_json: bool = JsonOption,
) -> None:
    """Show one connection and its routes (secrets only as key hints)."""

    async def go(db: Database, info: TenantInfo) -> tuple[ConnectionInfo, list[tuple[str, str]], dict[uuid.UUID, SocketState]]:
        connection = await service.get_connection(db, info, ref)
        socket = await socket_states(
            db, [connection.id] if connection.status == "connected" and "app_token_hint" in connection.details else []
        )
        return connection, await service.list_routes(db, info, connection), socket

    connection, routes, sockets = with_tenant(ctx, tenant, "channel.read", go)
    if as_json:
        print_json({**connection.as_json(), **_socket_json(sockets, connection), "routes": [{"channel": c, "agent": a} for c, a in routes]})
        return
    print_fields({"kind": connection.kind, "name": connection.name, "id": connection.external_id, "mode": connection.mode,
                  "status": connection.status, "connected by": connection.created_by, "updated": connection.updated_at,
                  **({"socket mode": sockets[connection.id].describe()} if connection.id in sockets else {}),
                  **{k: v for k, v in connection.details.items() if v}})  # fmt: skip
    for channel, agent_name in routes:
        out.print(f"route  {channel} → {agent_name}")


@app.command("disconnect")
def disconnect(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Slack team id, WhatsApp phone-number id, or connection id."),
    tenant: str = TenantOption,
    yes: bool = YesOption,
) -> None:
    """Disconnect: the agents stop answering there (reconnect or reinstall to resume)."""
    confirm_deletion(yes, f"the connection {ref}", "the agents' presence there (until reconnected)")

    async def go(db: Database, info: TenantInfo) -> ConnectionInfo:
        connection = await service.get_connection(db, info, ref)
        await service.set_status(db, info.id, connection.id, "disconnected", actor=actor(), reason="disconnected by operator")
        return connection

    connection = with_tenant(ctx, tenant, "channel.write", go)
    out.print(f"[green]disconnected[/green] {connection.kind} {connection.name}")


@app.command("route")
def route(
    ctx: typer.Context,
    tenant: str = TenantOption,
    slack_channel: str = typer.Option(..., "--slack-channel", help="Slack channel id, e.g. C0123ABCD."),
    agent: str | None = typer.Option(None, "--agent", help="The agent that answers in that channel."),
    remove: bool = typer.Option(False, "--remove", help="Remove the route (the default agent answers again)."),
    workspace: str | None = typer.Option(None, "--workspace", help="Team id, when the tenant has several workspaces."),
) -> None:
    """Choose which agent answers in one Slack channel."""
    if bool(agent) == remove:
        raise ValidationError("give either --agent NAME or --remove")

    async def go(db: Database, info: TenantInfo) -> str:
        slack = [c for c in await service.list_connections(db, info) if c.kind == "slack"]
        if workspace:
            slack = [c for c in slack if c.external_id == workspace]
        if len(slack) != 1:
            raise ValidationError(
                f"tenant {tenant!r} has no Slack workspace connected" if not slack else "several workspaces: pass --workspace TEAM_ID"
            )
        if remove:
            found = await service.remove_route(db, info, slack[0], slack_channel, actor=actor())
            return "removed the route" if found else "there was no route"
        assert agent is not None
        await service.set_route(db, info, slack[0], slack_channel, agent, actor=actor())
        return f"{agent} now answers in {slack_channel}"

    out.print(with_tenant(ctx, tenant, "channel.write", go))
