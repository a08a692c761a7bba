"""konstruct user | invite: who may use a tenant, with which role, and how they get in."""

from __future__ import annotations

import sys

import typer

from konstruct.cli.common import (
    JsonOption,
    YesOption,
    actor,
    confirm_deletion,
    database,
    out,
    platform,
    print_fields,
    print_json,
    print_table,
    run,
    secret_input,
    settings,
    tenant_for,
)
from konstruct.config import Settings
from konstruct.db.urls import resolve_urls
from konstruct.errors import ValidationError
from konstruct.secrets import encrypt
from konstruct.tenancy import invitations
from konstruct.tenancy import users as service

TenantOption = typer.Option(..., "--tenant", "-t", help="The tenant's slug.")
user_app = typer.Typer(help="Users of a tenant and their roles; platform admins.", no_args_is_help=True)
invite_app = typer.Typer(help="Invite people to a tenant by email (single-use links that expire).", no_args_is_help=True)


# -- users --


@user_app.command("list")
def user_list(
    ctx: typer.Context,
    tenant: str | None = typer.Option(None, "--tenant", "-t", help="The tenant's slug (without: every user, for platform admins)."),
    as_json: bool = JsonOption,
) -> None:
    """The users of a tenant with their roles (or every user)."""

    async def go() -> list[dict[str, object]]:
        async with database(settings(ctx)) as db:
            if tenant is None:
                await platform(db, "user.admin")
                return await service.directory(db)
            return [m.as_json() for m in await service.members(db, await tenant_for(db, tenant, "user.read"))]

    rows = run(go())
    if as_json:
        print_json(rows)
    elif not rows:
        out.print(f"{tenant or 'this installation'} has no users yet: `konstruct invite create --tenant … --email … --role …`")
    elif tenant is None:
        print_table(None, ["email", "name", "platform admin", "since"], [(r["email"], r["name"], "yes" if r["platform_admin"] else "", str(r["created_at"])[:10]) for r in rows])  # fmt: skip
    else:
        print_table(None, ["email", "name", "role", "signed up", "since"], [(r["email"], r["name"], r["role"], "yes" if r["has_password"] else "no", str(r["since"])[:10]) for r in rows])  # fmt: skip


@user_app.command("show")
def user_show(
    ctx: typer.Context,
    email: str = typer.Argument(..., help="The user's email."),
    tenant: str = TenantOption,
    as_json: bool = JsonOption,
) -> None:
    """One user of a tenant."""

    async def go() -> service.MemberInfo:
        async with database(settings(ctx)) as db:
            return await service.member(db, await tenant_for(db, tenant, "user.read"), email)

    info = run(go())
    if as_json:
        print_json(info.as_json())
    else:
        print_fields(info.as_json())


@user_app.command("role")
def user_role(
    ctx: typer.Context,
    email: str = typer.Argument(..., help="The user's email."),
    role: str = typer.Argument(..., help="customer_admin or customer_operator."),
    tenant: str = TenantOption,
    as_json: bool = JsonOption,
) -> None:
    """Change a user's role in a tenant."""

    async def go() -> service.MemberInfo:
        async with database(settings(ctx)) as db:
            return await service.set_role(db, await tenant_for(db, tenant, "user.write"), email, role, actor=actor())

    info = run(go())
    if as_json:
        print_json(info.as_json())
    else:
        out.print(f"[green]{info.email}[/green] is now {info.role} of {tenant}")


@user_app.command("remove")
def user_remove(
    ctx: typer.Context,
    email: str = typer.Argument(..., help="The user's email."),
    tenant: str = TenantOption,
    yes: bool = YesOption,
    as_json: bool = JsonOption,
) -> None:
    """Take a user out of a tenant (their account and other tenants stay)."""
    confirm_deletion(yes, f"{email} from {tenant}", "their access to this tenant")

    async def go() -> service.MemberInfo:
        async with database(settings(ctx)) as db:
            return await service.remove_member(db, await tenant_for(db, tenant, "user.write"), email, actor=actor())

    info = run(go())
    if as_json:
        print_json({**info.as_json(), "removed": True})
    else:
        out.print(f"[green]removed[/green] {info.email} ({info.role}) from {tenant}")


@user_app.command("create")
def user_create(
    ctx: typer.Context,
    email: str = typer.Argument(..., help="The new user's email."),
    name: str = typer.Option(..., "--name", help="Their name."),
    platform_admin: bool = typer.Option(False, "--platform-admin", help="Make them a platform admin (every tenant)."),
    password_env: str | None = typer.Option(None, "--password-env", help="Environment variable holding the password (else asked, hidden)."),
    as_json: bool = JsonOption,
) -> None:
    """Create a user directly (platform admins only; customers join through invitations)."""
    password = secret_input(password_env, "Password", "password", "--password-env", confirm=True)

    async def go() -> None:
        async with database(settings(ctx)) as db:
            await platform(db, "user.admin")
            await service.create_user(db, email=email, name=name, password=password, platform_admin=platform_admin, actor=actor())

    run(go())
    if as_json:
        print_json({"email": email.strip().lower(), "platform_admin": platform_admin})
    else:
        out.print(f"[green]created[/green] user {email.strip().lower()}" + (" (platform admin)" if platform_admin else ""))


@user_app.command("admin")
def user_admin(
    ctx: typer.Context,
    email: str = typer.Argument(..., help="The user's email."),
    revoke: bool = typer.Option(False, "--revoke", help="Take platform admin away instead."),
    as_json: bool = JsonOption,
) -> None:
    """Grant (or revoke) platform admin."""

    async def go() -> None:
        async with database(settings(ctx)) as db:
            await platform(db, "user.admin")
            await service.set_platform_admin(db, email, not revoke)

    run(go())
    if as_json:
        print_json({"email": email.strip().lower(), "platform_admin": not revoke})
    else:
        out.print(f"{email.strip().lower()} {'is no longer' if revoke else 'is now'} a platform admin")


# -- invitations --


def queue_invitation_email(cfg: Settings, info: invitations.InvitationInfo, tenant_id: object, token: str) -> bool:
    """Queue the email (the worker sends it). False when no SMTP server is configured."""
    if not cfg.smtp.host:
        return False
    from konstruct.worker.queue import make_queue

    queue = make_queue(cfg, resolve_urls(cfg))
    try:
        queue.enqueue_invitation(tenant_id, info.id, encrypt(cfg, token).decode())  # type: ignore[arg-type]
    finally:
        queue.close()
    return True


def _print_invitation(cfg: Settings, info: invitations.InvitationInfo, token: str, emailed: bool, show_link: bool, as_json: bool) -> None:
    link = invitations.invite_url(cfg, token)
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


@invite_app.command("create")
def invite_create(
    ctx: typer.Context,
    tenant: str = TenantOption,
    email: str = typer.Option(..., "--email", help="Who to invite."),
    role: str = typer.Option(..., "--role", help="customer_admin or customer_operator."),
    days: float = typer.Option(invitations.DEFAULT_DAYS, "--days", help="Days the link stays valid."),
    show_link: bool = typer.Option(False, "--show-link", help="Also print the link (it is a secret: whoever has it can join)."),
    as_json: bool = JsonOption,
) -> None:
    """Invite someone to a tenant: a single-use link, emailed by a worker."""
    cfg = settings(ctx)

    async def go() -> tuple[invitations.InvitationInfo, str, object]:
        async with database(cfg) as db:
            found = await tenant_for(db, tenant, "invite.write")
            info, token = await invitations.create(db, found, email=email, role=role, days=days, actor=actor())
            return info, token, found.id

    info, token, tenant_id = run(go())
    _print_invitation(cfg, info, token, queue_invitation_email(cfg, info, tenant_id, token), show_link, as_json)


@invite_app.command("list")
def invite_list(ctx: typer.Context, tenant: str = TenantOption, as_json: bool = JsonOption) -> None:
    """A tenant's invitations and their state: pending, accepted, revoked or expired."""

    async def go() -> list[invitations.InvitationInfo]:
        async with database(settings(ctx)) as db:
            return await invitations.list_invitations(db, await tenant_for(db, tenant, "invite.read"))

    rows = run(go())
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


@invite_app.command("revoke")
def invite_revoke(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="The invitation's id (its first characters) or the invited email."),
    tenant: str = TenantOption,
    as_json: bool = JsonOption,
) -> None:
    """Revoke a pending invitation: its link stops working."""

    async def go() -> invitations.InvitationInfo:
        async with database(settings(ctx)) as db:
            return await invitations.revoke(db, await tenant_for(db, tenant, "invite.write"), ref, actor=actor())

    info = run(go())
    if as_json:
        print_json(info.as_json())
    else:
        out.print(f"[green]revoked[/green] the invitation for {info.email}")


@invite_app.command("resend")
def invite_resend(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="The invitation's id (its first characters) or the invited email."),
    tenant: str = TenantOption,
    days: float = typer.Option(invitations.DEFAULT_DAYS, "--days", help="Days the new link stays valid."),
    show_link: bool = typer.Option(False, "--show-link", help="Also print the new link."),
    as_json: bool = JsonOption,
) -> None:
    """Send a pending or expired invitation again, with a new link (the old one stops working)."""
    cfg = settings(ctx)

    async def go() -> tuple[invitations.InvitationInfo, str, object]:
        async with database(cfg) as db:
            found = await tenant_for(db, tenant, "invite.write")
            info, token = await invitations.resend(db, found, ref, days=days, actor=actor())
            return info, token, found.id

    info, token, tenant_id = run(go())
    _print_invitation(cfg, info, token, queue_invitation_email(cfg, info, tenant_id, token), show_link, as_json)


@invite_app.command("accept")
def invite_accept(
    ctx: typer.Context,
    token: str = typer.Argument(..., help="The token from the invitation link (the part after /invite/)."),
    name: str | None = typer.Option(None, "--name", help="Your name (asked when missing)."),
    password_env: str | None = typer.Option(None, "--password-env", help="Environment variable holding your new password (else asked)."),
    as_json: bool = JsonOption,
) -> None:
    """Accept an invitation: set your name and password and join the tenant."""
    token = token.rsplit("/invite/", 1)[-1].strip()
    cfg = settings(ctx)

    async def check() -> invitations.Pending:
        async with database(cfg) as db:
            return await invitations.look_up(db, token)

    pending = run(check())  # a used or expired link is said before anything is asked
    password: str | None = None
    if not pending.has_password:  # a new account: a name and a password
        if name is None:
            if not sys.stdin.isatty():
                raise ValidationError("pass --name (there is no terminal to ask on)")
            name = str(typer.prompt("Your name"))
        password = secret_input(password_env, "Password", "password", "--password-env", confirm=True)

    async def go() -> tuple[str, str, str]:
        async with database(cfg) as db:
            return await invitations.accept(db, token, name=name or "", password=password)

    email, role, tenant_name = run(go())
    if as_json:
        print_json({"email": email, "role": role, "tenant": tenant_name})
    else:
        out.print(f"[green]welcome[/green] {email}: you are {role} of {tenant_name}")
