"""Declarative apply: plan shows the diff, apply is idempotent and audited, --prune is needed to delete;
the example tenants file applies cleanly. Through the real CLI (in-process) and a real database."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from konstruct import audit
from konstruct.cli import app
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.errors import PermissionDenied
from konstruct.tenancy.tenants import get_tenant
from konstruct.tenancy.users import create_user

ROOT = Path(__file__).resolve().parent.parent


def cli(config: Path, *args: str) -> Any:
    return CliRunner().invoke(app, ["--config", str(config), *args], env={"KONSTRUCT_AS": ""})


def plan(config: Path, file: Path, *extra: str) -> list[dict[str, Any]]:
    result = cli(config, "plan", "-f", str(file), "--json", *extra)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return list(json.loads(result.output))


def summary(changes: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(c["action"], c["kind"], f"{c['tenant']}/{c['name']}") for c in changes]


def audit_actions(config: Path, slug: str) -> list[str]:
    async def go() -> list[str]:
        db = Database(load_settings(config))
        try:
            return [e.action for e in await audit.events(db, (await get_tenant(db, slug)).id)]
        finally:
            await db.dispose()

    return asyncio.run(go())


def test_the_example_file_plans_applies_and_is_idempotent(config_path: Path, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples" / "personas", tmp_path / "personas")
    file = tmp_path / "tenants.toml"
    file.write_text((ROOT / "examples" / "tenants.toml").read_text())
    first = plan(config_path, file)
    assert ("create", "tenant", "acme/acme") in summary(first)
    assert ("create", "agent", "acme/Ava") in summary(first) and ("create", "agent", "globex/Gia") in summary(first)
    assert ("create", "invitation", "acme/ann@acme.example") in summary(first)
    assert cli(config_path, "tenant", "list", "--json").output.strip() == "[]"  # plan wrote nothing

    applied = cli(config_path, "apply", "-f", str(file), "--json")
    assert applied.exit_code == 0, applied.output + repr(applied.exception)
    links = json.loads(applied.output)["invitations"]
    assert {i["email"] for i in links} == {"ann@acme.example", "bo@acme.example"} and all("/invite/" in i["link"] for i in links)
    assert plan(config_path, file) == []  # idempotent: nothing left to do
    again = cli(config_path, "apply", "-f", str(file))
    assert again.exit_code == 0 and "nothing to do" in again.output

    agent = json.loads(cli(config_path, "agent", "show", "Ava", "--tenant", "acme", "--json").output)
    assert agent["model"] == "openai/gpt-4o" and "refunds" in agent["persona"]
    assert agent["settings"]["tools"] == ["current_time", "calculator", "web_fetch", "escalate_to_human"]
    assert agent["settings"]["fallbacks"] == ["anthropic/claude-3-5-haiku-20241022"]
    assert agent["suggested_prompts"] == ["What is your refund policy?", "Where is my order?"]
    budget = json.loads(cli(config_path, "budget", "show", "--tenant", "acme", "--json").output)
    assert (budget["monthly_usd"], budget["action"], budget["alerts"]) == (50.0, "downgrade", [50, 80])
    actions = audit_actions(config_path, "acme")
    for action in ("tenant.created", "tenant.updated", "agent.created", "budget.set", "invite.created"):
        assert action in actions, action


def test_changes_are_shown_and_deletes_need_prune(config_path: Path, tmp_path: Path) -> None:
    file = tmp_path / "t.toml"
    file.write_text("""
[[tenants]]
slug = "one"
name = "One"
[[tenants.agents]]
name = "A"
role = "Support"
persona = "Brief."
[[tenants.agents]]
name = "B"
role = "Sales"
persona = "Keen."
[tenants.budget]
usd = 10
""")
    assert cli(config_path, "apply", "-f", str(file)).exit_code == 0
    cli(config_path, "tenant", "create", "Stray", "--slug", "stray")
    file.write_text("""
[[tenants]]
slug = "one"
name = "One Renamed"
[[tenants.agents]]
name = "A"
role = "Support lead"
persona = "Brief."
""")
    changes = plan(config_path, file)
    assert summary(changes) == [("change", "tenant", "one/one"), ("change", "agent", "one/A")]
    assert changes[1]["fields"] == {"role": {"now": "Support", "then": "Support lead"}}
    pruned = plan(config_path, file, "--prune")
    assert set(summary(pruned)) == {
        ("change", "tenant", "one/one"), ("change", "agent", "one/A"), ("delete", "agent", "one/B"),
        ("delete", "budget", "one/monthly"), ("delete", "tenant", "stray/stray"),
    }  # fmt: skip
    assert cli(config_path, "apply", "-f", str(file)).exit_code == 0
    names = {a["name"] for a in json.loads(cli(config_path, "agent", "list", "--tenant", "one", "--json").output)}
    assert names == {"A", "B"}  # without --prune nothing is deleted
    assert cli(config_path, "apply", "-f", str(file), "--prune").exit_code == 0
    assert {a["name"] for a in json.loads(cli(config_path, "agent", "list", "--tenant", "one", "--json").output)} == {"A"}
    assert [t["slug"] for t in json.loads(cli(config_path, "tenant", "list", "--json").output)] == ["one"]
    assert plan(config_path, file, "--prune") == []


def test_bad_files_and_customers_are_refused(config_path: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    for text, words in (
        ('[[tenants]]\nslug = "x"\n', "name"),
        ('[[tenants]]\nslug = "x"\nname = "X"\n[[tenants.agents]]\nname = "A"\nrole = "R"\n', "persona"),
        (
            '[[tenants]]\nslug = "x"\nname = "X"\n[[tenants.agents]]\nname = "A"\nrole = "R"\npersona = "P"\ntools = ["teleport"]\n',
            "teleport",
        ),
        ('[[tenants]]\nslug = "x"\nname = "X"\ncolour = "red"\n', "colour"),
        ("not toml at all [", "TOML"),
    ):
        bad.write_text(text)
        result = cli(config_path, "plan", "-f", str(bad))
        assert result.exit_code != 0 and words in str(result.exception), (text, result.exception)
    assert cli(config_path, "tenant", "list", "--json").output.strip() == "[]"
    good = tmp_path / "good.toml"
    good.write_text('[[tenants]]\nslug = "x"\nname = "X"\n')
    assert cli(config_path, "plan", "-f", str(good)).exit_code == 0

    async def make_user() -> None:
        db = Database(load_settings(config_path))
        try:
            await create_user(db, email="cust@x.test", name="C", password=None, platform_admin=False, actor="test")
        finally:
            await db.dispose()

    asyncio.run(make_user())
    refused = CliRunner().invoke(app, ["--config", str(config_path), "--as", "cust@x.test", "apply", "-f", str(good)])
    assert isinstance(refused.exception, PermissionDenied)


def test_tenants_declared_in_konstruct_toml(config_path: Path) -> None:
    config_path.write_text(
        config_path.read_text() + '\n[[tenants]]\nslug = "inline"\nname = "Inline Ltd"\n'
        '[[tenants.agents]]\nname = "Ivy"\nrole = "Support"\npersona = "Brief."\n'
    )
    config_plan = cli(config_path, "plan", "--json")
    assert config_plan.exit_code == 0, config_plan.output
    assert summary(json.loads(config_plan.output)) == [("create", "tenant", "inline/inline"), ("create", "agent", "inline/Ivy")]
    assert cli(config_path, "apply").exit_code == 0
    assert json.loads(cli(config_path, "plan", "--json").output) == []


def test_suggested_prompts_are_planned_applied_and_checked(config_path: Path, tmp_path: Path) -> None:
    file = tmp_path / "p.toml"
    agent = '[[tenants]]\nslug = "p"\nname = "P"\n[[tenants.agents]]\nname = "A"\nrole = "R"\npersona = "Brief."\n'
    file.write_text(agent + 'suggested_prompts = ["What is your refund policy?", "Track my order"]\n')
    assert cli(config_path, "apply", "-f", str(file)).exit_code == 0
    shown = json.loads(cli(config_path, "agent", "show", "A", "--tenant", "p", "--json").output)
    assert shown["suggested_prompts"] == ["What is your refund policy?", "Track my order"]
    assert plan(config_path, file) == []  # idempotent
    file.write_text(agent + 'suggested_prompts = ["Track my order"]\n')
    [change] = plan(config_path, file)
    assert change["fields"] == {"suggested_prompts": {"now": ["What is your refund policy?", "Track my order"], "then": ["Track my order"]}}
    assert cli(config_path, "apply", "-f", str(file)).exit_code == 0
    assert json.loads(cli(config_path, "agent", "show", "A", "--tenant", "p", "--json").output)["suggested_prompts"] == ["Track my order"]
    file.write_text(agent)  # left out: the agent has none
    assert cli(config_path, "apply", "-f", str(file)).exit_code == 0
    assert json.loads(cli(config_path, "agent", "show", "A", "--tenant", "p", "--json").output)["suggested_prompts"] == []
    file.write_text(agent + "suggested_prompts = " + json.dumps([f"prompt {n}" for n in range(5)]) + "\n")
    result = cli(config_path, "plan", "-f", str(file))
    assert result.exit_code != 0 and "at most 4" in str(result.exception)
