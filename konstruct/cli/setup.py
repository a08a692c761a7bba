"""init, config show, db upgrade, doctor: setting an installation up and checking it."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from sqlalchemy import func, select, text

from konstruct.cli import model_setup
from konstruct.cli.channels import doctor_slack_sockets
from konstruct.cli.common import JsonOption, database, err, out, prepare_database, print_json, print_table, run, settings
from konstruct.config import CONFIG_FILENAME, Settings, render_config, secret_key_in_environment
from konstruct.db import migrate
from konstruct.db.models import WorkerHeartbeat
from konstruct.db.urls import DatabaseURLs, resolve_urls
from konstruct.errors import ConfigError, KonstructError
from konstruct.llm import probe
from konstruct.secrets import create_secret_key_file, master_keys, secret_key_path
from konstruct.supervision import inbox_health, read_state, summarise
from konstruct.worker.queue import make_queue

config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema: apply migrations, show the revision.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("doctor")(doctor)
    app.add_typer(config_app, name="config")
    app.add_typer(db_app, name="db")


def init(
    directory: Path = typer.Option(Path("."), "--dir", "-d", help="Folder for konstruct.toml and the .konstruct/ data directory."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing konstruct.toml (the master key is kept)."),
    llm_model: str | None = typer.Option(
        None, "--llm-model", help="Default model, e.g. openai/gpt-4o-mini or openai/llama3.1 for a local server."
    ),
    llm_api_base: str | None = typer.Option(
        None, "--llm-api-base", help="Base URL of an OpenAI-compatible API (Ollama http://127.0.0.1:11434/v1, vLLM, llama.cpp)."
    ),
    llm_api_key_env: str | None = typer.Option(
        None,
        "--llm-api-key-env",
        help="Environment variable holding the platform LLM key (stored as a reference, never the key); none for a local server.",
    ),
    no_test_call: bool = typer.Option(False, "--no-test-call", help="Do not make the one tiny test call to the model."),
    port: int | None = typer.Option(None, "--port", help="Gateway port."),
) -> None:
    """Write konstruct.toml, the data directory and the master secret key, and test the model with one tiny call.

    On an existing konstruct.toml, --llm-* (and --port) change only those settings; --force rewrites the whole file.
    The model is asked for on a terminal when no --llm-* flag is given."""
    directory = directory.expanduser().resolve()
    path = directory / CONFIG_FILENAME
    update = path.exists() and not force
    llm = model_setup.llm_values(llm_model, llm_api_base, llm_api_key_env, model_setup.current_llm(path) if update else {})
    values: dict[str, dict[str, Any]] = {"llm": llm} if llm else {}
    if port:
        values["gateway"] = {"port": port}  # public_url left unset follows the port (and a later change of it)
    if update:
        if not values:
            raise ConfigError(f"{path} exists already: pass --force to overwrite it, or --llm-model … to change only the model")
        model_setup.write_update(path, values)
    else:
        _write_new(directory, path, values)
    if llm_api_key_env:
        out.print(f"LLM key: read from ${llm_api_key_env} when used (export it in the shell that runs `konstruct up`)")
    if llm and not no_test_call:
        model_setup.report_test_call(path, llm_api_key_env)
    elif not llm:
        out.print(f"model: {model_setup.DEFAULT_MODEL} (the default): set yours with `konstruct init --llm-model …`")
    out.print(
        "Next: [bold]konstruct up[/bold]  (then `konstruct tenant create NAME` and `konstruct agent create …`)"
        if not update
        else "A running `konstruct up` applies the change by itself; `konstruct doctor` shows whether its worker did"
    )


def _write_new(directory: Path, path: Path, values: dict[str, dict[str, Any]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(render_config(values))
    data_dir = directory / ".konstruct"
    data_dir.mkdir(mode=0o700, exist_ok=True)
    key_file = data_dir / "secret.key"
    if secret_key_in_environment():
        key_note = "master key: from KONSTRUCT_SECRET_KEY (no key file written)"
    elif key_file.exists():
        key_note = f"master key: kept the existing {key_file}"
    else:
        create_secret_key_file(key_file)
        key_note = f"master key: {key_file} (0600) — back it up; stored secrets cannot be read without it"
    out.print(f"[green]Wrote[/green] {path}")
    out.print(f"data directory: {data_dir}")
    out.print(key_note)


@config_app.command("show")
def config_show(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Print the effective settings (file + environment) as TOML, with secrets masked and references shown as such."""
    cfg = settings(ctx)
    if as_json:
        print_json(cfg.masked())
    else:
        typer.echo(cfg.masked_toml(), nl=False)  # exactly as rendered: no markup, emoji codes or wrapping


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Apply pending migrations as the owner role (konstruct up does this on start)."""
    cfg = settings(ctx)
    started = time.perf_counter()
    result = migrate.upgrade(cfg)
    took = time.perf_counter() - started
    if result.before == result.after:
        out.print(f"database already at revision {result.after} ({took:.1f}s)")
    else:
        out.print(f"[green]migrated[/green] {result.before or 'empty'} → {result.after} ({took:.1f}s)")


@db_app.command("current")
def db_current(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Show the database's revision and the newest one this version knows."""
    cfg = settings(ctx)
    prepare_database(cfg)  # before the first `up`: the embedded database is set up, as for every other command
    current = migrate.current_revision(resolve_urls(cfg))
    head = migrate.head_revision()
    if as_json:
        print_json({"current": current, "head": head, "at_head": current == head})
        return
    out.print(f"current: {current or 'empty'}  head: {head}" + ("" if current == head else "  → run `konstruct db upgrade`"))


def doctor(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Check config, database, migrations, queue, workers and LLM settings, and say what to fix."""
    checks: list[dict[str, str]] = []

    def add(name: str, status: str, detail: str) -> None:
        checks.append({"check": name, "status": status, "detail": detail})

    try:
        cfg = settings(ctx)
        add("config", "ok", str(cfg.config_path))
    except KonstructError as exc:
        add("config", "fail", str(exc))
        _report(checks, as_json)
        return
    try:
        master_keys(cfg)
        add("master key", "ok", "KONSTRUCT_SECRET_KEY" if cfg.secret_key else str(secret_key_path(cfg)))
    except KonstructError as exc:
        add("master key", "fail", str(exc))
    workers = run(_doctor_database(cfg, add))
    doctor_slack_sockets(cfg, add)
    _check_llm(cfg, add)
    if workers:
        _check_worker_sees(cfg, workers[0], add)
    _report(checks, as_json)


async def _doctor_database(cfg: Settings, add: Any) -> list[WorkerHeartbeat]:
    """The database checks; returns the live workers' heartbeats, newest first."""
    urls = await _doctor_schema(cfg, add)
    workers = await _doctor_role_and_workers(cfg, add) if urls is not None else None
    if urls is None or workers is None:
        return []
    await _doctor_queue(cfg, urls, add)
    if workers:
        add("workers", "ok", f"{len(workers)} worker(s) alive")
    else:
        add("workers", "fail", "no worker has sent a heartbeat lately: start `konstruct up` or `konstruct worker`")
    status, lines = summarise(read_state(cfg.data_dir))
    add("supervisor", status, "; ".join(lines))
    await _doctor_messages(cfg, add)
    return workers


async def _doctor_schema(cfg: Settings, add: Any) -> DatabaseURLs | None:
    """Reachable and migrated to head (the embedded database set up first, as for any command): its URLs, or None."""
    try:
        await asyncio.to_thread(prepare_database, cfg)
        urls = resolve_urls(cfg)
        current = await asyncio.to_thread(migrate.current_revision, urls)
    except KonstructError as exc:
        add("database", "fail", str(exc))
        return None
    add("database", "ok", "embedded PostgreSQL in " + str(cfg.data_dir / "pg") if cfg.embedded_database else "reachable as the owner role")
    head = migrate.head_revision()
    if current != head:
        add("migrations", "fail", f"database at {current or 'empty'}, code at {head}: run `konstruct db upgrade`")
        return None
    add("migrations", "ok", f"at head ({head})")
    return urls


async def _doctor_role_and_workers(cfg: Settings, add: Any) -> list[WorkerHeartbeat] | None:
    """Whether the app role is subject to RLS; the live workers' heartbeats, newest first (None: no connection)."""
    try:
        async with database(cfg) as db, db.system() as session:
            row = (await session.execute(text("select rolsuper, rolbypassrls from pg_roles where rolname = current_user"))).one()
            if row.rolsuper or row.rolbypassrls:
                add("row-level security", "fail", "the app role bypasses RLS: run `ALTER ROLE konstruct_app NOSUPERUSER NOBYPASSRLS`")
            else:
                add("row-level security", "ok", "app role konstruct_app is subject to RLS")
            cutoff = func.now() - text(f"interval '{int(cfg.worker.stale_after)} seconds'")
            alive = select(WorkerHeartbeat).where(WorkerHeartbeat.seen_at > cutoff).order_by(WorkerHeartbeat.started_at.desc())
            return list((await session.execute(alive)).scalars().all())
    except KonstructError as exc:
        add("row-level security", "fail", str(exc))
        return None


async def _doctor_queue(cfg: Settings, urls: DatabaseURLs, add: Any) -> None:
    try:
        queue = make_queue(cfg, urls)
        pending = await asyncio.to_thread(queue.pending)
        queue.close()
        add("queue", "ok", f"{pending} task(s) waiting")
    except KonstructError as exc:
        add("queue", "fail", str(exc))


async def _doctor_messages(cfg: Settings, add: Any) -> None:
    try:
        async with database(cfg) as db:
            inbox = await inbox_health(db)
    except KonstructError as exc:
        add("messages", "fail", str(exc))
        return
    waiting = f"{inbox.received} waiting, {inbox.processing} being answered" + (
        f", {inbox.suspect} to be retried alone" if inbox.suspect else ""
    )
    if inbox.given_up:
        add("messages", "warn", f"{inbox.given_up} given up on in the last 24 h (each took a worker down {cfg.worker.max_attempts} times; "
                                f"see the status page's last errors); {waiting}")  # fmt: skip
    else:
        add("messages", "ok", waiting)


def _check_llm(cfg: Settings, add: Any) -> None:
    """One tiny real call to the default model with the platform key, as this shell has it."""
    model = cfg.llm.model
    if "/" not in model:
        add("llm", "warn", f"llm.model {model!r} has no provider prefix (e.g. openai/{model}); litellm may not route it")
    check = run(probe.check_platform_model(cfg))
    where = f" via {cfg.llm.api_base}" if cfg.llm.api_base else ""
    if check.ok:
        add("llm", "ok", f"{check.line()}{where}")
    else:
        add("llm", "fail", f"{check.line()}: fix it (`konstruct init --llm-model … --llm-api-base … --llm-api-key-env …`)")


def _check_worker_sees(cfg: Settings, worker: WorkerHeartbeat, add: Any) -> None:
    """What the newest running worker sees: the platform key in its environment, and the config it loaded."""
    name = f"worker {worker.pid}"
    if worker.has_platform_key is False:
        source = probe.key_source(cfg, probe.default_provider(cfg)) or "llm.api_key"
        add("worker key", "fail", f"{name} cannot read the platform key ({source}): export it in the shell that runs "
                                  "`konstruct up`, and restart it")  # fmt: skip
    elif worker.has_platform_key:
        add("worker key", "ok", f"{name} has the platform key")
    elif probe.platform_key_configured(cfg):
        add("worker key", "warn", f"{name} has not said whether it has the platform key (an older version, or starting)")
    if cfg.config_path is None or worker.config_mtime is None:
        return
    on_disk = datetime.fromtimestamp(cfg.config_path.stat().st_mtime, UTC)
    behind = (on_disk - worker.config_mtime).total_seconds()
    if behind > 1:
        add("worker config", "warn", f"{name} runs a config {_age(behind)} older than {cfg.config_path.name}: "
                                     "restart or wait for `up` to reload")  # fmt: skip
    else:
        add("worker config", "ok", f"{name} runs the current {cfg.config_path.name}")


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def _report(checks: list[dict[str, str]], as_json: bool) -> None:
    failed = any(c["status"] == "fail" for c in checks)
    if as_json:
        print_json({"ok": not failed, "checks": checks})
    else:
        marks = {"ok": "[green]ok[/green]", "warn": "[yellow]warn[/yellow]", "fail": "[red]FAIL[/red]"}
        print_table(None, ["check", "status", "detail"], [(c["check"], marks[c["status"]], c["detail"]) for c in checks])
        if failed:
            err.print("[red]Some checks failed:[/red] fix them as the details say.")
    if failed:
        raise typer.Exit(1)
