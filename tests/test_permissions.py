"""The whole permission matrix: every operation the CLI exposes × every role × own and other tenant,
run through the real CLI (in-process) against a real database. Any surprise fails.

The expectations below are written from DESIGN.md's role table, not imported from the code under test.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from konstruct.agent.agents import create_agent
from konstruct.cli import app
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.errors import KonstructError, NotFoundError, PermissionDenied, WorkerUnavailableError
from konstruct.tenancy.tenants import create_tenant, get_tenant
from konstruct.tenancy.users import add_member, create_user

ADMIN, OPERATOR = "customer_admin", "customer_operator"
BOTH = {ADMIN, OPERATOR}

# operation: (customer roles allowed on their own tenant, command for a tenant slug, errors allowed after the check)
Command = Callable[[str], list[str]]
MATRIX: dict[str, tuple[set[str], Command, tuple[type[KonstructError], ...]]] = {
    "tenant.read": (BOTH, lambda t: ["tenant", "show", t], ()),
    "tenant.configure": ({ADMIN}, lambda t: ["tenant", "configure", t, "--allowed-hosts", "example.com"], ()),
    "agent.read": (BOTH, lambda t: ["agent", "list", "--tenant", t], ()),
    "agent.show": (BOTH, lambda t: ["agent", "show", "Ava", "--tenant", t], ()),
    "agent.write": ({ADMIN}, lambda t: ["agent", "update", "Ava", "--tenant", t, "--role", "Support"], ()),
    "agent.test": (
        BOTH,
        lambda t: ["chat", "--tenant", t, "--agent", "Ava", "--message", "hi", "--timeout", "0.2"],
        (WorkerUnavailableError,),
    ),
    "escalation.test": (BOTH, lambda t: ["escalation", "test", "--tenant", t, "--agent", "Ava", "hello"], ()),
    "channel.read": ({ADMIN}, lambda t: ["channel", "list", "--tenant", t], ()),
    "channel.write": ({ADMIN}, lambda t: ["channel", "connect", "slack", "--tenant", t], ()),
    "key.read": ({ADMIN}, lambda t: ["key", "list", "--tenant", t], ()),
    "key.write": ({ADMIN}, lambda t: ["key", "add", "--tenant", t, "--provider", "openai", "--key-env", "MATRIX_KEY"], ()),
    "usage.read": (BOTH, lambda t: ["usage", "--tenant", t, "--json"], ()),
    "budget.read": (BOTH, lambda t: ["budget", "show", "--tenant", t], ()),
    "budget.write": ({ADMIN}, lambda t: ["budget", "set", "--tenant", t, "--usd", "5"], ()),
    "billing.read": ({ADMIN}, lambda t: ["billing", "status", "--tenant", t], ()),
    "billing.write": ({ADMIN}, lambda t: ["billing", "portal", "--tenant", t], (KonstructError,)),  # billing is off here
    "billing.exempt": (set(), lambda t: ["billing", "exempt", "--tenant", t], ()),
    "user.read": ({ADMIN}, lambda t: ["user", "list", "--tenant", t], ()),
    "user.write": ({ADMIN}, lambda t: ["user", "role", f"bystander@{t}.test", OPERATOR, "--tenant", t], ()),
    "invite.read": ({ADMIN}, lambda t: ["invite", "list", "--tenant", t], ()),
    "invite.write": ({ADMIN}, lambda t: ["invite", "create", "--tenant", t, "--email", f"new@{t}.test", "--role", OPERATOR], ()),
    "conversation.read": (BOTH, lambda t: ["conversation", "list", "--tenant", t], ()),
    "conversation.read (feedback)": (BOTH, lambda t: ["feedback", "--tenant", t, "--json"], ()),
    "conversation.handle": (BOTH, lambda t: ["conversation", "release", "0000000000", "--tenant", t], (NotFoundError,)),
    "knowledge.read": (BOTH, lambda t: ["knowledge", "list", "--tenant", t], ()),
    "knowledge.write": ({ADMIN}, lambda t: ["knowledge", "remove", "nothing.md", "--tenant", t, "--yes"], (NotFoundError,)),
    "conversation.handle (reply)": (BOTH, lambda t: ["conversation", "reply", "0000000000", "hello", "--tenant", t], (NotFoundError,)),
    "conversation.handle (take)": (BOTH, lambda t: ["conversation", "take", "0000000000", "--tenant", t], (NotFoundError,)),
    "conversation.handle (close)": (BOTH, lambda t: ["conversation", "close", "0000000000", "--tenant", t], (NotFoundError,)),
    "memory.read": ({ADMIN}, lambda t: ["memory", "list", "--tenant", t, "--person", "pat"], ()),
    "memory.forget": ({ADMIN}, lambda t: ["memory", "forget", "--tenant", t, "--person", "nobody", "--yes"], ()),
    "audit.read": ({ADMIN}, lambda t: ["audit", "tail", "--tenant", t], ()),
    "tenant.suspend": (set(), lambda t: ["tenant", "resume", t], ()),
}
# Installation-wide operations: platform admins only, whatever the tenant.
PLATFORM_ONLY: dict[str, list[str]] = {
    "tenant.create": ["tenant", "create", "Made by matrix", "--slug", "made-{n}"],
    "user.admin": ["user", "list"],
    "secrets.rotate": ["secrets", "reencrypt"],
    "installation.config": ["config", "show"],
    "installation.db": ["db", "current"],
    "installation.knowledge": ["knowledge", "indexes"],  # a large tenant's own indexes: DDL on the shared table
    "apply": ["plan"],  # the declared [[tenants]] of konstruct.toml (none here)
}


class Site:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.runner = CliRunner()
        self.count = 0

    def run(self, who: str | None, args: list[str]) -> BaseException | None:
        """Run one command as a user (None: the local operator). Returns the error, or None on success."""
        self.count += 1
        argv = ["--config", str(self.config), *(["--as", who] if who else []), *[a.replace("{n}", str(self.count)) for a in args]]
        result = self.runner.invoke(app, argv, env={"MATRIX_KEY": "sk-matrix-key-123456", "KONSTRUCT_AS": ""})
        if result.exit_code == 0:
            return None
        assert result.exception is not None, result.output
        return result.exception


@pytest.fixture
def site(config_path: Path) -> Iterator[Site]:
    config_path.write_text(
        config_path.read_text()
        + '\n[slack]\nclient_id = "123.456"\nclient_secret = "slack-client-secret"\nsigning_secret = "slack-signing-secret"\n'
    )

    async def seed() -> None:
        db = Database(load_settings(config_path))
        try:
            for slug in ("own", "other", "doomed-own", "doomed-other"):
                tenant = await create_tenant(db, name=slug, slug=slug, actor="test")
                if not slug.startswith("doomed"):
                    await create_agent(db, tenant, name="Ava", role="Support", persona="Brief.", model=None, actor="test")
            ids = {}
            for email, admin in (("platform@x.test", True), ("admin@x.test", False), ("operator@x.test", False),
                                 ("outsider@x.test", False), ("bystander@own.test", False), ("bystander@other.test", False)):  # fmt: skip
                ids[email] = await create_user(db, email=email, name=email, password=None, platform_admin=admin, actor="test")
            roles = {
                "own": [("admin@x.test", ADMIN), ("operator@x.test", OPERATOR), ("bystander@own.test", OPERATOR)],
                "doomed-own": [("admin@x.test", ADMIN), ("operator@x.test", OPERATOR)],
                "other": [("bystander@other.test", OPERATOR)],
            }
            for tenant_info in [await get_tenant(db, slug) for slug in roles]:
                async with db.tenant(tenant_id=tenant_info.id) as session:
                    for email, role in roles[tenant_info.slug]:
                        await add_member(session, tenant_info.id, ids[email], role, actor="test")
        finally:
            await db.dispose()

    asyncio.run(seed())
    os.environ.pop("KONSTRUCT_AS", None)
    yield Site(config_path)


PEOPLE = {"platform_admin": "platform@x.test", ADMIN: "admin@x.test", OPERATOR: "operator@x.test", "outsider": "outsider@x.test"}


def test_every_operation_for_every_role_on_own_and_other_tenant(site: Site) -> None:
    surprises: list[str] = []
    for operation, (allowed_roles, command, after_check) in MATRIX.items():
        for role, email in PEOPLE.items():
            for where, slug in (("own", "own"), ("other", "other")):
                expected = role == "platform_admin" or (where == "own" and role in allowed_roles)
                error = site.run(email, command(slug))
                denied = isinstance(error, PermissionDenied)
                if error is not None and not denied and not isinstance(error, after_check):
                    surprises.append(f"{operation} as {role} on {where}: unexpected {type(error).__name__}: {error}")
                elif denied == expected:
                    surprises.append(f"{operation} as {role} on {where}: {'denied' if denied else 'allowed'}, expected the opposite")
    for operation, args in PLATFORM_ONLY.items():
        for role, email in PEOPLE.items():
            error = site.run(email, args)
            denied = isinstance(error, PermissionDenied)
            if error is not None and not denied:
                surprises.append(f"{operation} as {role}: unexpected {type(error).__name__}: {error}")
            elif denied == (role == "platform_admin"):
                surprises.append(f"{operation} as {role}: {'denied' if denied else 'allowed'}, expected the opposite")
    # Deleting: customers never may, on their own tenant or another; a platform admin may.
    for role in (ADMIN, OPERATOR, "outsider"):
        for slug in ("doomed-own", "doomed-other"):
            if not isinstance(site.run(PEOPLE[role], ["tenant", "delete", slug, "--yes"]), PermissionDenied):
                surprises.append(f"tenant.delete as {role} on {slug}: not denied")
    for slug in ("doomed-own", "doomed-other"):
        error = site.run(PEOPLE["platform_admin"], ["tenant", "delete", slug, "--yes"])
        if error is not None:
            surprises.append(f"tenant.delete as platform_admin on {slug}: {type(error).__name__}: {error}")
    assert not surprises, "\n".join(surprises)


def test_the_local_operator_is_a_platform_admin_and_unknown_users_are_refused(site: Site) -> None:
    assert site.run(None, ["tenant", "show", "other"]) is None
    assert site.run(None, ["tenant", "create", "By the operator", "--slug", "by-op"]) is None
    for args in (["tenant", "show", "own"], ["config", "show"], ["tenant", "list"]):
        error = site.run("nobody@x.test", args)
        assert isinstance(error, NotFoundError) and "no user" in str(error), args


def test_listings_show_only_what_the_role_may_see(site: Site) -> None:
    result = site.runner.invoke(app, ["--config", str(site.config), "--as", "operator@x.test", "tenant", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert '"own"' in result.output and '"other"' not in result.output and '"doomed-other"' not in result.output
    result = site.runner.invoke(app, ["--config", str(site.config), "--as", "outsider@x.test", "usage", "--json"])
    assert result.exit_code == 0 and '"rows": []' in result.output.replace("\n", "").replace("  ", "")


def test_actions_as_a_user_are_audited_under_their_name(site: Site) -> None:
    assert site.run("admin@x.test", ["agent", "update", "Ava", "--tenant", "own", "--role", "Concierge"]) is None
    result = site.runner.invoke(app, ["--config", str(site.config), "audit", "tail", "--tenant", "own", "--json"])
    assert result.exit_code == 0, result.output
    assert "user:admin@x.test" in result.output and "agent.updated" in result.output
