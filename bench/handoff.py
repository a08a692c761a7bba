"""Human handoff latency on loopback: a customer's WhatsApp message → its mirror in the Slack desk thread, and a human's
reply in that thread → the Graph API send to the customer (issue 17).

Everything on loopback: `konstruct init` in a temporary folder (embedded PostgreSQL), a gateway and a worker process,
the fake Slack, the fake Graph API and the fake LLM from tests/fakes. One customer escalates (a rule fires), then
--samples signed WhatsApp webhooks are sent one at a time, each after the previous one's mirror was posted and the
desk channel's pacing slot (about one post a second per channel, Slack's limit) is free again; then --samples signed
Slack `message` events in the desk thread, one at a time. Each time runs from just before the POST to when the fake
received the Slack post (chat.postMessage) or the Graph send.

    python bench/handoff.py [--samples 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import cli, held_database, pct, spawn, wait_log, wait_ready  # noqa: E402
from tests.fakes import whatsapp as wa  # noqa: E402
from tests.fakes.llm import FakeLLM  # noqa: E402
from tests.fakes.slack import FakeSlack, sign  # noqa: E402
from tests.fakes.whatsapp import FakeGraph  # noqa: E402
from tests.helpers import cli_env, free_port  # noqa: E402

NUMBER, WA_TOKEN, WA_SECRET, PERSON = "106540352242922", "EAAG-bench-token-0001", "bench-app-secret", "15550009999"
TEAM, BOT_TOKEN, SIGNING, DESK, HUMAN = "T0BENCHDESK", "xoxb-bench-desk-0001", "bench-signing-secret", "C0BENCHDESK", "U0BENCHHUMAN"


def until(condition, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.001)
    raise SystemExit("timed out: see the gateway and worker logs in the temporary folder's copies")


def report(title: str, ms: list[float]) -> None:
    print(f"{title}: n={len(ms)} p50 {statistics.median(ms):.1f} ms, p95 {pct(ms, 0.95):.1f} ms, max {max(ms):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=30, help="messages measured in each direction")
    args = parser.parse_args()
    llm, graph, slack = FakeLLM().start(), FakeGraph().start(), FakeSlack().start()
    graph.add_number(NUMBER, WA_TOKEN)
    slack.add_token(BOT_TOKEN, team_id=TEAM, team="Bench", user_id="U0BENCHBOT")
    env = cli_env(
        BENCH_LLM_KEY="sk-bench", WA_TOKEN=WA_TOKEN, WA_SECRET=WA_SECRET, WA_VERIFY="bench-verify", SLACK_BOT=BOT_TOKEN,
        SLACK_SIGNING=SIGNING, KONSTRUCT_WHATSAPP__GRAPH_URL=graph.url, KONSTRUCT_WHATSAPP__RECIPIENT_INTERVAL="0",
        KONSTRUCT_SLACK__API_URL=slack.url,
    )  # fmt: skip
    setup = [
        ["tenant", "create", "Bench", "--slug", "bench"],
        ["agent", "create", "-t", "bench", "-n", "Ava", "-r", "Support", "--persona", "Brief."],
        ["agent", "update", "Ava", "-t", "bench", "--escalation-rule", "human"],
        ["channel", "connect", "whatsapp", "-t", "bench", "--phone-number-id", NUMBER, "--access-token-env", "WA_TOKEN",
         "--app-secret-env", "WA_SECRET", "--verify-token-env", "WA_VERIFY"],
        ["channel", "connect", "slack", "-t", "bench", "--bot-token-env", "SLACK_BOT", "--signing-secret-env", "SLACK_SIGNING"],
        ["tenant", "configure", "bench", "--escalation-target", f"slack:{DESK}"],
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="konstruct-bench-") as tmp:
        site, port = Path(tmp), free_port()
        cli(site, env, "init", "--llm-model", "openai/fake-model", "--llm-api-base", llm.url, "--llm-api-key-env", "BENCH_LLM_KEY",
            "--port", str(port))  # fmt: skip
        cli(site, env, "db", "upgrade")
        for command in setup:
            cli(site, env, *command)
        with held_database(site / ".konstruct"):  # the whole run; stopped before the folder goes
            gateway, worker = spawn(site, env, "gateway"), spawn(site, env, "worker")
            base = f"http://127.0.0.1:{port}"
            try:
                wait_log(site, "gateway", "Uvicorn running on")
                wait_ready(f"{base}/readyz", 1)
                wait_log(site, "worker", " ready: ")
                run(base, slack, graph, args.samples)
            finally:
                for proc in (gateway, worker):
                    proc.send_signal(2)
                for proc in (gateway, worker):
                    proc.wait(120)
                llm.stop()
                graph.stop()
                slack.stop()


def whatsapp(base: str, text: str) -> None:
    body = json.dumps(wa.webhook(NUMBER, messages=[wa.text(PERSON, text)], contacts=[wa.contact(PERSON, "Bench Person")])).encode()
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": wa.sign(body, WA_SECRET)}
    assert httpx.post(f"{base}/whatsapp/webhook", content=body, headers=headers, timeout=10).status_code == 200


def desk_event(base: str, thread: str, text: str) -> None:
    ts = f"{time.time():.6f}"
    event = {"type": "message", "user": HUMAN, "text": text, "ts": ts, "thread_ts": thread, "channel": DESK, "channel_type": "channel",
             "event_ts": ts}  # fmt: skip
    body = json.dumps({"team_id": TEAM, "event": event, "type": "event_callback", "event_id": f"Ev{uuid.uuid4().hex[:10]}"}).encode()
    assert httpx.post(f"{base}/slack/events", content=body, headers=sign(body, SIGNING), timeout=10).status_code == 200


def run(base: str, slack: FakeSlack, graph: FakeGraph, samples: int) -> None:
    whatsapp(base, "I need a human")
    card = until(lambda: [m for m in slack.messages_in(DESK) if m.get("metadata", {}).get("event_type") == "konstruct_desk"])[0]
    until(lambda: len(graph.messages_to(PERSON)) >= 1)  # the hand-over notice
    mirror_ms: list[float] = []
    for n in range(samples):
        text = f"customer message {n} {uuid.uuid4().hex[:6]}"
        time.sleep(1.1)  # the desk channel's pacing slot is free: the figure is the path, not Slack's rate limit
        started = time.monotonic()
        whatsapp(base, text)
        call = until(lambda text=text: [c for c in slack.calls_to("chat.postMessage") if text in str(c.args.get("text"))])[0]
        mirror_ms.append((call.at - started) * 1000)
    reply_ms: list[float] = []
    for n in range(samples):
        text = f"human reply {n} {uuid.uuid4().hex[:6]}"
        time.sleep(1.1)  # the status line of the previous reply is posted (paced) first
        started = time.time()
        desk_event(base, card["ts"], text)
        sent = until(lambda text=text: [s for s in graph.sent if s.body.get("text", {}).get("body") == text])[0]
        reply_ms.append((sent.at - started) * 1000)
    report("customer WhatsApp message -> mirror posted in the desk thread", mirror_ms)
    report("human reply in the desk thread -> Graph API send to the customer", reply_ms)
    assert len(graph.messages_to(PERSON)) == 1 + samples, "every human reply sent exactly once"
    mirrored = [
        m for m in slack.messages_in(DESK) if m.get("metadata", {}).get("event_payload", {}).get("marker", "").startswith("mirror:")
    ]
    print(f"mirrors in the thread: {len(mirrored)} for {samples} messages; replies sent: {len(graph.messages_to(PERSON)) - 1}")


if __name__ == "__main__":
    main()
