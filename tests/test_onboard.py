"""The onboarding wizard, all flags (automation): interrupted at the required test message when no worker
runs, resumed where it stopped once one does, and live at the end — through the real CLI and pipeline."""

from __future__ import annotations

import json
from pathlib import Path

from konstruct import audit
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.tenancy.tenants import get_tenant
from tests.fakes.llm import FakeLLM
from tests.helpers import Proc, cli_env, konstruct, konstruct_in_process


async def test_an_interrupted_wizard_resumes_and_goes_live(config_path: Path, tmp_path: Path, fake_llm: FakeLLM, db: Database) -> None:
    flags = ["--new-tenant", "Initech", "--channel", "skip", "--agent-name", "Ava", "--role", "Support", "--persona", "Kind and brief.",
             "--tools", "calculator,current_time", "--test-message", "Hello from onboarding"]  # fmt: skip
    first = konstruct_in_process("onboard", *flags, config=config_path)
    assert first.returncode != 0, first.stdout
    assert "got no answer" in first.stderr and "run `konstruct onboard` again" in first.stderr and "Traceback" not in first.stderr
    state = json.loads((load_settings(config_path).data_dir / "onboarding.json").read_text())
    assert state["done"] == ["tenant", "channel", "agent"] and state["tenant"] == "initech"
    assert fake_llm.requests == []

    worker = Proc("worker", ["worker"], config=config_path, log_dir=tmp_path)
    try:
        worker.wait_for_log(" ready: ")
        resumed = konstruct_in_process("onboard", "--test-message", "Hello from onboarding", config=config_path)
        assert resumed.returncode == 0, resumed.stderr + worker.log()
        assert "resuming" in resumed.stdout and "live" in resumed.stdout
    finally:
        worker.stop()
    assert "You said: Hello from onboarding" in resumed.stdout  # the agent's reply is shown
    assert [r.body["messages"][-1]["content"] for r in fake_llm.requests] == ["Hello from onboarding"]
    assert not (load_settings(config_path).data_dir / "onboarding.json").exists()
    agent = json.loads(konstruct_in_process("agent", "show", "Ava", "--tenant", "initech", "--json", config=config_path).stdout)
    assert agent["settings"]["tools"] == ["calculator", "current_time"] and agent["role"] == "Support"
    actions = [e.action for e in await audit.events(db, (await get_tenant(db, "initech")).id)]
    assert actions[0] == "tenant.created" and "agent.created" in actions and actions[-1] == "onboarding.completed"


async def test_missing_answers_without_a_terminal_are_clear_errors(config_path: Path) -> None:
    # Real processes with stdin not a terminal, as a script or CI runs them.
    result = konstruct("onboard", config=config_path)
    assert result.returncode != 0 and "--tenant or --new-tenant" in result.stderr and "Traceback" not in result.stderr
    bad = konstruct("onboard", "--new-tenant", "X", "--channel", "carrier-pigeon", config=config_path)
    assert bad.returncode != 0 and "--channel must be one of" in bad.stderr


async def test_the_wizard_acts_as_the_user_of_as(config_path: Path) -> None:
    # Its steps once re-entered the CLI through argv, which dropped --as: a customer could create a tenant through it.
    env = cli_env(NEW_PASSWORD="a-long-enough-password-1")
    created = konstruct("user", "create", "ops@example.com", "--name", "Ops", "--password-env", "NEW_PASSWORD", config=config_path, env=env)
    assert created.returncode == 0, created.stderr
    refused = konstruct("--as", "ops@example.com", "onboard", "--new-tenant", "Hooli", "--channel", "skip", config=config_path)
    assert refused.returncode == 3 and "may not do tenant.create" in refused.stderr and "Traceback" not in refused.stderr
    tenants = json.loads(konstruct("tenant", "list", "--json", config=config_path).stdout)
    assert "hooli" not in [t["slug"] for t in tenants]
