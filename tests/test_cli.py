"""The CLI as a person uses it: real database, one-line errors, --json.

Most commands run in-process through the real entry point (`konstruct_in_process`); what a shell sees of a process —
exit codes and a single stderr line without a traceback, a missing config, `up` and its signals — runs real processes."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import typer
from typer.testing import CliRunner

from tests.helpers import cli_env, konstruct, meter
from tests.helpers import konstruct_in_process as cli


def ok(result: object) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"  # type: ignore[attr-defined]
    return result.stdout  # type: ignore[attr-defined,no-any-return]


def fails(result: object, message: str) -> None:
    assert result.returncode == 1, f"expected exit 1, got {result.returncode}: {result.stdout} {result.stderr}"  # type: ignore[attr-defined]
    assert message in result.stderr, result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in result.stderr + result.stdout  # type: ignore[attr-defined]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # type: ignore[attr-defined]


def test_init_writes_config_data_dir_and_a_private_key(tmp_path: Path) -> None:
    ok(cli("init", "--dir", str(tmp_path / "site")))
    config = tmp_path / "site" / "konstruct.toml"
    key = tmp_path / "site" / ".konstruct" / "secret.key"
    assert config.is_file() and key.is_file()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    fails(cli("init", "--dir", str(tmp_path / "site")), "exists already: pass --force")
    before = key.read_text()
    ok(cli("init", "--dir", str(tmp_path / "site"), "--force"))
    assert key.read_text() == before  # --force rewrites the config, never the master key


def test_init_uses_the_master_key_from_the_environment(tmp_path: Path) -> None:
    from cryptography.fernet import Fernet

    out = ok(cli("init", "--dir", str(tmp_path), env=cli_env(KONSTRUCT_SECRET_KEY=Fernet.generate_key().decode())))
    assert "KONSTRUCT_SECRET_KEY" in out
    assert not (tmp_path / ".konstruct" / "secret.key").exists()


def test_config_show_masks_secrets_and_takes_env_overrides(config_path: Path) -> None:
    env = cli_env(KONSTRUCT_LLM__TIMEOUT="42")
    data = json.loads(ok(cli("config", "show", "--json", config=config_path, env=env)))
    assert data["llm"]["api_key"] == "…0001"
    assert data["llm"]["timeout"] == 42
    assert data["database"]["app_password"] == "…word"
    text = ok(cli("config", "show", config=config_path))
    assert "sk-test-key-0001" not in text and "[llm]" in text


def test_invalid_config_is_one_line_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "konstruct.toml"
    bad.write_text("[gateway]\nport = 'http'\n")
    fails(konstruct("tenant", "list", config=bad), "gateway.port")
    fails(konstruct("tenant", "list", config=tmp_path / "missing.toml"), "does not exist")


def test_tenant_and_agent_lifecycle(config_path: Path, tmp_path: Path) -> None:
    ok(cli("tenant", "create", "Acme Inc", config=config_path))
    created = json.loads(ok(cli("tenant", "create", "Globex", "--slug", "globex", "--json", config=config_path)))
    assert created["slug"] == "globex" and created["status"] == "active"
    fails(cli("tenant", "create", "Acme Inc", config=config_path), "exists already")
    fails(konstruct("tenant", "create", "Acme Inc", config=config_path), "exists already")  # as a shell sees it
    fails(cli("tenant", "create", "Bad", "--slug", "Not A Slug", config=config_path), "is not valid")
    listed = json.loads(ok(cli("tenant", "list", "--json", config=config_path)))
    assert [t["slug"] for t in listed] == ["acme-inc", "globex"]

    persona = tmp_path / "ava.md"
    persona.write_text("You are Ava. You answer billing questions for Acme.")
    ok(cli("agent", "create", "-t", "acme-inc", "-n", "Ava", "-r", "Billing", "--persona-file", str(persona), config=config_path))
    ok(
        cli(
            "agent",
            "create",
            "-t",
            "acme-inc",
            "-n",
            "Bo",
            "-r",
            "Sales",
            "--persona",
            "Friendly.",
            "--model",
            "openai/other",
            config=config_path,
        )
    )
    fails(cli("agent", "create", "-t", "acme-inc", "-n", "Cy", "-r", "X", config=config_path), "needs a persona")
    fails(cli("agent", "create", "-t", "nope", "-n", "Cy", "-r", "X", "--persona", "p", config=config_path), "no tenant 'nope'")
    agents = json.loads(ok(cli("agent", "list", "-t", "acme-inc", "--json", config=config_path)))
    assert [(a["name"], a["model"]) for a in agents] == [("Ava", None), ("Bo", "openai/other")]
    assert json.loads(ok(cli("agent", "list", "-t", "globex", "--json", config=config_path))) == []

    updated = json.loads(ok(cli("agent", "update", "Bo", "-t", "acme-inc", "--role", "Sales lead", "--json", config=config_path)))
    assert updated["role"] == "Sales lead"
    fails(cli("agent", "update", "Bo", "-t", "acme-inc", config=config_path), "nothing to change")
    shown = json.loads(ok(cli("agent", "show", "Ava", "-t", "acme-inc", "--json", config=config_path)))
    assert shown["persona"].startswith("You are Ava.")
    fails(cli("agent", "delete", "Bo", "-t", "acme-inc", config=config_path), "pass --yes")
    ok(cli("agent", "delete", "Bo", "-t", "acme-inc", "--yes", config=config_path))
    fails(cli("agent", "show", "Bo", "-t", "acme-inc", config=config_path), "has no agent 'Bo'")

    suspended = json.loads(ok(cli("tenant", "suspend", "globex", "--json", config=config_path)))
    assert suspended["status"] == "suspended"
    shown_tenant = json.loads(ok(cli("tenant", "show", "acme-inc", "--json", config=config_path)))
    assert shown_tenant["agents"] == 1
    ok(cli("tenant", "delete", "globex", "--yes", config=config_path))
    fails(cli("tenant", "show", "globex", config=config_path), "no tenant 'globex'")


def _every_command(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """The command and, for a group, every command under it, depth first, with the words that reach it.
    (Typer ships its own copy of click, so a group is known by its `commands`, not by click.Group.)"""
    yield path, command
    if isinstance(getattr(command, "commands", None), Mapping):
        for name, sub in sorted(command.commands.items()):
            yield from _every_command(sub, (*path, name))


def test_every_command_has_help() -> None:
    # In-process (typer's runner on the real app): the same parser, without an interpreter start-up per command.
    from konstruct.cli import app

    runner = CliRunner()
    commands = list(_every_command(typer.main.get_command(app)))
    assert len(commands) > 60  # the walk reached the sub-commands, not only the top
    for path, command in commands:
        purpose = (command.help or "").strip()
        assert purpose, f"`konstruct {' '.join(path)}` has no help text"
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, (path, result.output)
        first_words = " ".join(purpose.split()[:4])
        assert first_words in " ".join(result.output.split()), (path, first_words, result.output)
    assert "Usage:" in ok(konstruct("--help"))  # and the real entry point works


def test_the_root_knows_every_command_of_every_cli_module_and_imports_only_the_one_used() -> None:
    """konstruct.cli.COMMANDS (which module makes each root command, imported on use) matches the modules: each
    `register(app)` adds exactly the commands the table names for it, each module with its own Typer `app` is one
    group; and a command line imports only its own module."""
    import importlib
    import subprocess
    import sys

    from konstruct import cli

    modules = sorted(path.stem for path in Path(cli.__file__).parent.glob("*.py") if path.stem != "__init__")
    for name in modules:
        module = importlib.import_module(f"konstruct.cli.{name}")
        named = {command for command, made_by in cli.COMMANDS.items() if made_by == name}
        if hasattr(module, "register"):
            scratch = typer.Typer()
            module.register(scratch)
            assert set(typer.main.get_group(scratch).commands) == named, name
        elif isinstance(getattr(module, "app", None), typer.Typer):
            assert len(named) == 1, (name, named)
        else:
            assert not named, name  # a helper module (common, supervisor, ...)
    probe = "import sys; from konstruct.cli import command; command().commands['chat']; " + (
        "print(sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('konstruct.cli.')))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "'chat'" in loaded and not any(f"'{module}'" in loaded for module in ("mcp", "billing", "declare", "knowledge")), loaded


def test_doctor_reports_what_to_fix(config_path: Path) -> None:
    result = cli("doctor", "--json", config=config_path)
    assert result.returncode == 1  # no worker is running
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["database"]["status"] == "ok" and checks["migrations"]["status"] == "ok"
    assert checks["row-level security"]["status"] == "ok" and checks["queue"]["status"] == "ok"
    assert checks["workers"]["status"] == "fail" and "konstruct up" in checks["workers"]["detail"]


def test_no_config_anywhere(tmp_path: Path) -> None:
    env = cli_env()
    env.pop("KONSTRUCT_CONFIG", None)
    result = konstruct("tenant", "list", cwd=tmp_path, env=env)
    fails(result, "konstruct init")
    assert os.listdir(tmp_path) == []  # nothing written


def test_up_refuses_a_busy_port_at_once(config_path: Path, settings: object) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", settings.gateway.port))  # type: ignore[attr-defined]
        busy.listen()
        fails(konstruct("up", config=config_path, timeout=30), f"gateway.port {settings.gateway.port}")  # type: ignore[attr-defined]


def test_up_stops_everything_on_sigterm(config_path: Path, settings: object, tmp_path: Path) -> None:
    import signal

    from tests.helpers import Proc

    up = Proc("up", ["up"], config=config_path, log_dir=tmp_path)
    up.wait_for_log("Konstruct is up")
    assert up.stop(signal.SIGTERM) == 0
    log = up.log()
    assert "worker stopped" in log and "Finished server process" in log and log.rstrip().endswith("stopped")


def test_a_missing_env_reference_stops_only_what_needs_it(database_url: str, fake_llm: object, tmp_path: Path) -> None:
    """The variable behind llm.api_key (or the Stripe key) is missing: commands that never use it run; the one that
    does says which setting and which variable, in one line."""
    from tests.conftest import write_config

    config = write_config(
        tmp_path, database_url, fake_llm.url,  # type: ignore[attr-defined]
        llm={"api_key": {"$env": "H_UNSET_LLM_KEY"}},
        billing={"stripe_api_key": {"$env": "H_UNSET_STRIPE_KEY"}, "plans": [{"name": "pro", "price_id": "price_1"}]},
    )  # fmt: skip
    ok(cli("tenant", "create", "Acme Inc", config=config))
    ok(cli("agent", "create", "-t", "acme-inc", "-n", "Ava", "-r", "Billing", "--persona", "You are Ava.", config=config))
    assert json.loads(ok(cli("agent", "show", "Ava", "-t", "acme-inc", "--json", config=config)))["name"] == "Ava"
    assert [t["slug"] for t in json.loads(ok(cli("tenant", "list", "--json", config=config)))] == ["acme-inc"]
    shown = json.loads(ok(cli("config", "show", "--json", config=config)))
    assert shown["llm"]["api_key"] == {"$env": "H_UNSET_LLM_KEY", "status": "missing"}
    fails(
        cli("billing", "checkout", "-t", "acme-inc", "--plan", "pro", config=config),
        "billing.stripe_api_key: environment variable H_UNSET_STRIPE_KEY is not set; export it",
    )
    fails(konstruct("billing", "checkout", "-t", "acme-inc", "--plan", "pro", config=config), "H_UNSET_STRIPE_KEY is not set")  # a shell


def test_database_url_reference_is_read_when_used(database_url: str, fake_llm: object, tmp_path: Path) -> None:
    from tests.conftest import write_config

    config = write_config(tmp_path, database_url, fake_llm.url, database={"url": {"$env": "H_DATABASE_URL"}})  # type: ignore[attr-defined]
    assert "# missing" in ok(cli("config", "show", config=config))  # needs no database
    fails(cli("tenant", "list", config=config), "database.url: environment variable H_DATABASE_URL is not set")
    assert json.loads(ok(cli("tenant", "list", "--json", config=config, env=cli_env(H_DATABASE_URL=database_url)))) == []


def test_config_show_prints_toml(database_url: str, fake_llm: object, tmp_path: Path) -> None:
    import tomllib

    from tests.conftest import write_config

    config = write_config(tmp_path, database_url, fake_llm.url, gateway={"port": 9311, "public_url": ""})  # type: ignore[attr-defined]
    text = ok(cli("config", "show", config=config, env=cli_env(KONSTRUCT_AGENT__WEB_FETCH_PRIVATE="true")))
    back = tomllib.loads(text)
    assert "web_fetch_private = true" in text and "tenant_api_base_private = false" in text and "False" not in text
    assert back["gateway"]["public_url"] == "http://127.0.0.1:9311"  # follows the port
    assert back["llm"]["api_key"] == "…0001" and "sk-test-key" not in text
    assert back["database"]["url"].startswith("postgresql://") and "****" in back["database"]["url"]


def test_a_mistyped_setting_gets_a_suggestion(tmp_path: Path) -> None:
    bad = tmp_path / "konstruct.toml"
    bad.write_text("[gateway]\nprot = 8080\n")
    fails(cli("tenant", "list", config=bad), "unknown setting gateway.prot — did you mean gateway.port?")
    bad.write_text("[gateway]\nport = 8080\n")
    result = cli("tenant", "list", config=bad, env=cli_env(KONSTRUCT_GATEWAY__PROT="8081"))
    fails(
        result,
        "environment variable KONSTRUCT_GATEWAY__PROT: unknown setting KONSTRUCT_GATEWAY__PROT — did you mean KONSTRUCT_GATEWAY__PORT?",
    )
    assert "konstruct.toml" not in result.stderr


async def test_a_mistyped_tenant_or_agent_gets_a_suggestion_among_what_the_caller_sees(config_path: Path, db: Any) -> None:
    from konstruct.tenancy.tenants import get_tenant
    from konstruct.tenancy.users import add_member, create_user

    ok(cli("tenant", "create", "Acme Inc", config=config_path))
    ok(cli("tenant", "create", "Globex", config=config_path))
    ok(cli("agent", "create", "-t", "acme-inc", "-n", "Ava", "-r", "Billing", "--persona", "You are Ava.", config=config_path))
    fails(
        cli("agent", "show", "Ava", "-t", "acme", config=config_path),
        "no tenant 'acme' — did you mean 'acme-inc'? see `konstruct tenant list`",
    )
    fails(cli("tenant", "show", "initech", config=config_path), "no tenant 'initech': see `konstruct tenant list`")
    fails(cli("agent", "show", "ava", "-t", "acme-inc", config=config_path), "has no agent 'ava' — did you mean 'Ava'? see")

    # A customer of Globex only: never pointed at acme-inc, which they may not see; pointed at their own tenant.
    globex = await get_tenant(db, "globex")
    user = await create_user(db, email="gil@globex.test", name="Gil", password=None, platform_admin=False, actor="test")
    async with db.tenant(tenant_id=globex.id) as session:
        await add_member(session, globex.id, user, "customer_admin", actor="test")
    outsider = cli("--as", "gil@globex.test", "agent", "list", "-t", "acme", config=config_path)
    assert outsider.returncode == 3 and "has no role in tenant acme" in outsider.stderr and "acme-inc" not in outsider.stderr
    near = cli("--as", "gil@globex.test", "agent", "list", "-t", "globx", config=config_path)
    assert near.returncode == 3 and "has no role in tenant globx — did you mean 'globex'?" in near.stderr


async def test_money_below_a_cent_and_usage_at_80_columns(config_path: Path, db: Any) -> None:
    from decimal import Decimal

    from konstruct.tenancy.tenants import get_tenant

    ok(cli("tenant", "create", "Acme Inc", config=config_path))
    assert "$0.0005" in ok(cli("budget", "set", "-t", "acme-inc", "--usd", "0.0005", config=config_path))
    model = "openai/a-very-long-fine-tuned-model-name-for-acme-billing-2026-11-30"
    acme = await get_tenant(db, "acme-inc")
    await meter(db, acme.id, Decimal("0.000585"), model=model, prompt_tokens=1200, completion_tokens=300, latency_ms=900)
    shown = ok(cli("budget", "show", "-t", "acme-inc", config=config_path))
    assert "monthly limit  $0.0005\n" in shown and "$0.00059 in" in shown and "117.0%" in shown and "$0.00 in" not in shown

    usage = konstruct("usage", "--since", "30d", config=config_path, env=cli_env(COLUMNS="80"))  # a real 80-column terminal
    text = ok(usage)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    first_cells = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    assert model in "".join(first_cells), text  # folded onto more lines, not cut
    assert "$0.00059" in text and "$0.0000" not in text and "$0.00 " not in text
    chart = text[text.index("cost per day") : text.index("feedback on replies")].splitlines()[1:]  # the votes follow it
    assert 1 <= len(chart) <= 3 and any("█" in line and "$0.00059" in line for line in chart), chart
    assert all("█" in line or "no cost" in line for line in chart)


def test_db_current_json(config_path: Path) -> None:
    data = json.loads(ok(cli("db", "current", "--json", config=config_path)))
    assert data["current"] == data["head"] and data["at_head"] is True and data["head"]


async def test_invite_accept_takes_a_token_starting_with_a_dash(config_path: Path, db: Any) -> None:
    """Tokens made before the fix could start with '-' (1 in 64): `-- TOKEN` and --token TOKEN still accept them."""
    from sqlalchemy import update

    from konstruct.db.models import Invitation
    from konstruct.tenancy import invitations
    from konstruct.tenancy.tenants import get_tenant

    ok(cli("tenant", "create", "Acme Inc", config=config_path))
    acme = await get_tenant(db, "acme-inc")
    env = cli_env(PW="a long enough password")
    for n, how in enumerate((["--"], ["--token"])):
        info, token = await invitations.create(db, acme, email=f"dash{n}@acme.test", role="customer_operator", actor="test")
        old_style = "-" + token[1:]
        async with db.tenant(tenant_id=acme.id) as session:  # as an invitation made before the fix would be stored
            await session.execute(update(Invitation).where(Invitation.id == info.id).values(token_hash=invitations.token_hash(old_style)))
        joined = json.loads(ok(cli("invite", "accept", "--name", "Dee", "--password-env", "PW", "--json", *how, old_style,
                                   config=config_path, env=env)))  # fmt: skip
        assert joined["email"] == f"dash{n}@acme.test" and joined["role"] == "customer_operator"
    fails(cli("invite", "accept", config=config_path), "pass the invitation link or its token once")


def test_what_is_imported_with_the_collector_paused_is_frozen_out_of_it() -> None:
    """Otherwise the first collection after the pause walks every object the imports made (50 ms in `chat`)."""
    import gc

    from konstruct.startup import collector_paused

    before = gc.get_freeze_count()
    with collector_paused():
        assert not gc.isenabled()
        made = [[n] for n in range(1000)]
    assert gc.isenabled() and gc.get_freeze_count() >= before + len(made)
    gc.disable()
    try:
        with collector_paused():
            made.append([len(made)])
        assert not gc.isenabled()  # a caller that turned it off keeps it off
    finally:
        gc.enable()
