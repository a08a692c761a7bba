"""The `konstruct` command: the front door to everything."""

from __future__ import annotations

import sys

import typer

from konstruct import __version__
from konstruct.cli import (
    agents,
    approvals,
    audit,
    billing,
    budgets,
    channels,
    chat,
    conversations,
    declare,
    escalations,
    feedback,
    invitations,
    keys,
    knowledge,
    mcp,
    memory,
    onboard,
    secrets,
    serve,
    setup,
    tenants,
    usage,
    users,
)
from konstruct.cli.common import act_as, err, platform, state, with_database
from konstruct.errors import KonstructError

app = typer.Typer(
    name="konstruct",
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


setup.register(app)
serve.register(app)
chat.register(app)
declare.register(app)
usage.register(app)
feedback.register(app)
app.command("onboard")(onboard.onboard)
app.add_typer(tenants.app, name="tenant")
app.add_typer(agents.app, name="agent")
app.add_typer(channels.app, name="channel")
app.add_typer(audit.app, name="audit")
app.add_typer(memory.app, name="memory")
app.add_typer(knowledge.app, name="knowledge")
app.add_typer(conversations.app, name="conversation")
app.add_typer(escalations.app, name="escalation")
app.add_typer(keys.app, name="key")
app.add_typer(secrets.app, name="secrets")
app.add_typer(budgets.app, name="budget")
app.add_typer(billing.app, name="billing")
app.add_typer(users.app, name="user")
app.add_typer(invitations.app, name="invite")
app.add_typer(mcp.app, name="mcp")
app.add_typer(approvals.app, name="approval")


def main() -> None:
    """Entry point: a KonstructError becomes one red line and exit code 1, never a traceback."""
    try:
        app()
    except KonstructError as exc:
        err.print(f"[red]Error:[/red] {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
