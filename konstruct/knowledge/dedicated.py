"""A large tenant's own knowledge indexes: a partial GIN (full text) and a partial HNSW (vectors) on its rows only.

The shared indexes hold every tenant's chunks. For a tenant with a large share of them, both legs of a search pay for
the others' rows (bench/knowledge.py, 1,000,000 chunks, one tenant of 300,000): the full-text leg intersects posting
lists of words common across all tenants (22-37 ms for four such words) and the planner ANDs them with the tenant's
300,000-row bitmap from the btree (25-68 ms more); the vector leg walks a graph in which 70 % of the neighbours are
filtered out. Partial indexes `WHERE tenant_id = '…'` hold only that tenant's rows: the planner proves the predicate
from the search's own `tenant_id = …` (each search is planned for its parameters: plan_cache_mode force_custom_plan)
and takes the smaller index. Row-level security still filters every row.

They are built by the owner role (DDL), CONCURRENTLY — searches and ingests go on meanwhile — from
`konstruct knowledge index --tenant T`; a build cut short (a killed command, a database restart) leaves an invalid
index, which the next run drops and builds again. `tenant delete` and `apply --prune` drop them.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from typing import Any

from konstruct.db.urls import DatabaseURLs
from konstruct.errors import ValidationError

HNSW_M, HNSW_EF_CONSTRUCTION = 16, 64  # as the shared index (migration 0022)
_MEMORY = re.compile(r"^[1-9][0-9]{0,6}(kB|MB|GB)$")
_NAME = re.compile(r"^knowledge_chunks_(tsv|embedding)_t([0-9a-f]{32})$")


@dataclass(frozen=True)
class DedicatedIndex:
    tenant_id: uuid.UUID
    kind: str  # tsv (GIN, full text) | embedding (HNSW, vectors)
    name: str
    valid: bool  # false: a concurrent build was cut short
    bytes: int

    def as_json(self) -> dict[str, Any]:
        return {"tenant_id": str(self.tenant_id), "kind": self.kind, "name": self.name, "valid": self.valid, "bytes": self.bytes}


def index_name(tenant_id: uuid.UUID, kind: str) -> str:
    if kind not in ("tsv", "embedding"):
        raise ValueError(f"unknown index kind {kind!r}")
    return f"knowledge_chunks_{kind}_t{tenant_id.hex}"


def _definition(tenant_id: uuid.UUID, kind: str) -> str:
    # tenant_id is a uuid.UUID, so its text is only hex digits and dashes: safe to write into the DDL.
    where = f"WHERE tenant_id = '{uuid.UUID(str(tenant_id))}'::uuid"
    name = index_name(tenant_id, kind)
    if kind == "tsv":
        return f"CREATE INDEX CONCURRENTLY {name} ON knowledge_chunks USING gin (tsv) {where}"
    return (f"CREATE INDEX CONCURRENTLY {name} ON knowledge_chunks USING hnsw (embedding vector_cosine_ops) "
            f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION}) {where}")  # fmt: skip


def _connect(urls: DatabaseURLs) -> Any:
    import psycopg

    return psycopg.connect(urls.owner_dsn(), autocommit=True)


def listing(urls: DatabaseURLs) -> list[DedicatedIndex]:
    """Every tenant's own knowledge index, valid or not."""
    with _connect(urls) as conn:
        rows = conn.execute(
            """SELECT c.relname, i.indisvalid, pg_relation_size(c.oid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               WHERE i.indrelid = 'knowledge_chunks'::regclass AND c.relname ~ '^knowledge_chunks_(tsv|embedding)_t[0-9a-f]{32}$'
               ORDER BY c.relname"""
        ).fetchall()
    found = []
    for name, valid, size in rows:
        match = _NAME.match(name)
        if match:
            found.append(DedicatedIndex(uuid.UUID(match[2]), match[1], name, bool(valid), int(size)))
    return found


def build(urls: DatabaseURLs, tenant_id: uuid.UUID, *, memory: str | None = None) -> list[tuple[str, str]]:
    """Build the tenant's two indexes where missing (an invalid one is dropped and built again); no ANALYZE is needed,
    as indexes on plain columns add no statistics. Returns (name, what happened: built | rebuilt | present) for each."""
    if memory is not None and not _MEMORY.match(memory):
        raise ValidationError(f"--memory must look like 512MB or 2GB, not {memory!r}")
    present = {i.name: i for i in listing(urls) if i.tenant_id == tenant_id}
    done = []
    with _connect(urls) as conn:
        if memory is not None:
            conn.execute(f"SET maintenance_work_mem = '{memory}'")  # checked against _MEMORY above
        for kind in ("tsv", "embedding"):
            name = index_name(tenant_id, kind)
            index = present.get(name)
            if index is not None and index.valid:
                done.append((name, "present"))
                continue
            if index is not None:
                conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            conn.execute(_definition(tenant_id, kind))
            done.append((name, "rebuilt" if index is not None else "built"))
    return done


async def deleted_tenant(urls: DatabaseURLs, tenant_id: uuid.UUID) -> list[str]:
    """After a tenant is deleted (`tenant delete`, `apply --prune`): drop its own indexes, which its rows are gone from."""
    return await asyncio.to_thread(drop, urls, tenant_id)


def drop(urls: DatabaseURLs, tenant_id: uuid.UUID) -> list[str]:
    """Drop the tenant's own indexes, if it has any; the names dropped."""
    names = [i.name for i in listing(urls) if i.tenant_id == tenant_id]
    if names:
        with _connect(urls) as conn:
            for name in names:
                conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")  # names matched _NAME: safe
    return names
