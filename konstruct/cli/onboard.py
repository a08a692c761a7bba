"""konstruct onboard: tenant → channel → agent → a required test message through the real pipeline → live.

Every answer can be given as a flag (for automation); what is missing is asked when there is a terminal.
Progress is kept in the data directory (onboarding.json), so an interrupted wizard resumes where it stopped.
The steps call the same commands as the rest of the CLI, so their checks and audit events are the same.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from konstruct.cli.common import actor, database, out, run, settings, tenant_for
from konstruct.config import Settings
from konstruct.errors import KonstructError, ValidationError

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


def _invoke(ctx: typer.Context, args: list[str | None]) -> None:
    """Run another konstruct command in this process (its own checks, prompts, output and audit events).
    Options given as None are left out."""
    argv: list[str] = []
    for n, item in enumerate(args):
        if item is None or (item.startswith("--") and n + 1 < len(args) and args[n + 1] is None):
            continue
        argv.append(item)
    root = ctx.find_root()
    config = root.params.get("config")
    code = root.command.main([*(["--config", config] if config else []), *argv], prog_name="konstruct", standalone_mode=False)
    if isinstance(code, int) and code:
        raise KonstructError(f"`konstruct {' '.join(a for a in argv if not a.startswith('-'))[:60]}` did not succeed (exit {code})")


def onboard(
    ctx: typer.Context,
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

    # 1. the tenant
    if "tenant" not in state["done"]:
        out.print("[bold]1/5 tenant[/bold]")
        if tenant is None and new_tenant is None:
            answer = _ask(None, "An existing tenant's slug, or a name for a new one", "--tenant or --new-tenant")
            existing = run(_exists(cfg, answer))
            tenant, new_tenant = (answer, None) if existing else (None, answer)
        if new_tenant is not None:
            _invoke(ctx, ["tenant", "create", new_tenant, "--slug", slug])
            from konstruct.tenancy.tenants import slugify

            tenant = slug or slugify(new_tenant)
        else:
            run(_check_tenant(cfg, str(tenant)))
        state["tenant"] = tenant
        finished("tenant")
    slug_now = str(state["tenant"])

    # 2. a channel
    if "channel" not in state["done"]:
        out.print("[bold]2/5 channel[/bold]")
        kind = channel or _ask(None, f"Channel ({', '.join(CHANNELS)})", "--channel", default="slack-install")
        if kind not in CHANNELS:
            raise ValidationError(f"the channel must be one of {', '.join(CHANNELS)}")
        if kind == "slack":
            _invoke(ctx, ["channel", "connect", "slack", "--tenant", slug_now, "--bot-token-env", bot_token_env,
                          "--signing-secret-env", signing_secret_env, "--single-workspace"])  # fmt: skip
        elif kind == "slack-install":
            _invoke(ctx, ["channel", "connect", "slack", "--tenant", slug_now])
        elif kind == "whatsapp":
            _invoke(ctx, ["channel", "connect", "whatsapp", "--tenant", slug_now, "--phone-number-id", phone_number_id,
                          "--access-token-env", access_token_env, "--app-secret-env", app_secret_env,
                          "--verify-token-env", verify_token_env])  # fmt: skip
        else:
            out.print("no channel for now: talk to the agent with `konstruct chat`; connect one later with `konstruct channel connect`")
        state["channel"] = kind
        finished("channel")

    # 3. the agent
    if "agent" not in state["done"]:
        out.print("[bold]3/5 agent[/bold]")
        name = _ask(agent_name, "The agent's name", "--agent-name", default="Ava")
        agent_role = _ask(role, "Its role", "--role", default="Support specialist")
        if persona is None and persona_file is None:
            persona = _ask(None, "Its persona (how it talks and what it does)", "--persona or --persona-file")
        _invoke(ctx, ["agent", "create", "--tenant", slug_now, "--name", name, "--role", agent_role, "--persona", persona,
                      "--persona-file", str(persona_file) if persona_file else None, "--model", model])  # fmt: skip
        if tools:
            _invoke(ctx, ["agent", "update", name, "--tenant", slug_now, "--tools", tools])
        state["agent"] = name
        finished("agent")

    # 4. the required test message, through the inbox, the queue, a worker and the model
    if "test" not in state["done"]:
        out.print("[bold]4/5 test message[/bold] (needs a running worker: `konstruct up` or `konstruct worker`)")
        text = test_message or _ask(None, "Say something to the agent", "--test-message", default="Hello! What can you do for me?")
        try:
            _invoke(
                ctx, ["chat", "--tenant", slug_now, "--agent", str(state["agent"]), "--message", text, "--new", "--person", "onboarding"]
            )
        except KonstructError as exc:
            raise KonstructError(
                f"the test message got no answer ({exc}): fix that, then run `konstruct onboard` again to resume"
            ) from None
        finished("test")

    # 5. live
    run(_record_live(cfg, slug_now, str(state["agent"]), str(state.get("channel"))))
    finished("live")
    _state_path(cfg).unlink(missing_ok=True)
    out.print(f"[green]live[/green]: {state['agent']} answers for {slug_now}" + (
        f" in {state['channel']}" if state.get("channel") not in (None, "skip") else " (terminal only until a channel is connected)"))  # fmt: skip


async def _exists(cfg: Settings, slug: str) -> bool:
    from konstruct.errors import NotFoundError

    async with database(cfg) as db:
        try:
            await tenant_for(db, slug, "tenant.read")
        except NotFoundError:
            return False
    return True


async def _check_tenant(cfg: Settings, slug: str) -> None:
    async with database(cfg) as db:
        await tenant_for(db, slug, "agent.write")


async def _record_live(cfg: Settings, slug: str, agent: str, channel: str) -> None:
    from konstruct import audit

    async with database(cfg) as db:
        tenant = await tenant_for(db, slug, "agent.write")
        async with db.tenant(tenant_id=tenant.id) as session:
            await audit.record(session, tenant_id=tenant.id, actor=actor(), action="onboarding.completed", target=agent,
                               detail={"channel": channel})  # fmt: skip
