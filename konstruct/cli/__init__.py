"""The `konstruct` command: the front door to everything."""

from __future__ import annotations

import functools
import gc
import importlib
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

from konstruct.startup import collector_paused

with collector_paused():
    import typer
    from typer import _click as click
    from typer.core import TyperGroup

    from konstruct import __version__
    from konstruct.cli.common import act_as, err, platform, state, with_database
    from konstruct.errors import KonstructError

# Every command of the root, and the module of konstruct.cli that makes it: a module with `register(app)` adds its
# commands to the root; a module with a Typer `app` is the group of that name. A module is imported when a command
# line names one of its commands (or help lists them all), so `konstruct chat` does not import what `konstruct mcp`,
# `konstruct apply` or `konstruct billing` need. tests/test_cli.py checks this table against the modules.
COMMANDS = {
    "init": "setup",
    "doctor": "setup",
    "up": "serve",
    "gateway": "serve",
    "worker": "serve",
    "chat": "chat",
    "plan": "declare",
    "apply": "declare",
    "usage": "usage",
    "feedback": "feedback",
    "onboard": "onboard",
    "config": "setup",
    "db": "setup",
    "tenant": "tenants",
    "agent": "agents",
    "channel": "channels",
    "audit": "audit",
    "memory": "memory",
    "knowledge": "knowledge",
    "conversation": "conversations",
    "escalation": "escalations",
    "key": "keys",
    "secrets": "secrets",
    "budget": "budgets",
    "billing": "billing",
    "user": "users",
    "invite": "invitations",
    "mcp": "mcp",
    "approval": "approvals",
}


@functools.cache
def _registered(module_name: str) -> dict[str, click.Command]:
    """The commands a module registers on the root, built on a root of their own (the module imported by _load)."""
    module = importlib.import_module(f"konstruct.cli.{module_name}")
    scratch = typer.Typer()
    module.register(scratch)
    return dict(typer.main.get_group(scratch).commands)


@functools.cache  # click commands are definitions only (each call has its own context): built once per process
def _load(name: str) -> click.Command:
    with collector_paused():
        module = importlib.import_module(f"konstruct.cli.{COMMANDS[name]}")
    if hasattr(module, "register"):
        return _registered(COMMANDS[name])[name]
    group = typer.main.get_group(module.app)  # a group even of one command, as add_typer makes it
    group.name = name
    return group


class _Commands(MutableMapping[str, click.Command]):
    """The root's commands (COMMANDS), each built the first time it is looked up. Listing the names (click's "did you
    mean", typer's order) loads nothing."""

    def __init__(self, registered: MutableMapping[str, click.Command]) -> None:
        self._loaded = dict(registered)
        self._names = [*registered, *(name for name in COMMANDS if name not in registered)]

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded:
            if name not in COMMANDS:
                raise KeyError(name)
            self._loaded[name] = _load(name)
        return self._loaded[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._loaded[name] = command
        if name not in self._names:
            self._names.append(name)

    def __delitem__(self, name: str) -> None:
        self._loaded.pop(name, None)
        self._names.remove(name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)


class _Root(TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _Commands(self.commands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


app = typer.Typer(
    name="konstruct",
    cls=_Root,
    help="Run AI employees in Slack, WhatsApp and the terminal, for many tenants on one installation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"konstruct {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: str | None = typer.Option(
        None, "--config", "-c", help="Path to konstruct.toml (default: $KONSTRUCT_CONFIG or ./konstruct.toml).", metavar="PATH"
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More log output."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
    as_user: str | None = typer.Option(
        None,
        "--as",
        envvar="KONSTRUCT_AS",
        metavar="EMAIL",
        help="Act as this user, with exactly their permissions (default: the local operator).",
    ),
) -> None:
    st = state(ctx)
    st.config = config
    st.verbose = verbose
    act_as(as_user)
    if as_user and ctx.invoked_subcommand in INSTALLATION_COMMANDS:
        # Running the installation itself is the owner's business: only a platform admin, even with --as.
        with_database(ctx, lambda db: platform(db, "installation"))


INSTALLATION_COMMANDS = frozenset({"init", "up", "gateway", "worker", "config", "db", "doctor", "secrets"})


@functools.cache
def command() -> click.Command:
    """The click command behind `app`, built once per process (typer builds it anew on every call otherwise)."""
    return typer.main.get_command(app)


def run() -> None:
    """The process's entry point (the `konstruct` script, `python -m konstruct`): `main`, then the objects the process
    made are frozen out of the garbage collector, so the interpreter's shutdown does not walk them all once more
    (~0.1 s of every command's exit: `chat --message` spent ~0.3 s after its last line). Not in `main` itself, which
    tests also run inside a long-lived process."""
    try:
        main()
    finally:
        gc.freeze()


def main() -> None:
    """Entry point: a KonstructError becomes one red line and exit code 1, never a traceback."""
    try:
        command()()
    except KonstructError as exc:
        err.print(f"[red]Error:[/red] {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
