"""20,000 unsigned and forged hostile requests (then half as many validly signed ones) against a real gateway (the generator of tests/fakes/hostile.py): requests by route
and status, 5xx count (target 0), rows written by unauthenticated input (target 0), gateway RSS before and
after, and the p99 of /healthz during the run.

    python bench/hostile.py [--total 20000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import pct, spawn, wait_log, wait_ready  # noqa: E402
from tests.fakes import hostile  # noqa: E402
from tests.fakes.llm import FakeLLM  # noqa: E402
from tests.helpers import cli_env, free_port  # noqa: E402

KEYS = hostile.Keys("T0BENCH001", "bench-slack-secret", "106540352242922", "bench-wa-secret", "whsec_bench", "admin@bench.test")


async def setup(config: Path) -> str:
    """Tenant, Slack and WhatsApp connections, a user; returns the superuser DSN of the site's database."""
    from konstruct.channels import connections
    from konstruct.config import load_settings
    from konstruct.db.engine import Database
    from konstruct.db.urls import resolve_urls
    from konstruct.tenancy.tenants import create_tenant
    from konstruct.tenancy.users import add_member, create_user

    settings = load_settings(config)
    db = Database(settings)
    tenant = await create_tenant(db, name="Bench", slug="bench", actor="bench")
    await connections.connect(db, settings, tenant, kind="slack", external_id=KEYS.slack_team, name="Bench HQ", mode="single",
                              credentials={"bot_token": "xoxb-bench", "signing_secret": KEYS.slack_secret}, details={},
                              default_agent=None, actor="bench")  # fmt: skip
    await connections.connect(db, settings, tenant, kind="whatsapp", external_id=KEYS.wa_number, name="+1", mode="single",
                              credentials={"access_token": "EAAG", "app_secret": KEYS.wa_secret, "verify_token": "v"}, details={},
                              default_agent=None, actor="bench")  # fmt: skip
    user = await create_user(db, email=KEYS.login_email, name="A", password="a long enough password", platform_admin=False, actor="b")
    async with db.tenant(tenant_id=tenant.id) as session:
        await add_member(session, tenant.id, user, "customer_admin", actor="bench")
    await db.dispose()
    return resolve_urls(settings).owner.set(drivername="postgresql").render_as_string(hide_password=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total", type=int, default=20_000, help="unsigned requests (1,000 sign-ins, the rest webhooks)")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    llm = FakeLLM().start()
    with tempfile.TemporaryDirectory(prefix="konstruct-hostile-") as tmp:
        site, port = Path(tmp), free_port()
        env = cli_env(BENCH_LLM_KEY="sk-bench", KONSTRUCT_BILLING__STRIPE_API_KEY="sk_test_bench",
                      KONSTRUCT_BILLING__WEBHOOK_SECRET=KEYS.stripe_secret)  # fmt: skip
        from bench.harness import cli, held_database

        cli(site, env, "init", "--llm-model", "openai/fake-model", "--llm-api-base", llm.url, "--llm-api-key-env", "BENCH_LLM_KEY",
            "--port", str(port))  # fmt: skip
        cli(site, env, "db", "upgrade")
        import os

        os.environ.update({k: v for k, v in env.items() if k.startswith("KONSTRUCT_") or k == "BENCH_LLM_KEY"})
        with held_database(site / ".konstruct"):  # stopped before the folder goes
            dsn = asyncio.run(setup(site / "konstruct.toml"))
            gateway = spawn(site, env, "gateway")
            try:
                wait_log(site, "gateway", "Uvicorn running on")
                wait_ready(f"http://127.0.0.1:{port}/readyz", 1)
                rss = psutil.Process(gateway.pid)
                before_rss = rss.memory_info().rss
                webhook = (args.total - 1000) // 3
                per_route = {"slack": webhook, "whatsapp": webhook, "stripe": webhook, "login": 1000}
                half = {k: v // 2 for k, v in per_route.items()}
                base = f"http://127.0.0.1:{port}"
                rows_before = hostile.count_rows(dsn)
                unsigned = asyncio.run(hostile.send(base, hostile.batch(1, KEYS, per_route, signed=False), concurrency=args.concurrency))
                rows_unsigned = hostile.count_rows(dsn)
                signed = asyncio.run(
                    hostile.send(
                        base,
                        hostile.batch(2, KEYS, {k: v for k, v in half.items() if k != "login"}, signed=True),
                        concurrency=args.concurrency,
                        tally=unsigned,
                    )
                )
                after_rss = rss.memory_info().rss
                sent = sum(signed.statuses.values())
                print(f"requests sent: {sent} (transport errors: {dict(signed.errors) or 0})")
                for route, statuses in signed.by_route().items():
                    print(f"  {route:18} {sum(statuses.values()):6}  {statuses}")
                print(f"5xx responses: {signed.server_errors}")
                written = {t: rows_unsigned[t] - rows_before[t] for t in rows_before if rows_unsigned[t] != rows_before[t]}
                print(f"rows written by unauthenticated input: {sum(written.values())} {written or ''}")
                print(f"gateway RSS: {before_rss / 2**20:.1f} MiB before, {after_rss / 2**20:.1f} MiB after")
                print(f"/healthz during the run: {len(signed.health_ms)} probes, p50 {pct(signed.health_ms, 0.5):.1f} ms, "
                      f"p99 {pct(signed.health_ms, 0.99):.1f} ms, failures {signed.health_failures}")  # fmt: skip
                log = (site / "gateway.log").read_text(errors="replace")
                print(f"tracebacks in the gateway log: {log.count('Traceback')}")
            finally:
                gateway.send_signal(2)
                gateway.wait(60)
                llm.stop()


if __name__ == "__main__":
    main()
