"""konstruct onboard: tenant → channel → agent → a required test message through the real pipeline → live.

Every answer can be given as a flag (for automation); what is missing is asked when there is a terminal.
Progress is kept in the data directory (onboarding.json), so an interrupted wizard resumes where it stopped.
Each step calls the same services (and the same permission checks) as its command, so its audit events and
output are the same.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from konstruct import audit
from konstruct.agent import agents as agent_service
from konstruct.cli import agents, channels, chat, tenants
from konstruct.cli.common import actor, out, settings, tenant_for, with_database, with_tenant
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.errors import KonstructError, NotFoundError, ValidationError
from konstruct.tenancy.tenants import TenantInfo

STEPS = ("tenant", "channel", "agent", "test", "live")
CHANNELS = ("slack", "slack-install", "whatsapp", "skip")


def _state_path(cfg: Settings) -> Path:
    return cfg.data_dir / "onboarding.json"


def _load(cfg: Settings) -> dict[str, Any]:
    try:
        return dict(json.loads(_state_path(cfg).read_text()))
    except (FileNotFoundError, ValueError):
        return {"done": []}


def _save(cfg: Settings, state: dict[str, Any]) -> None:
    path = _state_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def _ask(value: str | None, prompt: str, flag: str, default: str | None = None) -> str:
    if value:
        return value
    if not sys.stdin.isatty():
        raise ValidationError(f"{flag} is needed (there is no terminal to ask on)")
    return str(typer.prompt(prompt, default=default))


def onboard(
    ctx: typer.Context,
    # Not the shared tenant options: here --tenant is one of two answers (an existing tenant, or --new-tenant).
    tenant: str | None = typer.Option(None, "--tenant", "-t", help="Use this existing tenant (its slug)."),
    new_tenant: str | None = typer.Option(None, "--new-tenant", help="Create a tenant with this name."),
    slug: str | None = typer.Option(None, "--slug", help="Slug for --new-tenant (default: made from the name)."),
    channel: str | None = typer.Option(
        None, "--channel", help="slack (one workspace, its own app), slack-install (OAuth link), whatsapp or skip."
    ),
    bot_token_env: str | None = typer.Option(None, "--bot-token-env", help="Slack: variable holding the bot token."),
    signing_secret_env: str | None = typer.Option(None, "--signing-secret-env", help="Slack: variable holding the signing secret."),
    phone_number_id: str | None = typer.Option(None, "--phone-number-id", help="WhatsApp: the phone-number id."),
    access_token_env: str | None = typer.Option(None, "--access-token-env", help="WhatsApp: variable holding the access token."),
    app_secret_env: str | None = typer.Option(None, "--app-secret-env", help="WhatsApp: variable holding the app secret."),
    verify_token_env: str | None = typer.Option(None, "--verify-token-env", help="WhatsApp: variable holding the verify token."),
    agent_name: str | None = typer.Option(None, "--agent-name", help="The agent's name."),
    role: str | None = typer.Option(None, "--role", help="The agent's role, e.g. 'Support specialist'."),
    persona: str | None = typer.Option(None, "--persona", help="The agent's persona."),
    persona_file: Path | None = typer.Option(None, "--persona-file", help="The persona from a file."),
    model: str | None = typer.Option(None, "--model", help="The model (default: llm.model)."),
    tools: str | None = typer.Option(None, "--tools", help="Tools, comma-separated, e.g. calculator,current_time."),
    test_message: str | None = typer.Option(None, "--test-message", help="The message sent to the agent in the required test."),
    restart: bool = typer.Option(False, "--restart", help="Forget an unfinished wizard and start over."),
) -> None:
    """Set up a tenant end to end: tenant, channel, agent, a test message through the real pipeline, live."""
    cfg = settings(ctx)
    if channel is not None and channel not in CHANNELS:
        raise ValidationError(f"--channel must be one of {', '.join(CHANNELS)}")
    state = {"done": []} if restart else _load(cfg)
    if state["done"] and state["done"][-1] != "live":
        out.print(f"[dim]resuming: {', '.join(state['done'])} done already[/dim]")
    elif state["done"]:
        state = {"done": []}

    def finished(step: str) -> None:
        state["done"].append(step)
        _save(cfg, state)

    if "tenant" not in state["done"]:
        out.print("[bold]1/5 tenant[/bold]")
        state["tenant"] = _tenant_step(ctx, tenant, new_tenant, slug)
        finished("tenant")
    slug_now = str(state["tenant"])
    if "channel" not in state["done"]:
        out.print("[bold]2/5 channel[/bold]")
        state["channel"] = _channel_step(ctx, cfg, slug_now, channel, bot_token_env=bot_token_env, signing_secret_env=signing_secret_env,
                                         phone_number_id=phone_number_id, access_token_env=access_token_env,
                                         app_secret_env=app_secret_env, verify_token_env=verify_token_env)  # fmt: skip
        finished("channel")
    if "agent" not in state["done"]:
        out.print("[bold]3/5 agent[/bold]")
        state["agent"] = _agent_step(ctx, slug_now, agent_name, role, persona, persona_file, model, tools)
        finished("agent")
    agent_now, channel_now = str(state["agent"]), str(state.get("channel"))
    if "test" not in state["done"]:
        out.print("[bold]4/5 test message[/bold] (needs a running worker: `konstruct up` or `konstruct worker`)")
        text = test_message or _ask(None, "Say something to the agent", "--test-message", default="Hello! What can you do for me?")
        try:
            with_database(ctx, lambda db: _test_message(db, cfg, slug_now, agent_now, text))
        except KonstructError as exc:
            raise KonstructError(
                f"the test message got no answer ({exc}): fix that, then run `konstruct onboard` again to resume"
            ) from None
        finished("test")
    with_tenant(ctx, slug_now, "agent.write", lambda db, t: _record_live(db, t, agent_now, channel_now))
    finished("live")
    _state_path(cfg).unlink(missing_ok=True)
    out.print(f"[green]live[/green]: {agent_now} answers for {slug_now}" + (
        f" in {channel_now}" if channel_now not in ("None", "skip") else " (terminal only until a channel is connected)"))  # fmt: skip


def _tenant_step(ctx: typer.Context, tenant: str | None, new_tenant: str | None, slug: str | None) -> str:
    """1. The tenant: an existing one the acting user may add agents to, or a new one. Returns its slug."""
    if tenant is None and new_tenant is None:
        answer = _ask(None, "An existing tenant's slug, or a name for a new one", "--tenant or --new-tenant")
        existing = with_database(ctx, lambda db: _exists(db, answer))
        tenant, new_tenant = (answer, None) if existing else (None, answer)
    if new_tenant is not None:
        name = new_tenant
        created = with_database(ctx, lambda db: tenants.create_tenant(db, name, slug))
        tenants.report_created(created)
        return created.slug
    with_tenant(ctx, str(tenant), "agent.write", _nothing)
    return str(tenant)


def _channel_step(
    ctx: typer.Context,
    cfg: Settings,
    slug: str,
    channel: str | None,
    *,
    bot_token_env: str | None,
    signing_secret_env: str | None,
    phone_number_id: str | None,
    access_token_env: str | None,
    app_secret_env: str | None,
    verify_token_env: str | None,
) -> str:
    """2. A channel, connected as `konstruct channel connect` does, or none for now. Returns its kind."""
    kind = channel or _ask(None, f"Channel ({', '.join(CHANNELS)})", "--channel", default="slack-install")
    if kind not in CHANNELS:
        raise ValidationError(f"the channel must be one of {', '.join(CHANNELS)}")
    if kind == "slack":
        connection, created = with_tenant(ctx, slug, "channel.write", lambda db, t: channels.connect_slack(
            db, cfg, t, bot_token_env=bot_token_env, signing_secret_env=signing_secret_env, agent=None))  # fmt: skip
        channels.report_slack(cfg, slug, connection, created, as_json=False)
    elif kind == "slack-install":
        link = with_tenant(ctx, slug, "channel.write", lambda db, t: channels.slack_install_link(cfg, t, None))
        channels.report_install_link(cfg, slug, link, as_json=False)
    elif kind == "whatsapp":
        number = channels.whatsapp_number(phone_number_id)
        connection, created = with_tenant(ctx, slug, "channel.write", lambda db, t: channels.connect_whatsapp(
            db, cfg, t, number, access_token_env=access_token_env, app_secret_env=app_secret_env,
            verify_token_env=verify_token_env, agent=None))  # fmt: skip
        channels.report_whatsapp(cfg, slug, connection, created, as_json=False)
    else:
        out.print("no channel for now: talk to the agent with `konstruct chat`; connect one later with `konstruct channel connect`")
    return kind


def _agent_step(
    ctx: typer.Context,
    slug: str,
    agent_name: str | None,
    role: str | None,
    persona: str | None,
    persona_file: Path | None,
    model: str | None,
    tools: str | None,
) -> str:
    """3. The agent, created (and given its tools) as `konstruct agent create` and `agent update` do. Returns its name."""
    name = _ask(agent_name, "The agent's name", "--agent-name", default="Ava")
    agent_role = _ask(role, "Its role", "--role", default="Support specialist")
    if persona is None and persona_file is None:
        persona = _ask(None, "Its persona (how it talks and what it does)", "--persona or --persona-file")
    text = agents.persona_text(persona, persona_file, required=True)
    assert text is not None
    created = with_tenant(ctx, slug, "agent.write", lambda db, t: agent_service.create_agent(
        db, t, name=name, role=agent_role, persona=text, model=model, actor=actor()))  # fmt: skip
    agents.report_created(created, slug)
    if tools:
        changes = {"tools": agents.comma_list(tools)}
        updated = with_tenant(
            ctx, slug, "agent.write", lambda db, t: agent_service.update_agent(db, t, name, changes=changes, actor=actor())
        )
        agents.report_updated(updated)
    return name


async def _exists(db: Database, slug: str) -> bool:
    try:
        await tenant_for(db, slug, "tenant.read")
    except NotFoundError:
        return False
    return True


async def _nothing(db: Database, tenant: TenantInfo) -> None:
    """Nothing to do: the step only checks the acting user's permission on the tenant."""


async def _test_message(db: Database, cfg: Settings, slug: str, agent: str, text: str) -> None:
    """What `konstruct chat --message TEXT --new --person onboarding` does: one message through the inbox, the queue,
    a worker and the model, with the reply printed. An unanswered message is an error."""
    person = "onboarding"
    async with chat.open_line(db, cfg, slug, agent, person=person, conversation=chat.new_conversation(person), timeout=None) as line:
        result = await line.send(text)
        chat.print_result(line.agent.name, result, False, plain=True)
    if result.status != "replied":
        raise KonstructError(result.error or f"the message was {result.status}")


async def _record_live(db: Database, tenant: TenantInfo, agent: str, channel: str) -> None:
    async with db.tenant(tenant_id=tenant.id) as session:
        await audit.record(session, tenant_id=tenant.id, actor=actor(), action="onboarding.completed", target=agent,
                           detail={"channel": channel})  # fmt: skip
