"""Slack gateway under load: signed app_mention events at a steady rate, then every one answered exactly once?

Everything on loopback: `konstruct init` in a temporary folder (embedded PostgreSQL), a gateway and a
worker process, the fake Slack Web API and the fake LLM from tests/fakes. Latency is measured from
each event's *scheduled* send time (so a slow gateway cannot hide behind a slow load generator).

    python bench/slack_events.py [--rate 200] [--seconds 30] [--channels 100] [--worker-nice 10]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.llm import FakeLLM  # noqa: E402
from tests.fakes.slack import FakeSlack  # noqa: E402
from tests.helpers import cli_env, free_port  # noqa: E402

TEAM, BOT_USER, SECRET, TOKEN = "T0BENCH0001", "U0BENCHBOT", "bench-signing-secret", "xoxb-bench-token-0001"


def cli(site: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "konstruct", *args], cwd=site, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"konstruct {' '.join(args)} failed: {result.stderr}")
    return result.stdout


def spawn(site: Path, env: dict[str, str], name: str, nice: int = 0) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "konstruct", name]
    if nice:
        argv = ["nice", "-n", str(nice), *argv]
    return subprocess.Popen(argv, cwd=site, env=env, stdout=open(site / f"{name}.log", "wb"), stderr=subprocess.STDOUT)


def wait_log(site: Path, name: str, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in (site / f"{name}.log").read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise SystemExit(f"{name} did not log {text!r}:\n{(site / f'{name}.log').read_text()}")


def wait_ready(url: str, processes: int, timeout: float = 60) -> None:
    """Every gateway process answers /readyz (several in a row, since each connection may land on another)."""
    deadline, streak = time.monotonic() + timeout, 0
    while time.monotonic() < deadline and streak < 10 * processes:
        try:
            streak = streak + 1 if httpx.get(url, timeout=2).status_code == 200 else 0
        except httpx.HTTPError:
            streak = 0
            time.sleep(0.2)
    if streak < 10 * processes:
        raise SystemExit(f"the gateway at {url} did not become ready")


def signed(event_id: str, channel: str, ts: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(
        {
            "team_id": TEAM,
            "api_app_id": "A0BENCH",
            "type": "event_callback",
            "event_id": event_id,
            "event_time": int(time.time()),
            "event": {
                "type": "app_mention",
                "user": "U0PERSON01",
                "text": f"<@{BOT_USER}> question {event_id}",
                "ts": ts,
                "channel": channel,
                "event_ts": ts,
            },
        }
    ).encode()
    stamp = str(int(time.time()))
    signature = "v0=" + hmac.new(SECRET.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    return body, {"Content-Type": "application/json", "X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": signature}


async def load(url: str, rate: float, seconds: float, channels: int) -> tuple[list[float], dict[int, int], int, float]:
    """Send at a steady rate from one process. aiohttp: the load generator shares the 2 cores with the gateway."""
    total = int(rate * seconds)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    kinds: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as client:

        async def one(n: int, due: float) -> None:
            nonlocal errors
            body, headers = signed(f"Ev{n:08d}", f"C{n % channels:08d}", f"{1_800_000_000 + n}.000100")
            try:
                async with client.post(url, data=body, headers=headers) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors += 1
                kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
            latencies.append(time.perf_counter() - due)

        start = time.perf_counter() + 0.2
        tasks = []
        for n in range(total):
            due = start + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n, due)))
        await asyncio.gather(*tasks)
        took = time.perf_counter() - start
    if kinds:
        print(f"transport errors by kind: {kinds}")
    return latencies, statuses, errors, took


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to send")
    parser.add_argument("--channels", type=int, default=100, help="Slack channels the events spread over")
    parser.add_argument("--worker-nice", type=int, default=10, help="nice level of the worker (the gateway's ack comes first)")
    parser.add_argument("--gateway-workers", type=int, default=2, help="gateway processes (gateway.workers)")
    parser.add_argument(
        "--worker",
        choices=["during", "after"],
        default="during",
        help="run the worker during the load (all on these 2 cores) or start it when the load ends (as on separate machines)",
    )
    parser.add_argument("--drain-timeout", type=float, default=900.0, help="seconds to wait for every event to be answered")
    args = parser.parse_args()

    llm, slack = FakeLLM().start(), FakeSlack().start()
    slack.add_token(TOKEN, team_id=TEAM, team="Bench", user_id=BOT_USER)
    with tempfile.TemporaryDirectory(prefix="konstruct-slack-bench-") as tmp:
        site = Path(tmp)
        port = free_port()
        env = cli_env(BENCH_LLM_KEY="sk-bench", BENCH_BOT=TOKEN, BENCH_SIGNING=SECRET, KONSTRUCT_SLACK__API_URL=slack.url,
                      KONSTRUCT_GATEWAY__WORKERS=str(args.gateway_workers))  # fmt: skip
        cli(
            site,
            env,
            "init",
            "--llm-model",
            "openai/fake-model",
            "--llm-api-base",
            llm.url,
            "--llm-api-key-env",
            "BENCH_LLM_KEY",
            "--port",
            str(port),
        )
        cli(site, env, "db", "upgrade")
        cli(site, env, "tenant", "create", "Bench", "--slug", "bench")
        cli(site, env, "agent", "create", "-t", "bench", "-n", "Ava", "-r", "Support", "--persona", "Brief.")
        cli(
            site, env, "channel", "connect", "slack", "-t", "bench", "--bot-token-env", "BENCH_BOT", "--signing-secret-env", "BENCH_SIGNING"
        )
        from konstruct.db.embedded import start_embedded  # hold the embedded server for the whole run

        start_embedded(site / ".konstruct")
        gateway = spawn(site, env, "gateway")
        worker = spawn(site, env, "worker", nice=args.worker_nice) if args.worker == "during" else None
        try:
            wait_log(site, "gateway", "Uvicorn running on")
            wait_ready(f"http://127.0.0.1:{port}/readyz", args.gateway_workers)
            if worker is not None:
                wait_log(site, "worker", " ready: ")
            print(
                f"machine: {os.cpu_count()} cores; {args.rate:g} events/s for {args.seconds:g} s over {args.channels} channels; "
                f"{args.gateway_workers} gateway process(es); worker {args.worker} the load (nice {args.worker_nice})"
            )
            latencies, statuses, errors, took = asyncio.run(
                load(f"http://127.0.0.1:{port}/slack/events", args.rate, args.seconds, args.channels)
            )
            sent = len(latencies)
            ms = [x * 1000 for x in latencies]
            print(
                f"\nsent {sent} events in {took:.1f} s ({sent / took:.1f}/s); statuses {dict(sorted(statuses.items()))}; transport errors {errors}"
            )
            print(
                f"time to HTTP 200: p50 {statistics.median(ms):.1f} ms, p95 {pct(ms, 0.95):.1f} ms, p99 {pct(ms, 0.99):.1f} ms, max {max(ms):.1f} ms"
            )

            if worker is None:
                worker = spawn(site, env, "worker", nice=args.worker_nice)
            started = time.perf_counter()
            deadline = started + args.drain_timeout
            answered: set[str] = set()
            while time.perf_counter() < deadline:
                updates = [c for c in slack.calls_to("chat.update") if not c.rate_limited]
                answered = {c.args["ts"] for c in updates}
                if len(updates) >= sent:
                    break
                time.sleep(1)
            drain = time.perf_counter() - started
            updates = [c for c in slack.calls_to("chat.update") if not c.rate_limited]
            questions = [r.body["messages"][-1]["content"] for r in llm.requests]
            print(f"\nafter the load: {len(updates)} answers delivered ({len(answered)} distinct placeholders) in {drain:.0f} s more")
            print(f"LLM calls {len(questions)} for {len(set(questions))} distinct questions; events sent {sent}")
            exactly_once = len(updates) == sent == len(answered) == len(questions) == len(set(questions))
            print(f"every event answered exactly once: {'yes' if exactly_once else 'NO'}")
        finally:
            for name in ("gateway", "worker"):  # kept for a look after the temporary folder is gone
                if (site / f"{name}.log").exists():
                    (Path(tempfile.gettempdir()) / f"konstruct-bench-{name}.log").write_bytes((site / f"{name}.log").read_bytes())
            running = [p for p in (gateway, worker) if p is not None]
            for proc in running:
                proc.send_signal(2)
            for proc in running:
                proc.wait(120)
    llm.stop()
    slack.stop()


if __name__ == "__main__":
    main()
