"""Streamed Slack answers: how soon the person sees text, next to how soon the whole answer is there.

Everything on loopback: `konstruct init` in a temporary folder (embedded PostgreSQL), a gateway and a worker, the
fake Slack Web API and the fake LLM streaming at a fixed token rate. Signed DM-thread messages are sent one after
another; for each, measured from the event's POST: the first text in Slack (chat.startStream) and the full answer
(chat.stopStream). Then the same with streaming off (slack.stream = false: the thread's status, then the answer
posted whole), where the first text *is* the full answer and the fake LLM takes as long to answer as it takes to stream. The first message of
each mode warms the worker up (litellm's import, connections) and is not counted.

    python bench/slack_stream.py [--messages 20] [--tokens-per-second 30] [--words 60]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import cli, held_database, pct, spawn, wait_log  # noqa: E402
from tests.fakes.llm import FakeLLM  # noqa: E402
from tests.fakes.slack import FakeSlack  # noqa: E402
from tests.helpers import cli_env, free_port  # noqa: E402

TEAM, BOT_USER, SECRET, TOKEN = "T0STREAM001", "U0STREAMBOT", "bench-signing-secret", "xoxb-bench-stream-0001"
DM = "D0STREAM001"


def signed(n: int, words: int) -> tuple[bytes, dict[str, str], str]:
    ts = f"{1_800_000_000 + n}.000100"
    text = f"question {n}: " + " ".join(f"w{i}" for i in range(words))
    event = {"type": "message", "user": "U0PERSON01", "text": text, "ts": ts, "thread_ts": ts, "channel": DM, "channel_type": "im",
             "event_ts": ts}  # fmt: skip
    body = json.dumps({"team_id": TEAM, "api_app_id": "A0BENCH", "type": "event_callback", "event_id": f"Ev{n:08d}",
                       "event_time": int(time.time()), "event": event}).encode()  # fmt: skip
    stamp = str(int(time.time()))
    signature = "v0=" + hmac.new(SECRET.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    return body, {"Content-Type": "application/json", "X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": signature}, ts


def first_call(slack: FakeSlack, methods: tuple[str, ...], match: Any) -> float | None:
    for method in methods:
        for call in slack.calls_to(method):
            if not call.rate_limited and match(call.args):
                return call.at
    return None


def measure(base: str, slack: FakeSlack, args: argparse.Namespace, offset: int, streamed: bool) -> tuple[list[float], list[float], int]:
    """(ms to first text, ms to the full answer, appends) for each message, sent one after another."""
    first_ms, full_ms, appends = [], [], 0
    for n in range(offset, offset + args.messages + 1):
        body, headers, thread = signed(n, args.words)
        sent = time.monotonic()
        assert httpx.post(f"{base}/slack/events", content=body, headers=headers, timeout=10).status_code == 200
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if streamed:
                start = first_call(slack, ("chat.startStream",), lambda a, t=thread: a.get("thread_ts") == t)
                ts = next(
                    (s for (c, s), m in list(slack.messages.items()) if c == DM and m.get("thread_ts") == thread and m.get("bot_id")), None
                )
                stop = first_call(slack, ("chat.stopStream",), lambda a, s=ts: a.get("ts") == s) if ts else None
                if start is not None and stop is not None:
                    first_ms.append((start - sent) * 1000)
                    full_ms.append((stop - sent) * 1000)
                    appends += sum(1 for c in slack.calls_to("chat.appendStream") if c.args.get("ts") == ts)
                    break
            else:  # the thread's status shows the agent at work, then the answer is posted whole
                done = first_call(slack, ("chat.postMessage",), lambda a, t=thread: a.get("thread_ts") == t)
                if done is not None:
                    first_ms.append((done - sent) * 1000)
                    full_ms.append((done - sent) * 1000)
                    break
            time.sleep(0.01)
        else:
            raise SystemExit(f"message {n} was not answered within 120 s")
        if n == offset:  # the warm-up
            first_ms, full_ms, appends = [], [], 0
    return first_ms, full_ms, appends


def report(label: str, first: list[float], full: list[float]) -> None:
    first, full = sorted(first), sorted(full)
    print(f"  {label}: first text p50 {pct(first, 0.5):.0f} ms, p95 {pct(first, 0.95):.0f} ms;"
          f" full answer p50 {pct(full, 0.5):.0f} ms, p95 {pct(full, 0.95):.0f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20, help="DM-thread messages, sent one after another, per mode")
    parser.add_argument("--tokens-per-second", type=float, default=30.0, help="the fake LLM's streaming rate")
    parser.add_argument("--words", type=int, default=60, help="words in each question (the fake answer echoes them)")
    args = parser.parse_args()

    llm, slack = FakeLLM(stream_delay=1 / args.tokens_per_second).start(), FakeSlack().start()
    slack.add_token(TOKEN, team_id=TEAM, team="Bench", user_id=BOT_USER)
    env = cli_env(BENCH_LLM_KEY="sk-bench", BENCH_BOT=TOKEN, BENCH_SIGNING=SECRET, KONSTRUCT_SLACK__API_URL=slack.url)
    port = free_port()
    try:
        with tempfile.TemporaryDirectory(prefix="konstruct-bench-") as tmp:
            site = Path(tmp)
            cli(site, env, "init", "--llm-model", "openai/fake-model", "--llm-api-base", llm.url, "--llm-api-key-env", "BENCH_LLM_KEY",
                "--port", str(port))  # fmt: skip
            cli(site, env, "db", "upgrade")
            cli(site, env, "tenant", "create", "Bench", "--slug", "bench")
            cli(site, env, "agent", "create", "-t", "bench", "-n", "Ava", "-r", "Support", "--persona", "Brief.")
            cli(
                site,
                env,
                "channel",
                "connect",
                "slack",
                "-t",
                "bench",
                "--bot-token-env",
                "BENCH_BOT",
                "--signing-secret-env",
                "BENCH_SIGNING",
            )
            with held_database(site / ".konstruct"):  # the whole run; stopped before the folder goes
                gateway = spawn(site, env, "gateway")
                processes = [gateway]
                try:
                    wait_log(site, "gateway", "Uvicorn running on")
                    answer_tokens = args.words + 5
                    print(f"machine: {os.cpu_count()} cores; fake LLM streaming {args.tokens_per_second:g} tokens/s, answers of "
                          f"~{answer_tokens} tokens (~{answer_tokens / args.tokens_per_second:.1f} s to write); {args.messages} messages a mode")  # fmt: skip
                    results = {}
                    for streamed in (True, False):
                        llm.delay = 0.0 if streamed else answer_tokens / args.tokens_per_second  # the same model, not streamed
                        worker_env = {**env, "KONSTRUCT_SLACK__STREAM": "true" if streamed else "false"}
                        worker = spawn(site, worker_env, "worker")
                        processes.append(worker)
                        wait_log(site, "worker", " ready: ")
                        results[streamed] = measure(f"http://127.0.0.1:{port}", slack, args, 0 if streamed else 10_000, streamed)
                        worker.send_signal(2)
                        worker.wait(60)
                        processes.remove(worker)
                        (site / "worker.log").unlink()
                    print("\nmeasured (from each event's POST):")
                    first, full, appends = results[True]
                    report("streamed (startStream → stopStream)", first, full)
                    print(f"    {appends / args.messages:.1f} appendStream calls per answer (bounded by slack.stream_interval)")
                    first, full, _ = results[False]
                    report("not streamed (status, then the answer posted)", first, full)
                finally:
                    for proc in processes:
                        proc.send_signal(2)
                    for proc in processes:
                        proc.wait(60)
    finally:
        llm.stop()
        slack.stop()


if __name__ == "__main__":
    main()
