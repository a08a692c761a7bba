"""A large tenant's own knowledge indexes (`konstruct knowledge index`): built concurrently by the owner role, used by
the tenant's searches (the planner proves their predicate), safe to run again, rebuilt after a build cut short,
dropped on request and with the tenant; platform admins only (tests/test_permissions.py)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.knowledge import search
from konstruct.knowledge.dedicated import index_name
from tests.helpers import konstruct_in_process
from tests.test_knowledge_search import config, near, org, random_vectors, store, without_the_btree


def scans(database_url: str, name: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = %s", (name,)).fetchone()
    return -1 if row is None else int(row[0])


def indexdef(database_url: str, name: str) -> str | None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (name,)).fetchone()
    return None if row is None else str(row[0])


async def test_a_large_tenants_own_indexes_serve_its_searches(
    db: Database, settings: Settings, config_path: Path, database_url: str
) -> None:
    await without_the_btree(db, database_url)  # else, on tables this small, any scope is read through the btree
    acme, ava = await org(db, "Acme")
    globex, gus = await org(db, "Globex")
    big, other = random_vectors(3000), random_vectors(400)
    await store(db, acme, "manual.md", [f"acme kettle {i} {'refund' if i % 7 == 0 else 'lid'}" for i in range(3000)], big)
    await store(db, globex, "same.md", [f"acme kettle {i} refund" for i in range(400)], other)  # identical-looking words
    gin, hnsw = index_name(acme.id, "tsv"), index_name(acme.id, "embedding")

    built = konstruct_in_process("knowledge", "index", "--tenant", acme.slug, "--json", config=config_path)
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout) == {
        "tenant": acme.slug,
        "indexes": [{"name": gin, "result": "built"}, {"name": hnsw, "result": "built"}],
    }
    assert f"WHERE (tenant_id = '{acme.id}'::uuid)" in (indexdef(database_url, gin) or "") and "USING gin" in (
        indexdef(database_url, gin) or ""
    )
    assert "USING hnsw" in (indexdef(database_url, hnsw) or "")
    listed = json.loads(konstruct_in_process("knowledge", "indexes", "--json", config=config_path).stdout)
    assert [(i["tenant_id"], i["kind"], i["valid"]) for i in listed] == [(str(acme.id), "embedding", True), (str(acme.id), "tsv", True)]
    table = konstruct_in_process("knowledge", "indexes", config=config_path)
    assert table.returncode == 0 and "vectors (HNSW)" in table.stdout and "full text (GIN)" in table.stdout

    indexed = config(settings, exact_below=100)
    lines = await search.explain(db, indexed, tenant_id=acme.id, agent_id=ava.id, question="refund", vector=big[21], k=10)
    assert any(hnsw in line for line in lines), "\n".join(lines)
    gin_before = scans(database_url, gin)
    found, plan = await search.ranked(
        db, indexed, tenant_id=acme.id, agent_id=ava.id, question="refund kettle", vector=near(big[21], 0.02), k=10
    )
    assert plan.method == "hnsw" and len(found) == 10 and found[0].content == "acme kettle 21 refund"
    assert all(p.content.startswith("acme kettle") and p.source == "manual.md" for p in found)
    assert any(p.text_rank is not None for p in found)  # the full-text leg found matches, through the tenant's GIN:
    await db.dispose()  # (a backend's index statistics are flushed when it ends)
    deadline = time.monotonic() + 10
    while scans(database_url, gin) <= gin_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert scans(database_url, gin) > gin_before
    # Globex's search is untouched by them and never sees Acme's rows.
    found, _ = await search.ranked(db, indexed, tenant_id=globex.id, agent_id=gus.id, question="", vector=near(other[5], 0.02), k=10)
    assert len(found) == 10 and all(p.source == "same.md" for p in found) and found[0].content == "acme kettle 5 refund"

    again = konstruct_in_process("knowledge", "index", "--tenant", acme.slug, config=config_path)
    assert again.returncode == 0 and again.stdout.count("present") == 2

    # A build cut short leaves an invalid index under the name: the next run drops it and builds the real one.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"DROP INDEX {gin}")
        with pytest.raises(psycopg.errors.UniqueViolation):  # a unique index on a tenant's rows fails; CONCURRENTLY leaves it, invalid
            conn.execute(f"CREATE UNIQUE INDEX CONCURRENTLY {gin} ON knowledge_chunks (tenant_id) WHERE tenant_id = '{acme.id}'")
    listed = json.loads(konstruct_in_process("knowledge", "indexes", "--json", config=config_path).stdout)
    assert {i["name"]: i["valid"] for i in listed} == {gin: False, hnsw: True}
    assert "invalid" in konstruct_in_process("knowledge", "indexes", config=config_path).stdout
    rebuilt = json.loads(konstruct_in_process("knowledge", "index", "--tenant", acme.slug, "--json", config=config_path).stdout)
    assert rebuilt["indexes"] == [{"name": gin, "result": "rebuilt"}, {"name": hnsw, "result": "present"}]
    assert "USING gin" in (indexdef(database_url, gin) or "")

    bad = konstruct_in_process("knowledge", "index", "--tenant", acme.slug, "--memory", "lots", config=config_path)
    assert bad.returncode != 0 and "--memory must look like 512MB or 2GB" in bad.stderr and "Traceback" not in bad.stderr
    dropped = json.loads(konstruct_in_process("knowledge", "index", "--tenant", acme.slug, "--drop", "--json", config=config_path).stdout)
    assert sorted(dropped["dropped"]) == sorted([gin, hnsw]) and indexdef(database_url, gin) is None
    none = konstruct_in_process("knowledge", "index", "--tenant", acme.slug, "--drop", config=config_path)
    assert none.returncode == 0 and "has no indexes of its own" in none.stdout

    # Deleting a tenant deletes its indexes with its knowledge.
    assert konstruct_in_process("knowledge", "index", "--tenant", globex.slug, config=config_path).returncode == 0
    assert indexdef(database_url, index_name(globex.id, "embedding")) is not None
    deleted = konstruct_in_process("tenant", "delete", globex.slug, "--yes", config=config_path)
    assert deleted.returncode == 0, deleted.stderr
    assert indexdef(database_url, index_name(globex.id, "embedding")) is None
    assert indexdef(database_url, index_name(globex.id, "tsv")) is None
    assert json.loads(konstruct_in_process("knowledge", "indexes", "--json", config=config_path).stdout) == []
    assert uuid.UUID(str(acme.id))  # acme is still there, without indexes of its own
