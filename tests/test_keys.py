"""Bring-your-own keys, the per-tenant router (fallbacks, failures) and usage metering, through a real
worker, the CLI and the fake LLM (which sees the bearer token of every call)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.engine import URL

from konstruct import audit
from konstruct.agent.agents import create_agent
from konstruct.channels import connections
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.db.models import LLMUsage
from konstruct.db.urls import resolve_urls
from konstruct.secrets import master_keys
from konstruct.tenancy.tenants import TenantInfo, create_tenant
from tests.conftest import write_config
from tests.fakes.llm import FakeLLM
from tests.helpers import Proc, cli_env, konstruct, konstruct_in_process
from tests.shared import SharedWorker, shared_worker, unique_slug

PLATFORM_KEY = "sk-test-key-0001"
ACME_KEY = "sk-acme-own-key-7f3a9c21"


@dataclass
class Site:
    config: Path
    db: Database
    llm: FakeLLM
    acme: TenantInfo
    globex: TenantInfo
    worker: Proc

    def slug(self, name: str) -> str:
        """The test's own tenant for the name the test uses ("acme", "globex")."""
        return {"acme": self.acme.slug, "globex": self.globex.slug}.get(name, name)

    def chat(self, text: str, *, tenant: str = "acme") -> Any:
        result = konstruct_in_process(
            "chat", "--tenant", self.slug(tenant), "--agent", "Ava", "--message", text, "--json", "--new", "--timeout", "60",
            config=self.config,
        )  # fmt: skip
        assert result.stdout, result.stderr + self.worker.log()
        return json.loads(result.stdout)

    def cli(self, *args: str, **env: str) -> Any:
        """The CLI in-process, with "--tenant acme" meaning this test's acme."""
        named = [self.slug(a) if i and args[i - 1] == "--tenant" else a for i, a in enumerate(args)]
        return konstruct_in_process(*named, config=self.config, env=cli_env(**env))

    def bearer(self, index: int = -1) -> str:
        return self.llm.requests[index].headers["authorization"]

    async def usage(self, tenant: TenantInfo) -> list[LLMUsage]:
        async with self.db.tenant(tenant_id=tenant.id) as session:
            return list(await session.scalars(select(LLMUsage).order_by(LLMUsage.id)))


async def make_site(config: Path, db: Database, llm: FakeLLM, worker: Proc) -> Site:
    acme = await create_tenant(db, name="Acme", slug=unique_slug("acme"), actor="test")
    globex = await create_tenant(db, name="Globex", slug=unique_slug("globex"), actor="test")
    for tenant in (acme, globex):
        await create_agent(db, tenant, name="Ava", role="Support", persona="Brief.", model=None, actor="test")
    return Site(config, db, llm, acme, globex, worker)


@pytest.fixture(scope="module")
def keys_worker(
    pg_server: URL, template_db: str, fake_llm_server: FakeLLM, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedWorker]:
    """One worker for the module's tests; each test has tenants of its own."""
    path, llm = tmp_path_factory.mktemp("keys"), fake_llm_server.url
    with shared_worker(pg_server, template_db, path, llm, llm={"model": "openai/gpt-4o-mini"}) as shared:
        yield shared


@pytest.fixture
async def site(keys_worker: SharedWorker, fake_llm: FakeLLM) -> AsyncIterator[Site]:
    db = Database(load_settings(keys_worker.config))
    try:
        yield await make_site(keys_worker.config, db, fake_llm, keys_worker.worker)
    finally:
        await db.dispose()


@pytest.fixture
async def own_site(tmp_path: Path, database_url: str, fake_llm: FakeLLM, db: Database) -> AsyncIterator[Site]:
    """A database and worker of the test's own: for what is installation-wide (rotating the master key)."""
    config = write_config(tmp_path / "site", database_url, fake_llm.url, llm={"model": "openai/gpt-4o-mini"})
    worker = Proc("worker", ["worker"], config=config, log_dir=tmp_path)
    try:
        worker.wait_for_log(" ready: ")
        yield await make_site(config, db, fake_llm, worker)
    finally:
        worker.stop()


def owner_bytes(db: Database, table: str, column: str, tenant: TenantInfo | None = None) -> list[bytes]:
    """A column as the table owner reads it (bypassing row-level security): one tenant's rows, or every row."""
    where = " where tenant_id = %s" if tenant else ""
    with psycopg.connect(resolve_urls(db.settings).owner_sync().replace("+psycopg", "")) as conn:
        rows = conn.execute(f"select {column} from {table}{where}", (tenant.id,) if tenant else ()).fetchall()
        return [bytes(row[0]) for row in rows]


async def test_a_tenant_key_is_used_for_that_tenant_only_and_never_stored_in_clear(site: Site) -> None:
    added = site.cli("key", "add", "--tenant", "acme", "--provider", "openai", "--key-env", "ACME_KEY", "--json", ACME_KEY=ACME_KEY)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["hint"] == "…9c21" and ACME_KEY not in added.stdout

    stored = owner_bytes(site.db, "llm_keys", "secret", site.acme)
    assert len(stored) == 1 and ACME_KEY.encode() not in stored[0] and b"9c21" not in stored[0]

    listed = site.cli("key", "list", "--tenant", "acme")
    assert "openai" in listed.stdout and "…9c21" in listed.stdout and ACME_KEY not in listed.stdout
    assert "operator:" in listed.stdout  # added by

    assert site.chat("hello from acme")["status"] == "replied"
    assert site.bearer() == f"Bearer {ACME_KEY}"
    assert site.chat("hello from globex", tenant="globex")["status"] == "replied"
    assert site.bearer() == f"Bearer {PLATFORM_KEY}"
    assert [u.key_source for u in await site.usage(site.acme)] == ["tenant"]
    assert [u.key_source for u in await site.usage(site.globex)] == ["platform"]

    removed = site.cli("key", "remove", "--tenant", "acme", "--provider", "openai", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert site.chat("again from acme")["status"] == "replied"
    assert site.bearer() == f"Bearer {PLATFORM_KEY}"
    actions = [e.action for e in await audit.events(site.db, site.acme.id)]
    assert "key.added" in actions and "key.removed" in actions
    assert ACME_KEY not in json.dumps([e.detail for e in await audit.events(site.db, site.acme.id)])


async def test_key_input_mistakes_are_clear_errors(site: Site) -> None:
    # A real process, stdin not a terminal, as a script runs it: a flag is asked for, not a prompt, and exit code 1.
    no_tty = konstruct("key", "add", "--tenant", site.acme.slug, "--provider", "openai", config=site.config)
    assert no_tty.returncode != 0 and "--key-env" in no_tty.stderr and "Traceback" not in no_tty.stderr
    unknown = site.cli("key", "add", "--tenant", "acme", "--provider", "nosuchprovider", "--key-env", "K", K="sk-whatever-123456")
    assert unknown.returncode != 0 and "provider" in unknown.stderr and "Traceback" not in unknown.stderr
    unset = site.cli("key", "add", "--tenant", "acme", "--provider", "openai", "--key-env", "NOT_SET_ANYWHERE")
    assert unset.returncode != 0 and "NOT_SET_ANYWHERE" in unset.stderr
    missing = site.cli("key", "remove", "--tenant", "acme", "--provider", "anthropic", "--yes")
    assert missing.returncode != 0 and "no anthropic key" in missing.stderr
    assert owner_bytes(site.db, "llm_keys", "secret", site.acme) == []


async def test_a_bad_key_becomes_an_audited_apology_without_the_key_anywhere(site: Site) -> None:
    bad = "sk-revoked-key-55aa77bb"
    site.cli("key", "add", "--tenant", "acme", "--provider", "openai", "--key-env", "K", K=bad)
    site.llm.bad_keys.add(bad)
    result = site.chat("are you there?")
    assert result["status"] == "failed"
    assert result["reply"] == load_settings(site.config).agent.apology
    failed = [e for e in await audit.events(site.db, site.acme.id) if e.action == "llm.failed"]
    assert len(failed) == 1 and "AuthenticationError" in failed[0].detail["error"] and failed[0].detail["key"] == "tenant"
    usage = await site.usage(site.acme)
    assert usage[-1].error and usage[-1].cost_usd == 0
    for text in (site.worker.log(), json.dumps([e.detail for e in await audit.events(site.db, site.acme.id)]), usage[-1].error):
        assert bad not in text and "55aa77bb" not in text
    # Globex is not affected by Acme's key.
    assert site.chat("hi", tenant="globex")["status"] == "replied"


async def test_fallback_models_answer_when_the_model_is_down(site: Site) -> None:
    site.llm.fail_models["gpt-4o-mini"] = 503
    updated = site.cli("agent", "update", "Ava", "--tenant", "acme", "--fallbacks", "openai/gpt-4o")
    assert updated.returncode == 0, updated.stderr
    result = site.chat("help please")
    assert result["status"] == "replied" and result["reply"].startswith("[gpt-4o]")
    assert [r.body["model"] for r in site.llm.requests] == ["gpt-4o-mini", "gpt-4o"]
    # Without fallbacks (globex), the outage is an apology and an audited error.
    assert site.chat("help please", tenant="globex")["status"] == "failed"
    assert any(e.action == "llm.failed" for e in await audit.events(site.db, site.globex.id))


async def test_usage_is_metered_and_reported(site: Site) -> None:
    for text in ("one", "two", "three"):
        assert site.chat(text)["status"] == "replied"
    assert site.chat("four", tenant="globex")["status"] == "replied"
    rows = await site.usage(site.acme)
    assert len(rows) == 3
    for row in rows:
        assert row.model == "openai/gpt-4o-mini" and row.prompt_tokens > 0 and row.completion_tokens > 0
        assert row.cost_usd > 0 and row.latency_ms >= 0 and row.agent_id is not None and row.conversation_id is not None
    by_model = json.loads(site.cli("usage", "--tenant", "acme", "--json").stdout)
    assert by_model["rows"][0]["model"] == "openai/gpt-4o-mini" and by_model["rows"][0]["calls"] == 3
    assert by_model["total"]["cost_usd"] == pytest.approx(float(sum(r.cost_usd for r in rows)))
    everyone = json.loads(site.cli("usage", "--by", "tenant", "--json").stdout)
    calls = {r["tenant"]: r["calls"] for r in everyone["rows"]}  # every tenant of the shared database: ours among them
    assert (calls[site.acme.slug], calls[site.globex.slug]) == (3, 1)
    with psycopg.connect(resolve_urls(site.db.settings).owner_sync().replace("+psycopg", "")) as conn:
        query = "select t.slug, count(*) from llm_usage u join tenants t on t.id = u.tenant_id group by t.slug"
        assert calls == dict(conn.execute(query).fetchall())  # and every other tenant's as the database has it
    by_agent = json.loads(site.cli("usage", "--tenant", "acme", "--by", "agent", "--json").stdout)
    assert by_agent["rows"][0]["agent"] == "Ava"
    by_day = site.cli("usage", "--tenant", "acme", "--by", "day", "--csv")
    lines = by_day.stdout.strip().splitlines()
    assert lines[0].startswith("day,calls") and lines[-1].startswith("total,3,")
    table = site.cli("usage", "--since", "7d")
    assert table.returncode == 0 and "cost per day" in table.stdout and "█" in table.stdout
    bad = site.cli("usage", "--since", "last tuesday")
    assert bad.returncode != 0 and "--since" in bad.stderr and "Traceback" not in bad.stderr


async def test_rotation_keeps_every_secret_readable_while_a_worker_runs(own_site: Site) -> None:
    site = own_site
    site.cli("key", "add", "--tenant", "acme", "--provider", "openai", "--key-env", "K", K=ACME_KEY)
    settings = load_settings(site.config)
    await connections.connect(
        site.db, settings, site.globex, kind="slack", external_id="T-GLOBEX", name="globex", mode="single",
        credentials={"bot_token": "xoxb-globex-bot-token", "signing_secret": "globex-signing"}, details={}, default_agent=None,
        actor="test",
    )  # fmt: skip
    assert site.chat("before rotation")["status"] == "replied"  # the worker has cached the old key
    before = owner_bytes(site.db, "llm_keys", "secret") + owner_bytes(site.db, "channel_connections", "credentials")
    old_keys = master_keys(settings)

    rotated = site.cli("secrets", "rotate", "--json")
    assert rotated.returncode == 0, rotated.stderr
    assert json.loads(rotated.stdout)["secrets_reencrypted"] == 2
    new_keys = master_keys(load_settings(site.config))
    assert len(new_keys) == 2 and new_keys[1:] == old_keys
    after = owner_bytes(site.db, "llm_keys", "secret") + owner_bytes(site.db, "channel_connections", "credentials")
    assert set(after).isdisjoint(before)

    # The running worker meets a token it cannot read with the key it has, reads the key file again, and goes on.
    assert site.chat("after rotation")["status"] == "replied"
    assert site.bearer() == f"Bearer {ACME_KEY}"

    dropped = site.cli("secrets", "rotate", "--drop-old", "--json")
    assert dropped.returncode == 0, dropped.stderr
    assert json.loads(dropped.stdout)["old_keys_dropped"] == 1
    assert master_keys(load_settings(site.config)) == new_keys[:1]
    fresh = Database(load_settings(site.config))
    try:
        _, credentials = await connections.credentials_for(fresh, fresh.settings, site.globex.id, "slack", "T-GLOBEX")
        assert credentials["bot_token"] == "xoxb-globex-bot-token"
    finally:
        await fresh.dispose()
    assert site.chat("after dropping the old key")["status"] == "replied"
    assert site.bearer() == f"Bearer {ACME_KEY}"
    assert "KONSTRUCT_SECRET_KEY" not in os.environ  # the file-based path was the one exercised
