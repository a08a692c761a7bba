"""up, gateway, worker: running Konstruct."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, NoReturn

import typer

from konstruct.cli.common import out, settings, state
from konstruct.config import DATABASE_URL_ENV, Settings
from konstruct.logs import setup_logging
from konstruct.startup import collector_paused
from konstruct.supervision import hold_up_lock, release_up_lock, released

if TYPE_CHECKING:  # SQLAlchemy, psycopg and the migrations: imported by `up` once it has started its parts
    from konstruct.cli.config_watch import ConfigWatch
    from konstruct.db.embedded import EmbeddedServer

DATA_DIR_ENV = "KONSTRUCT_DATA__DIR"
APP_PASSWORD_ENV = "KONSTRUCT_DATABASE__APP_PASSWORD"


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("gateway")(gateway)
    app.command("worker")(worker)


def gateway(ctx: typer.Context) -> None:
    """Run only the gateway (HTTP: webhooks, health). Scale out by running several behind a proxy."""
    with collector_paused():  # deferred: Starlette, uvicorn and the whole app load only for this command
        import uvicorn  # noqa: F401  (imported by run_gateway: here, while `up` may still be starting the database)

        from konstruct.gateway.app import run_gateway

    if not released():  # started by `up` before its database was ready, which then failed
        raise typer.Exit()
    cfg = settings(ctx)
    setup_logging(state(ctx).verbose)
    run_gateway(cfg)


def worker(
    ctx: typer.Context,
    threads: int = typer.Option(4, "--threads", help="huey consumer threads that admit work (the LLM calls themselves run concurrently)."),
    no_periodic: bool = typer.Option(False, "--no-periodic", help="Do not schedule periodic tasks (run them on one worker only)."),
    standby: bool = typer.Option(
        False,
        "--standby",
        help="Be a warm spare: import everything once, then fork a ready worker on each SIGUSR1 (how `up` restarts workers).",
    ),
) -> None:
    """Run only the worker (answers messages). Stop gracefully with SIGINT."""
    with collector_paused():  # deferred: the worker, its tasks and the agent pipeline load only for this command
        from konstruct.worker.main import run_worker

    if not released():
        raise typer.Exit()
    cfg = settings(ctx)
    setup_logging(state(ctx).verbose)
    run_worker(cfg, threads=threads, periodic=not no_periodic, standby=standby)
    _exit_without_finalizing()


def _exit_without_finalizing() -> NoReturn:
    """End a stopped worker without the interpreter's shutdown. In it, litellm's HTTP client finalizer imports a
    module, and an import lock held by a daemon thread the shutdown froze then blocks it forever: twice in CI a worker
    of a SIGKILLed `up` was still there 6 and 18 minutes later (ppid 1; py-spy: AsyncHTTPHandler.__del__ in
    _get_module_lock), even once the warm-up thread was joined. The atexit handlers still run (the embedded database's
    handle is given back there; logging is flushed), and the standard streams are flushed; everything the worker holds
    was closed by run_worker."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def up(ctx: typer.Context) -> None:
    """Start the embedded database (if used), migrate, and run the gateway and a worker until Ctrl-C.

    Every part is supervised for as long as `up` runs: one that dies is started again (at once, or with a
    growing pause up to `up.max_backoff` when it keeps dying), and never takes the others down. One `up` runs
    per data directory. An edit of konstruct.toml is taken up by restarting the parts one at a time (an invalid
    edit is reported and the parts keep running as they are)."""
    from konstruct.cli.config_watch import ConfigWatch  # here: the gateway and the worker this module runs need neither
    from konstruct.cli.supervisor import require_free_port

    cfg = settings(ctx)
    started = time.perf_counter()
    watch = ConfigWatch(cfg)  # from now: an edit made while the database starts is seen too
    lock = hold_up_lock(cfg.data_dir)
    try:
        require_free_port(cfg)
        _run(cfg, watch, started, verbose=state(ctx).verbose)
    finally:
        release_up_lock(lock)


def _run(cfg: Settings, watch: ConfigWatch, started: float, *, verbose: bool) -> None:
    from konstruct.cli.supervisor import Part, Supervisor, hold, let_go, ready_url

    # -P: the current folder is not put on the children's sys.path, so a stripe.py there cannot stand in for
    # the library. Not -I: that would also drop PYTHONPATH (plugins installed there), the user's site-packages
    # and every PYTHON* variable (PYTHONUNBUFFERED, which the prefixed logs rely on).
    base = [sys.executable, "-P", "-m", "konstruct", "--config", str(cfg.config_path)]
    if verbose:
        base.append("--verbose")
    parts = [
        Part("gateway", [*base, "gateway"], signal.SIGTERM, "cyan", ready_url=ready_url(cfg)),
        Part("worker", [*base, "worker"], signal.SIGINT, "magenta", ready_line=" ready: "),  # SIGINT is huey's graceful stop
    ]
    standby = (
        Part("standby", [*base, "worker", "--standby"], signal.SIGTERM, "magenta", ready_line="standby: warm") if cfg.up.standby else None
    )
    held = hold(parts)  # their imports overlap the database's start and the migration check
    database: EmbeddedServer | None = None
    try:
        from konstruct.db import migrate
        from konstruct.db.embedded import EmbeddedServer

        if cfg.embedded_database:
            # This process holds the server and supervises it; the children are handed its URL and never start or stop it.
            database = EmbeddedServer(cfg.data_dir)
            out.print(f"[dim]embedded PostgreSQL in {cfg.data_dir / 'pg'}[/dim]")
        result = migrate.upgrade(cfg)
        out.print(f"[dim]database at revision {result.after}[/dim]")
        Supervisor(cfg, parts, standby, database, _children_env(cfg, database), started, watch, held=held).run()
    finally:
        let_go(held)
        if database is not None:
            database.release()


def _children_env(cfg: Settings, database: EmbeddedServer | None) -> dict[str, str]:
    """The parts' environment: what `up` itself works from (data directory, database) is pinned in it, so a part
    started after an edit of konstruct.toml still uses the database `up` migrated and holds."""
    from sqlalchemy.engine import make_url

    from konstruct.db.embedded import DATABASE_NAME
    from konstruct.db.urls import app_password

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[DATA_DIR_ENV] = str(cfg.data_dir)
    if database is not None:
        env[DATABASE_URL_ENV] = str(make_url(database.uri).set(database=DATABASE_NAME).render_as_string(hide_password=False))
    elif cfg.database.url is not None:
        env[DATABASE_URL_ENV] = cfg.database.url.get_secret_value()
    env[APP_PASSWORD_ENV] = app_password(cfg, create=False)
    return env
