"""Scale-out on one machine: the Redis queue, several gateway processes and several workers. Every Slack event answered
exactly once? And the CPU each part spends per message, for sizing a fleet.

Everything on loopback: `konstruct init` in a temporary folder (embedded PostgreSQL), a private redis-server on a free
port as the queue (`queue.url`), `konstruct gateway` with --gateway-workers processes, --workers `konstruct worker`
processes (the first one schedules the periodic tasks, the others run with --no-periodic), the fake Slack Web API and
the fake LLM from tests/fakes. Signed app_mention events arrive at a steady rate; once every one is answered (its answer
streamed into its thread and the stream stopped), the CPU time (user + system, from /proc through psutil, of each
process and of the children it reaped) that the gateway, the workers, PostgreSQL and Redis used from the first measured
event to the last answer is divided by the events. Exactly once: one LLM call per distinct question, per event one
placeholder, one stream and one finished answer, nothing twice; and in the fake Slack at the end every event's answer
in exactly one message, no placeholder left.

    python bench/scale_out.py [--rate 100] [--seconds 20] [--warmup 2] [--workers 3] [--gateway-workers 2]
                              [--channels 100] [--llm-delay 0] [--kill-worker]

With --kill-worker one of the --no-periodic workers is SIGKILLed halfway through the load (after its CPU time so far
is read): what it had claimed, or taken from Redis and not claimed yet, is re-queued by the first worker's sweeper
(`worker.stale_after`, `worker.received_grace`: 30 s), and every event must still be answered once in Slack (an LLM
call it had made may be made again, and an answer it had finished replaced by the same: neither is a second answer).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import Part, cli, load, pct, spawn, wait_log, wait_ready  # noqa: E402
from bench.slack_events import BOT_USER, SECRET, TEAM, TOKEN, signed  # noqa: E402
from tests.fakes.llm import FakeLLM  # noqa: E402
from tests.fakes.slack import FakeSlack  # noqa: E402
from tests.helpers import cli_env, free_port  # noqa: E402

EVENT_ID = re.compile(r"Ev\d{8}")


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)]
    with (folder / "redis.log").open("wb") as log:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"redis-server did not listen on {port}:\n{(folder / 'redis.log').read_text()}")


def settle(parts: list[Part], quiet: float = 0.1, timeout: float = 60) -> None:
    """Until the parts together use under `quiet` of a core for a second (the workers' warm-up thread is done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for part in parts:
            part.mark()
        time.sleep(1)
        if sum(part.since_mark() for part in parts) < quiet:
            return
    print(f"(the processes did not settle within {timeout:g} s; measuring anyway)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0, help="events per second (default 100)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to send, measured (default 20)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load at the same rate first, answered and not measured")
    parser.add_argument("--workers", type=int, default=3, help="`konstruct worker` processes (default 3)")
    parser.add_argument("--gateway-workers", type=int, default=2, help="gateway processes (gateway.workers, default 2)")
    parser.add_argument("--worker-nice", type=int, default=10, help="nice level of the workers (the gateway's ack comes first)")
    parser.add_argument("--channels", type=int, default=100, help="Slack channels the events spread over")
    parser.add_argument("--llm-delay", type=float, default=0.0, help="seconds the fake LLM takes per answer (default 0)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measured before the load (0: none)")
    parser.add_argument("--kill-worker", action="store_true", help="SIGKILL one --no-periodic worker halfway through the load")
    parser.add_argument("--drain-timeout", type=float, default=600.0, help="seconds to wait for every event to be answered")
    args = parser.parse_args()
    if args.kill_worker and args.workers < 2:
        parser.error("--kill-worker needs --workers 2 or more (the first one runs the sweeper)")

    llm, slack = FakeLLM(delay=args.llm_delay).start(), FakeSlack().start()
    slack.add_token(TOKEN, team_id=TEAM, team="Bench", user_id=BOT_USER)
    env = cli_env(
        BENCH_LLM_KEY="sk-bench",
        BENCH_BOT=TOKEN,
        BENCH_SIGNING=SECRET,
        KONSTRUCT_SLACK__API_URL=slack.url,
        KONSTRUCT_GATEWAY__WORKERS=str(args.gateway_workers),
    )
    sent_at: dict[int, float] = {}  # event number -> when it was sent (time.monotonic, as the fake Slack's Call.at)
    offset = 0  # event numbers of the measured load follow the warm-up's
    # Each event's ts: a microsecond apart from a minute ago, so earlier than anything the app posts in its thread (the
    # fake Slack's ts are the time, as Slack's are): a retry looks for its placeholder among the replies after the event.
    epoch = int(time.time()) - 60

    def request(n: int) -> tuple[bytes, dict[str, str]]:
        n += offset
        sent_at[n] = time.monotonic()
        return signed(f"Ev{n:08d}", f"C{n % args.channels:08d}", f"{epoch + n // 1_000_000}.{n % 1_000_000:06d}")

    def calls(method: str) -> list[Any]:
        return [c for c in slack.calls_to(method) if not c.rate_limited]

    def answers() -> list[tuple[Any, str]]:
        """(the call that finished an answer, the answer's text): a stream stopped (a channel mention's answer is streamed
        into its thread, slack.stream) or, where Slack refused the stream, the placeholder replaced (chat.update)."""
        done = [
            (c, str(slack.messages.get((c.args.get("channel"), c.args.get("ts")), {}).get("text") or "")) for c in calls("chat.stopStream")
        ]
        return done + [(c, str(c.args.get("text") or "")) for c in calls("chat.update")]

    def answered() -> dict[int, float]:
        """Event number -> when its answer was first finished (time.monotonic)."""
        first: dict[int, float] = {}
        for call, text in answers():
            if found := EVENT_ID.search(text):
                n = int(found[0][2:])
                first[n] = min(first.get(n, call.at), call.at)
        return first

    def wait_answered(count: int) -> float:
        """Until events 0 … count-1 are all answered; the seconds that took."""
        started = time.perf_counter()
        while time.perf_counter() < started + args.drain_timeout and len(answered()) < count:
            time.sleep(0.05)
        return time.perf_counter() - started

    tmp = tempfile.TemporaryDirectory(prefix="konstruct-bench-")
    site = Path(tmp.name)
    redis, redis_port = start_redis(site)
    running: list[subprocess.Popen[bytes]] = []
    database = None
    try:
        port = free_port()
        init = ["init", "--llm-model", "openai/fake-model", "--llm-api-base", llm.url, "--llm-api-key-env", "BENCH_LLM_KEY"]
        cli(site, env, *init, "--port", str(port))
        config = site / "konstruct.toml"
        queue_url = f"redis://127.0.0.1:{redis_port}/0"
        config.write_text(config.read_text().replace("[queue]\n", f'[queue]\nurl = "{queue_url}"\n', 1))
        from konstruct.config import load_settings

        concurrency = load_settings(config).worker.concurrency
        cli(site, env, "db", "upgrade")
        cli(site, env, "tenant", "create", "Bench", "--slug", "bench")
        cli(site, env, "agent", "create", "-t", "bench", "-n", "Ava", "-r", "Support", "--persona", "Brief.")
        cli(
            site, env, "channel", "connect", "slack", "-t", "bench", "--bot-token-env", "BENCH_BOT", "--signing-secret-env", "BENCH_SIGNING"
        )
        setup_calls = len(llm.requests)  # `konstruct init` tries the model once
        from konstruct.db.embedded import EmbeddedServer  # hold the embedded server for the whole run, as `up` does

        database = EmbeddedServer(site / ".konstruct")
        postmaster = database.pid()
        assert postmaster is not None
        gateway = spawn(site, env, "gateway")
        running.append(gateway)
        workers = []
        for i in range(args.workers):
            extra = ["--no-periodic"] if i else []
            workers.append(spawn(site, env, "worker", nice=args.worker_nice, extra=extra, log=f"worker-{i + 1}"))
        running += workers
        wait_log(site, "gateway", "Uvicorn running on")
        wait_ready(f"http://127.0.0.1:{port}/readyz", args.gateway_workers)
        for i in range(args.workers):
            wait_log(site, f"worker-{i + 1}", " ready: ")

        parts = {
            "gateway": Part("gateway", [gateway.pid]),
            "worker": Part("worker", [w.pid for w in workers]),
            "postgresql": Part("postgresql", [postmaster]),
            "redis": Part("redis", [redis.pid]),
            "bench": Part("bench", []),  # this process: load generator, fake Slack, fake LLM (its own time only)
        }
        me = psutil.Process()
        print(f"machine: {os.cpu_count()} cores; queue {queue_url}; {args.gateway_workers} gateway process(es), "
              f"{args.workers} worker process(es) (nice {args.worker_nice}), worker.concurrency {concurrency} each; "
              f"fake LLM {args.llm_delay:g} s per answer")  # fmt: skip
        print(f"load: {args.rate:g} events/s for {args.seconds:g} s (after a {args.warmup:g} s warm-up, answered and not measured), "
              f"over {args.channels} channels")  # fmt: skip

        if args.warmup > 0:
            warm = asyncio.run(load(f"http://127.0.0.1:{port}/slack/events", args.rate, [args.warmup], request))[0]
            offset = len(warm.latencies)
            took = wait_answered(offset)
            print(f"\nwarm-up: {offset} sent, statuses {warm.statuses}, {len(answered())} answered {took:.1f} s after the last one")

        settle(list(parts.values())[:4])
        if args.idle > 0:
            for part in parts.values():
                part.mark()
            mine = sum(me.cpu_times()[:2])
            time.sleep(args.idle)
            idle = {name: part.since_mark() for name, part in parts.items()}
            idle["bench"] = sum(me.cpu_times()[:2]) - mine
            print(
                f"\nidle for {args.idle:g} s, CPU-ms per second: " + ", ".join(f"{k} {v * 1000 / args.idle:.1f}" for k, v in idle.items())
            )

        for part in parts.values():
            part.mark()
        mine = sum(me.cpu_times()[:2])
        started = time.monotonic()
        killer = None
        if args.kill_worker:
            victim = workers[-1]

            def kill() -> None:
                time.sleep(args.seconds / 2)
                parts["worker"].drop(victim.pid)
                victim.send_signal(signal.SIGKILL)
                print(f"(SIGKILLed worker-{args.workers} at {time.monotonic() - started:.1f} s)", flush=True)

            killer = threading.Thread(target=kill, daemon=True)
            killer.start()
        measured = asyncio.run(load(f"http://127.0.0.1:{port}/slack/events", args.rate, [args.seconds], request))[0]
        if killer is not None:
            killer.join()
        sent_measured = len(measured.latencies)
        sent_total = offset + sent_measured
        measured.report("measured")
        drained = wait_answered(sent_total)
        used = {name: part.since_mark() for name, part in parts.items()}
        used["bench"] = sum(me.cpu_times()[:2]) - mine
        window = time.monotonic() - started

        first = answered()
        print(f"\nafter the load: {len(first)} of {sent_total} answered (warm-up included), the last {drained:.1f} s after the last send")
        if measured_first := {n: at for n, at in first.items() if n >= offset}:
            ms = [(at - sent_at[n]) * 1000 for n, at in measured_first.items()]
            print(f"  send to answer (its stream stopped): p50 {statistics.median(ms):.0f} ms, p95 {pct(ms, 0.95):.0f} ms, "
                  f"p99 {pct(ms, 0.99):.0f} ms, max {max(ms):.0f} ms")  # fmt: skip
            print(f"  answers/s: {len(ms) / (max(measured_first.values()) - started):.1f} (first measured send to last answer)")

        print(f"\nCPU time from the first measured event to the last answer ({window:.1f} s), for {sent_measured} events:")
        print(f"  {'part':<13}{'CPU s':>8}{'cores':>8}{'CPU-ms/event':>14}")
        for name, seconds in used.items():
            label = {"bench": "bench+fakes"}.get(name, name)
            print(f"  {label:<13}{seconds:>8.2f}{seconds / window:>8.2f}{seconds * 1000 / sent_measured:>14.2f}")
        total = sum(v for k, v in used.items() if k != "bench")
        print(f"  {'konstruct':<13}{total:>8.2f}{total / window:>8.2f}{total * 1000 / sent_measured:>14.2f}"
              "   (gateway + worker + postgresql + redis)")  # fmt: skip

        placeholder = "_thinking…_"  # slack.placeholder

        def strays() -> int:
            return sum(1 for m in list(slack.messages.values()) if m.get("text") == placeholder)

        deadline = time.monotonic() + 60
        while strays() and time.monotonic() < deadline:  # a placeholder goes once its answer's stream shows text
            time.sleep(0.1)
        answered_calls = answers()
        questions = [r.body["messages"][-1]["content"] for r in llm.requests[setup_calls:]]
        posted = Counter(str(c.args.get("thread_ts")) for c in calls("chat.postMessage") if c.args.get("text") == placeholder)
        streams = Counter(str(c.args.get("thread_ts")) for c in calls("chat.startStream"))
        finished = Counter((str(c.args.get("channel")), str(c.args.get("ts"))) for c, _ in answered_calls)
        twice = [
            name for name, seen in (("placeholder", posted), ("stream", streams), ("answer", finished)) if max(seen.values(), default=0) > 1
        ]
        print(f"LLM calls {len(questions)} for {len(set(questions))} distinct questions (and {setup_calls} by `konstruct init`, its model check); placeholders {sum(posted.values())} "
              f"in {len(posted)} threads, streams {sum(streams.values())} in {len(streams)}, {len(answered_calls)} answers finished "
              f"({len(calls('chat.update'))} of them by chat.update) in {len(finished)} messages, {len(calls('chat.delete'))} chat.delete")  # fmt: skip
        strict = len(questions) == len(set(questions)) == sent_total == len(answered_calls) == len(finished) and not twice
        shown: Counter[str] = Counter()
        for message in list(slack.messages.values()):
            shown.update(set(EVENT_ID.findall(str(message.get("text") or ""))))
        left = strays()
        once = sum(1 for n in range(sent_total) if shown[f"Ev{n:08d}"] == 1)
        more = sum(1 for n in range(sent_total) if shown[f"Ev{n:08d}"] > 1)
        print(f"in Slack: {once} of {sent_total} events answered once, {more} more than once, {left} placeholders left"
              + (f"; calls repeated for a message: {', '.join(twice)}" if twice else ""))  # fmt: skip
        visible = once == sent_total and left == 0
        if args.kill_worker:
            print(f"every one answered exactly once in Slack: {'yes' if visible else 'NO'}")
            print(f"and no LLM call made twice: {'yes' if strict else 'no (a killed worker may have asked before it died)'}")
        else:
            print(f"every one answered exactly once: {'yes' if strict and visible else 'NO'}")
    finally:
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in running:
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                print(f"(pid {proc.pid} did not stop in 120 s; killed)")
                proc.kill()
        for log in site.glob("*.log"):  # kept for a look after the temporary folder is gone
            shutil.copyfile(log, Path(tempfile.gettempdir()) / f"konstruct-scale-out-{log.name}")
        if database is not None:
            database.release()  # stopped before its folder is removed (holders that died unannounced do not count)
        redis.terminate()
        redis.wait(10)
        llm.stop()
        slack.stop()
        tmp.cleanup()


if __name__ == "__main__":
    main()
