"""Long-term memory figures: embedding speed on this CPU, and recall latency over a million memories under RLS.

A fresh `konstruct init` + `konstruct db upgrade` in a temporary folder (embedded PostgreSQL + pgvector).
Tenants, agents and memories (random unit vectors) are loaded as the owner role with binary COPY; recall
then runs as the app role (konstruct_app, row-level security on), one person at a time:

    SELECT content, embedding <=> $1 AS distance FROM memories
    WHERE agent_id = $2 AND person = $3 [AND tenant_id = $4] ORDER BY embedding <=> $1 LIMIT 10

A query is "complete" when it returns min(10, memories that person really has) rows. Target: p95 < 20 ms, 100 % complete.

    python bench/memory_recall.py [--memories 1000000] [--tenants 1000] [--people 100] [--queries 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
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
CHUNK = 25_000  # memories per COPY
TARGET_P95_MS = 20.0

RECALL = "SELECT content, embedding <=> $1 AS distance FROM memories WHERE agent_id = $2 AND person = $3 ORDER BY embedding <=> $1 LIMIT 10"
RECALL_TENANT = (
    "SELECT content, embedding <=> $1 AS distance FROM memories WHERE tenant_id = $4 AND agent_id = $2 AND person = $3 "
    "ORDER BY embedding <=> $1 LIMIT 10"
)
VARIANTS = {"RLS only (agent_id, person)": RECALL, "with tenant_id = $4 as well": RECALL_TENANT}


# --- embedding ---------------------------------------------------------------------------------------------------


def sentences(count: int, rng: numpy.random.Generator) -> list[str]:
    """Short, varied sentences of the kind a memory holds."""
    who = ["Maria", "the customer", "Dr. Okafor", "our client", "Jun", "the new tenant", "Priya", "the accountant", "Lars", "the buyer"]
    does = ["prefers", "asked about", "complained about", "wants", "cancelled", "needs help with", "is allergic to", "loves", "forgot"]
    what = [
        "a call after 5 pm",
        "the invoice from March",
        "vegetarian meals",
        "their password reset",
        "the blue model in size M",
        "delivery to the back door",
        "a refund for the broken kettle",
        "weekly summaries by email",
        "peanuts",
        "the Berlin office",
        "two-factor login",
        "a quote for 40 chairs",
    ]
    when = ["", " on Tuesdays", " next month", " since the last update", " before the audit", " every morning", " again"]
    return [f"{rng.choice(who)} {rng.choice(does)} {rng.choice(what)}{rng.choice(when)} (#{n})." for n in range(count)]


def bench_embedding(rng: numpy.random.Generator) -> None:
    """Both backends on the same 2,000 short sentences: torch (sentence-transformers, the anchor) and ONNX Runtime (the
    default), batched as the worker batches (64) and one at a time, and how far apart their vectors are."""
    import torch

    from konstruct.agent.embedding import BATCH_SIZE, load_backend

    texts = sentences(2000, rng)
    print(f"embedding: all-MiniLM-L6-v2 on the CPU ({os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads)")
    vectors: dict[str, numpy.ndarray] = {}
    for name in ("torch", "onnx"):
        started = time.perf_counter()
        model = load_backend(name)
        load = time.perf_counter() - started
        model.encode(texts[:BATCH_SIZE])  # warms the kernels
        rates = []
        for _ in range(3):
            started = time.perf_counter()
            vectors[name] = model.encode(texts)
            rates.append(len(texts) / (time.perf_counter() - started))
        single = []
        for text in texts[:100]:
            started = time.perf_counter()
            model.encode([text])
            single.append((time.perf_counter() - started) * 1000)
        print(f"  {name:>5}: load {load:.2f} s; {len(texts)} short sentences, batch {BATCH_SIZE}: {statistics.median(rates):.0f} sentences/s "
              f"(median of 3: {', '.join(f'{r:.0f}' for r in rates)}); one sentence: p50 {statistics.median(single):.1f} ms, "
              f"p95 {pct(single, 0.95):.1f} ms")  # fmt: skip
    gap = float((1 - (vectors["onnx"] * vectors["torch"]).sum(axis=1)).max())
    print(f"  largest cosine distance between the two backends' vectors: {gap:.2e} (target <= 1e-3); target >= 600 sentences/s batched")


# --- the database ------------------------------------------------------------------------------------------------


@dataclass
class Data:
    tenants: list[uuid.UUID]
    agents: list[uuid.UUID]
    people: list[str]
    counts: numpy.ndarray  # memories per (tenant index * people + person index)


async def load(owner: asyncpg.Connection, args: argparse.Namespace, rng: numpy.random.Generator) -> Data:
    """Tenants, one agent each, and the memories, as the owner role with binary COPY."""
    tenants = [uuid.uuid4() for _ in range(args.tenants)]
    agents = [uuid.uuid4() for _ in range(args.tenants)]
    people = [f"U{n:07d}" for n in range(args.people)]  # the same person ids in every tenant
    started = time.perf_counter()
    await owner.copy_records_to_table(
        "tenants", records=[(t, f"bench-{n:05d}", f"Bench {n}") for n, t in enumerate(tenants)], columns=["id", "slug", "name"]
    )
    await owner.copy_records_to_table(
        "agents",
        records=[(a, t, "Ava", "Support", "Brief.") for a, t in zip(agents, tenants, strict=True)],
        columns=["id", "tenant_id", "name", "role", "persona"],
    )
    print(f"  {args.tenants} tenants and agents in {time.perf_counter() - started:.1f} s")

    # Each memory belongs to a random (tenant, person): about memories / (tenants * people) each, interleaved
    # in the heap as they would be when written over time.
    tenant_of = rng.integers(0, args.tenants, args.memories)
    person_of = rng.integers(0, args.people, args.memories)
    counts = numpy.bincount(tenant_of * args.people + person_of, minlength=args.tenants * args.people)

    def records(start: int, stop: int) -> Iterator[tuple[Any, ...]]:
        vectors = rng.standard_normal((stop - start, DIMENSIONS), dtype=numpy.float32)
        vectors /= numpy.linalg.norm(vectors, axis=1, keepdims=True)
        for i in range(start, stop):
            t, p = int(tenant_of[i]), int(person_of[i])
            yield tenants[t], agents[t], people[p], f"memory {i}: {people[p]} said something worth keeping", vectors[i - start]

    started = last = time.perf_counter()
    columns = ["tenant_id", "agent_id", "person", "content", "embedding"]
    for start in range(0, args.memories, CHUNK):
        stop = min(start + CHUNK, args.memories)
        await owner.copy_records_to_table("memories", records=records(start, stop), columns=columns)
        if time.perf_counter() - last > 15 or stop == args.memories:
            last = time.perf_counter()
            print(f"  {stop:>9,} memories, {stop / (last - started):,.0f} rows/s")
    took = time.perf_counter() - started
    print(f"  {args.memories:,} memories by binary COPY in {took:.1f} s ({args.memories / took:,.0f} rows/s)")
    started = time.perf_counter()
    await owner.execute("ANALYZE memories")
    print(f"  ANALYZE in {time.perf_counter() - started:.1f} s")
    if args.vacuum:
        started = time.perf_counter()
        await owner.execute("VACUUM memories")
        print(f"  VACUUM in {time.perf_counter() - started:.1f} s (what autovacuum would do soon after such a load)")
    size = await owner.fetchval("SELECT pg_size_pretty(pg_table_size('memories'))")
    index = await owner.fetchval("SELECT pg_size_pretty(pg_relation_size('memories_scope'))")
    per = counts[counts > 0]
    print(
        f"  table {size}, index memories_scope {index}; memories per person: mean {per.mean():.1f}, "
        f"min {int(counts.min())}, max {int(counts.max())}, people with none {int((counts == 0).sum())}"
    )
    return Data(tenants, agents, people, counts)


@dataclass
class Figures:
    total: list[float] = field(default_factory=list)  # ms, BEGIN + set_config + SELECT + COMMIT
    select: list[float] = field(default_factory=list)  # ms, the SELECT alone
    complete: int = 0
    wrong_tenant: int = 0


async def recall(app: asyncpg.Connection, sql: str, data: Data, key: int, vector: numpy.ndarray, figures: Figures | None) -> None:
    t, p = divmod(key, len(data.people))
    params: list[Any] = [vector, data.agents[t], data.people[p]]
    if "$4" in sql:
        params.append(data.tenants[t])
    started = time.perf_counter()
    async with app.transaction():
        await app.fetchval("SELECT set_config('app.current_tenant', $1, true)", str(data.tenants[t]))
        before = time.perf_counter()
        rows = await app.fetch(sql, *params)
        select = time.perf_counter() - before
    total = time.perf_counter() - started
    if figures is None:
        return
    figures.total.append(total * 1000)
    figures.select.append(select * 1000)
    expected = min(10, int(data.counts[key]))
    distances = [row["distance"] for row in rows]
    if len(rows) == expected and distances == sorted(distances):
        figures.complete += 1
    figures.wrong_tenant += sum(1 for row in rows if f": {data.people[p]} said" not in row["content"])


def literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


async def explain(app: asyncpg.Connection, sql: str, data: Data, vector: numpy.ndarray) -> list[str]:
    """The plan the prepared statement runs once PostgreSQL switches to a generic plan (as it does after five runs)."""
    t, p = 0, 0
    while data.counts[t * len(data.people) + p] == 0:
        p += 1
    values = ["'[" + ",".join(f"{x:.8g}" for x in vector.tolist()) + "]'", literal(str(data.agents[t])), literal(data.people[p])]
    types = ["vector", "uuid", "text"]
    if "$4" in sql:
        values.append(literal(str(data.tenants[t])))
        types.append("uuid")
    async with app.transaction():
        await app.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await app.execute(f"PREPARE bench_recall ({', '.join(types)}) AS {sql}")
        await app.fetchval("SELECT set_config('app.current_tenant', $1, true)", str(data.tenants[t]))
        rows = await app.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, SUMMARY OFF) EXECUTE bench_recall({', '.join(values)})")
        await app.execute("DEALLOCATE bench_recall")
    return [row[0] for row in rows]


def report(name: str, figures: Figures, queries: int) -> bool:
    total, select = figures.total, figures.select
    share = 100.0 * figures.complete / queries
    print(f"\n  {name}")
    print(
        f"    whole transaction (BEGIN, set_config, SELECT, COMMIT): p50 {statistics.median(total):.2f} ms, "
        f"p95 {pct(total, 0.95):.2f} ms, p99 {pct(total, 0.99):.2f} ms, max {max(total):.2f} ms"
    )
    print(
        f"    the SELECT alone:                                      p50 {statistics.median(select):.2f} ms, "
        f"p95 {pct(select, 0.95):.2f} ms, p99 {pct(select, 0.99):.2f} ms, max {max(select):.2f} ms"
    )
    print(f"    complete: {figures.complete} of {queries} ({share:.2f} %); rows of another person or tenant: {figures.wrong_tenant}")
    met = pct(total, 0.95) < TARGET_P95_MS and figures.complete == queries and figures.wrong_tenant == 0
    print(f"    target (p95 < {TARGET_P95_MS:g} ms over the whole transaction, 100 % complete): {'met' if met else 'NOT met'}")
    return met


async def bench_recall(urls: Any, args: argparse.Namespace, rng: numpy.random.Generator) -> None:
    owner = await asyncpg.connect(dsn(urls.owner))
    try:
        if not await owner.fetchval("SELECT to_regclass('memories') IS NOT NULL"):
            raise SystemExit("no memories table: migration 0004 is missing")
        await register_vector(owner)
        print(f"\nloading (owner role, binary COPY): {args.memories:,} memories, {args.tenants} tenants, {args.people} people each")
        data = await load(owner, args, rng)
    finally:
        await owner.close()

    app = await asyncpg.connect(dsn(urls.app))
    try:
        await register_vector(app)
        if await app.fetchval("SELECT count(*) FROM memories"):
            raise SystemExit("the app role sees memories with no tenant set: row-level security is off")
        keys = rng.integers(0, args.tenants * args.people, (len(VARIANTS), args.queries))
        vectors = rng.standard_normal((len(VARIANTS), args.queries, DIMENSIONS), dtype=numpy.float32)
        vectors /= numpy.linalg.norm(vectors, axis=2, keepdims=True)
        sqls = list(VARIANTS.values())
        for n in range(20):  # warm-up: prepared statements, catalog caches (not in the figures)
            for sql in sqls:
                await recall(app, sql, data, int(keys[0, n]), vectors[0, n], None)
        figures = [Figures() for _ in sqls]
        print(f"\nrecall as {urls.app.username} (RLS on), {args.queries} random people per variant, one connection, one query at a time")
        started = time.perf_counter()
        for i in range(args.queries):  # the variants take turns, so both see the same machine
            for v, sql in enumerate(sqls):
                await recall(app, sql, data, int(keys[v, i]), vectors[v, i], figures[v])
        took = time.perf_counter() - started
        print(f"  {len(sqls) * args.queries} queries in {took:.1f} s")
        met = [report(name, f, args.queries) for name, f in zip(VARIANTS, figures, strict=True)]
        for name, sql in VARIANTS.items():
            print(f"\n  plan, {name} (generic plan, EXPLAIN ANALYZE):")
            for line in await explain(app, sql, data, vectors[0, 0]):
                print(f"    {line}")
        print()
        for name, ok in zip(VARIANTS, met, strict=True):
            print(f"target {'met' if ok else 'NOT met'}: {name}")
    finally:
        await app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memories", type=int, default=1_000_000, help="memories to load")
    parser.add_argument("--tenants", type=int, default=1000, help="tenants (one agent each)")
    parser.add_argument("--people", type=int, default=100, help="people per tenant")
    parser.add_argument("--queries", type=int, default=2000, help="recall queries per variant")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument(
        "--vacuum", action="store_true", help="VACUUM after the load's ANALYZE (otherwise autovacuum may run during the queries)"
    )
    parser.add_argument("--skip-embedding", action="store_true", help="only the database part")
    parser.add_argument("--skip-recall", action="store_true", help="only the embedding part")
    args = parser.parse_args()
    rng = numpy.random.default_rng(args.seed)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"machine: {os.cpu_count()} cores\n")
    if not args.skip_embedding:
        bench_embedding(rng)
    if args.skip_recall:
        return

    with embedded_site() as (_, urls):
        asyncio.run(bench_recall(urls, args, rng))


if __name__ == "__main__":
    main()
