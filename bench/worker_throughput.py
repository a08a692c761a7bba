"""Answers per second of `konstruct worker` processes (one, or one per core), and how many conversations one really
has in flight.

A fresh `konstruct init` in a temporary folder (embedded PostgreSQL, the default Postgres queue), one tenant and agent,
the fake OpenAI-compatible LLM from tests/fakes. For each scenario the inbox is filled first (terminal-channel messages,
each its own conversation, queued as the gateway queues them) with no worker running; then the workers start and
answer them all. Answers/s is the number answered over the time from the first claim to the last answer (from the
inbox rows' claimed_at/finished_at); the peak is the most LLM calls the fake saw at once; CPU-ms per answer is the
workers' (all of them) and PostgreSQL's process time over the run; transactions per answer, the database's
(pg_stat_database) over the run, less the bench's own look-ups (each commit is a WAL flush and two round trips more).

Scenarios (each `delay:concurrency:messages[:workers]`, the concurrency each worker's), by default those of the
throughput issue, with one worker and with two (one per core of the 2-core machine the targets were set on):
  0:64:3000      instant LLM, the default concurrency        (target ≥ 150 answers/s on 2 cores)
  0:64:3000:2    the same, two worker processes
  2:256:1024     a 2 s LLM, concurrency 256                 (target ≥ 115 answers/s; ideal 128)
  2:128:1024:2   two workers at 128: 256 in flight in all
  20:1000:1000   a 20 s LLM, concurrency 1000               (target: 1,000 conversations in flight in one worker; with
                                                             a 2 s LLM the peak is bounded by how fast the worker starts
                                                             them, not by a cap)

    python bench/worker_throughput.py [--scenarios 0:64:3000 0:64:3000:2 2:256:1024 2:128:1024:2 20:1000:1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import Part, cli, spawn, wait_log  # noqa: E402
from bench.scale_out import settle  # noqa: E402
from tests.fakes.llm import FakeLLM  # noqa: E402
from tests.helpers import cli_env  # noqa: E402


async def fill(site: Path, messages: int, run: str) -> None:
    """Put `messages` new conversations into the inbox, queued, as the gateway stores them (group commit)."""
    from konstruct.agent.agents import get_agent
    from konstruct.config import load_settings
    from konstruct.db.engine import Database
    from konstruct.inbox import accept
    from konstruct.messaging import InboundMessage
    from konstruct.tenancy.tenants import get_tenant
    from konstruct.worker.queue import make_queue

    settings = load_settings(site / "konstruct.toml")
    db = Database(settings)
    queue = make_queue(settings, db.urls)
    try:
        tenant = await get_tenant(db, "bench")
        agent = await get_agent(db, tenant, "Ava")
        slots = asyncio.Semaphore(64)

        async def one(n: int) -> None:
            async with slots:
                message = InboundMessage(tenant.id, agent.id, "terminal", f"{run}-{n}", f"{run}-{n}", f"person-{n}", f"question {n}")
                await accept(db, queue, message)

        await asyncio.gather(*(one(n) for n in range(messages)))
    finally:
        queue.close()
        await db.dispose()


async def progress(site: Path, run: str) -> tuple[int, int, float | None]:
    """(answered, failed, seconds from the first claim to the last answer) of this run's messages."""
    from sqlalchemy import text

    from konstruct.config import load_settings
    from konstruct.db.engine import Database
    from konstruct.tenancy.tenants import get_tenant

    db = Database(load_settings(site / "konstruct.toml"))
    try:
        tenant = await get_tenant(db, "bench")
        async with db.tenant(tenant_id=tenant.id) as session:
            row = (
                await session.execute(
                    text(
                        "SELECT count(*) FILTER (WHERE status = 'replied'), count(*) FILTER (WHERE status = 'failed'), "
                        "extract(epoch FROM max(finished_at) - min(claimed_at)) FROM inbound_messages WHERE external_id LIKE :prefix"
                    ),
                    {"prefix": run + "-%"},
                )
            ).one()
    finally:
        await db.dispose()
    return int(row[0]), int(row[1]), float(row[2]) if row[2] is not None else None


def transactions(site: Path) -> int:
    """Transactions the database has ended (committed or rolled back) so far, as its statistics have them: a backend
    reports its own when it goes idle (at most once a second) and when it exits."""
    from sqlalchemy import create_engine, text

    from konstruct.config import load_settings
    from konstruct.db.urls import resolve_urls

    engine = create_engine(resolve_urls(load_settings(site / "konstruct.toml")).owner_sync())
    try:
        with engine.connect() as conn:
            query = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
            return int(conn.execute(text(query)).scalar_one())
    finally:
        engine.dispose()


def own_transactions(site: Path, run: str) -> tuple[int, int]:
    """(one `transactions` read's, one `progress` look-up's) transactions, counted with the workers stopped: taken off a
    run's count, what is left are the workers' own."""
    first = transactions(site)
    read = transactions(site) - first
    asyncio.run(progress(site, run))
    time.sleep(1.1)
    return read, transactions(site) - first - 2 * read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scenarios", nargs="+", default=["0:64:3000", "0:64:3000:2", "2:256:1024", "2:128:1024:2", "20:1000:1000"],
        help="delay:concurrency:messages[:workers]",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a scenario's answers")
    args = parser.parse_args()
    scenarios = []
    for spec in args.scenarios:
        try:
            delay, concurrency, messages, *count = spec.split(":")
            scenarios.append((float(delay), int(concurrency), int(messages), int(count[0]) if count else 1))
            if len(count) > 1 or scenarios[-1][3] < 1:
                raise ValueError
        except ValueError:
            parser.error(f"a scenario is delay:concurrency:messages[:workers] (e.g. 0:64:3000 or 0:64:3000:2), not {spec!r}")

    fake = FakeLLM().start()
    env = cli_env(BENCH_LLM_KEY="sk-bench-0000")
    os.environ["BENCH_LLM_KEY"] = env["BENCH_LLM_KEY"]
    with tempfile.TemporaryDirectory(prefix="konstruct-bench-") as tmp:
        site = Path(tmp)
        cli(site, env, "init", "--llm-model", "openai/gpt-4o-mini", "--llm-api-base", fake.url, "--llm-api-key-env", "BENCH_LLM_KEY")
        cli(site, env, "db", "upgrade")
        cli(site, env, "tenant", "create", "Bench", "--slug", "bench")
        cli(site, env, "agent", "create", "-t", "bench", "-n", "Ava", "-r", "Support", "--persona", "Brief.")
        from konstruct.db.embedded import EmbeddedServer  # held for the whole run, as `up` does

        database = EmbeddedServer(site / ".konstruct")
        postmaster = database.pid()
        assert postmaster is not None
        print(f"machine: {os.cpu_count()} cores; fake LLM in the bench process\n")
        try:
            for delay, concurrency, messages, count in scenarios:
                run = uuid.uuid4().hex[:8]
                asyncio.run(fill(site, messages, run))
                fake.delay, fake.max_in_flight = delay, 0
                workers = [
                    spawn(site, dict(env, KONSTRUCT_WORKER__CONCURRENCY=str(concurrency)), "worker", log=f"worker-{run}-{n}")
                    for n in range(count)
                ]
                parts = [Part("worker", [w.pid for w in workers]), Part("postgresql", [postmaster])]
                try:
                    for n in range(count):
                        wait_log(site, f"worker-{run}-{n}", " ready: ")
                    for part in parts:
                        part.mark()
                    ended = transactions(site)
                    polls = 0
                    deadline = time.monotonic() + args.timeout
                    while True:
                        done, failed, took = asyncio.run(progress(site, run))
                        polls += 1
                        if done + failed >= messages or time.monotonic() > deadline:
                            break
                        time.sleep(0.5)
                    cpu = {part.name: part.since_mark() for part in parts}
                finally:
                    for worker in workers:
                        worker.send_signal(signal.SIGTERM)
                    for worker in workers:
                        try:
                            worker.wait(30)
                        except subprocess.TimeoutExpired:
                            worker.kill()
                time.sleep(1.1)  # the statistics of the last backends to go idle
                ended = transactions(site) - ended
                read, poll = own_transactions(site, run)
                ended -= read + polls * poll
                rate = done / took if took else 0.0
                ideal = f" (ideal {count * concurrency / delay:.0f}/s)" if delay else ""
                who = "one worker" if count == 1 else f"{count} workers"
                per = ", ".join(f"{name} {seconds * 1000 / max(done, 1):.1f}" for name, seconds in cpu.items())
                print(
                    f"{who}, LLM {delay:g} s, concurrency {concurrency:>4}, {messages} messages: {done} answered, {failed} failed, "
                    f"{rate:.1f} answers/s{ideal}, peak {fake.max_in_flight} LLM calls in flight; CPU-ms per answer: {per}; "
                    f"{ended / max(done, 1):.2f} transactions per answer",
                    flush=True,
                )
                settle(parts[1:])
        finally:
            database.release()
            fake.stop()


if __name__ == "__main__":
    main()
