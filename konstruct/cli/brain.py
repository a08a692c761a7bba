"""konstruct memory | conversation | escalation …, and `tenant configure`: the agent's memory and its humans."""

from __future__ import annotations

import re

import typer

from konstruct.agent import escalation as escalations
from konstruct.agent import memory as memories
from konstruct.agent.agents import get_agent
from konstruct.channels.registry import validate_escalation_target
from konstruct.cli.common import (
    JsonOption,
    YesOption,
    actor,
    confirm_deletion,
    database,
    out,
    print_json,
    print_table,
    run,
    settings,
    tenant_for,
)
from konstruct.errors import ValidationError
from konstruct.tenancy.tenants import update_settings

TenantOption = typer.Option(..., "--tenant", "-t", help="The tenant's slug.")
memory_app = typer.Typer(help="What agents remember about people; the right to be forgotten.", no_args_is_help=True)
conversation_app = typer.Typer(help="Conversations, and handing escalated ones back to the agent.", no_args_is_help=True)
escalation_app = typer.Typer(help="Escalation rules: try them without sending anything.", no_args_is_help=True)


@memory_app.command("list")
def memory_list(
    ctx: typer.Context,
    tenant: str = TenantOption,
    person: str = typer.Option(..., "--person", help="The person: Slack user id, WhatsApp number, terminal name."),
    as_json: bool = JsonOption,
) -> None:
    """What the tenant's agents remember about one person."""

    async def go() -> list[memories.MemoryInfo]:
        async with database(settings(ctx)) as db:
            return await memories.list_memories(db, await tenant_for(db, tenant, "memory.read"), person)

    rows = run(go())
    if as_json:
        print_json([m.as_json() for m in rows])
    elif not rows:
        out.print(f"nothing remembered about {person}")
    else:
        print_table(None, ["id", "when", "memory"], [(m.id, m.created_at.strftime("%Y-%m-%d %H:%M"), m.content) for m in rows])


@memory_app.command("forget")
def memory_forget(
    ctx: typer.Context,
    tenant: str = TenantOption,
    person: str = typer.Option(..., "--person", help="The person to forget."),
    yes: bool = YesOption,
    as_json: bool = JsonOption,
) -> None:
    """Delete everything about one person: memories, conversations and messages (audited)."""
    confirm_deletion(yes, f"everything {tenant} holds about {person}", "their memories, conversations and messages")

    async def go() -> tuple[int, int]:
        async with database(settings(ctx)) as db:
            return await memories.forget(db, await tenant_for(db, tenant, "memory.forget"), person, actor=actor())

    removed, conversations = run(go())
    if as_json:
        print_json({"person": person, "memories": removed, "conversations": conversations})
    else:
        out.print(f"[green]forgotten[/green] {person}: {removed} memories, {conversations} conversations")


@conversation_app.command("list")
def conversation_list(
    ctx: typer.Context,
    tenant: str = TenantOption,
    escalated: bool = typer.Option(False, "--escalated", help="Only conversations waiting for a human."),
    as_json: bool = JsonOption,
) -> None:
    """The tenant's recent conversations (or the escalated ones)."""

    async def go() -> list[escalations.EscalationInfo]:
        async with database(settings(ctx)) as db:
            return await escalations.list_conversations(db, await tenant_for(db, tenant, "conversation.read"), escalated_only=escalated)

    rows = run(go())
    if as_json:
        print_json([c.as_json() for c in rows])
    elif not rows:
        out.print("no escalated conversations" if escalated else "no conversations yet")
    else:
        print_table(
            None,
            ["id", "channel", "person", "status", "escalated", "reason"],
            [
                (
                    str(c.conversation_id)[:8],
                    c.channel,
                    c.person,
                    c.status,
                    c.escalated_at.strftime("%Y-%m-%d %H:%M") if c.escalated_at else "",
                    c.reason or "",
                )
                for c in rows
            ],
        )


@conversation_app.command("release")
def conversation_release(
    ctx: typer.Context, ref: str = typer.Argument(..., help="Conversation id (or its first 8 characters)."), tenant: str = TenantOption
) -> None:
    """Hand an escalated conversation back to the agent."""

    async def go() -> bool:
        async with database(settings(ctx)) as db:
            info = await tenant_for(db, tenant, "conversation.handle")
            conversation_id = await escalations.find_conversation(db, info, ref)
            return await escalations.release(db, tenant_id=info.id, conversation_id=conversation_id, actor=actor())

    if not run(go()):
        raise ValidationError(f"conversation {ref} is not escalated")
    out.print(f"[green]released[/green] {ref}: the agent answers again")


@escalation_app.command("test")
def escalation_test(
    ctx: typer.Context,
    message: str = typer.Argument(..., help="A message as the person would write it."),
    tenant: str = TenantOption,
    agent: str = typer.Option(..., "--agent", help="The agent whose rules to try."),
    count: int = typer.Option(1, "--count", min=1, help="The person's turn number in the conversation."),
    as_json: bool = JsonOption,
) -> None:
    """Dry run: which of the agent's rules fires for this message, and why. Nothing is sent or stored."""

    async def go() -> list[str]:
        async with database(settings(ctx)) as db:
            found = await get_agent(db, await tenant_for(db, tenant, "escalation.test"), agent)
            return list(found.settings.get("escalation_rules") or [])

    rules = run(go())
    fired = escalations.check(rules, message, count) if rules else None
    if as_json:
        print_json({"rules": rules, "fired": fired[0] if fired else None, "reasons": fired[1].reasons if fired else []})
    elif not rules:
        out.print(f"{agent} has no escalation rules: `konstruct agent update {agent} --tenant {tenant} --escalation-rule …`")
    elif fired:
        out.print(f"[yellow]escalates[/yellow]: rule {fired[0]!r} fires because {'; '.join(fired[1].reasons)}")
    else:
        out.print(f"no rule fires ({len(rules)} tried): the agent answers")


def configure(
    ctx: typer.Context,
    slug: str = typer.Argument(..., help="The tenant's slug."),
    escalation_target: str | None = typer.Option(
        None, "--escalation-target", help="Where escalations are announced: slack:CHANNEL_ID or slack:USER_ID ('' for none)."
    ),
    allowed_hosts: str | None = typer.Option(None, "--allowed-hosts", help="Hosts web_fetch may reach, comma-separated ('' for none)."),
    contact_email: str | None = typer.Option(
        None, "--contact-email", help="Where budget alerts and billing notices are emailed ('' for none)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Set a tenant's escalation target, web_fetch allow-list and contact email."""
    target = validate_escalation_target(escalation_target) if escalation_target else escalation_target
    hosts = None
    if allowed_hosts is not None:
        hosts = [h.strip().lower() for h in allowed_hosts.split(",") if h.strip()]
        bad = [h for h in hosts if not re.fullmatch(r"(\*\.)?[a-z0-9.-]+(:\d+)?", h)]
        if bad:
            raise ValidationError(f"not a host name: {', '.join(bad)} (e.g. docs.example.com or *.example.com)")

    async def go() -> dict[str, object]:
        async with database(settings(ctx)) as db:
            return await update_settings(db, await tenant_for(db, slug, "tenant.configure"), escalation_target=target, allowed_hosts=hosts, actor=actor(),
                                         contact_email=contact_email)  # fmt: skip

    values = run(go())
    if as_json:
        print_json(values)
    else:
        out.print(f"[green]updated[/green] {slug}: " + ", ".join(f"{k} = {v}" for k, v in values.items()))
