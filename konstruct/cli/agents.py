"""konstruct agent …: the AI employees of a tenant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from konstruct.agent import agents as service
from konstruct.agent.tools.policy import parse_assignments
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
    with_tenant,
)
from konstruct.errors import ValidationError

app = typer.Typer(help="Create, list, change and delete a tenant's agents.", no_args_is_help=True)

PROMPT_HELP = "A prompt Slack suggests when a person opens the agent's Messages tab (repeat, up to 4)."


def persona_text(text: str | None, file: Path | None, *, required: bool) -> str | None:
    """The persona given as text or as a file (not both); an error naming both flags when it is required and missing."""
    if text is not None and file is not None:
        raise ValidationError("give the persona as --persona TEXT or --persona-file FILE, not both")
    if file is not None:
        try:
            return file.read_text()
        except OSError as exc:
            raise ValidationError(f"cannot read {file}: {exc.strerror}") from None
    if text is None and required:
        raise ValidationError("an agent needs a persona: --persona TEXT or --persona-file FILE")
    return text


@app.command("create")
def create(
    ctx: typer.Context,
    tenant: str = TenantOption,
    name: str = typer.Option(..., "--name", "-n", help="The agent's name, e.g. 'Ava'."),
    role: str = typer.Option(..., "--role", "-r", help="Its role or title, e.g. 'Customer support'."),
    persona: str | None = typer.Option(None, "--persona", help="Who it is and how it works, as text."),
    persona_file: Path | None = typer.Option(None, "--persona-file", help="The persona from a file."),
    model: str | None = typer.Option(None, "--model", "-m", help="litellm model (default: llm.model from the config)."),
    prompts: list[str] | None = typer.Option(None, "--suggested-prompt", help=PROMPT_HELP),
    as_json: bool = JsonOption,
) -> None:
    """Create an agent for a tenant."""
    text = persona_text(persona, persona_file, required=True)
    assert text is not None
    agent = with_tenant(
        ctx,
        tenant,
        "agent.write",
        lambda db, t: service.create_agent(
            db, t, name=name, role=role, persona=text, model=model, actor=actor(), suggested_prompts=list(prompts or [])
        ),
    )
    if as_json:
        print_json(agent.as_json())
    else:
        report_created(agent, tenant)


def report_created(agent: service.AgentInfo, tenant: str) -> None:
    out.print(f"[green]created[/green] agent {agent.name} ({agent.role}) for {tenant}")


@app.command("list")
def list_(ctx: typer.Context, tenant: str = TenantOption, as_json: bool = JsonOption) -> None:
    """List a tenant's agents."""
    agents = with_tenant(ctx, tenant, "agent.read", service.list_agents)
    if as_json:
        print_json([a.as_json() for a in agents])
    elif not agents:
        out.print(f"tenant {tenant} has no agents: `konstruct agent create --tenant {tenant} --name … --role … --persona …`")
    else:
        print_table(
            None, ["name", "role", "model", "persona"], [(a.name, a.role, a.model or "(default)", _short(a.persona)) for a in agents]
        )


@app.command("show")
def show(
    ctx: typer.Context, name: str = typer.Argument(..., help="The agent's name."), tenant: str = TenantOption, as_json: bool = JsonOption
) -> None:
    """Show one agent in full."""
    agent = with_tenant(ctx, tenant, "agent.read", lambda db, t: service.get_agent(db, t, name))
    if as_json:
        print_json(agent.as_json())
    else:
        print_fields(
            {
                "name": agent.name,
                "role": agent.role,
                "model": agent.model or "(default)",
                "id": agent.id,
                "created": agent.created_at,
                "suggested prompts": escape(" | ".join(agent.suggested_prompts)) or "(none)",
                "tools": ", ".join(agent.settings.get("tools") or []) or "(none)",
                "tool policy": ", ".join(f"{k}={v}" for k, v in (agent.settings.get("tool_policy") or {}).items()) or "(defaults)",
                "persona": "",
            }
        )
        out.print(agent.persona)


@app.command("update")
def update(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The agent's current name."),
    tenant: str = TenantOption,
    new_name: str | None = typer.Option(None, "--name", help="A new name."),
    role: str | None = typer.Option(None, "--role", help="A new role."),
    persona: str | None = typer.Option(None, "--persona", help="A new persona."),
    persona_file: Path | None = typer.Option(None, "--persona-file", help="A new persona from a file."),
    model: str | None = typer.Option(None, "--model", help="A new model."),
    fallbacks: str | None = typer.Option(
        None, "--fallbacks", help="Models tried in order when the model fails, comma-separated ('' for the config's list)."
    ),
    tools: str | None = typer.Option(
        None,
        "--tools",
        help="Tools the agent may use, comma-separated ('' for none), e.g. calculator,web_fetch; an MCP server's as "
        "shop (all its tools) or shop__lookup_order (one).",
    ),
    tool_policy: list[str] | None = typer.Option(
        None,
        "--tool-policy",
        help="NAME=allow|ask|ask:operators|deny: may the agent call the tool freely, after the person's "
        "(or an operator's) approval, or never (repeat; NAME=default for the tool's own default).",
    ),
    rules: list[str] | None = typer.Option(
        None, "--escalation-rule", help='A rule handing the conversation to a human, e.g. "refund OR lawyer" (repeat; "" clears).'
    ),
    prompts: list[str] | None = typer.Option(None, "--suggested-prompt", help=PROMPT_HELP + " Replaces the agent's list."),
    clear_prompts: bool = typer.Option(False, "--clear-suggested-prompts", help="Remove the agent's suggested prompts."),
    as_json: bool = JsonOption,
) -> None:
    """Change an agent's name, role, persona, model, fallback models, tools (and their approval policies), escalation rules
    or suggested prompts."""
    text = persona_text(persona, persona_file, required=False)
    changes: dict[str, Any] = {"name": new_name, "role": role, "persona": text, "model": model}
    if fallbacks is not None:
        changes["fallbacks"] = comma_list(fallbacks)
    if tools is not None:
        changes["tools"] = comma_list(tools)
    if tool_policy:
        changes["tool_policy_updates"] = parse_assignments(tool_policy)
    if rules is not None:
        changes["escalation_rules"] = [r for r in rules if r.strip()]
    if clear_prompts and prompts:
        raise ValidationError("give --suggested-prompt or --clear-suggested-prompts, not both")
    if clear_prompts or prompts:
        changes["suggested_prompts"] = [] if clear_prompts else list(prompts or [])
    agent = with_tenant(ctx, tenant, "agent.write", lambda db, t: service.update_agent(db, t, name, changes=changes, actor=actor()))
    if as_json:
        print_json(agent.as_json())
    else:
        report_updated(agent)


def comma_list(text: str) -> list[str]:
    """'a, b,,c' → ['a', 'b', 'c'] ('' is the empty list)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def report_updated(agent: service.AgentInfo) -> None:
    out.print(f"[green]updated[/green] agent {agent.name}")


@app.command("delete")
def delete(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The agent's name."),
    tenant: str = TenantOption,
    yes: bool = YesOption,
) -> None:
    """Delete an agent and its conversations."""
    confirm_deletion(yes, f"agent {name!r} of {tenant}", "its conversations")
    with_tenant(ctx, tenant, "agent.write", lambda db, t: service.delete_agent(db, t, name, actor=actor()))
    out.print(f"[green]deleted[/green] agent {name}")


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
