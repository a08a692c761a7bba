"""Slack gateway under load: signed app_mention events at a steady rate, then every one answered exactly once?

Everything on loopback: `konstruct init` in a temporary folder (embedded PostgreSQL), a gateway and a
worker process, the fake Slack Web API and the fake LLM from tests/fakes. Latency is measured from
each event's *scheduled* send time (so a slow gateway cannot hide behind a slow load generator).

    python bench/slack_events.py [--rate 200] [--seconds 30] [--warmup 0] [--channels 100] [--worker during|after]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import Bench, add_load_arguments  # noqa: E402
from tests.fakes.llm import FakeLLM  # noqa: E402
from tests.fakes.slack import FakeSlack  # noqa: E402
from tests.helpers import cli_env  # noqa: E402

TEAM, BOT_USER, SECRET, TOKEN = "T0BENCH0001", "U0BENCHBOT", "bench-signing-secret", "xoxb-bench-token-0001"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser, "events")
    parser.add_argument("--channels", type=int, default=100, help="Slack channels the events spread over")
    args = parser.parse_args()

    llm, slack = FakeLLM().start(), FakeSlack().start()
    slack.add_token(TOKEN, team_id=TEAM, team="Bench", user_id=BOT_USER)
    env = cli_env(BENCH_LLM_KEY="sk-bench", BENCH_BOT=TOKEN, BENCH_SIGNING=SECRET, KONSTRUCT_SLACK__API_URL=slack.url)
    setup = [
        ["tenant", "create", "Bench", "--slug", "bench"],
        ["agent", "create", "-t", "bench", "-n", "Ava", "-r", "Support", "--persona", "Brief."],
        ["channel", "connect", "slack", "-t", "bench", "--bot-token-env", "BENCH_BOT", "--signing-secret-env", "BENCH_SIGNING"],
    ]

    def request(n: int) -> tuple[bytes, dict[str, str]]:
        return signed(f"Ev{n:08d}", f"C{n % args.channels:08d}", f"{1_800_000_000 + n}.000100")

    def updates() -> list[Any]:
        return [c for c in slack.calls_to("chat.update") if not c.rate_limited]

    def exactly_once(sent: int) -> bool:
        questions = [r.body["messages"][-1]["content"] for r in llm.requests]
        placeholders = {c.args["ts"] for c in updates()}
        print(
            f"LLM calls {len(questions)} for {len(set(questions))} distinct questions; {len(placeholders)} distinct placeholders replaced"
        )
        return len(updates()) == sent == len(placeholders) == len(questions) == len(set(questions))

    try:
        Bench(args, env, llm.url, setup, "/slack/events").run(request, lambda: len(updates()), exactly_once)
    finally:
        llm.stop()
        slack.stop()


if __name__ == "__main__":
    main()
