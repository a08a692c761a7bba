"""The onboarding wizard, all flags (automation): a running worker first, then the model, then tenant, channel, agent
and a test message the model really answers — through the real CLI and pipeline; with billing on, the pause explained
and the wizard resumed once the tenant may run."""

from __future__ import annotations

import json
import shlex
from decimal import Decimal
from pathlib import Path

from konstruct import audit
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.tenancy.tenants import get_tenant
from tests.conftest import write_config
from tests.fakes import stripe as fs
from tests.fakes.llm import FakeLLM
from tests.helpers import Proc, cli_env, konstruct, konstruct_in_process, meter

FLAGS = ["--new-tenant", "Initech", "--channel", "skip", "--agent-name", "Ava", "--role", "Support", "--persona", "Kind and brief.",
         "--tools", "calculator,current_time", "--test-message", "Hello from onboarding"]  # fmt: skip


async def test_the_wizard_checks_for_a_worker_first_then_goes_live(
    config_path: Path, tmp_path: Path, fake_llm: FakeLLM, db: Database
) -> None:
    first = konstruct_in_process("onboard", *FLAGS, config=config_path)
    assert first.returncode == 1 and "Traceback" not in first.stderr, first.stdout
    assert "no worker is running: start `konstruct up` in another shell" in first.stderr and len(first.stderr.strip().splitlines()) == 1
    assert not (load_settings(config_path).data_dir / "onboarding.json").exists()  # nothing was done: no tenant made
    assert "initech" not in konstruct_in_process("tenant", "list", config=config_path).stdout
    assert fake_llm.requests == []

    worker = Proc("worker", ["worker"], config=config_path, log_dir=tmp_path)
    try:
        # Started after the wizard: it waits for the worker (--wait), then tests the model, then the rest.
        waiting = Proc("onboard", ["onboard", *FLAGS, "--wait", "120", "--json"], config=config_path, log_dir=tmp_path)
        assert waiting.process.wait(180) == 0, waiting.log() + worker.log()
    finally:
        worker.stop()
    result = json.loads(waiting.log())
    assert result["ok"] is True and (result["tenant"], result["agent"]) == ("initech", "Ava")
    steps = {s["step"]: s for s in result["steps"]}
    assert list(steps) == ["up", "model", "tenant", "channel", "agent", "test", "live"]
    assert all(s["status"] == "ok" for s in steps.values())
    assert "model openai/fake-model answered in" in steps["model"]["detail"]
    assert steps["test"]["reply"] == "[fake-model] You said: Hello from onboarding"  # the model's own answer
    assert fake_llm.requests[-1].body["messages"][-1]["content"] == "Hello from onboarding"
    assert not (load_settings(config_path).data_dir / "onboarding.json").exists()
    agent = json.loads(konstruct_in_process("agent", "show", "Ava", "--tenant", "initech", "--json", config=config_path).stdout)
    assert agent["settings"]["tools"] == ["calculator", "current_time"] and agent["role"] == "Support"
    actions = [e.action for e in await audit.events(db, (await get_tenant(db, "initech")).id)]
    assert actions[0] == "tenant.created" and "agent.created" in actions and actions[-1] == "onboarding.completed"


async def test_the_wizard_stops_at_a_model_that_does_not_answer(config_path: Path, tmp_path: Path, fake_llm: FakeLLM) -> None:
    worker = Proc("worker", ["worker"], config=config_path, log_dir=tmp_path)
    try:
        worker.wait_for_log(" ready: ")
        fake_llm.bad_keys.add("sk-test-key-0001")
        refused = konstruct_in_process("onboard", *FLAGS, "--json", config=config_path)
    finally:
        worker.stop()
    assert refused.returncode == 1 and "401 bad key" in refused.stderr and "konstruct init --llm-model" in refused.stderr
    result = json.loads(refused.stdout)
    assert result["ok"] is False and [s["step"] for s in result["steps"]] == ["up"] and "401 bad key" in result["error"]
    assert not (load_settings(config_path).data_dir / "onboarding.json").exists()


async def test_with_billing_on_the_wizard_explains_the_pause_and_resumes(tmp_path: Path, database_url: str, fake_llm: FakeLLM) -> None:
    stripe_fake = fs.FakeStripe().start()
    try:
        billing: dict[str, object] = {"stripe_api_key": stripe_fake.api_key, "webhook_secret": "whsec_onboarding", "api_base": stripe_fake.url,
                   "plans": [{"name": "starter", "price_id": "price_starter", "budget_usd": 5.0}]}  # fmt: skip
        config = write_config(tmp_path, database_url, fake_llm.url, billing=billing)
        worker = Proc("worker", ["worker"], config=config, log_dir=tmp_path)
        try:
            worker.wait_for_log(" ready: ")
            paused = konstruct_in_process("onboard", *FLAGS, config=config)
            assert paused.returncode == 1, paused.stdout
            error = paused.stderr.strip()
            assert len(error.splitlines()) == 1 and "Traceback" not in error, paused.stderr
            assert "live" not in paused.stdout
            assert "billing pauses initech's agents (no subscription)" in error
            assert (
                "`konstruct billing exempt --tenant initech`" in error
                and "konstruct billing checkout --tenant initech --plan starter" in error
            )
            again = error.split("try again with: ", 1)[1].split(" — ", 1)[0]
            assert shlex.split(again) == ["konstruct", "--config", str(config), "chat", "--tenant", "initech", "--agent", "Ava", "--new",
                                          "--person", "onboarding", "--message", "Hello from onboarding"]  # fmt: skip
            assert fake_llm.requests[1:] == []  # only the model step's test call: the paused agent never asked the model

            assert konstruct_in_process("billing", "exempt", "--tenant", "initech", config=config).returncode == 0
            resumed = konstruct_in_process("onboard", "--test-message", "Hello from onboarding", config=config)
            assert resumed.returncode == 0, resumed.stderr + worker.log()
        finally:
            worker.stop()
    finally:
        stripe_fake.stop()
    assert "resuming: tenant initech, its channel (skip) and agent Ava done already" in resumed.stdout
    assert "[fake-model] You said: Hello from onboarding" in resumed.stdout and "live: Ava answers for initech" in resumed.stdout
    assert stripe_fake.requests == []


async def test_a_spent_budget_is_explained_not_called_live(config_path: Path, tmp_path: Path, fake_llm: FakeLLM, db: Database) -> None:
    assert konstruct_in_process("tenant", "create", "Initech", config=config_path).returncode == 0
    assert (
        konstruct_in_process("budget", "set", "--tenant", "initech", "--usd", "0.0001", "--action", "block", config=config_path).returncode
        == 0
    )
    initech = await get_tenant(db, "initech")
    await meter(db, initech.id, Decimal("0.0002"))  # this month's calls so far: over the limit
    flags = ["--tenant", "initech", "--channel", "skip", "--agent-name", "Ava", "--role", "Support", "--persona", "Brief.",
             "--model", "openai/gpt-4o-mini", "--test-message", "Hello from onboarding"]  # fmt: skip  # a priced model
    worker = Proc("worker", ["worker"], config=config_path, log_dir=tmp_path)
    try:
        worker.wait_for_log(" ready: ")
        blocked = konstruct_in_process("onboard", *flags, config=config_path)
    finally:
        worker.stop()
    assert blocked.returncode == 1 and "live" not in blocked.stdout, blocked.stdout
    error = blocked.stderr.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, blocked.stderr
    assert "initech's monthly LLM budget is used up" in error and "konstruct budget set --tenant initech --usd N" in error
    assert not any(r.body["messages"][-1]["content"] == "Hello from onboarding" for r in fake_llm.requests)  # never reached the model


async def test_missing_answers_and_a_refused_user_are_clear_errors(config_path: Path, tmp_path: Path) -> None:
    # Real processes with stdin not a terminal, as a script or CI runs them; a worker runs, so the wizard gets that far.
    worker = Proc("worker", ["worker"], config=config_path, log_dir=tmp_path)
    try:
        worker.wait_for_log(" ready: ")
        result = konstruct("onboard", config=config_path)
        assert result.returncode == 1 and "--tenant or --new-tenant" in result.stderr and "Traceback" not in result.stderr
        bad = konstruct("onboard", "--new-tenant", "X", "--channel", "carrier-pigeon", config=config_path)
        assert bad.returncode != 0 and "--channel must be one of" in bad.stderr

        # Its steps once re-entered the CLI through argv, which dropped --as: a customer could create a tenant through it.
        env = cli_env(NEW_PASSWORD="a-long-enough-password-1")
        created = konstruct_in_process("user", "create", "ops@example.com", "--name", "Ops", "--password-env", "NEW_PASSWORD",
                                       config=config_path, env=env)  # fmt: skip
        assert created.returncode == 0, created.stderr
        refused = konstruct("--as", "ops@example.com", "onboard", "--new-tenant", "Hooli", "--channel", "skip", config=config_path)
        assert refused.returncode == 3 and "may not do tenant.create" in refused.stderr and "Traceback" not in refused.stderr
    finally:
        worker.stop()
    tenants = json.loads(konstruct_in_process("tenant", "list", "--json", config=config_path).stdout)
    assert "hooli" not in [t["slug"] for t in tenants]
