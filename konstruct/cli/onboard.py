"""konstruct onboard: a running worker → the model → tenant → channel → agent → a required test message through
the real pipeline → live, and live only when the model itself wrote the reply (billing or a budget that blocks it
is explained, with the command that lifts it).

Every answer can be given as a flag (for automation); what is missing is asked when there is a terminal.
Progress is kept in the data directory (onboarding.json), so an interrupted wizard resumes where it stopped.
Each step calls the same services (and the same permission checks) as its command, so its audit events and
output are the same.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from sqlalchemy import select

from konstruct import audit, inbox
from konstruct.agent import agents as agent_service
from konstruct.billing import standing
from konstruct.cli import agents, channels, chat, tenants
from konstruct.cli.common import actor, out, print_json, run, settings, tenant_for, with_database, with_tenant
from konstruct.cli.common import state as cli_state
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Message, WorkerHeartbeat
from konstruct.errors import KonstructError, NotFoundError, ValidationError, WorkerUnavailableError
from konstruct.llm import probe
from konstruct.llm.client import LLMError
from konstruct.tenancy.tenants import TenantInfo

STEPS = ("up", "model", "tenant", "channel", "agent", "test", "live")
CHANNELS = ("slack", "slack-install", "whatsapp", "skip")
FIXED_REPLIES = ("billing", "budget", "escalation", "gave-up")  # a stored reply's model when no model was asked
WORKER_POLL = 0.5  # seconds between looks for a running worker


class Report:
    """What each step did, for the closing line or `--json`; in JSON mode the steps' own output is kept quiet."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.steps: list[dict[str, Any]] = []
        self.result: dict[str, Any] = {}

    def step(self, name: str, title: str) -> None:
        if not self.as_json:
            out.print(f"[bold]{STEPS.index(name) + 1}/{len(STEPS)} {title}[/bold]")

    def done(self, name: str, status: str, detail: str, **extra: Any) -> None:
        self.steps.append({"step": name, "status": status, "detail": detail, **extra})

    def finish(self, ok: bool, error: str | None = None) -> None:
        if self.as_json:
            out.quiet = False
            print_json({"ok": ok, "error": error, "steps": self.steps, **self.result})


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


def register(app: typer.Typer) -> None:
    app.command("onboard")(onboard)


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
    wait: float | None = typer.Option(
        None, "--wait", help="Seconds to wait for a running worker (default: until one runs on a terminal, none without one)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result of each step as JSON instead of the steps' output."),
) -> None:
    """Set up a tenant end to end: a running worker, the model, tenant, channel, agent, a test message through the real
    pipeline, live. Start `konstruct up` in another shell first."""
    cfg = settings(ctx)
    if channel is not None and channel not in CHANNELS:
        raise ValidationError(f"--channel must be one of {', '.join(CHANNELS)}")
    report = Report(as_json)
    out.quiet = as_json
    try:
        _run(ctx, cfg, report, restart=restart, wait=wait, answers=dict(
            tenant=tenant, new_tenant=new_tenant, slug=slug, channel=channel, bot_token_env=bot_token_env,
            signing_secret_env=signing_secret_env, phone_number_id=phone_number_id, access_token_env=access_token_env,
            app_secret_env=app_secret_env, verify_token_env=verify_token_env, agent_name=agent_name, role=role,
            persona=persona, persona_file=persona_file, model=model, tools=tools, test_message=test_message))  # fmt: skip
    except KonstructError as exc:
        report.finish(False, str(exc))
        raise
    finally:
        out.quiet = False
    report.finish(True)


def _run(ctx: typer.Context, cfg: Settings, report: Report, *, restart: bool, wait: float | None, answers: dict[str, Any]) -> None:
    state = {"done": []} if restart else _load(cfg)
    if state["done"] and state["done"][-1] != "live":
        if not report.as_json:
            out.print(f"[dim]resuming: {_done_already(state)} done already[/dim]")
        for step in state["done"]:
            report.done(step, "done before", _done_already({**state, "done": [step]}))
    elif state["done"]:
        state = {"done": []}

    def finished(step: str, detail: str, **extra: Any) -> None:
        state["done"].append(step)
        _save(cfg, state)
        report.done(step, "ok", detail, **extra)

    report.step("up", "a running worker")
    workers = with_database(ctx, lambda db: _wait_for_worker(db, cfg, wait, quiet=report.as_json))
    report.done("up", "ok", f"{workers} worker(s) running")
    report.step("model", "the model")
    check = _model_step(ctx, cfg, answers["model"])
    report.done("model", "ok", check.line(), **check.as_json())
    if "tenant" not in state["done"]:
        report.step("tenant", "tenant")
        state["tenant"] = _tenant_step(ctx, answers["tenant"], answers["new_tenant"], answers["slug"])
        finished("tenant", f"tenant {state['tenant']}", tenant=state["tenant"])
    slug_now = str(state["tenant"])
    report.result["tenant"] = slug_now
    if "channel" not in state["done"]:
        report.step("channel", "channel")
        kind, link = _channel_step(ctx, cfg, slug_now, answers["channel"], **{k: answers[k] for k in _CHANNEL_FLAGS})
        state["channel"] = kind
        finished("channel", f"channel {kind}", channel=kind, **({"install_url": link} if link else {}))
    if "agent" not in state["done"]:
        report.step("agent", "agent")
        state["agent"] = _agent_step(ctx, slug_now, answers["agent_name"], answers["role"], answers["persona"],
                                     answers["persona_file"], answers["model"], answers["tools"])  # fmt: skip
        finished("agent", f"agent {state['agent']}", agent=state["agent"])
    agent_now, channel_now = str(state["agent"]), str(state.get("channel"))
    report.result.update(agent=agent_now, channel=channel_now)
    if "test" not in state["done"]:
        report.step("test", "test message")
        text = answers["test_message"] or _ask(
            None, "Say something to the agent", "--test-message", default="Hello! What can you do for me?"
        )
        answer = with_database(ctx, lambda db: _test_message(db, cfg, slug_now, agent_now, text))
        if answer.problem is not None:
            raise KonstructError(f"{answer.problem}; try again with: {escape(_chat_command(ctx, slug_now, agent_now, text))} "
                                 "— then run `konstruct onboard` again to finish")  # fmt: skip
        if not report.as_json:
            typer.echo(answer.reply)
        finished("test", f"{answer.model} answered", reply=answer.reply, model=answer.model)
    with_tenant(ctx, slug_now, "agent.write", lambda db, t: _record_live(db, t, agent_now, channel_now))
    finished("live", f"{agent_now} answers for {slug_now}")
    _state_path(cfg).unlink(missing_ok=True)
    out.print(f"[green]live[/green]: {agent_now} answers for {slug_now}" + (
        f" in {channel_now}" if channel_now not in ("None", "skip") else " (terminal only until a channel is connected)"))  # fmt: skip


_CHANNEL_FLAGS = ("bot_token_env", "signing_secret_env", "phone_number_id", "access_token_env", "app_secret_env", "verify_token_env")


def _done_already(state: dict[str, Any]) -> str:
    """What an unfinished wizard did, by name: "tenant acme-inc and its channel (skip)"."""
    done = state["done"]
    parts = [f"tenant {state.get('tenant')}"] if "tenant" in done else []
    if "channel" in done:
        parts.append(f"its channel ({state.get('channel')})")
    if "agent" in done:
        parts.append(f"agent {state.get('agent')}")
    if "test" in done:
        parts.append("the test message")
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1] if parts else "nothing"


async def _wait_for_worker(db: Database, cfg: Settings, wait: float | None, *, quiet: bool) -> int:
    """1. `konstruct up` (or a worker) must run: the test message needs it. On a terminal, wait for it to start."""
    within = cfg.worker.stale_after
    workers = await inbox.live_workers(db, within=within)
    if workers:
        return workers
    limit = wait if wait is not None else (None if sys.stdin.isatty() else 0.0)
    if limit == 0:
        raise WorkerUnavailableError(
            "no worker is running: start `konstruct up` in another shell, then run `konstruct onboard` again (or pass --wait 120)"
        )
    if not quiet:
        out.print("no worker is running: start [bold]konstruct up[/bold] in another shell; waiting for it… (Ctrl-C to stop)")
    deadline = None if limit is None else time.monotonic() + limit
    while not (workers := await inbox.live_workers(db, within=within)):
        if deadline is not None and time.monotonic() > deadline:
            raise WorkerUnavailableError(f"no worker started within {limit:g} s: start `konstruct up` in another shell, then run "
                                         "`konstruct onboard` again")  # fmt: skip
        await asyncio.sleep(WORKER_POLL)
    return workers


def _model_step(ctx: typer.Context, cfg: Settings, model: str | None) -> probe.ModelCheck:
    """2. The model answers a tiny test call with the platform key (this shell's; the worker's when only it has it)."""
    name = model or cfg.llm.model
    key = probe.platform_key(cfg, probe.provider_of(name) if model else probe.default_provider(cfg))
    if key.value is None and key.problem is not None and with_database(ctx, _worker_has_key):
        # The key is in `up`'s shell only, as it should be: the test message through the worker shows the model answers.
        check = probe.ModelCheck(
            name, True, 0.0, "not called from here: the worker has the key (this shell does not); the test message will tell"
        )
        out.print(check.line())
        return check
    check = run(probe.check_model(name, api_base=cfg.llm.api_base, key=key, timeout=min(cfg.llm.timeout, probe.TEST_TIMEOUT)))
    if not check.ok:
        raise LLMError(f"{check.line()}: set the model up with `konstruct init --llm-model … --llm-api-base … --llm-api-key-env …` "
                       "(restart `konstruct up` after), then run `konstruct onboard` again")  # fmt: skip
    out.print(f"[green]{check.line()}[/green]")
    return check


async def _worker_has_key(db: Database) -> bool:
    async with db.system() as session:
        return bool(await session.scalar(select(WorkerHeartbeat.has_platform_key).order_by(WorkerHeartbeat.seen_at.desc()).limit(1)))


def _tenant_step(ctx: typer.Context, tenant: str | None, new_tenant: str | None, slug: str | None) -> str:
    """3. The tenant: an existing one the acting user may add agents to, or a new one. Returns its slug."""
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
) -> tuple[str, str | None]:
    """4. A channel, connected as `konstruct channel connect` does, or none for now. Returns its kind (and an install link)."""
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
        return kind, link
    elif kind == "whatsapp":
        number = channels.whatsapp_number(phone_number_id)
        connection, created = with_tenant(ctx, slug, "channel.write", lambda db, t: channels.connect_whatsapp(
            db, cfg, t, number, access_token_env=access_token_env, app_secret_env=app_secret_env,
            verify_token_env=verify_token_env, agent=None))  # fmt: skip
        channels.report_whatsapp(cfg, slug, connection, created, as_json=False)
    else:
        out.print("no channel for now: talk to the agent with `konstruct chat`; connect one later with `konstruct channel connect`")
    return kind, None


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
    """5. The agent, created (and given its tools) as `konstruct agent create` and `agent update` do. Returns its name."""
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


@dataclass(frozen=True)
class FirstAnswer:
    """The test message's outcome: the reply and the model that gave it, or what kept the model from answering."""

    reply: str | None
    model: str | None
    problem: str | None = None


async def _test_message(db: Database, cfg: Settings, slug: str, agent: str, text: str) -> FirstAnswer:
    """What `konstruct chat --message TEXT --new --person onboarding` does: one message through the inbox, the queue,
    a worker and the model. Only a reply the model wrote counts: a fixed one (billing, budget, a rule) says why not."""
    person = "onboarding"
    try:
        async with chat.open_line(db, cfg, slug, agent, person=person, conversation=chat.new_conversation(person), timeout=None) as line:
            result = await line.send(text)
            tenant = line.tenant
    except KonstructError as exc:
        return FirstAnswer(None, None, f"the test message got no answer ({exc})")
    async with db.tenant(tenant_id=tenant.id) as session:
        model = await session.scalar(select(Message.model).where(Message.inbound_id == result.message_id, Message.direction == "out"))
    if result.status == "replied" and model not in FIXED_REPLIES:
        return FirstAnswer(result.reply, model)
    return FirstAnswer(result.reply, model, await _why_no_model(db, cfg, tenant, result.status, result.error, model))


async def _why_no_model(db: Database, cfg: Settings, tenant: TenantInfo, status: str, error: str | None, model: str | None) -> str:
    """Why the model did not answer the test message, and what to do about it."""
    slug = tenant.slug
    if model == "billing" or (error or "").startswith("paused"):
        billing = await standing.status(db, cfg, tenant)
        plans = ", ".join(p.name for p in cfg.billing.plans) or "PLAN"
        return (f"billing pauses {slug}'s agents ({billing.standing.reason}): let them run with `konstruct billing exempt --tenant "
                f"{slug}`, or subscribe it: `konstruct billing checkout --tenant {slug} --plan {plans.split(', ')[0]}` (plans: {plans})")  # fmt: skip
    if model == "budget":
        return (f"{slug}'s monthly LLM budget is used up ({error}): raise it with `konstruct budget set --tenant {slug} --usd N`, "
                f"or remove it with `konstruct budget clear --tenant {slug}`")  # fmt: skip
    if model == "escalation":
        return "one of the agent's rules handed the test message to a human: send another --test-message"
    if status == "ignored":
        return f"the agent did not answer ({error})"
    return f"the model did not answer ({error or status}): see `konstruct doctor`"


def _chat_command(ctx: typer.Context, slug: str, agent: str, text: str) -> str:
    """The command line that sends the test message again, ready to paste."""
    config = cli_state(ctx).config
    argv = ["konstruct", *(["--config", config] if config else []), "chat", "--tenant", slug, "--agent", agent,
            "--new", "--person", "onboarding", "--message", text]  # fmt: skip
    return shlex.join(argv)


async def _record_live(db: Database, tenant: TenantInfo, agent: str, channel: str) -> None:
    async with db.tenant(tenant_id=tenant.id) as session:
        await audit.record(session, tenant_id=tenant.id, actor=actor(), action="onboarding.completed", target=agent,
                           detail={"channel": channel})  # fmt: skip
