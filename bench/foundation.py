"""Foundation figures: `konstruct up` to ready, one `chat --message` round trip, conversations in flight.

Everything runs here, on loopback: a fresh `konstruct init` in a temporary folder (embedded PostgreSQL),
the fake OpenAI-compatible LLM from tests/fakes, real `konstruct up` / `konstruct chat` processes.

    python bench/foundation.py [--chats 10] [--delay 2] [--concurrency 64 256]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.llm import FakeLLM  # noqa: E402
from tests.helpers import cli_env, free_port  # noqa: E402


def cli(site: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "konstruct", *args], cwd=site, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"konstruct {' '.join(args)} failed: {result.stderr}")
    return result


def start_up(site: Path, env: dict[str, str], *, settled: bool = False) -> tuple[subprocess.Popen[str], float]:
    """`konstruct up`, and the seconds to its ready line. settled: return only once the warm spare is warm too (it
    starts after ready, and its imports would otherwise share the cores with what is measured next)."""
    started = time.perf_counter()
    took: float | None = None
    proc = subprocess.Popen(
        [sys.executable, "-m", "konstruct", "up"], cwd=site, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Konstruct is up" in line:
            took = time.perf_counter() - started
        if took is not None and (not settled or "standby: warm" in line):
            # Keep draining the output so the pipe never fills.
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
            return proc, took
    raise SystemExit(f"konstruct up exited with {proc.wait()} before it was ready")


def stop_up(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(2)
    proc.wait(120)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def in_flight(site: Path, fake: FakeLLM, messages: int) -> tuple[int, float]:
    """Put `messages` conversations into the inbox at once; return (max LLM calls at once, seconds to answer all)."""
    from sqlalchemy import func, select

    from konstruct.agent.agents import get_agent
    from konstruct.config import load_settings
    from konstruct.db.engine import Database
    from konstruct.db.models import InboundMessage as Row
    from konstruct.inbox import accept
    from konstruct.messaging import InboundMessage
    from konstruct.tenancy.tenants import get_tenant
    from konstruct.worker.queue import make_queue

    settings = load_settings(site / "konstruct.toml")
    db = Database(settings)
    queue = make_queue(settings, db.urls)
    tenant = await get_tenant(db, "bench")
    agent = await get_agent(db, tenant, "Ava")
    fake.max_in_flight = 0
    run = uuid.uuid4().hex[:6]
    started = time.perf_counter()
    for n in range(messages):
        await accept(
            db,
            queue,
            InboundMessage(tenant.id, agent.id, "terminal", f"{run}-{n}", f"bench-{run}-{n}", f"person-{n}", f"question {n}"),
        )
    while True:
        async with db.tenant(tenant_id=tenant.id) as session:
            open_rows = await session.scalar(select(func.count()).select_from(Row).where(Row.status.in_(["received", "processing"])))
        if not open_rows:
            break
        await asyncio.sleep(0.05)
    took = time.perf_counter() - started
    queue.close()
    await db.dispose()
    return fake.max_in_flight, took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", type=int, default=10, help="chat --message round trips to time")
    parser.add_argument("--delay", type=float, default=2.0, help="seconds the fake LLM takes, for the in-flight test")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256], help="worker.concurrency values to try")
    args = parser.parse_args()

    fake = FakeLLM().start()
    print(f"machine: {os.cpu_count()} cores; fake LLM at {fake.url}\n")
    with tempfile.TemporaryDirectory(prefix="konstruct-bench-") as tmp:
        site = Path(tmp)
        os.environ["BENCH_LLM_KEY"] = "sk-bench-0000"  # read by this process too (the in-flight test)
        env = cli_env()
        port = free_port()
        cli(
            site,
            "init",
            "--llm-model",
            "openai/fake-model",
            "--llm-api-base",
            fake.url,
            "--llm-api-key-env",
            "BENCH_LLM_KEY",
            "--port",
            str(port),
            env=env,
        )

        # 1. konstruct up → ready (gateway /readyz 200 and the worker's heartbeat), first start and a warm one.
        proc, first = start_up(site, env)
        cli(site, "tenant", "create", "Bench", "--slug", "bench", env=env)
        cli(site, "agent", "create", "-t", "bench", "-n", "Ava", "-r", "Support", "--persona", "Brief.", env=env)
        stop_up(proc)
        warm = []
        for _ in range(3):
            proc, took = start_up(site, env)
            warm.append(took)
            stop_up(proc)
        print("konstruct up → ready")
        print(f"  first start (initdb + migrations): {first:.2f} s")
        print(f"  warm start, median of 3:           {statistics.median(warm):.2f} s")

        # 2. chat --message round trips (a whole CLI process each; the first warms the worker's litellm).
        proc, _ = start_up(site, env, settled=True)
        try:
            cli(site, "chat", "-t", "bench", "-a", "Ava", "-m", "warm-up", env=env)
            totals, inside = [], []
            for n in range(args.chats):
                started = time.perf_counter()
                result = cli(site, "chat", "-t", "bench", "-a", "Ava", "-m", f"hello {n}", "--json", env=env)
                totals.append(time.perf_counter() - started)
                inside.append(float(__import__("json").loads(result.stdout)["seconds"]))
            print(f"\nkonstruct chat --message round trip, fake LLM answering at once ({args.chats} runs)")
            print(f"  whole command (process start to exit): p50 {statistics.median(totals):.2f} s, p95 {pct(totals, 0.95):.2f} s")
            print(
                f"  message stored → reply read:           p50 {statistics.median(inside) * 1000:.0f} ms, p95 {pct(inside, 0.95) * 1000:.0f} ms"
            )
        finally:
            stop_up(proc)

        # 3. conversations in flight in ONE worker with a slow LLM.
        print(f"\none worker, fake LLM taking {args.delay:g} s per answer")
        fake.delay = args.delay
        for concurrency in args.concurrency:
            env_c = dict(env, KONSTRUCT_WORKER__CONCURRENCY=str(concurrency))
            proc, _ = start_up(site, env_c, settled=True)
            try:
                fake.delay = 0.0
                cli(site, "chat", "-t", "bench", "-a", "Ava", "-m", "warm-up", env=env)  # the worker has imported litellm
                fake.delay = args.delay
                messages = concurrency * 3
                peak, took = asyncio.run(in_flight(site, fake, messages))
            finally:
                stop_up(proc)
            print(
                f"  worker.concurrency={concurrency:>4}: {messages} conversations answered in {took:.1f} s, "
                f"peak {peak} LLM calls in flight, {messages / took:.1f} answers/s "
                f"(ideal {concurrency / args.delay:.1f}/s)"
            )
        release_embedded()  # before its folder goes: the in-flight part's Database held the embedded server here too
    fake.stop()


def release_embedded() -> None:
    """Give back this process's handles on embedded servers (the last one stops its server), as up does on exit."""
    from konstruct.db import embedded

    for pgdata in list(embedded._servers):
        embedded._servers.pop(pgdata).cleanup()


if __name__ == "__main__":
    main()
