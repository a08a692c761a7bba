"""Invitations end to end: created by a customer admin, emailed by a real worker over SMTP, accepted once;
expired, revoked and reused links are refused clearly; users and roles managed from the CLI; audited."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import URL

from konstruct import audit
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.db.urls import resolve_urls
from konstruct.tenancy import invitations
from konstruct.tenancy.tenants import TenantInfo, create_tenant
from konstruct.tenancy.users import verify_password
from tests.conftest import write_config
from tests.fakes.llm import FakeLLM
from tests.fakes.smtp import FakeSMTP
from tests.helpers import cli_env, konstruct, konstruct_in_process
from tests.shared import SharedWorker, shared_worker, unique_slug

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def smtp() -> Iterator[FakeSMTP]:
    server = FakeSMTP().start()
    yield server
    server.stop()


class Site:
    def __init__(self, config: Path, db: Database, acme: TenantInfo, globex: TenantInfo, smtp: FakeSMTP) -> None:
        self.config, self.db, self.acme, self.globex, self.smtp = config, db, acme, globex, smtp

    def slug(self, name: str) -> str:
        """This test's tenant for the name the test uses ("acme", "globex"); anything else as it is."""
        return {"acme": self.acme.slug, "globex": self.globex.slug}.get(name, name)

    def cli(self, *args: str, who: str | None = None, config: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        """The CLI in-process (the module's worker sends the mail)."""
        argv = [*(["--as", who] if who else []), *map(self.slug, args)]
        return konstruct_in_process(*argv, config=config or self.config, env=cli_env(**env))

    def owner(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        with psycopg.connect(resolve_urls(self.db.settings).owner_sync().replace("+psycopg", "")) as conn:
            cursor = conn.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []


@pytest.fixture(scope="module")
def invite_worker(
    pg_server: URL, template_db: str, fake_llm_server: FakeLLM, smtp: FakeSMTP, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedWorker]:
    """One worker for the module; each test has tenants (and invitees) of its own."""
    with shared_worker(
        pg_server, template_db, tmp_path_factory.mktemp("invitations"), fake_llm_server.url,
        smtp={"host": smtp.host, "port": smtp.port, "security": "none", "sender": "invites@konstruct.test"},
    ) as shared:  # fmt: skip
        yield shared


@pytest.fixture
async def site(invite_worker: SharedWorker, smtp: FakeSMTP) -> AsyncIterator[Site]:
    smtp.reset()
    db = Database(load_settings(invite_worker.config))
    try:
        acme = await create_tenant(db, name="Acme Inc", slug=unique_slug("acme"), actor="test")
        globex = await create_tenant(db, name="Globex", slug=unique_slug("globex"), actor="test")
        yield Site(invite_worker.config, db, acme, globex, smtp)
    finally:
        await db.dispose()


def token_from(body: str) -> str:
    match = re.search(r"/invite/([A-Za-z0-9_-]{20,})", body)
    assert match, body
    return match[1]


async def test_an_invitation_is_emailed_accepted_once_and_audited(site: Site) -> None:
    created = site.cli("invite", "create", "--tenant", "acme", "--email", "Ann@Example.com", "--role", "customer_admin", "--json")
    assert created.returncode == 0, created.stderr
    info = json.loads(created.stdout)
    assert info["email"] == "ann@example.com" and info["state"] == "pending" and info["emailed"] is True and "link" not in info

    mail = site.smtp.wait_for(1)[0]
    assert mail.recipients == ["ann@example.com"] and "Acme Inc" in mail.subject
    token = token_from(mail.body)
    assert f"{load_settings(site.config).gateway.public_url}/invite/{token}" in mail.body
    # Only the token's SHA-256 is stored.
    stored = site.owner("select token_hash from invitations where tenant_id = %s", site.acme.id)
    assert stored == [(hashlib.sha256(token.encode()).digest(),)]
    assert token.encode() not in b"".join(bytes(r[0]) for r in stored)  # type: ignore[call-overload]

    accepted = site.cli("invite", "accept", token, "--name", "Ann Lee", "--password-env", "PW", "--json", PW=PASSWORD)
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout) == {"email": "ann@example.com", "role": "customer_admin", "tenant": "Acme Inc"}
    [(password_hash,)] = site.owner("select password_hash from users where email = 'ann@example.com'")
    assert str(password_hash).startswith("scrypt$") and verify_password(PASSWORD, str(password_hash))
    assert PASSWORD not in str(password_hash)

    again = site.cli("invite", "accept", token, "--name", "Mallory", "--password-env", "PW", PW="another password!")
    assert again.returncode != 0 and "used already" in again.stderr and "Traceback" not in again.stderr
    forged = site.cli("invite", "accept", "not-a-real-token-at-all-0000", "--name", "X", "--password-env", "PW", PW=PASSWORD)
    assert forged.returncode != 0 and "not valid" in forged.stderr

    # Ann is now an admin of acme, and of acme only.
    members = json.loads(site.cli("user", "list", "--tenant", "acme", "--json", who="ann@example.com").stdout)
    assert [(m["email"], m["role"], m["has_password"]) for m in members] == [("ann@example.com", "customer_admin", True)]
    other = site.cli("user", "list", "--tenant", "globex", who="ann@example.com")
    assert other.returncode == 3 and f"no role in tenant {site.globex.slug}" in other.stderr

    # An invitation for someone who has an account already only adds the role: no name or password asked.
    site.cli("invite", "create", "--tenant", "globex", "--email", "ann@example.com", "--role", "customer_operator")
    second = token_from(site.smtp.wait_for(2)[1].body)
    joined = site.cli("invite", "accept", second, "--json")
    assert joined.returncode == 0, joined.stderr
    assert json.loads(joined.stdout)["role"] == "customer_operator"
    [(same_hash,)] = site.owner("select password_hash from users where email = 'ann@example.com'")
    assert same_hash == password_hash  # the password stays
    assert site.cli("agent", "list", "--tenant", "globex", who="ann@example.com").returncode == 0  # an operator may read agents
    assert site.cli("key", "list", "--tenant", "globex", who="ann@example.com").returncode == 3  # but not keys

    actions = [(e.action, e.target) for e in await audit.events(site.db, site.acme.id)]
    assert ("invite.created", "ann@example.com") in actions
    assert ("invite.sent", "ann@example.com") in actions
    assert ("invite.accepted", "ann@example.com") in actions


async def test_revoked_expired_and_resent_links(site: Site) -> None:
    first = json.loads(site.cli("invite", "create", "--tenant", "acme", "--email", "bo@example.com", "--role", "customer_operator",
                                "--json").stdout)  # fmt: skip
    token = token_from(site.smtp.wait_for(1)[0].body)
    revoked = site.cli("invite", "revoke", first["id"][:8], "--tenant", "acme")
    assert revoked.returncode == 0, revoked.stderr
    refused = site.cli("invite", "accept", token, "--name", "Bo", "--password-env", "PW", PW=PASSWORD)
    assert refused.returncode != 0 and "revoked" in refused.stderr

    site.cli("invite", "create", "--tenant", "acme", "--email", "cy@example.com", "--role", "customer_operator")
    old_token = token_from(site.smtp.wait_for(2)[1].body)
    site.owner("update invitations set expires_at = now() - interval '1 minute' where email = 'cy@example.com'")
    expired = site.cli("invite", "accept", old_token, "--name", "Cy", "--password-env", "PW", PW=PASSWORD)
    assert expired.returncode != 0 and "expired" in expired.stderr and "resent" in expired.stderr
    listed = json.loads(site.cli("invite", "list", "--tenant", "acme", "--json").stdout)
    assert {(i["email"], i["state"]) for i in listed} == {("bo@example.com", "revoked"), ("cy@example.com", "expired")}

    resent = site.cli("invite", "resend", "cy@example.com", "--tenant", "acme", "--json")
    assert resent.returncode == 0, resent.stderr
    new_token = token_from(site.smtp.wait_for(3)[2].body)
    assert new_token != old_token
    short = site.cli("invite", "accept", new_token, "--name", "Cy", "--password-env", "PW", PW="short")
    assert short.returncode != 0 and "at least" in short.stderr
    ok = site.cli("invite", "accept", new_token, "--name", "Cy", "--password-env", "PW", PW=PASSWORD)
    assert ok.returncode == 0, ok.stderr

    # Roles can be changed and people removed, by an admin of the tenant only.
    assert site.cli("user", "role", "cy@example.com", "customer_admin", "--tenant", "acme").returncode == 0
    assert json.loads(site.cli("user", "show", "cy@example.com", "--tenant", "acme", "--json").stdout)["role"] == "customer_admin"
    bad_role = site.cli("user", "role", "cy@example.com", "king", "--tenant", "acme")
    assert bad_role.returncode != 0 and "customer_operator" in bad_role.stderr
    removed = site.cli("user", "remove", "cy@example.com", "--tenant", "acme", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(site.cli("user", "list", "--tenant", "acme", "--json").stdout) == []
    gone = site.cli("tenant", "show", "acme", who="cy@example.com")
    assert gone.returncode == 3 and "no role" in gone.stderr


async def test_without_smtp_the_link_is_printed_for_the_operator(
    site: Site, tmp_path: Path, invite_worker: SharedWorker, fake_llm: FakeLLM
) -> None:
    config = write_config(tmp_path / "nosmtp", invite_worker.database_url, fake_llm.url)
    result = site.cli("invite", "create", "--tenant", "acme", "--email", "dee@example.com", "--role", "customer_operator", config=config)
    assert result.returncode == 0, result.stderr
    assert "no SMTP server configured" in result.stdout and "/invite/" in result.stdout
    # A real process: a shell sees exit code 1 and one clear line, no traceback.
    bad = konstruct("invite", "create", "--tenant", site.acme.slug, "--email", "not-an-email", "--role", "customer_operator", config=config)
    assert bad.returncode != 0 and "email address" in bad.stderr and "Traceback" not in bad.stderr


def test_a_token_never_starts_with_a_dash() -> None:
    """One token in 64 did (secrets.token_urlsafe), and `konstruct invite accept -B…` read it as an unknown option."""
    tokens = [invitations.new_token() for _ in range(5000)]
    assert not [t for t in tokens if t.startswith("-")]
    assert len(set(tokens)) == len(tokens) and all(len(t) == 43 for t in tokens)
