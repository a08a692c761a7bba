"""What the webhook benchmarks share: a site in a temporary folder, processes, a steady-rate load generator."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import free_port  # noqa: E402

Request = Callable[[int], tuple[bytes, dict[str, str]]]


def dsn(url: Any) -> str:
    """A SQLAlchemy URL as the libpq string asyncpg and psycopg take."""
    return str(url.set(drivername="postgresql").render_as_string(hide_password=False))


@contextmanager
def embedded_site(postgresql_conf: str = "") -> Iterator[tuple[Any, Any]]:
    """(settings, urls) of a fresh `konstruct init` + `db upgrade` in a temporary folder, its embedded PostgreSQL held
    by this process (with `postgresql_conf` appended to its configuration first) and stopped at the end."""
    from konstruct.config import load_settings
    from konstruct.db import embedded
    from konstruct.db.urls import resolve_urls
    from tests.helpers import cli_env

    env = cli_env()
    with tempfile.TemporaryDirectory(prefix="konstruct-bench-") as tmp:
        site = Path(tmp)
        cli(site, env, "init")
        cli(site, env, "db", "upgrade")
        settings = load_settings(site / "konstruct.toml")
        pgdata = embedded.pgdata_dir(settings.data_dir).resolve()
        if postgresql_conf:
            with (pgdata / "postgresql.conf").open("a") as conf:  # the server stopped with `db upgrade`
                conf.write("\n" + postgresql_conf + "\n")
        with held_database(settings.data_dir):
            yield settings, resolve_urls(settings)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def held_database(data_dir: Path) -> Iterator[None]:
    """The site's embedded PostgreSQL held by this process for the run, and stopped before its temporary folder is
    removed. Before, the server was let go only when the bench process exited, after the folder was gone, and with the
    pids of the gateway's uvicorn processes still on its handle list (they end without taking themselves off it): it
    was never stopped and outlived the bench, one per `--knee` rate. SIGTERM (`timeout` ending a long drain) leaves
    through the same clean-up: by default it killed the bench at once, and the server and the folder stayed."""
    from konstruct.db import embedded

    terminated = signal.getsignal(signal.SIGTERM)
    if terminated is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    embedded.start_embedded(data_dir)
    try:
        yield
    finally:
        if terminated is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        pgdata = embedded.pgdata_dir(data_dir).resolve()
        server = embedded._servers.pop(pgdata, None)
        if server is not None:
            embedded._forget_dead_handles(pgdata)  # a part that died without letting go holds it no more
            server.cleanup()


def drain_answers(
    site: Path,
    env: dict[str, str],
    args: argparse.Namespace,
    worker: subprocess.Popen[bytes] | None,
    sent: int,
    answered: Callable[[], int],
    check: Callable[[int], bool],
) -> subprocess.Popen[bytes]:
    """After the load: the worker started if it did not run during it, then waited for until all `sent` are answered
    (or --drain-timeout); prints how long that took and whether each was answered exactly once. The worker."""
    if worker is None:
        worker = spawn(site, env, "worker", nice=args.worker_nice)
    started = time.perf_counter()
    while time.perf_counter() < started + args.drain_timeout and answered() < sent:
        time.sleep(1)
    print(f"\nafter the load: {answered()} of {sent} answered in {time.perf_counter() - started:.0f} s more")
    print(f"every one answered exactly once: {'yes' if check(sent) else 'NO'}")
    return worker


def cli(site: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "konstruct", *args], cwd=site, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"konstruct {' '.join(args)} failed: {result.stderr}")
    return result.stdout


def spawn(
    site: Path, env: dict[str, str], name: str, nice: int = 0, *, extra: Sequence[str] = (), log: str = ""
) -> subprocess.Popen[bytes]:
    """`konstruct NAME [EXTRA…]` in the site, its output in LOG.log (default NAME.log: what `wait_log` reads)."""
    argv = [sys.executable, "-m", "konstruct", name, *extra]
    if nice:
        argv = ["nice", "-n", str(nice), *argv]
    return subprocess.Popen(argv, cwd=site, env=env, stdout=open(site / f"{log or name}.log", "wb"), stderr=subprocess.STDOUT)


def wait_log(site: Path, name: str, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in (site / f"{name}.log").read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise SystemExit(f"{name} did not log {text!r}:\n{(site / f'{name}.log').read_text()}")


def wait_ready(url: str, processes: int, timeout: float = 60, ok: tuple[int, ...] = (200,)) -> None:
    """Every gateway process answers `url` with a status in `ok` (several in a row, since each connection may land on
    another)."""
    deadline, streak = time.monotonic() + timeout, 0
    while time.monotonic() < deadline and streak < 10 * processes:
        try:
            streak = streak + 1 if httpx.get(url, timeout=2).status_code in ok else 0
        except httpx.HTTPError:
            streak = 0
            time.sleep(0.2)
    if streak < 10 * processes:
        raise SystemExit(f"the gateway at {url} did not become ready")


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds, from each request's scheduled send time
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # transport errors by kind
    slow_at: dict[int, int] = field(default_factory=dict)  # second of the phase -> requests over 100 ms
    took: float = 0.0

    def report(self, title: str) -> None:
        ms = [x * 1000 for x in self.latencies]
        sent = len(ms)
        print(f"\n{title}: sent {sent} in {self.took:.1f} s ({sent / self.took:.1f}/s); statuses {dict(sorted(self.statuses.items()))}; "
              f"transport errors {sum(self.errors.values())} {self.errors or ''}")  # fmt: skip
        print(f"  time to HTTP response: p50 {statistics.median(ms):.1f} ms, p95 {pct(ms, 0.95):.1f} ms, p99 {pct(ms, 0.99):.1f} ms, "
              f"max {max(ms):.1f} ms")  # fmt: skip
        if self.slow_at:
            print("  requests over 100 ms, by second: " + ", ".join(f"s{k}: {v}" for k, v in sorted(self.slow_at.items())))


async def load(url: str, rate: float, phases: list[float], request: Request) -> list[Result]:
    """Send at one steady rate through consecutive phases (a warm-up, then the measured part), numbering
    requests across them. One process with aiohttp: the load generator shares the cores with the gateway."""
    results = [Result() for _ in phases]
    # The generator's own collector off while it sends: a full pass here (57 ms at 10,000 requests, growing with the
    # run) stalls every response it is reading and was counted as the server's latency, a burst of requests over
    # 100 ms in one second. Measured with gc.callbacks in the bench process, worker during, 1,000/s for 10 s.
    gc.freeze()
    gc.disable()
    try:
        return await _send(url, rate, phases, request, results)
    finally:
        gc.enable()


async def _send(url: str, rate: float, phases: list[float], request: Request, results: list[Result]) -> list[Result]:
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as client:

        async def one(n: int, due: float, result: Result, phase_start: float) -> None:
            body, headers = request(n)
            try:
                async with client.post(url, data=body, headers=headers) as response:
                    await response.read()
                    result.statuses[response.status] = result.statuses.get(response.status, 0) + 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.errors[type(exc).__name__] = result.errors.get(type(exc).__name__, 0) + 1
            done = time.perf_counter()
            result.latencies.append(done - due)
            result.took = max(result.took, done - phase_start)
            if done - due > 0.1:
                second = int(due - phase_start)
                result.slow_at[second] = result.slow_at.get(second, 0) + 1

        tasks = []
        start = time.perf_counter() + 0.2
        n = 0
        for seconds, result in zip(phases, results, strict=True):
            count = int(rate * seconds)
            for i in range(count):
                due = start + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(n, due, result, start)))
                n += 1
            start += count / rate
        await asyncio.gather(*tasks)
    return results


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def add_load_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--rate", type=float, default=200.0, help=f"{what} per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to send (measured)")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds of load at the same rate before measuring (0: none)")
    parser.add_argument("--worker-nice", type=int, default=10, help="nice level of the worker (the gateway's ack comes first)")
    parser.add_argument("--gateway-workers", type=int, default=2, help="gateway processes (gateway.workers)")
    parser.add_argument(
        "--worker",
        choices=["during", "after"],
        default="during",
        help="run the worker during the load (all on these cores) or start it when the load ends (as on separate machines)",
    )
    parser.add_argument("--drain-timeout", type=float, default=900.0, help=f"seconds to wait for every one of the {what} to be answered")


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system time of a process and of the children it has reaped (a PostgreSQL backend that ended, say)."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class Part:
    """One part of the installation (the gateway, the workers, …): the process trees it is made of, and their CPU time."""

    name: str
    roots: list[int] = field(default_factory=list)
    gone: float = 0.0  # CPU seconds of processes that died unreaped by a process of ours (a SIGKILLed worker), since the mark
    _marks: dict[tuple[int, float], float] = field(default_factory=dict)

    def processes(self) -> list[psutil.Process]:
        found: list[psutil.Process] = []
        for pid in self.roots:
            try:
                root = psutil.Process(pid)
                found += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return found

    def sample(self) -> dict[tuple[int, float], float]:
        times = {}
        for proc in self.processes():
            try:
                times[(proc.pid, proc.create_time())] = cpu_seconds(proc)
            except psutil.NoSuchProcess:
                continue
        return times

    def mark(self) -> None:
        self._marks, self.gone = self.sample(), 0.0

    def since_mark(self) -> float:
        """CPU seconds since `mark`: a process that ended since counts in its parent's reaped children's time (all of its
        life, less what it had at the mark, which is subtracted here); a process new since counts from zero."""
        return sum(self.sample().values()) - sum(self._marks.values()) + self.gone

    def drop(self, pid: int) -> None:
        """Before a SIGKILL of root `pid`: keep its CPU time since the mark, stop following it."""
        for key, value in self.sample().items():
            if key[0] == pid:
                self.gone += value - self._marks.pop(key, 0.0)
        self.roots.remove(pid)


@dataclass
class Bench:
    """One benchmark run: a site set up by `setup` commands, a gateway, a worker during or after the load."""

    args: argparse.Namespace
    env: dict[str, str]
    llm_url: str
    setup: list[list[str]]
    path: str  # the webhook path on the gateway

    def run(self, request: Request, answered: Callable[[], int], check: Callable[[int], bool], *, drain: bool = True) -> Result:
        """Load at the steady rate, then wait until `answered()` reaches the number sent; `check(sent)` says exactly once.
        Without `drain` only the load is measured (no worker after it). The measured phase's result."""
        args = self.args
        env = {**self.env, "KONSTRUCT_GATEWAY__WORKERS": str(args.gateway_workers)}
        with tempfile.TemporaryDirectory(prefix="konstruct-bench-") as tmp:
            site = Path(tmp)
            port = free_port()
            init = ["init", "--llm-model", "openai/fake-model", "--llm-api-base", self.llm_url, "--llm-api-key-env", "BENCH_LLM_KEY"]
            cli(site, env, *init, "--port", str(port))
            cli(site, env, "db", "upgrade")
            for command in self.setup:
                cli(site, env, *command)
            with held_database(site / ".konstruct"):  # the whole run; stopped before the folder goes
                gateway = spawn(site, env, "gateway")
                worker = spawn(site, env, "worker", nice=args.worker_nice) if args.worker == "during" and drain else None
                try:
                    wait_log(site, "gateway", "Uvicorn running on")
                    wait_ready(f"http://127.0.0.1:{port}/readyz", args.gateway_workers)
                    if worker is not None:
                        wait_log(site, "worker", " ready: ")
                    print(
                        f"machine: {os.cpu_count()} cores; {args.rate:g}/s for {args.seconds:g} s after a {args.warmup:g} s warm-up; "
                        f"{args.gateway_workers} gateway process(es); "
                        + (f"worker {args.worker} the load (nice {args.worker_nice})" if drain else "no worker (ingest alone)")
                    )
                    phases = [args.warmup, args.seconds] if args.warmup > 0 else [args.seconds]
                    from konstruct.db.embedded import postmaster_pid

                    parts = [Part("gateway", [gateway.pid]), Part("postgresql", [postmaster_pid(site / ".konstruct") or 0])]
                    if worker is not None:
                        parts.append(Part("worker", [worker.pid]))
                    for part in parts:
                        part.mark()
                    results = asyncio.run(load(f"http://127.0.0.1:{port}{self.path}", args.rate, phases, request))
                    if len(results) == 2:
                        results[0].report(f"warm-up ({args.warmup:g} s at the same rate, not in the figures below)")
                    results[-1].report("measured")
                    sent = sum(len(r.latencies) for r in results)
                    print(
                        "  CPU-ms per request over the load (warm-up included): "
                        + ", ".join(f"{part.name} {part.since_mark() * 1000 / max(sent, 1):.2f}" for part in parts)
                    )
                    if not drain:
                        return results[-1]
                    worker = drain_answers(site, env, args, worker, sent, answered, check)
                    return results[-1]
                finally:
                    for name in ("gateway", "worker"):  # kept for a look after the temporary folder is gone
                        if (site / f"{name}.log").exists():
                            (Path(tempfile.gettempdir()) / f"konstruct-bench-{name}.log").write_bytes((site / f"{name}.log").read_bytes())
                    running = [p for p in (gateway, worker) if p is not None]
                    for proc in running:
                        proc.send_signal(2)
                    for proc in running:
                        proc.wait(120)
