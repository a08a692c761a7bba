"""Knowledge retrieval at scale, and ingest throughput.

A fresh `konstruct init` + `konstruct db upgrade` in a temporary folder (embedded PostgreSQL + pgvector 0.8). As the
owner role with binary COPY: 1,000,000 chunks over 1,000 tenants — one tenant holds 300,000, five hold 2k/5k/10k/20k/50k
(to place the exact-scan threshold), the rest ~617 each — in sources of ~100 chunks. Texts are Zipf-distributed
pseudo-words (a 30,000-word vocabulary, 50 words a chunk); vectors are clustered like real embeddings (each source a
topic: its centroid plus noise). The indexes are built after the load, as a bulk load would (timed). Questions are a
chunk's vector with noise and four of its words among common English ones.

Retrieval then runs through konstruct.knowledge.search.ranked (the worker's code: BEGIN, tenant set, scope, the hybrid
statement, COMMIT) as the app role under row-level security, one question at a time, k = 10. Embedding the question
is not in these figures (see the ingest part and bench/memory_recall.py for the model's speed).

Figures: p50/p95 for small tenants and the large one; recall@10 of the index path against the exact scan (vector
ranking alone, and the fused hybrid result); share of questions that got k rows; rows of another tenant (must be 0);
the exact scan against the index at several scope sizes; and ingest chunks/s with the real model on a real corpus.
Targets: p95 < 30 ms (large) and < 5 ms (small), recall@10 >= 0.95, 100 % of questions get k rows.

    python bench/knowledge.py [--chunks 1000000] [--tenants 1000] [--large 300000] [--queries 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import numpy
from pgvector.asyncpg import register_vector

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import dsn, embedded_site, pct  # noqa: E402

DIMENSIONS = 384
BATCH = 20_000  # chunks per COPY
PER_SOURCE = 100
MEDIUM = (2_000, 5_000, 10_000, 20_000, 50_000)
K = 10
TARGET_LARGE_MS, TARGET_SMALL_MS, TARGET_RECALL = 30.0, 5.0, 0.95
COMMON = ["what", "is", "the", "how", "do", "i", "can", "you", "tell", "me", "about", "for", "a", "of", "in", "on", "with", "to", "my"]
SYLLABLES = ["ka", "ri", "to", "me", "su", "la", "po", "ne", "vi", "do", "ga", "mu", "ze", "ta", "lo", "fi", "ru", "sa", "be", "ko"]


def unit_rows(matrix: numpy.ndarray) -> numpy.ndarray:
    matrix /= numpy.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix


@dataclass
class Corpus:
    """What was loaded: each tenant's size, sources and (for questions) a few of its chunks with their words."""

    tenants: list[uuid.UUID]
    agents: list[uuid.UUID]
    sizes: list[int]
    source_tenant: dict[uuid.UUID, int] = field(default_factory=dict)
    samples: dict[int, list[tuple[numpy.ndarray, list[str]]]] = field(default_factory=dict)  # tenant → (vector, words)


class Generator:
    def __init__(self, rng: numpy.random.Generator, topics: int = 5000) -> None:
        self.rng = rng
        self.vocabulary = numpy.array(sorted({"".join(rng.choice(SYLLABLES, rng.integers(2, 5))) for _ in range(60_000)})[:30_000])
        weights = 1.0 / numpy.arange(1, len(self.vocabulary) + 1) ** 1.07  # Zipf
        self.weights = weights / weights.sum()
        self.centroids = unit_rows(rng.standard_normal((topics, DIMENSIONS)).astype(numpy.float32))

    def texts(self, n: int) -> list[list[str]]:
        picks = self.rng.choice(len(self.vocabulary), size=(n, 50), p=self.weights)
        return [list(self.vocabulary[row]) for row in picks]

    def vectors(self, topics: numpy.ndarray) -> numpy.ndarray:
        noise = self.rng.standard_normal((len(topics), DIMENSIONS)).astype(numpy.float32) * 0.05
        return unit_rows(self.centroids[topics] + noise)


def plan_sizes(args: argparse.Namespace) -> list[int]:
    rest = args.chunks - args.large - sum(MEDIUM)
    small = args.tenants - 1 - len(MEDIUM)
    base, extra = divmod(rest, small)
    return [args.large, *MEDIUM, *[base + (1 if i < extra else 0) for i in range(small)]]


async def load(owner: asyncpg.Connection, args: argparse.Namespace, rng: numpy.random.Generator) -> Corpus:
    sizes = plan_sizes(args)
    corpus = Corpus([uuid.uuid4() for _ in sizes], [uuid.uuid4() for _ in sizes], sizes)
    await owner.copy_records_to_table("tenants", records=[(t, f"bench-{n:05d}", f"Bench {n}") for n, t in enumerate(corpus.tenants)],
                                      columns=["id", "slug", "name"])  # fmt: skip
    await owner.copy_records_to_table("agents", records=[(a, t, "Ava", "Support", "Brief.") for a, t in zip(corpus.agents, corpus.tenants, strict=True)],
                                      columns=["id", "tenant_id", "name", "role", "persona"])  # fmt: skip
    gen = Generator(rng)
    # Sources of ~100 chunks, each stored in one piece (as an ingest writes a source in one transaction); the sources
    # of all tenants interleaved in the heap, as ingests over time would leave them.
    sources = [(t, uuid.uuid4(), n) for t, size in enumerate(sizes) for n in split(size)]
    order = rng.permutation(len(sources))
    await owner.copy_records_to_table("knowledge_sources", records=[
        (s, corpus.tenants[t], f"/docs/{s}.md", f"doc-{str(s)[:8]}.md", "markdown", [], n) for t, s, n in sources],
        columns=["id", "tenant_id", "uri", "name", "kind", "agent_ids", "chunks"])  # fmt: skip
    corpus.source_tenant = {s: t for t, s, _ in sources}
    started = last = time.perf_counter()
    records: list[tuple[Any, ...]] = []
    done = 0
    for position, index in enumerate(order):
        t, source, n = sources[index]
        vectors = gen.vectors(numpy.full(n, int(rng.integers(0, len(gen.centroids)))))  # the source's topic
        for ordinal, words in enumerate(gen.texts(n)):
            records.append((corpus.tenants[t], source, ordinal, f"Section {ordinal}", " ".join(words), vectors[ordinal]))
            if len(corpus.samples.get(t, [])) < 3 or rng.random() < 0.002:
                corpus.samples.setdefault(t, []).append((vectors[ordinal], words))
        if len(records) >= BATCH or position == len(order) - 1:
            await owner.copy_records_to_table("knowledge_chunks", records=records,
                                              columns=["tenant_id", "source_id", "ordinal", "heading", "content", "embedding"])  # fmt: skip
            done += len(records)
            records = []
            if time.perf_counter() - last > 20 or position == len(order) - 1:
                last = time.perf_counter()
                print(f"  {done:>9,} chunks, {done / (last - started):,.0f} rows/s", flush=True)
    print(f"  {done:,} chunks in {time.perf_counter() - started:.0f} s; {len(sources):,} sources")
    return corpus


def split(size: int) -> list[int]:
    """A tenant's chunks as sources of PER_SOURCE (the last one smaller)."""
    full, rest = divmod(size, PER_SOURCE)
    return [PER_SOURCE] * full + ([rest] if rest else [])


async def build_indexes(owner: asyncpg.Connection) -> None:
    await owner.execute("SET maintenance_work_mem = '6GB'")
    await owner.execute("SET max_parallel_maintenance_workers = 1")  # 2 cores: the leader and one worker
    for name, sql in [
        ("knowledge_chunks_scope (btree)", "CREATE INDEX knowledge_chunks_scope ON knowledge_chunks (tenant_id, source_id)"),
        ("knowledge_chunks_tsv (GIN)", "CREATE INDEX knowledge_chunks_tsv ON knowledge_chunks USING gin (tsv)"),
        ("knowledge_chunks_embedding (HNSW, m 16, ef_construction 64)",
         "CREATE INDEX knowledge_chunks_embedding ON knowledge_chunks USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"),
    ]:  # fmt: skip
        started = time.perf_counter()
        await owner.execute(sql)
        print(f"  {name} built in {time.perf_counter() - started:.0f} s", flush=True)
    started = time.perf_counter()
    await owner.execute("VACUUM ANALYZE knowledge_chunks")
    await owner.execute("ANALYZE knowledge_sources")
    size = await owner.fetchval("SELECT pg_size_pretty(pg_table_size('knowledge_chunks'))")
    hnsw = await owner.fetchval("SELECT pg_size_pretty(pg_relation_size('knowledge_chunks_embedding'))")
    print(f"  VACUUM ANALYZE in {time.perf_counter() - started:.0f} s; table {size}, HNSW index {hnsw}")


@dataclass
class Run:
    ms: list[float] = field(default_factory=list)
    complete: int = 0
    foreign: int = 0
    methods: dict[str, int] = field(default_factory=dict)
    results: list[list[int]] = field(default_factory=list)

    def line(self, name: str) -> str:
        methods = ", ".join(f"{m} {n}" for m, n in sorted(self.methods.items()))
        return (f"{name}: p50 {statistics.median(self.ms):.2f} ms, p95 {pct(self.ms, 0.95):.2f} ms, p99 {pct(self.ms, 0.99):.2f} ms; "
                f"{self.complete}/{len(self.ms)} got k rows; other tenants' rows {self.foreign}; path: {methods}")  # fmt: skip


def question(rng: numpy.random.Generator, sample: tuple[numpy.ndarray, list[str]]) -> tuple[str, numpy.ndarray]:
    vector, words = sample
    noisy = vector + rng.standard_normal(DIMENSIONS).astype(numpy.float32) * 0.03
    picked = list(rng.choice(words, 4, replace=False))
    return " ".join([*rng.choice(COMMON, 3), *picked]) + "?", noisy / numpy.linalg.norm(noisy)


async def ask(db: Any, conf: Any, corpus: Corpus, tenant: int, text: str, vector: numpy.ndarray, run: Run, exact: bool = False) -> None:
    from konstruct.knowledge import search

    started = time.perf_counter()
    found, plan = await search.ranked(
        db, conf, tenant_id=corpus.tenants[tenant], agent_id=corpus.agents[tenant], question=text, vector=vector, k=K, exact_vectors=exact
    )
    run.ms.append((time.perf_counter() - started) * 1000)
    run.complete += len(found) == min(K, corpus.sizes[tenant])
    run.foreign += sum(1 for p in found if corpus.source_tenant.get(p.source_id) != tenant)
    run.methods[plan.method] = run.methods.get(plan.method, 0) + 1
    run.results.append([p.chunk_id for p in found])


def recall(approximate: Run, exact: Run) -> float:
    hits = sum(len(set(a) & set(e)) for a, e in zip(approximate.results, exact.results, strict=True))
    return hits / sum(len(e) for e in exact.results)


async def bench_search(settings: Any, urls: Any, corpus: Corpus, args: argparse.Namespace, rng: numpy.random.Generator) -> bool:
    from konstruct.db.engine import Database
    from konstruct.knowledge import dedicated

    db = Database(settings, urls)
    conf = settings.knowledge
    indexed = conf.model_copy(update={"exact_below": 0})
    small = [t for t in range(1 + len(MEDIUM), len(corpus.tenants))]
    try:
        for _ in range(args.warmup):  # warm-up: connections, catalog caches, the pages of a steady-state server
            t = int(rng.choice(small))
            await ask(db, conf, corpus, t, *question(rng, corpus.samples[t][0]), Run())
            await ask(db, conf, corpus, 0, *question(rng, corpus.samples[0][0]), Run())
        if args.dedicated:  # the anchor: the large tenant on the shared indexes, then its own (`knowledge index`)
            shared = Run()
            for i in range(args.queries // 2):
                await ask(db, conf, corpus, 0, *question(rng, corpus.samples[0][i % len(corpus.samples[0])]), shared)
            print(f"\nthe large tenant on the shared indexes (the anchor): {shared.line(f'{args.queries // 2} questions')}")
            started = time.perf_counter()
            await asyncio.to_thread(dedicated.build, urls, corpus.tenants[0], memory="4GB")
            print(f"its own indexes (`konstruct knowledge index`: partial GIN + HNSW) built in {time.perf_counter() - started:.0f} s")
            for _ in range(args.warmup // 2):
                await ask(db, conf, corpus, 0, *question(rng, corpus.samples[0][0]), Run())
        print(f"\nretrieval, k = {K}, as the app role (RLS on), one question at a time; settings: exact_below {conf.exact_below}, "
              f"ef_search {conf.ef_search}, candidates {conf.candidates}, max_scan_tuples {conf.max_scan_tuples}")  # fmt: skip
        runs: dict[str, Run] = {name: Run() for name in ("small", "large", "large exact", "large vector", "large vector exact")}
        for i in range(args.queries):
            t = int(rng.choice(small))
            await ask(db, conf, corpus, t, *question(rng, corpus.samples[t][i % len(corpus.samples[t])]), runs["small"])
            text, vector = question(rng, corpus.samples[0][i % len(corpus.samples[0])])
            await ask(db, conf, corpus, 0, text, vector, runs["large"])
            if i < args.recall_queries:  # the same questions through the exact scan: the truth for recall@10
                await ask(db, conf, corpus, 0, text, vector, runs["large exact"], exact=True)
                await ask(db, indexed, corpus, 0, "", vector, runs["large vector"])
                await ask(db, conf, corpus, 0, "", vector, runs["large vector exact"], exact=True)
        print(f"  {runs['small'].line(f'small tenants ({corpus.sizes[-1]}-{corpus.sizes[6]} chunks), {args.queries} questions')}")
        print(f"  {runs['large'].line(f'the large tenant ({corpus.sizes[0]:,} chunks), {args.queries} questions')}")
        print(f"  {runs['large exact'].line(f'the large tenant, exact scan (the anchor), {args.recall_queries} of them')}")
        hybrid, vector_only = (
            recall(Run(results=runs["large"].results[: args.recall_queries]), runs["large exact"]),
            recall(runs["large vector"], runs["large vector exact"]),
        )
        print(f"  recall@10, large tenant, index path vs the exact vector scan (the same full-text leg): hybrid (fused) {hybrid:.3f}; "
              f"vector ranking alone {vector_only:.3f}")  # fmt: skip

        print("\nexact scan vs HNSW index by scope size (100 questions each; the planner may still read a small scope by btree):")
        for t, size in enumerate(MEDIUM, 1):
            a, b = Run(), Run()
            for i in range(100):
                text, vector = question(rng, corpus.samples[t][i % len(corpus.samples[t])])
                await ask(db, conf, corpus, t, text, vector, a, exact=True)
                await ask(db, indexed, corpus, t, text, vector, b)
            print(f"  {size:>6,} chunks: exact p50 {statistics.median(a.ms):.2f} / p95 {pct(a.ms, 0.95):.2f} ms; "
                  f"index p50 {statistics.median(b.ms):.2f} / p95 {pct(b.ms, 0.95):.2f} ms, recall@10 {recall(b, a):.3f}")  # fmt: skip
        await explain(db, conf, corpus, rng)
        large, small_run = runs["large"], runs["small"]
        every = large.complete == len(large.ms) and small_run.complete == len(small_run.ms)
        met = (pct(large.ms, 0.95) < TARGET_LARGE_MS and pct(small_run.ms, 0.95) < TARGET_SMALL_MS and hybrid >= TARGET_RECALL
               and every and large.foreign == small_run.foreign == 0)  # fmt: skip
        print(f"\ntargets (large p95 < {TARGET_LARGE_MS:g} ms, small p95 < {TARGET_SMALL_MS:g} ms, recall@10 >= {TARGET_RECALL}, "
              f"100 % k rows, no foreign rows): {'met' if met else 'NOT met'}")  # fmt: skip
        return met
    finally:
        await db.dispose()


async def explain(db: Any, conf: Any, corpus: Corpus, rng: numpy.random.Generator) -> None:
    from konstruct.knowledge import search

    text, vector = question(rng, corpus.samples[0][0])
    lines = await search.explain(db, conf, tenant_id=corpus.tenants[0], agent_id=corpus.agents[0], question=text, vector=vector, k=K)
    print(f"\nplan of the large tenant's statement (scans only), full text {search.tsquery(text)!r}:")
    for line in lines:
        if "Scan" in line or "Index" in line or "Limit" in line:
            print("  " + line.split("  (")[0][:150])


def bench_ingest(corpus_dir: Path) -> None:
    from konstruct.knowledge.ingest import measure_throughput

    paths = [p for p in corpus_dir.rglob("*.md") if ".venv" not in p.parts and "node_modules" not in p.parts]
    result = asyncio.run(measure_throughput(paths))
    print(f"\ningest with the real model (all-MiniLM-L6-v2, CPU): {result.files} Markdown files of this repository, {result.chunks} chunks, "
          f"{result.characters:,} characters: read+split {result.read_seconds:.2f} s, embed {result.embed_seconds:.2f} s "
          f"= {result.chunks / max(result.embed_seconds + result.read_seconds, 1e-9):.1f} chunks/s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--large", type=int, default=300_000, help="chunks of the one large tenant")
    parser.add_argument("--queries", type=int, default=500, help="questions per group (small tenants, the large one)")
    parser.add_argument("--recall-queries", type=int, default=100, help="of those, also run exactly for recall@10")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--warmup", type=int, default=300, help="question pairs (small, large) before measuring")
    parser.add_argument("--shared-buffers", default="8GB", help="PostgreSQL's shared_buffers for the run")
    parser.add_argument("--no-dedicated", dest="dedicated", action="store_false",
                        help="keep the large tenant on the shared indexes (default: measure them, then give it its own)")  # fmt: skip
    args = parser.parse_args()
    rng = numpy.random.default_rng(args.seed)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"machine: {os.cpu_count()} cores")
    if not args.skip_ingest:
        bench_ingest(ROOT)

    print(f"PostgreSQL: shared_buffers {args.shared_buffers} (the embedded default is 128MB; the HNSW index should fit)")
    with embedded_site(f"shared_buffers = '{args.shared_buffers}'") as (settings, urls):
        met = asyncio.run(run(settings, urls, args, rng))
    raise SystemExit(0 if met else 1)


async def run(settings: Any, urls: Any, args: argparse.Namespace, rng: numpy.random.Generator) -> bool:
    owner = await asyncpg.connect(dsn(urls.owner))
    try:
        await register_vector(owner)
        for index in ("knowledge_chunks_embedding", "knowledge_chunks_tsv", "knowledge_chunks_scope"):
            await owner.execute(f"DROP INDEX {index}")  # rebuilt after the load, as a bulk load does
        print(f"\nloading (owner role, binary COPY): {args.chunks:,} chunks, {args.tenants} tenants, one with {args.large:,}")
        corpus = await load(owner, args, rng)
        await build_indexes(owner)
    finally:
        await owner.close()
    return await bench_search(settings, urls, corpus, args, rng)


if __name__ == "__main__":
    main()
