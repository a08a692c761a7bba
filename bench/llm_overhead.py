"""What the LLM service costs on top of the model call: the tenant's keys, the budget admission (with its
reservation) before the call, and the usage row, the month's spending and alerts after it.

A fresh `konstruct init` + `konstruct db upgrade` in a temporary folder (embedded PostgreSQL) and the fake
OpenAI-compatible LLM (no delay) in a process of its own, as a provider is another machine: so what is measured is
our overhead, not a model's, and the fake's threads do not share this process's interpreter lock. Every variant is
warmed first (litellm's first calls are slow ones); then each makes `--calls` calls sequentially and `--calls` calls
with `--concurrency` in flight:

  raw      litellm.acompletion alone, the same model, key and options (the floor)
  router   a litellm Router's acompletion alone (what the service called before it made its own retries)
  service  LLMService.complete: keys + usage metering, no budget
  budget   the same with a monthly budget (admission + reservation + accounting)
  own-key  with a budget and the tenant's own key

    python bench/llm_overhead.py [--calls 400] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import cli, held_database, pct  # noqa: E402
from tests.helpers import cli_env, free_port  # noqa: E402

MODEL = "openai/gpt-4o-mini"
MESSAGES = [
    {"role": "system", "content": "You are Ava, a support agent of Acme. Be brief. You are an AI."},
    {"role": "user", "content": "Hello, where is my order number 4711? It was due on Monday."},
]


async def measure(name: str, call: Callable[[], Awaitable[Any]], calls: int, concurrency: int) -> float:
    sequential = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        sequential.append((time.perf_counter() - started) * 1000)
    latencies: list[float] = []
    slots = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with slots:
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(calls)))
    elapsed = time.perf_counter() - started
    print(
        f"{name:8}  sequential p50 {pct(sequential, 0.50):6.2f} ms  p95 {pct(sequential, 0.95):6.2f} ms  |  "
        f"{concurrency} in flight: p50 {pct(latencies, 0.50):7.2f} ms  p99 {pct(latencies, 0.99):7.2f} ms  {calls / elapsed:7.1f} calls/s",
        flush=True,
    )
    return calls / elapsed


async def run(site: Path, args: argparse.Namespace) -> None:
    from konstruct.agent.agents import create_agent
    from konstruct.config import load_settings
    from konstruct.db.engine import Database
    from konstruct.llm import budget
    from konstruct.llm.client import load_litellm
    from konstruct.llm.keys import add_key
    from konstruct.llm.service import CallContext, LLMService, deployments
    from konstruct.tenancy.tenants import create_tenant

    settings = load_settings(site / "konstruct.toml")
    db = Database(settings)
    load_litellm()
    plain = await create_tenant(db, name="Plain", slug="plain", actor="bench")
    limited = await create_tenant(db, name="Limited", slug="limited", actor="bench")
    own = await create_tenant(db, name="Own key", slug="own", actor="bench")
    agents = {}
    for tenant in (plain, limited, own):
        agents[tenant.slug] = await create_agent(db, tenant, name="Ava", role="Support", persona="Brief.", model=None, actor="bench")
    for tenant in (limited, own):
        await budget.set_budget(
            db, tenant, usd=1_000_000, alerts=[80], action="block", downgrade_model=None, settings=settings, actor="bench"
        )
    await add_key(db, settings, own, provider="openai", key="sk-own-tenant-key-1234", api_base=None, actor="bench")
    service = LLMService(settings, db)
    (deployment,) = deployments(settings, {}, [MODEL])
    litellm = load_litellm()
    llm = settings.llm
    params = {"model": MODEL, "api_key": deployment.api_key, "api_base": deployment.api_base, "timeout": llm.timeout, "max_retries": 0}
    router = litellm.Router(
        model_list=[{"model_name": MODEL, "litellm_params": params}], num_retries=llm.retries, retry_after=0, timeout=llm.timeout,
        disable_cooldowns=True,
    )  # fmt: skip

    async def raw() -> Any:
        return await litellm.acompletion(messages=MESSAGES, max_tokens=llm.max_tokens, **params)

    async def routed() -> Any:
        return await router.acompletion(model=MODEL, messages=MESSAGES, max_tokens=llm.max_tokens)

    def through(slug: str, tenant_id: Any) -> Callable[[], Awaitable[Any]]:
        ctx = CallContext(tenant_id, agents[slug].id, None, "bench")
        return lambda: service.complete(ctx, model=MODEL, messages=MESSAGES)

    print(f"machine: {os.cpu_count()} cores; fake LLM, no delay\n")
    variants = {
        "raw": raw,
        "router": routed,
        "service": through("plain", plain.id),
        "budget": through("limited", limited.id),
        "own-key": through("own", own.id),
    }
    names = args.variants.split(",")
    for name in names:  # warm: connections, the router, the tokenizer, litellm's first-call work
        await asyncio.gather(*(variants[name]() for _ in range(100)))
    rates = {name: await measure(name, variants[name], args.calls, args.concurrency) for name in names}
    if "raw" in rates:
        print("\n" + "  ".join(f"{name} {rate / rates['raw']:.2f}x" for name, rate in rates.items() if name != "raw") + " of litellm alone")
    info = await budget.get_budget(db, limited, settings)
    print(f"\nbudgeted tenant: spent ${info.spent_usd:.6f}, reserved ${info.reserved_usd} after the run (must be 0)")
    await db.dispose()


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"the fake LLM did not listen on port {port} in {timeout:g} s") from None
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400, help="calls per variant and mode")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight in the concurrent mode")
    parser.add_argument("--variants", default="raw,router,service,budget,own-key", help="which variants, in this order")
    args = parser.parse_args()
    port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "tests.fakes.llm", "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL)
    wait_port(port)
    url = f"http://127.0.0.1:{port}/v1"
    env = cli_env()
    with tempfile.TemporaryDirectory(prefix="konstruct-bench-") as tmp:
        site = Path(tmp)
        cli(site, env, "init")
        cli(site, env, "db", "upgrade")
        os.environ.update(
            KONSTRUCT_LLM__API_BASE=url, KONSTRUCT_LLM__API_KEY="sk-platform-bench-0001", KONSTRUCT_LLM__MODEL=MODEL,
            KONSTRUCT_LLM__RETRIES="0", LITELLM_LOCAL_MODEL_COST_MAP="True",
        )  # fmt: skip
        from konstruct.config import load_settings

        try:
            with held_database(load_settings(site / "konstruct.toml").data_dir):
                asyncio.run(run(site, args))
        finally:
            fake.terminate()
            fake.wait()


if __name__ == "__main__":
    main()
