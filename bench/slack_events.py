"""Slack gateway under load: signed app_mention events at a steady rate, then every one answered exactly once?

Everything on loopback: `konstruct init` in a temporary folder (embedded PostgreSQL), a gateway and a
worker process, the fake Slack Web API and the fake LLM from tests/fakes. Latency is measured from
each event's *scheduled* send time (so a slow gateway cannot hide behind a slow load generator).

    python bench/slack_events.py [--rate 200] [--seconds 30] [--warmup 0] [--channels 100] [--worker during|after]
    python bench/slack_events.py --socket-mode [--rate 200] [--seconds 30] [--channels 100]

With --socket-mode the same events arrive as Socket Mode envelopes over the websocket a gateway holds to the fake
Slack; latency is the time to each envelope's ack (sent only once the event is stored), and events/s what was acked.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import Bench, add_load_arguments, cli, drain_answers, held_database, load, pct, spawn, wait_log, wait_ready  # noqa: E402
from tests.fakes.llm import FakeLLM  # noqa: E402
from tests.fakes.slack import FakeSlack  # noqa: E402
from tests.helpers import cli_env, free_port  # noqa: E402

TEAM, BOT_USER, SECRET, TOKEN = "T0BENCH0001", "U0BENCHBOT", "bench-signing-secret", "xoxb-bench-token-0001"
APP_TOKEN = "xapp-1-A0BENCH-bench-app-token"


def event(event_id: str, channel: str, ts: str) -> dict[str, Any]:
    return {
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


def signed(event_id: str, channel: str, ts: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(event(event_id, channel, ts)).encode()
    stamp = str(int(time.time()))
    signature = "v0=" + hmac.new(SECRET.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    return body, {"Content-Type": "application/json", "X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": signature}


def run_socket_mode(args: argparse.Namespace, env: dict[str, str], llm_url: str, setup: list[list[str]], slack: FakeSlack,
                    answered: Callable[[], int], check: Callable[[int], bool]) -> None:  # fmt: skip
    """The same site, but the events go over the websocket the gateway holds; measured to each ack."""
    assert slack.socket is not None
    env = {**env, "KONSTRUCT_GATEWAY__WORKERS": str(args.gateway_workers)}
    with tempfile.TemporaryDirectory(prefix="konstruct-bench-") as tmp:
        site = Path(tmp)
        init = ["init", "--llm-model", "openai/fake-model", "--llm-api-base", llm_url, "--llm-api-key-env", "BENCH_LLM_KEY"]
        cli(site, env, *init, "--port", str(free_port()))
        cli(site, env, "db", "upgrade")
        for command in setup:
            cli(site, env, *command)
        with held_database(site / ".konstruct"):  # the whole run; stopped before the folder goes
            gateway = spawn(site, env, "gateway")
            worker = spawn(site, env, "worker", nice=args.worker_nice) if args.worker == "during" else None
            try:
                wait_log(site, "gateway", "Socket Mode: holding")
                deadline = time.monotonic() + 30
                while not slack.socket.open_connections(APP_TOKEN) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if worker is not None:
                    wait_log(site, "worker", " ready: ")
                print(f"machine: {os.cpu_count()} cores; Socket Mode, {args.rate:g}/s for {args.seconds:g} s; "
                      f"{args.gateway_workers} gateway process(es), one holds the socket; worker {args.worker} the load")  # fmt: skip
                count = int(args.rate * args.seconds)
                payloads = [event(f"Ev{n:08d}", f"C{n % args.channels:08d}", f"{1_800_000_000 + n}.000100") for n in range(count)]
                sent = slack.socket.send_events_at(APP_TOKEN, payloads, args.rate)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not all(slack.socket.acked(e) for e, _ in sent):
                    time.sleep(0.2)
                acks = {e: slack.socket.acked(e) for e, _ in sent}
                latencies = [acks[e][0].at - due for e, due in sent if acks[e]]
                took = max(a[0].at for a in acks.values() if a) - sent[0][1]
                ms = sorted(x * 1000 for x in latencies)
                print(f"\nmeasured: sent {count}, acked {len(ms)} ({sum(len(a) > 1 for a in acks.values())} acked twice) in {took:.1f} s: "
                      f"{len(ms) / took:.1f} events/s")  # fmt: skip
                print(f"  time to ack (stored first): p50 {pct(ms, 0.5):.1f} ms, p95 {pct(ms, 0.95):.1f} ms, p99 {pct(ms, 0.99):.1f} ms, "
                      f"max {ms[-1]:.1f} ms")  # fmt: skip
                worker = drain_answers(site, env, args, worker, count, answered, check)
            finally:
                running = [p for p in (gateway, worker) if p is not None]
                for proc in running:
                    proc.send_signal(2)
                for proc in running:
                    proc.wait(120)


def knee(args: argparse.Namespace, env: dict[str, str], llm_url: str, setup: list[list[str]], request: Callable[[int], Any]) -> None:
    """Ingest alone at rising rates (a fresh site each): where the p99 passes 100 ms is the sustained capacity."""
    rows = []
    for rate in [float(r) for r in args.knee.split(",")]:
        args.rate = rate
        result = Bench(args, env, llm_url, setup, "/slack/events").run(request, lambda: 0, lambda _: False, drain=False)
        result.report(f"at {rate:g}/s")
        rows.append((rate, len(result.latencies) / result.took, pct([x * 1000 for x in result.latencies], 0.99)))
    print("\nrate (sent/s)  achieved/s  p99 ms")
    for rate, achieved, p99 in rows:
        print(f"{rate:13g}  {achieved:10.1f}  {p99:6.1f}")
    under = [rate for rate, _, p99 in rows if p99 < 100]
    print(f"knee: {max(under):g}/s is the highest rate with p99 under 100 ms" if under else "knee: below every rate tried")


def anchor(args: argparse.Namespace, request: Callable[[int], Any]) -> None:
    """Bare slack-bolt on Starlette (bench/bare_bolt.py: verify, ack, store nothing), under the same load first."""
    port = free_port()
    env = {**os.environ, "BENCH_SIGNING": SECRET}
    argv = [sys.executable, "-m", "uvicorn", "bench.bare_bolt:app", "--port", str(port), "--workers", str(args.gateway_workers),
            "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(argv, cwd=ROOT, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/slack/events", args.gateway_workers, ok=(405,))  # up: a GET is refused
        result = asyncio.run(load(f"http://127.0.0.1:{port}/slack/events", args.rate, [args.seconds], request))[0]
        result.report(f"anchor: bare slack-bolt on Starlette, {args.gateway_workers} uvicorn process(es), storing nothing")
    finally:
        server.send_signal(2)
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser, "events")
    parser.add_argument("--channels", type=int, default=100, help="Slack channels the events spread over")
    parser.add_argument("--socket-mode", action="store_true", help="send the events over Socket Mode instead (no --warmup)")
    parser.add_argument("--no-anchor", action="store_true", help="skip the anchor run (bare slack-bolt under the same load)")
    parser.add_argument("--knee", metavar="RATES", help="comma-separated rates, each its own run of --seconds with no worker: "
                        "print the highest rate whose p99 stays under 100 ms")  # fmt: skip
    args = parser.parse_args()

    llm, slack = FakeLLM().start(), FakeSlack().start()
    slack.add_token(TOKEN, team_id=TEAM, team="Bench", user_id=BOT_USER)
    env = cli_env(BENCH_LLM_KEY="sk-bench", BENCH_BOT=TOKEN, BENCH_SIGNING=SECRET, KONSTRUCT_SLACK__API_URL=slack.url)
    connect = ["channel", "connect", "slack", "-t", "bench", "--bot-token-env", "BENCH_BOT", "--signing-secret-env", "BENCH_SIGNING"]
    if args.socket_mode:
        slack.start_socket_mode()
        slack.add_app_token(APP_TOKEN, team_id=TEAM)
        env["BENCH_APP"] = APP_TOKEN
        connect += ["--app-token-env", "BENCH_APP"]
    setup = [
        ["tenant", "create", "Bench", "--slug", "bench"],
        ["agent", "create", "-t", "bench", "-n", "Ava", "-r", "Support", "--persona", "Brief."],
        connect,
    ]

    def request(n: int) -> tuple[bytes, dict[str, str]]:
        return signed(f"Ev{n:08d}", f"C{n % args.channels:08d}", f"{1_800_000_000 + n}.000100")

    def finished() -> list[Any]:
        """The calls that finished an answer: a stopped stream (a channel mention's answer is streamed into its thread)
        or, where there was no stream, the placeholder replaced."""
        return [c for method in ("chat.stopStream", "chat.update") for c in slack.calls_to(method) if not c.rate_limited]

    def exactly_once(sent: int) -> bool:
        questions = [q for r in llm.requests if "question Ev" in (q := str(r.body["messages"][-1]["content"]))]  # not init's check
        answers = {(c.args.get("channel"), c.args.get("ts")) for c in finished()}
        print(f"LLM calls {len(questions)} for {len(set(questions))} distinct questions; {len(answers)} distinct answers finished")
        return len(finished()) == sent == len(answers) == len(questions) == len(set(questions))

    try:
        if args.knee:
            knee(args, env, llm.url, setup, request)
        elif args.socket_mode:
            run_socket_mode(args, env, llm.url, setup, slack, lambda: len(finished()), exactly_once)
        else:
            if not args.no_anchor:
                anchor(args, request)
            Bench(args, env, llm.url, setup, "/slack/events").run(request, lambda: len(finished()), exactly_once)
    finally:
        llm.stop()
        slack.stop()


if __name__ == "__main__":
    main()
