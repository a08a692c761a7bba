"""konstruct user …: who may use a tenant, with which role; platform admins."""

from __future__ import annotations

import typer

from konstruct.cli.common import (
    EveryTenantOption,
    JsonOption,
    TenantOption,
    YesOption,
    actor,
    confirm_deletion,
    out,
    platform,
    print_fields,
    print_json,
    print_table,
    secret_input,
    tenant_for,
    with_database,
    with_tenant,
)
from konstruct.db.engine import Database
from konstruct.tenancy import users as service

app = typer.Typer(help="Users of a tenant and their roles; platform admins.", no_args_is_help=True)


@app.command("list")
def list_(ctx: typer.Context, tenant: str | None = EveryTenantOption, as_json: bool = JsonOption) -> None:
    """The users of a tenant with their roles (or every user, for platform admins)."""

    async def go(db: Database) -> list[dict[str, object]]:
        if tenant is None:
            await platform(db, "user.admin")
            return await service.directory(db)
        return [m.as_json() for m in await service.members(db, await tenant_for(db, tenant, "user.read"))]

    rows = with_database(ctx, go)
    if as_json:
        print_json(rows)
    elif not rows:
        out.print(f"{tenant or 'this installation'} has no users yet: `konstruct invite create --tenant … --email … --role …`")
    elif tenant is None:
        print_table(None, ["email", "name", "platform admin", "since"], [(r["email"], r["name"], "yes" if r["platform_admin"] else "", str(r["created_at"])[:10]) for r in rows])  # fmt: skip
    else:
        print_table(None, ["email", "name", "role", "signed up", "since"], [(r["email"], r["name"], r["role"], "yes" if r["has_password"] else "no", str(r["since"])[:10]) for r in rows])  # fmt: skip


@app.command("show")
def show(
    ctx: typer.Context,
    email: str = typer.Argument(..., help="The user's email."),
    tenant: str = TenantOption,
    as_json: bool = JsonOption,
) -> None:
    """One user of a tenant."""
    info = with_tenant(ctx, tenant, "user.read", lambda db, t: service.member(db, t, email))
    if as_json:
        print_json(info.as_json())
    else:
        print_fields(info.as_json())


@app.command("role")
def role(
    ctx: typer.Context,
    email: str = typer.Argument(..., help="The user's email."),
    role: str = typer.Argument(..., help="customer_admin or customer_operator."),
    tenant: str = TenantOption,
    as_json: bool = JsonOption,
) -> None:
    """Change a user's role in a tenant."""
    info = with_tenant(ctx, tenant, "user.write", lambda db, t: service.set_role(db, t, email, role, actor=actor()))
    if as_json:
        print_json(info.as_json())
    else:
        out.print(f"[green]{info.email}[/green] is now {info.role} of {tenant}")


@app.command("remove")
def remove(
    ctx: typer.Context,
    email: str = typer.Argument(..., help="The user's email."),
    tenant: str = TenantOption,
    yes: bool = YesOption,
    as_json: bool = JsonOption,
) -> None:
    """Take a user out of a tenant (their account and other tenants stay)."""
    confirm_deletion(yes, f"{email} from {tenant}", "their access to this tenant")
    info = with_tenant(ctx, tenant, "user.write", lambda db, t: service.remove_member(db, t, email, actor=actor()))
    if as_json:
        print_json({**info.as_json(), "removed": True})
    else:
        out.print(f"[green]removed[/green] {info.email} ({info.role}) from {tenant}")


@app.command("create")
def create(
    ctx: typer.Context,
    email: str = typer.Argument(..., help="The new user's email."),
    name: str = typer.Option(..., "--name", help="Their name."),
    platform_admin: bool = typer.Option(False, "--platform-admin", help="Make them a platform admin (every tenant)."),
    password_env: str | None = typer.Option(None, "--password-env", help="Environment variable holding the password (else asked, hidden)."),
    as_json: bool = JsonOption,
) -> None:
    """Create a user directly (platform admins only; customers join through invitations)."""
    password = secret_input(password_env, "Password", "password", "--password-env", confirm=True)

    async def go(db: Database) -> None:
        await platform(db, "user.admin")
        await service.create_user(db, email=email, name=name, password=password, platform_admin=platform_admin, actor=actor())

    with_database(ctx, go)
    if as_json:
        print_json({"email": email.strip().lower(), "platform_admin": platform_admin})
    else:
        out.print(f"[green]created[/green] user {email.strip().lower()}" + (" (platform admin)" if platform_admin else ""))


@app.command("admin")
def admin(
    ctx: typer.Context,
    email: str = typer.Argument(..., help="The user's email."),
    revoke: bool = typer.Option(False, "--revoke", help="Take platform admin away instead."),
    as_json: bool = JsonOption,
) -> None:
    """Grant (or revoke) platform admin."""

    async def go(db: Database) -> None:
        await platform(db, "user.admin")
        await service.set_platform_admin(db, email, not revoke)

    with_database(ctx, go)
    if as_json:
        print_json({"email": email.strip().lower(), "platform_admin": not revoke})
    else:
        out.print(f"{email.strip().lower()} {'is no longer' if revoke else 'is now'} a platform admin")
