"""konstruct escalation …: try an agent's escalation rules without sending anything."""

from __future__ import annotations

import typer

from konstruct.agent import escalation as service
from konstruct.agent.agents import get_agent
from konstruct.cli.common import JsonOption, TenantOption, out, print_json, with_tenant
from konstruct.db.engine import Database
from konstruct.tenancy.tenants import TenantInfo

app = typer.Typer(help="Escalation rules: try them without sending anything.", no_args_is_help=True)


@app.command("test")
def test(
    ctx: typer.Context,
    message: str = typer.Argument(..., help="A message as the person would write it."),
    tenant: str = TenantOption,
    agent: str = typer.Option(..., "--agent", help="The agent whose rules to try."),
    count: int = typer.Option(1, "--count", min=1, help="The person's turn number in the conversation."),
    as_json: bool = JsonOption,
) -> None:
    """Dry run: which of the agent's rules fires for this message, and why. Nothing is sent or stored."""

    async def rules_of(db: Database, info: TenantInfo) -> list[str]:
        return list((await get_agent(db, info, agent)).settings.get("escalation_rules") or [])

    rules = with_tenant(ctx, tenant, "escalation.test", rules_of)
    fired = service.check(rules, message, count) if rules else None
    if as_json:
        print_json({"rules": rules, "fired": fired[0] if fired else None, "reasons": fired[1].reasons if fired else []})
    elif not rules:
        out.print(f"{agent} has no escalation rules: `konstruct agent update {agent} --tenant {tenant} --escalation-rule …`")
    elif fired:
        out.print(f"[yellow]escalates[/yellow]: rule {fired[0]!r} fires because {'; '.join(fired[1].reasons)}")
    else:
        out.print(f"no rule fires ({len(rules)} tried): the agent answers")
