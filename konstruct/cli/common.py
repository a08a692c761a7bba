"""What every command shares: the options, the settings, one way to run against the database, output helpers."""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from konstruct.config import Settings, load_settings, read_secret_from_environment
from konstruct.errors import ValidationError

if TYPE_CHECKING:  # the database stack (SQLAlchemy's ORM, the models) is imported by the commands that use it: not `up`'s
    from konstruct.db.engine import Database
    from konstruct.tenancy.access import Principal
    from konstruct.tenancy.tenants import TenantInfo

T = TypeVar("T")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

# The options many commands share, declared once.
TenantOption = typer.Option(..., "--tenant", "-t", help="The tenant's slug.")
EveryTenantOption = typer.Option(None, "--tenant", "-t", help="Only this tenant (default: every tenant).")
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")
YesOption = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")


@dataclass
class State:
    config: str | None = None
    verbose: bool = False
    settings: Settings | None = None


def state(ctx: typer.Context) -> State:
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State()
    return root.obj


def settings(ctx: typer.Context) -> Settings:
    """The settings of this invocation (konstruct.toml and the environment), read once."""
    st = state(ctx)
    if st.settings is None:
        st.settings = load_settings(st.config)
    return st.settings


def confirm_deletion(yes: bool, what: str, consequence: str) -> None:
    """Ask before deleting; without a terminal to ask on, insist on --yes."""
    if yes:
        return
    if not typer.get_text_stream("stdin").isatty():
        raise ValidationError(f"deleting {what} removes {consequence}: pass --yes to confirm")
    typer.confirm(f"Delete {what} and {consequence}?", abort=True)


_acting_as: str | None = None  # --as EMAIL / KONSTRUCT_AS, set by the root command


def act_as(email: str | None) -> None:
    global _acting_as
    _acting_as = email.strip().lower() if email and email.strip() else None


def secret_input(env_name: str | None, prompt: str, what: str, flag: str, *, confirm: bool = False) -> str:
    """A secret from the environment variable the person named, or asked for hidden: never a command-line
    argument (it would land in shell history). Without a terminal to ask on, the flag is required."""
    if env_name:
        return read_secret_from_environment(env_name, what)
    if not sys.stdin.isatty():
        raise ValidationError(f"{what}: pass it in an environment variable with {flag} NAME; there is no terminal to ask on")
    value = str(typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm)).strip()
    if not value:
        raise ValidationError(f"{what} is empty")
    return value


def actor() -> str:
    """Who is acting, for the audit log: the user acted as, or the local operator."""
    if _acting_as:
        return f"user:{_acting_as}"
    try:
        return f"operator:{getpass.getuser()}"
    except Exception:
        return "operator:unknown"


async def who(db: Database) -> Principal:
    """The acting principal: the local operator (a platform admin), or exactly the user of --as."""
    from konstruct.tenancy import access

    return await access.principal_for(db, _acting_as) if _acting_as else access.local_operator()


async def tenant_for(db: Database, slug: str, operation: str) -> TenantInfo:
    """The tenant named by slug, after checking the acting user may do this operation on it."""
    from konstruct.tenancy import access

    return await access.tenant(db, await who(db), slug, operation)


async def tenants_for(db: Database, operation: str, slug: str | None = None) -> list[TenantInfo]:
    """The tenant named by slug, or without one every tenant the acting user may do this operation on."""
    from konstruct.tenancy import access

    if slug:
        return [await tenant_for(db, slug, operation)]
    return await access.tenants(db, await who(db), operation)


async def platform(db: Database, operation: str) -> Principal:
    """The acting principal, if it is a platform admin (for installation-wide operations)."""
    principal = await who(db)
    principal.require(operation)
    return principal


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def prepare_database(cfg: Settings) -> None:
    """The embedded database before the first `konstruct up`: started, created and migrated here, said on stderr."""
    from konstruct.db import migrate  # SQLAlchemy and psycopg: not before `up` has started its parts

    started = time.perf_counter()
    result = migrate.prepare_embedded(cfg)
    if result is not None:
        err.print(f"[dim]first run: set up the embedded database in {cfg.data_dir / 'pg'} "
                  f"(revision {result.after}, {time.perf_counter() - started:.1f} s)[/dim]")  # fmt: skip


@asynccontextmanager
async def database(cfg: Settings) -> AsyncIterator[Database]:
    """The installation's database as the app role (the embedded one started and migrated when it never was)."""
    from konstruct.db.engine import Database

    await asyncio.to_thread(prepare_database, cfg)
    db = Database(cfg)
    try:
        await db.ping()
        yield db
    finally:
        await db.dispose()


def with_database(ctx: typer.Context, work: Callable[[Database], Awaitable[T]]) -> T:
    """Run work with this installation's database and return its result. A KonstructError it raises goes
    up unchanged, and `main` prints it as one red line with its exit code."""

    async def go() -> T:
        async with database(settings(ctx)) as db:
            return await work(db)

    return run(go())


def with_tenant(ctx: typer.Context, slug: str, operation: str, work: Callable[[Database, TenantInfo], Awaitable[T]]) -> T:
    """Run work on the tenant named by slug, once the acting user is found allowed this operation on it."""

    async def on_tenant(db: Database) -> T:
        return await work(db, await tenant_for(db, slug, operation))

    return with_database(ctx, on_tenant)


def print_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str))


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if value is None else str(value) for value in row))
    out.print(table)


def print_fields(fields: dict[str, Any]) -> None:
    width = max(len(key) for key in fields)
    for key, value in fields.items():
        out.print(f"[bold]{key.ljust(width)}[/bold]  {'' if value is None else value}")
