"""Chaos at scale: `konstruct up` on its own embedded PostgreSQL while signed Slack events (delivered again as Slack
does when they get no 200) and terminal chats stream in, the worker SIGKILLed over and over and the database
SIGKILLed a few times. Prints what came out: sent, answered once, unanswered, answered twice, stray placeholders,
failed messages, and the longest recovery after a database kill. Target: 0 / 0 / 0 and recovery under 10 s.

The same driver as tests/test_crash_safety.py (tests/chaos.py), with more of everything.

    python bench/chaos.py [--events 500] [--rate 5] [--chats 20] [--worker-kills 100] [--database-kills 3] [--delay 0.3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos import Chaos  # noqa: E402
from tests.fakes.llm import FakeLLM  # noqa: E402
from tests.fakes.slack import FakeSlack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=500, help="Slack events to send (default 500)")
    parser.add_argument("--rate", type=float, default=5.0, help="events per second (default 5)")
    parser.add_argument("--chats", type=int, default=20, help="terminal chats spread over the run (default 20)")
    parser.add_argument("--worker-kills", type=int, default=100, help="SIGKILLs of the running worker (default 100)")
    parser.add_argument("--database-kills", type=int, default=3, help="SIGKILLs of the embedded PostgreSQL (default 3)")
    parser.add_argument("--delay", type=float, default=0.3, help="seconds the fake LLM takes per answer (default 0.3)")
    args = parser.parse_args()

    llm, slack = FakeLLM().start(), FakeSlack().start()
    slack.retry_after = 0
    root = Path(tempfile.mkdtemp(prefix="konstruct-chaos-"))
    print(f"chaos in {root}: {args.events} events at {args.rate:g}/s, {args.chats} chats, "
          f"{args.worker_kills} worker kills, {args.database_kills} database kills, LLM {args.delay:g}s per answer", flush=True)  # fmt: skip
    started = time.monotonic()
    try:
        with Chaos(root, llm, slack) as chaos:
            llm.delay = args.delay
            chaos.run(
                events=args.events,
                rate=args.rate,
                chats=args.chats,
                worker_kills=args.worker_kills,
                database_kills=args.database_kills,
                on_tick=lambda line: print(line, flush=True) if "database" in line else None,
            )
            print(f"load done after {time.monotonic() - started:.1f}s; waiting for every answer", flush=True)
            report = chaos.report(settle=300)
    finally:
        llm.stop()
        slack.stop()
    print()
    for line in report.lines():
        print(line)
    for problem in (report.unanswered + report.answered_twice)[:20]:
        print("  ", problem)
    ok = not report.unanswered and not report.answered_twice and not report.stray_placeholders and report.up_alive
    print(f"\n{'PASS' if ok and max(report.recoveries, default=0) < 10 else 'MISS'}: target 0 unanswered / 0 twice / "
          "0 stray placeholders, recovery under 10 s")  # fmt: skip


if __name__ == "__main__":
    main()
