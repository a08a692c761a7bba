"""konstruct invite …: invite people to a tenant by email, with single-use links that expire."""

from __future__ import annotations

import sys
import uuid

import typer

from konstruct.cli.common import (
    JsonOption,
    TenantOption,
    actor,
    out,
    print_json,
    print_table,
    secret_input,
    settings,
    with_database,
    with_tenant,
)
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.urls import resolve_urls
from konstruct.errors import ValidationError
from konstruct.secrets import encrypt
from konstruct.tenancy import invitations as service
from konstruct.tenancy.tenants import TenantInfo
from konstruct.worker.queue import make_queue

app = typer.Typer(help="Invite people to a tenant by email (single-use links that expire).", no_args_is_help=True)


def queue_invitation_email(cfg: Settings, info: service.InvitationInfo, tenant_id: uuid.UUID, token: str) -> bool:
    """Queue the email (the worker sends it). False when no SMTP server is configured."""
    if not cfg.smtp.host:
        return False
    queue = make_queue(cfg, resolve_urls(cfg))
    try:
        queue.enqueue_invitation(tenant_id, info.id, encrypt(cfg, token).decode())
    finally:
        queue.close()
    return True


def _print_invitation(cfg: Settings, info: service.InvitationInfo, token: str, emailed: bool, show_link: bool, as_json: bool) -> None:
    link = service.invite_url(cfg, token)
    if as_json:
        print_json({**info.as_json(), "emailed": emailed, **({"link": link} if show_link or not emailed else {})})
        return
    if emailed:
        out.print(
            f"[green]invited[/green] {info.email} as {info.role}: the link is emailed (valid until {info.expires_at:%Y-%m-%d %H:%M} UTC)"
        )
    else:
        out.print(f"[yellow]no SMTP server configured[/yellow] ([smtp] host): give {info.email} this link yourself")
    if show_link or not emailed:
        out.print(link)


@app.command("create")
def create(
    ctx: typer.Context,
    tenant: str = TenantOption,
    email: str = typer.Option(..., "--email", help="Who to invite."),
    role: str = typer.Option(..., "--role", help="customer_admin or customer_operator."),
    days: float = typer.Option(service.DEFAULT_DAYS, "--days", help="Days the link stays valid."),
    show_link: bool = typer.Option(False, "--show-link", help="Also print the link (it is a secret: whoever has it can join)."),
    as_json: bool = JsonOption,
) -> None:
    """Invite someone to a tenant: a single-use link, emailed by a worker."""
    cfg = settings(ctx)

    async def go(db: Database, found: TenantInfo) -> tuple[service.InvitationInfo, str, uuid.UUID]:
        info, token = await service.create(db, found, email=email, role=role, days=days, actor=actor())
        return info, token, found.id

    info, token, tenant_id = with_tenant(ctx, tenant, "invite.write", go)
    _print_invitation(cfg, info, token, queue_invitation_email(cfg, info, tenant_id, token), show_link, as_json)


@app.command("list")
def list_(ctx: typer.Context, tenant: str = TenantOption, as_json: bool = JsonOption) -> None:
    """A tenant's invitations and their state: pending, accepted, revoked or expired."""
    rows = with_tenant(ctx, tenant, "invite.read", service.list_invitations)
    if as_json:
        print_json([r.as_json() for r in rows])
    elif not rows:
        out.print(f"{tenant} has no invitations")
    else:
        print_table(
            None,
            ["id", "email", "role", "state", "expires", "by"],
            [(str(r.id)[:8], r.email, r.role, r.state, f"{r.expires_at:%Y-%m-%d %H:%M}", r.created_by) for r in rows],
        )


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="The invitation's id (its first characters) or the invited email."),
    tenant: str = TenantOption,
    as_json: bool = JsonOption,
) -> None:
    """Revoke a pending invitation: its link stops working."""
    info = with_tenant(ctx, tenant, "invite.write", lambda db, t: service.revoke(db, t, ref, actor=actor()))
    if as_json:
        print_json(info.as_json())
    else:
        out.print(f"[green]revoked[/green] the invitation for {info.email}")


@app.command("resend")
def resend(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="The invitation's id (its first characters) or the invited email."),
    tenant: str = TenantOption,
    days: float = typer.Option(service.DEFAULT_DAYS, "--days", help="Days the new link stays valid."),
    show_link: bool = typer.Option(False, "--show-link", help="Also print the new link."),
    as_json: bool = JsonOption,
) -> None:
    """Send a pending or expired invitation again, with a new link (the old one stops working)."""
    cfg = settings(ctx)

    async def go(db: Database, found: TenantInfo) -> tuple[service.InvitationInfo, str, uuid.UUID]:
        info, token = await service.resend(db, found, ref, days=days, actor=actor())
        return info, token, found.id

    info, token, tenant_id = with_tenant(ctx, tenant, "invite.write", go)
    _print_invitation(cfg, info, token, queue_invitation_email(cfg, info, tenant_id, token), show_link, as_json)


@app.command("accept")
def accept(
    ctx: typer.Context,
    token: str | None = typer.Argument(
        None, help="The invitation link, or its token (the part after /invite/). One starting with '-': `-- TOKEN` or --token."
    ),
    token_option: str | None = typer.Option(None, "--token", help="The token, as an option (it may start with '-')."),
    name: str | None = typer.Option(None, "--name", help="Your name (asked when missing)."),
    password_env: str | None = typer.Option(None, "--password-env", help="Environment variable holding your new password (else asked)."),
    as_json: bool = JsonOption,
) -> None:
    """Accept an invitation: set your name and password and join the tenant."""
    if (token is None) == (token_option is None):
        raise ValidationError("pass the invitation link or its token once: `konstruct invite accept TOKEN` or --token TOKEN")
    token = str(token or token_option).rsplit("/invite/", 1)[-1].strip()
    pending = with_database(ctx, lambda db: service.look_up(db, token))  # a used or expired link is said before anything is asked
    password: str | None = None
    if not pending.has_password:  # a new account: a name and a password
        if name is None:
            if not sys.stdin.isatty():
                raise ValidationError("pass --name (there is no terminal to ask on)")
            name = str(typer.prompt("Your name"))
        password = secret_input(password_env, "Password", "password", "--password-env", confirm=True)
    email, role, tenant_name = with_database(ctx, lambda db: service.accept(db, token, name=name or "", password=password))
    if as_json:
        print_json({"email": email, "role": role, "tenant": tenant_name})
    else:
        out.print(f"[green]welcome[/green] {email}: you are {role} of {tenant_name}")
