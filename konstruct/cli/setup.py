"""init, config show, db upgrade, doctor: setting an installation up and checking it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import typer
from sqlalchemy import func, select, text

from konstruct.cli.channels import doctor_slack_sockets
from konstruct.cli.common import JsonOption, database, err, out, print_json, print_table, run, settings
from konstruct.config import CONFIG_FILENAME, Settings, render_config, secret_key_in_environment
from konstruct.db import migrate
from konstruct.db.models import WorkerHeartbeat
from konstruct.db.urls import resolve_urls
from konstruct.errors import ConfigError, KonstructError
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
    force: bool = typer.Option(False, "--force", help="Overwrite an existing konstruct.toml."),
    llm_model: str | None = typer.Option(None, "--llm-model", help="Default model, e.g. openai/gpt-4o-mini."),
    llm_api_base: str | None = typer.Option(None, "--llm-api-base", help="Base URL of an OpenAI-compatible API."),
    llm_api_key_env: str | None = typer.Option(
        None,
        "--llm-api-key-env",
        help="Environment variable holding the platform LLM key (stored as a reference, never the key).",
    ),
    port: int | None = typer.Option(None, "--port", help="Gateway port."),
) -> None:
    """Write konstruct.toml and the data directory, and create the master secret key."""
    directory = directory.expanduser().resolve()
    path = directory / CONFIG_FILENAME
    if path.exists() and not force:
        raise ConfigError(f"{path} exists already: pass --force to overwrite it")
    directory.mkdir(parents=True, exist_ok=True)
    values: dict[str, dict[str, Any]] = {"llm": {}}
    if llm_model:
        values["llm"]["model"] = llm_model
    if llm_api_base:
        values["llm"]["api_base"] = llm_api_base
    if llm_api_key_env:
        values["llm"]["api_key"] = {"$env": llm_api_key_env}
    if port:
        values["gateway"] = {"port": port, "public_url": f"http://127.0.0.1:{port}"}
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
    if llm_api_key_env:
        out.print(f"LLM key: read from ${llm_api_key_env} at run time")
    out.print("Next: [bold]konstruct up[/bold]  (then `konstruct tenant create NAME` and `konstruct agent create …`)")


@config_app.command("show")
def config_show(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Print the effective settings (file + environment) with secrets masked."""
    cfg = settings(ctx)
    data = cfg.masked()
    if as_json:
        print_json(data)
        return
    lines = [f"# from {data.pop('config_path')}"]
    for section, values in data.items():
        if not isinstance(values, dict):
            lines.append(f"{section} = {'' if values is None else repr(values)}")
            continue
        lines.append(f"\n[{section}]")
        lines += [f"{key} = {'' if value is None else repr(value)}" for key, value in values.items()]
    out.print("\n".join(lines), markup=False)


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
def db_current(ctx: typer.Context) -> None:
    """Show the database's revision and the newest one this version knows."""
    cfg = settings(ctx)
    current = migrate.current_revision(resolve_urls(cfg))
    head = migrate.head_revision()
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
    run(_doctor_database(cfg, add))
    doctor_slack_sockets(cfg, add)
    _check_llm(cfg, add)
    _report(checks, as_json)


async def _doctor_database(cfg: Settings, add: Any) -> None:
    try:
        urls = resolve_urls(cfg)
        current = await asyncio.to_thread(migrate.current_revision, urls)
    except KonstructError as exc:
        add("database", "fail", str(exc))
        return
    add("database", "ok", "embedded PostgreSQL in " + str(cfg.data_dir / "pg") if cfg.embedded_database else "reachable as the owner role")
    head = migrate.head_revision()
    if current != head:
        add("migrations", "fail", f"database at {current or 'empty'}, code at {head}: run `konstruct db upgrade`")
        return
    add("migrations", "ok", f"at head ({head})")
    try:
        async with database(cfg) as db, db.system() as session:
            row = (await session.execute(text("select rolsuper, rolbypassrls from pg_roles where rolname = current_user"))).one()
            if row.rolsuper or row.rolbypassrls:
                add("row-level security", "fail", "the app role bypasses RLS: run `ALTER ROLE konstruct_app NOSUPERUSER NOBYPASSRLS`")
            else:
                add("row-level security", "ok", "app role konstruct_app is subject to RLS")
            cutoff = func.now() - text(f"interval '{int(cfg.worker.stale_after)} seconds'")
            workers = await session.scalar(select(func.count()).select_from(WorkerHeartbeat).where(WorkerHeartbeat.seen_at > cutoff))
    except KonstructError as exc:
        add("row-level security", "fail", str(exc))
        return
    try:
        queue = make_queue(cfg, urls)
        pending = await asyncio.to_thread(queue.pending)
        queue.close()
        add("queue", "ok", f"{pending} task(s) waiting")
    except KonstructError as exc:
        add("queue", "fail", str(exc))
    if workers:
        add("workers", "ok", f"{workers} worker(s) alive")
    else:
        add("workers", "fail", "no worker has sent a heartbeat lately: start `konstruct up` or `konstruct worker`")
    status, lines = summarise(read_state(cfg.data_dir))
    add("supervisor", status, "; ".join(lines))
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
    model = cfg.llm.model
    if "/" not in model:
        add("llm", "warn", f"llm.model {model!r} has no provider prefix (e.g. openai/{model}); litellm may not route it")
    elif cfg.llm.api_key is None and cfg.llm.api_base is None:
        add("llm", "warn", f"no llm.api_key or llm.api_base: calls to {model} will fail unless the provider needs no key")
    else:
        where = cfg.llm.api_base or "the provider's default endpoint"
        add("llm", "ok", f"{model} via {where}, timeout {cfg.llm.timeout:g}s, {cfg.llm.retries} retries")


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
