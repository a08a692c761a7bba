"""konstruct approval …: tool calls waiting for a human's approval, and deciding them."""

from __future__ import annotations

import typer
from rich.markup import escape

from konstruct import approvals as service
from konstruct.cli.common import JsonOption, TenantOption, actor, out, print_json, print_table, settings, with_tenant
from konstruct.db.engine import Database
from konstruct.db.urls import resolve_urls
from konstruct.tenancy.tenants import TenantInfo
from konstruct.worker.queue import make_queue

app = typer.Typer(help="Tool calls waiting for approval: list them, approve or deny them.", no_args_is_help=True)

StatusOption = typer.Option("pending", "--status", help="pending, approved, denied, expired, or all.")


@app.command("list")
def list_(ctx: typer.Context, tenant: str = TenantOption, status: str = StatusOption, as_json: bool = JsonOption) -> None:
    """The tenant's approvals, newest first (by default the pending ones)."""
    wanted = None if status == "all" else status
    rows = with_tenant(ctx, tenant, "approval.read", lambda db, t: service.list_approvals(db, t, status=wanted))
    if as_json:
        print_json([a.as_json() for a in rows])
    elif not rows:
        out.print(f"no {'' if wanted is None else wanted + ' '}approvals")
    else:
        print_table(None, ["id", "agent", "tool", "arguments", "approver", "status", "expires", "decided by"],
                    [(str(a.id)[:8], a.agent, a.tool, escape(_short(a.arguments)), a.approver, a.status,
                      a.expires_at.strftime("%Y-%m-%d %H:%M"), a.decided_by or "") for a in rows])  # fmt: skip


@app.command("approve")
def approve(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="The approval's id (or its first 8 characters)."),
    tenant: str = TenantOption,
    as_json: bool = JsonOption,
) -> None:
    """Approve a waiting tool call: the agent makes it and goes on with its answer."""
    _decide(ctx, ref, tenant, True, as_json)


@app.command("deny")
def deny(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="The approval's id (or its first 8 characters)."),
    tenant: str = TenantOption,
    as_json: bool = JsonOption,
) -> None:
    """Deny a waiting tool call: the agent is told it was not made and answers without it."""
    _decide(ctx, ref, tenant, False, as_json)


def _decide(ctx: typer.Context, ref: str, tenant: str, approve: bool, as_json: bool) -> None:
    cfg = settings(ctx)

    async def go(db: Database, info: TenantInfo) -> service.Decision:
        approval_id = await service.find(db, info, ref)
        queue = make_queue(cfg, resolve_urls(cfg))
        try:
            return await service.decide(db, queue, tenant_id=info.id, approval_id=approval_id, approve=approve,
                                        decider=service.Decider(actor(), operator=True))  # fmt: skip
        finally:
            queue.close()

    decision = with_tenant(ctx, tenant, "approval.decide", go)
    if as_json:
        print_json({**decision.approval.as_json(), "changed": decision.changed})
    elif decision.changed:
        out.print(
            f"[green]{decision.approval.status}[/green] {decision.approval.tool} ({str(decision.approval.id)[:8]}): the agent goes on"
        )
    else:
        out.print(f"[yellow]already {decision.approval.status}[/yellow] ({decision.approval.decided_by}): nothing changed")


def _short(arguments: dict[str, object], width: int = 60) -> str:
    text = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    return text if len(text) <= width else text[: width - 1] + "…"
