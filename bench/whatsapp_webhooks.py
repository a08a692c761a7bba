"""WhatsApp gateway under load: signed message webhooks at a steady rate, then every one answered exactly once?

Everything on loopback: `konstruct init` in a temporary folder (embedded PostgreSQL), a gateway and a
worker process, the fake Graph API and the fake LLM from tests/fakes. Each webhook is Meta's real
shape (one text message from one of --people senders, a fresh wamid), signed with X-Hub-Signature-256.
Latency is measured from each webhook's *scheduled* send time.

    python bench/whatsapp_webhooks.py [--rate 200] [--seconds 30] [--warmup 0] [--people 1000] [--worker during|after]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import Bench, add_load_arguments  # noqa: E402
from tests.fakes import whatsapp as wa  # noqa: E402
from tests.fakes.llm import FakeLLM  # noqa: E402
from tests.fakes.whatsapp import FakeGraph  # noqa: E402
from tests.helpers import cli_env  # noqa: E402

NUMBER, TOKEN, APP_SECRET, VERIFY = "106540352242922", "EAAG-bench-token-0001", "bench-app-secret", "bench-verify"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser, "webhooks")
    parser.add_argument("--people", type=int, default=1000, help="distinct WhatsApp senders the messages come from")
    args = parser.parse_args()

    llm, graph = FakeLLM().start(), FakeGraph().start()
    graph.add_number(NUMBER, TOKEN)
    env = cli_env(
        BENCH_LLM_KEY="sk-bench", WA_TOKEN=TOKEN, WA_SECRET=APP_SECRET, WA_VERIFY=VERIFY,
        KONSTRUCT_WHATSAPP__GRAPH_URL=graph.url, KONSTRUCT_WHATSAPP__RECIPIENT_INTERVAL="1",
    )  # fmt: skip
    setup = [
        ["tenant", "create", "Bench", "--slug", "bench"],
        ["agent", "create", "-t", "bench", "-n", "Ava", "-r", "Support", "--persona", "Brief."],
        ["channel", "connect", "whatsapp", "-t", "bench", "--phone-number-id", NUMBER, "--access-token-env", "WA_TOKEN",
         "--app-secret-env", "WA_SECRET", "--verify-token-env", "WA_VERIFY"],
    ]  # fmt: skip

    def request(n: int) -> tuple[bytes, dict[str, str]]:
        person = f"1555{n % args.people:07d}"
        message = wa.text(person, f"question {n}", wamid=f"wamid.BENCH{n:010d}")
        body = json.dumps(wa.webhook(NUMBER, messages=[message], contacts=[wa.contact(person, f"Person {n % args.people}")])).encode()
        return body, {"Content-Type": "application/json", "X-Hub-Signature-256": wa.sign(body, APP_SECRET)}

    def replies() -> int:
        return len([s for s in graph.sent if s.kind == "text"])

    def exactly_once(sent: int) -> bool:
        questions = [r.body["messages"][-1]["content"] for r in llm.requests]
        receipts = graph.read_receipts()
        print(f"LLM calls {len(questions)} for {len(set(questions))} distinct questions; {len(set(receipts))} messages marked read")
        return replies() == sent == len(questions) == len(set(questions)) == len(set(receipts))

    try:
        Bench(args, env, llm.url, setup, "/whatsapp/webhook").run(request, replies, exactly_once)
    finally:
        llm.stop()
        graph.stop()


if __name__ == "__main__":
    main()
