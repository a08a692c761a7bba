"""Knowledge retrieval in process, on a real database: chunks stored with chosen vectors, so each ranking is known.

The exact scan for small scopes, the HNSW index with iterative scan for large ones (and the exact scan taking over
when the index comes back short), full text fused with the vectors, agents' scopes, and tenants kept apart by
row-level security whatever they hold."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy
import psycopg
import pytest
from sqlalchemy import insert, text

from konstruct.agent import grounding
from konstruct.agent.agents import AgentInfo, create_agent
from konstruct.config import KnowledgeSettings, Settings
from konstruct.db.engine import Database
from konstruct.db.models import KnowledgeChunk, KnowledgeSource
from konstruct.knowledge import search
from konstruct.tenancy.tenants import TenantInfo, create_tenant

RNG = numpy.random.default_rng(7)


def unit(vector: numpy.ndarray) -> numpy.ndarray:
    return vector / numpy.linalg.norm(vector)


def random_vectors(n: int) -> numpy.ndarray:
    return numpy.array([unit(v) for v in RNG.normal(size=(n, 384))], dtype=numpy.float32)


def near(vector: numpy.ndarray, noise: float = 0.05) -> numpy.ndarray:
    return unit(vector + RNG.normal(scale=noise, size=384))


async def store(
    db: Database, tenant: TenantInfo, name: str, texts: Sequence[str], vectors: numpy.ndarray, agents: Sequence[uuid.UUID] = ()
) -> uuid.UUID:
    """One source with these chunks (as an ingest would leave it)."""
    async with db.tenant(tenant_id=tenant.id) as session:
        source = KnowledgeSource(tenant_id=tenant.id, uri=f"/docs/{name}", name=name, kind="markdown", agent_ids=list(agents),
                                 content_hash=uuid.uuid4().hex, chunks=len(texts))  # fmt: skip
        session.add(source)
        await session.flush()
        rows = [{"tenant_id": tenant.id, "source_id": source.id, "ordinal": i, "heading": f"{name} part {i}", "content": t,
                 "embedding": v.tolist()} for i, (t, v) in enumerate(zip(texts, vectors, strict=True))]  # fmt: skip
        for start in range(0, len(rows), 1000):
            await session.execute(insert(KnowledgeChunk), rows[start : start + 1000])
        return source.id


async def org(db: Database, name: str) -> tuple[TenantInfo, AgentInfo]:
    tenant = await create_tenant(db, name=name, slug=f"{name.lower()}-{uuid.uuid4().hex[:6]}", actor="test")
    return tenant, await create_agent(db, tenant, name="Ava", role="Support", persona="Helpful.", model=None, actor="test")


def config(settings: Settings, **changes: int) -> KnowledgeSettings:
    return settings.knowledge.model_copy(update=changes)


async def ranked(db: Database, conf: KnowledgeSettings, tenant: TenantInfo, agent: AgentInfo, question: str, vector: numpy.ndarray,
                 k: int = 5) -> tuple[list[grounding.Passage], search.Plan]:  # fmt: skip
    return await search.ranked(db, conf, tenant_id=tenant.id, agent_id=agent.id, question=question, vector=vector, k=k)


async def without_the_btree(db: Database, database_url: str) -> None:
    """PostgreSQL's planner reads a scope it estimates small through the btree, exactly, whatever we allow; on tables
    this small it would always. Without the btree (and with sequential scans discouraged) it must take an index."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP INDEX knowledge_chunks_scope")
        conn.execute("ALTER DATABASE " + conn.info.dbname + " SET enable_seqscan = off")
    await db.dispose()


def test_the_full_text_query_keeps_the_content_words_quoted() -> None:
    assert search.tsquery("What is the refund policy for XK-2291? And the REFUND?") == "refund policy XK-2291 REFUND"
    assert search.tsquery("what is it?") == ""
    assert search.tsquery("o'brien & (x | !y) <-> z:*") == "brien"


async def test_the_full_text_side_is_safe_from_what_a_question_holds(db: Database, settings: Settings) -> None:
    acme, ava = await org(db, "Acme")
    await store(db, acme, "faq.md", ["O'Brien's kettle & (the) <-> lid:*"], random_vectors(1))
    for question in ["o'brien & (x | !y) <-> z:*", "'; DROP TABLE knowledge_chunks; --", "\\ :* & | ! <->", "kettle lid"]:
        found, _ = await ranked(db, config(settings), acme, ava, question, random_vectors(1)[0])
        assert len(found) == 1


async def test_a_small_tenant_is_searched_exactly_and_never_sees_another_tenants_identical_document(
    db: Database, settings: Settings
) -> None:
    acme, ava = await org(db, "Acme")
    globex, gina = await org(db, "Globex")
    texts = [f"Paragraph {i} about kettles and returns." for i in range(30)]
    vectors = random_vectors(30)
    mine = await store(db, acme, "guide.md", texts, vectors)
    theirs = await store(db, globex, "guide.md", texts, vectors)  # the very same document, vectors included
    query = near(vectors[12])
    found, plan = await ranked(db, config(settings), acme, ava, "warranty", query, k=5)  # no text matches: vectors alone
    assert plan.method == "exact" and plan.scope == 30 and len(found) == 5
    assert {p.source_id for p in found} == {mine}
    assert found[0].content == texts[12] and found[0].vector_rank == 1 and found[0].distance is not None
    exact = numpy.argsort(1 - vectors @ query)[:5]
    assert [p.vector_rank for p in found] == [1, 2, 3, 4, 5] and all(p.text_rank is None for p in found)
    assert [p.content for p in found] == [texts[i] for i in exact]  # exactly the exact nearest, in order
    other, _ = await ranked(db, config(settings), globex, gina, "kettles", query, k=5)
    assert {p.source_id for p in other} == {theirs}


async def test_full_text_finds_what_the_vectors_miss_and_fusion_ranks_both(db: Database, settings: Settings) -> None:
    acme, ava = await org(db, "Acme")
    vectors = random_vectors(20)
    texts = [f"General note number {i}." for i in range(20)]
    texts[3] = "The XK-2291 kettle ships with a descaling kit."  # far from the question's vector
    texts[8] = "Descaling a kettle: vinegar, an hour, rinse."  # near it, and sharing a word
    await store(db, acme, "faq.md", texts, vectors)
    found, plan = await ranked(db, config(settings), acme, ava, "Which kit comes with the XK-2291 kettle?", near(vectors[8]), k=3)
    assert plan.words == "kit comes XK-2291 kettle"
    assert [p.content for p in found if p.text_rank is not None] == []  # "comes" is in no chunk: every word must match
    found, plan = await ranked(db, config(settings), acme, ava, "XK-2291 kettle kit?", near(vectors[8]), k=3)
    # The code's chunk ranks first: the full text found it (rank 1) and the vectors did too, lower; then the nearest one.
    assert [p.content for p in found[:2]] == [texts[3], texts[8]]
    assert found[0].text_rank == 1 and found[0].vector_rank is not None and found[0].vector_rank > 3  # the vectors alone miss it
    assert found[1].vector_rank == 1 and found[1].text_rank is None
    for p in found:  # reciprocal rank fusion, exactly
        assert p.score == pytest.approx(sum(1 / (60 + r) for r in (p.vector_rank, p.text_rank) if r is not None))


async def test_an_agent_reads_only_the_sources_meant_for_it(db: Database, settings: Settings) -> None:
    acme, ava = await org(db, "Acme")
    bob = await create_agent(db, acme, name="Bob", role="Sales", persona="Sells.", model=None, actor="test")
    vectors = random_vectors(12)
    shared = await store(db, acme, "shared.md", [f"shared {i}" for i in range(6)], vectors[:6])
    sales = await store(db, acme, "pricing.md", [f"pricing {i}" for i in range(6)], vectors[6:], agents=[bob.id])
    found, plan = await ranked(db, config(settings), acme, ava, "pricing", near(vectors[7]), k=10)
    assert plan.scope == 6 and {p.source_id for p in found} == {shared} and len(found) == 6
    found, plan = await ranked(db, config(settings), acme, bob, "pricing", near(vectors[7]), k=10)
    assert plan.scope == 12 and found[0].source_id == sales and len(found) == 10


async def test_a_large_scope_goes_through_the_index_and_a_sliver_of_it_falls_back_to_the_exact_scan(
    db: Database, settings: Settings, database_url: str
) -> None:
    await without_the_btree(db, database_url)  # the path under test: how the iterative scan fills a filtered scope
    acme, ava = await org(db, "Acme")
    globex, _ = await org(db, "Globex")
    bob = await create_agent(db, acme, name="Bob", role="Sales", persona="Sells.", model=None, actor="test")
    big, small = random_vectors(3000), random_vectors(300)
    await store(db, globex, "everything.md", [f"globex {i}" for i in range(3000)], big)
    await store(db, acme, "manual.md", [f"acme {i}" for i in range(300)], small)
    sliver = random_vectors(12)
    narrow = await store(db, acme, "secret.md", [f"bob only {i}" for i in range(12)], sliver, agents=[bob.id])
    indexed = config(settings, exact_below=100, max_scan_tuples=1000)

    query = near(small[42], noise=0.02)
    found, plan = await ranked(db, indexed, acme, ava, "anything", query, k=10)
    assert plan.method == "hnsw" and plan.scope == 300 and len(found) == 10
    exact, _ = await ranked(db, config(settings), acme, ava, "anything", query, k=10)
    assert found[0].content == "acme 42" and len({p.chunk_id for p in found} & {p.chunk_id for p in exact}) >= 9

    # Bob sees 312 chunks, 12 of them his own: a question near his sliver is answered from it, whatever the index found.
    found, plan = await ranked(db, indexed, acme, bob, "anything", near(sliver[3], noise=0.02), k=10)
    assert len(found) == 10 and found[0].source_id == narrow and found[0].content == "bob only 3"

    # A tenant of 12 chunks among thousands in the index: the iterative scan gives up before it has enough of them.
    initech, ian = await org(db, "Initech")
    few = random_vectors(12)
    await store(db, initech, "few.md", [f"initech {i}" for i in range(12)], few)
    sparse = config(settings, exact_below=5, max_scan_tuples=1000)
    found, plan = await ranked(db, sparse, initech, ian, "anything", near(few[5], noise=0.02), k=10)
    assert plan.method == "hnsw→exact" and plan.scope == 12 and len(found) == 10 and found[0].content == "initech 5"
    assert {p.content for p in found} <= {f"initech {i}" for i in range(12)}


async def test_the_full_text_function_shows_only_the_sessions_tenant(db: Database, settings: Settings) -> None:
    """knowledge_text_matches runs as the owner (so it can use the GIN index): it must filter as the policies do."""
    acme, _ = await org(db, "Acme")
    globex, _ = await org(db, "Globex")
    await store(db, acme, "a.md", ["the blue kettle"], random_vectors(1))
    await store(db, globex, "g.md", ["the blue kettle", "a blue kettle lid"], random_vectors(2))
    sql = text("SELECT count(*) FROM knowledge_text_matches('blue kettle', 10, NULL, 50)")
    async with db.tenant(tenant_id=acme.id) as session:
        assert await session.scalar(sql) == 1
    async with db.tenant(tenant_id=globex.id) as session:
        assert await session.scalar(sql) == 2
    async with db.system() as session:  # no tenant set: nothing, as with row-level security
        assert await session.scalar(sql) == 0
