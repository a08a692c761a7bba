"""Retrieval: the k chunks of a tenant's documents that best answer a question, for one of its agents.

Hybrid, in one statement: a vector ranking (cosine distance to the question's embedding) and a full-text ranking
(PostgreSQL `simple` configuration: chunks holding every content word of the question, ranked by ts_rank_cd), each
`knowledge.candidates` deep, fused by reciprocal rank fusion (score = Σ 1 / (60 + rank)).

Correct at any scale under row-level security (bench/knowledge.py measured the choice):
- an agent that sees fewer than `knowledge.exact_below` chunks is searched exactly: its rows are read through the
  (tenant_id, source_id) btree index into a materialized scope, every distance computed and the words tested in
  those same rows — a small tenant's answer never depends on what other tenants hold, and costs ~1 ms;
- a larger scope goes through the HNSW index with pgvector's iterative scan (`relaxed_order`), which keeps walking the
  graph until enough rows of this tenant (and of the sources this agent may read) came through the filter, re-sorted
  exactly afterwards. If it still comes back short (the scope is a sliver of the index), the exact scan runs instead,
  so every query gets min(k, chunks in scope) rows.
- a tenant holding a large share of all chunks can be given its own partial GIN and HNSW indexes
  (konstruct.knowledge.dedicated, `konstruct knowledge index`); the same statements then use them, since each search
  of a large scope is planned for its own tenant.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect

from konstruct.agent.embedding import embedder
from konstruct.agent.grounding import Passage
from konstruct.config import KnowledgeSettings, Settings
from konstruct.db.engine import Database

RRF_K = 60  # the usual reciprocal-rank-fusion constant: rank 1 scores 1/61, rank 40 1/100
MAX_WORDS = 16  # of the question, into the full-text query

# Common English words: OR-ed into the full-text query they would match nearly every chunk and rank nothing.
_COMMON = """a about above after again against all am an and any are as at be because been before being below between both but
    by can could did do does doing down during each few for from further had has have having he her here hers herself him
    himself his how i if in into is it its itself just me more most my myself no nor not now of off on once only or other
    our ours ourselves out over own same she should so some such than that the their theirs them themselves then there
    these they this those through to too under until up very was we were what when where which while who whom why will
    with would you your yours yourself yourselves tell know please thanks thank hi hello hey get got want need"""
STOPWORDS = frozenset(_COMMON.split())

# What the agent may read, and the HNSW scan's settings for the rest of the transaction, evaluated once (MATERIALIZED):
# the start of every search's first statement (`first`), and alone for `has_knowledge` and `explain`.
_SEEN = """src AS MATERIALIZED (SELECT id, chunks, (agent_ids = '{}' OR CAST(:agent AS uuid) = ANY(agent_ids)) AS visible
                         FROM knowledge_sources WHERE tenant_id = CAST(:tenant AS uuid)),
seen AS MATERIALIZED (
    SELECT coalesce(sum(chunks) FILTER (WHERE visible), 0) AS seen, coalesce(sum(chunks), 0) AS total,
           coalesce(array_agg(id) FILTER (WHERE visible AND chunks > 0), '{}') AS ids,
           set_config('hnsw.iterative_scan', 'relaxed_order', true), set_config('hnsw.ef_search', :ef, true),
           set_config('hnsw.max_scan_tuples', :max_scan, true), set_config('plan_cache_mode', 'force_custom_plan', true)
    FROM src)"""
_SCOPE = text(f"WITH {_SEEN} SELECT seen, total, ids FROM seen")
# Each search of a large scope is planned for its own tenant (its own indexes, konstruct.knowledge.dedicated; the
# iterative scan's row estimates), so plan_cache_mode is force_custom_plan after `first`. That one runs as a generic
# plan: the same plan serves every small tenant, and planning it anew (the planner's 'auto' kept doing so) cost 1 ms a
# question in bench/knowledge.py, as much as running it.
GENERIC = {"plan_cache_mode": "force_generic_plan"}

_WHERE = "tenant_id = CAST(:tenant AS uuid){sources}"
# The exact legs read the scope's rows through the (tenant_id, source_id) btree, each leg on its own (NOT MATERIALIZED:
# copying 617 rows of vectors into a tuplestore cost 0.7 ms of a 2 ms search in bench/knowledge.py). "+ 0": the sort key
# is no longer the HNSW index's ordering operator, so the planner can never answer this leg from the index (which
# filters after the scan). The vector stays CAST(:query AS vector): asyncpg then sends it as a vector parameter, parsed
# once (a text parameter cast to vector would be parsed again for each row of a generic plan: 16 ms).
_EXACT = """scope AS NOT MATERIALIZED (SELECT id, embedding, tsv FROM knowledge_chunks WHERE {where}{gate}),
vec AS MATERIALIZED (SELECT id, (embedding <=> CAST(:query AS vector)) + 0 AS d FROM scope ORDER BY d LIMIT :n)"""
_INDEXED = """vec AS MATERIALIZED (SELECT id, embedding <=> CAST(:query AS vector) AS d FROM knowledge_chunks WHERE {where}
    ORDER BY embedding <=> CAST(:query AS vector) LIMIT :n)"""
# Through knowledge_text_matches (migration 0022): the GIN index is out of the app role's reach under row-level security.
_TEXT = """txt AS MATERIALIZED (SELECT id, s FROM knowledge_text_matches(CAST(:words AS text), CAST(:n AS integer), {sources},
    CAST(:scan AS integer)))"""
TEXT_SCAN = 5  # the full-text side ranks at most TEXT_SCAN × candidates matches (migration 0022)
# A scope below knowledge.exact_below is also searched for its words exactly, in the rows already read: through the
# function the planner would look the words up in the GIN index over every tenant's chunks (bench/knowledge.py: 7-24
# ms p95 for a 617-chunk tenant among 1,000,000 chunks, where testing its rows takes 0.2-0.8 ms). A larger scope's
# text leg is the function's, whichever way its vectors are ranked (so the exact vector scan, when the index comes
# back short or as the benchmark's anchor, changes only the vector leg).
_TEXT_EXACT = """txt AS MATERIALIZED (SELECT id, ts_rank_cd(tsv, q) AS s FROM scope, plainto_tsquery('simple', CAST(:words AS text)) q
    WHERE tsv @@ q ORDER BY s DESC, id LIMIT :n)"""
_NO_TEXT = "txt AS (SELECT NULL::bigint AS id, NULL::real AS s WHERE false)"
_FUSE = f""",
ranked AS (SELECT id, d, row_number() OVER (ORDER BY d, id) AS vr, NULL::real AS s, NULL::bigint AS tr FROM vec
           UNION ALL SELECT id, NULL, NULL, s, row_number() OVER (ORDER BY s DESC, id) FROM txt),
fused AS (SELECT id, min(d) AS d, min(vr) AS vr, max(s) AS s, min(tr) AS tr,
                 sum(1.0 / ({RRF_K} + coalesce(vr, tr))) AS score FROM ranked GROUP BY id ORDER BY score DESC, id LIMIT :k),
found AS (SELECT f.id, f.d, f.vr, f.s, f.tr, f.score, c.source_id, c.heading, c.content, ks.name, ks.uri,
                 (SELECT count(*) FROM vec) AS vec_rows
          FROM fused f JOIN knowledge_chunks c ON c.id = f.id JOIN knowledge_sources ks ON ks.id = c.source_id)
"""


@dataclass(frozen=True)
class Scope:
    """The chunks an agent may read: how many, and which sources (None: all of the tenant's)."""

    chunks: int
    sources: list[uuid.UUID] | None


@dataclass(frozen=True)
class Plan:
    """How one search ran (for `knowledge search` and the benchmark)."""

    method: str  # exact | hnsw | hnsw→exact (the index came back short) | none (nothing to search)
    scope: int  # chunks the agent may read
    words: str  # the full-text query


def tsquery(question: str) -> str:
    """The question without its stopwords (at most MAX_WORDS words), for plainto_tsquery: PostgreSQL's own parser then
    splits it exactly as it split the chunks ("XK-2291" included), ignores any operator in it, and AND-s the words.
    AND, not OR: OR-ed, one common word matches most of a large tenant's chunks, and ranking them all cost 150 ms in
    bench/knowledge.py; AND-ed, the GIN index intersects the words' posting lists."""
    found = re.finditer(r"[^\W_]+(?:[-.][^\W_]+)*", question)
    kept = [m for m in found if len(m[0]) > 1 and m[0].casefold() not in STOPWORDS]
    return " ".join(m[0] for m in kept[:MAX_WORDS])


def vector_literal(values: Any) -> str:
    """pgvector's text form, exact: each float32 as the shortest decimal that reads back as the same float32's double
    (the server rounds it to that float32 again). In C: formatting 384 floats one by one cost 0.14 ms a question."""
    import numpy  # here, not at the top: a worker imports this module at start-up (0.05 s); the embedding has it already

    return str(numpy.asarray(values, dtype=numpy.float32).tolist())


def statement(*, exact: bool, sources: bool, words: bool) -> str:
    """The hybrid statement of a scope of `exact_below` chunks or more: the vector leg exact (over a materialized scope)
    or through the HNSW index, the text leg through knowledge_text_matches."""
    where = _WHERE.format(sources=" AND source_id = ANY(CAST(:sources AS uuid[]))" if sources else "")
    text_leg = _TEXT.format(sources="CAST(:sources AS uuid[])" if sources else "NULL::uuid[]") if words else _NO_TEXT
    legs = [(_EXACT if exact else _INDEXED).format(where=where, gate=""), text_leg]
    return "WITH " + ",\n".join(legs) + _FUSE + "SELECT * FROM found ORDER BY score DESC, id"


@functools.cache
def first(*, words: bool) -> Any:
    """The statement each search starts with, one round trip: what the agent may read (_SEEN) and, when that is fewer
    than `exact_below` chunks, the exact hybrid search of those chunks; for a larger scope the search itself is skipped
    (a one-time filter) and the one row tells `ranked` where to look next."""
    where = _WHERE.format(sources=" AND source_id IN (SELECT id FROM src WHERE visible)")
    legs = [_SEEN, _EXACT.format(where=where, gate=" AND (SELECT seen FROM seen) < :exact_below"), _TEXT_EXACT if words else _NO_TEXT]
    return text(
        "WITH "
        + ",\n".join(legs)
        + _FUSE
        + """SELECT seen.seen, seen.total, seen.ids, found.* FROM seen LEFT JOIN found ON true
ORDER BY found.score DESC, found.id"""
    )


@functools.cache
def _first_sql(words: bool) -> str:
    return str(first(words=words))  # rendering the statement anew cost 0.2 ms a question


def _seen_params(tenant_id: uuid.UUID, agent_id: uuid.UUID, config: KnowledgeSettings) -> dict[str, Any]:
    return {"tenant": str(tenant_id), "agent": str(agent_id), "ef": str(config.ef_search), "max_scan": str(config.max_scan_tuples)}


def _scope(row: Any) -> Scope:
    """The scope from the first row of a statement that starts with _SEEN (a mapping)."""
    return Scope(int(row["seen"]), None if row["seen"] == row["total"] else list(row["ids"]))


async def scope(session: Any, tenant_id: uuid.UUID, agent_id: uuid.UUID, config: KnowledgeSettings) -> Scope:
    """What the agent may read (and the HNSW scan's settings for this transaction, in the same round trip)."""
    return _scope((await session.execute(_SCOPE, _seen_params(tenant_id, agent_id, config))).one()._mapping)


async def ranked(
    db: Database,
    config: KnowledgeSettings,
    *,
    tenant_id: uuid.UUID,
    agent_id: uuid.UUID,
    question: str,
    vector: Any,
    k: int,
    exact_vectors: bool = False,
) -> tuple[list[Passage], Plan]:
    """The k best passages for a question already embedded, and how they were found. `exact_vectors`: rank the vectors
    exactly whatever the scope's size (the benchmark's anchor for recall)."""
    words = tsquery(question)
    # On the driver's connection: through SQLAlchemy a small tenant's search cost ~1.5 ms more than the statement.
    async with db.tenant_driver(tenant_id=tenant_id, local=GENERIC) as conn:
        rows = await _fetch(conn, _first_sql(bool(words)), _first_params(tenant_id, agent_id, words, vector, k, config))
        seen = _scope(rows[0])
        if seen.chunks == 0:
            return [], Plan("none", 0, words)
        if seen.chunks < config.exact_below:
            return [_passage(row) for row in rows if row["id"] is not None], Plan("exact", seen.chunks, words)
        params = _params(tenant_id, seen, words, vector, k, config)
        method = "exact" if exact_vectors else "hnsw"
        rows = await _run(conn, exact_vectors, seen, params)
        if method == "hnsw" and (not rows or rows[0]["vec_rows"] < min(params["n"], seen.chunks)):
            method = "hnsw→exact"  # the iterative scan gave up before it found enough of this scope's rows
            rows = await _run(conn, True, seen, params)
    return [_passage(row) for row in rows], Plan(method, seen.chunks, words)


async def explain(
    db: Database, config: KnowledgeSettings, *, tenant_id: uuid.UUID, agent_id: uuid.UUID, question: str, vector: Any, k: int
) -> list[str]:
    """EXPLAIN ANALYZE of the statement that searches for this question: the first one for a small scope, the HNSW
    one for a larger scope (for the benchmark and operators)."""
    words = tsquery(question)
    async with db.tenant(tenant_id=tenant_id) as session:
        seen = await scope(session, tenant_id, agent_id, config)
        if seen.chunks < config.exact_below:
            sql, params = str(first(words=bool(words))), _first_params(tenant_id, agent_id, words, vector, k, config)
        else:
            params = _params(tenant_id, seen, words, vector, k, config)
            sql = statement(exact=False, sources=seen.sources is not None, words=bool(words))
        return [row[0] for row in await session.execute(text("EXPLAIN (ANALYZE, COSTS OFF, SUMMARY OFF) " + sql), params)]


def _first_params(tenant_id: uuid.UUID, agent_id: uuid.UUID, words: str, vector: Any, k: int, config: KnowledgeSettings) -> dict[str, Any]:
    params = _seen_params(tenant_id, agent_id, config) | {"query": vector_literal(vector), "k": k, "n": max(config.candidates, k)}
    return params | ({"words": words} if words else {}) | {"exact_below": config.exact_below}


def _params(tenant_id: uuid.UUID, seen: Scope, words: str, vector: Any, k: int, config: KnowledgeSettings) -> dict[str, Any]:
    n = max(config.candidates, k)
    params: dict[str, Any] = {"tenant": str(tenant_id), "query": vector_literal(vector), "k": k, "n": n, "scan": TEXT_SCAN * n}
    if seen.sources is not None:
        params["sources"] = seen.sources
    if words:
        params["words"] = words
    return params


async def _run(conn: Any, exact: bool, seen: Scope, params: dict[str, Any]) -> Sequence[Any]:
    return await _fetch(conn, statement(exact=exact, sources=seen.sources is not None, words="words" in params), params)


@functools.lru_cache(maxsize=64)
def _positional(sql: str) -> tuple[str, tuple[str, ...]]:
    """A statement with :name parameters as asyncpg takes it ($1, $2 …), and the names in that order (SQLAlchemy's
    own compiler does the rewriting, so casts and literals stay as they are)."""
    compiled = text(sql).compile(dialect=asyncpg_dialect())
    return compiled.string, tuple(compiled.positiontup or ())


async def _fetch(conn: Any, sql: str, params: dict[str, Any]) -> Sequence[Any]:
    statement_sql, names = _positional(sql)
    return await conn.fetch(statement_sql, *(params[name] for name in names))  # type: ignore[no-any-return]


def _passage(row: Any) -> Passage:
    """A found row (a mapping: asyncpg's Record) as a Passage."""
    vr, d, tr, s = row["vr"], row["d"], row["tr"], row["s"]
    return Passage(
        chunk_id=int(row["id"]), source_id=row["source_id"], source=row["name"], uri=row["uri"], heading=row["heading"],
        content=row["content"], score=float(row["score"]), vector_rank=None if vr is None else int(vr),
        distance=None if d is None else float(d), text_rank=None if tr is None else int(tr), text_score=None if s is None else float(s),
    )  # fmt: skip


async def has_knowledge(db: Database, tenant_id: uuid.UUID, agent_id: uuid.UUID, config: KnowledgeSettings) -> bool:
    async with db.tenant(tenant_id=tenant_id) as session:
        return (await scope(session, tenant_id, agent_id, config)).chunks > 0


async def search(
    db: Database, settings: Settings, tenant_id: uuid.UUID, agent_id: uuid.UUID, question: str, k: int
) -> tuple[list[Passage], Plan]:
    """Embed the question (only when the agent has something to search) and retrieve."""
    config = settings.knowledge
    if not await has_knowledge(db, tenant_id, agent_id, config):
        return [], Plan("none", 0, tsquery(question))
    vector = (await embedder().aembed([question.strip() or " "]))[0]
    return await ranked(db, config, tenant_id=tenant_id, agent_id=agent_id, question=question, vector=vector, k=k)


def retriever(db: Database, settings: Settings) -> Any:
    """The pipeline's `retrieve`: (tenant_id, agent_id, question, k) → passages."""

    async def retrieve(tenant_id: uuid.UUID, agent_id: uuid.UUID, question: str, k: int) -> list[Passage]:
        return (await search(db, settings, tenant_id, agent_id, question, k))[0]

    return retrieve
