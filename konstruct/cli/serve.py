"""up, gateway, worker: running Konstruct."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import psutil
import typer
from rich.text import Text
from sqlalchemy.engine import make_url

from konstruct.cli.common import err, out, settings, setup_logging, state
from konstruct.config import DATABASE_URL_ENV, Settings
from konstruct.db import migrate
from konstruct.db.embedded import DATABASE_NAME, EmbeddedServer
from konstruct.errors import ConfigError, KonstructError
from konstruct.supervision import FORKED_PREFIX, RECENT, STATE_FILE, write_state


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("gateway")(gateway)
    app.command("worker")(worker)


def gateway(ctx: typer.Context) -> None:
    """Run only the gateway (HTTP: webhooks, health). Scale out by running several behind a proxy."""
    cfg = settings(ctx)
    setup_logging(state(ctx).verbose)
    from konstruct.gateway.app import run_gateway  # deferred: Starlette, uvicorn and the whole app load only for this command

    run_gateway(cfg)


def worker(
    ctx: typer.Context,
    threads: int = typer.Option(4, "--threads", help="huey consumer threads that admit work (the LLM calls themselves run concurrently)."),
    no_periodic: bool = typer.Option(False, "--no-periodic", help="Do not schedule periodic tasks (run them on one worker only)."),
    standby: bool = typer.Option(
        False,
        "--standby",
        help="Be a warm spare: import everything once, then fork a ready worker on each SIGUSR1 (how `up` restarts workers).",
    ),
) -> None:
    """Run only the worker (answers messages). Stop gracefully with SIGINT."""
    cfg = settings(ctx)
    setup_logging(state(ctx).verbose)
    from konstruct.worker.main import run_worker  # deferred: the worker, its tasks and the agent pipeline load only for this command

    run_worker(cfg, threads=threads, periodic=not no_periodic, standby=standby)


def up(ctx: typer.Context) -> None:
    """Start the embedded database (if used), migrate, and run the gateway and a worker until Ctrl-C.

    Every part is supervised for as long as `up` runs: one that dies is started again (at once, or with a
    growing pause up to `up.max_backoff` when it keeps dying), and never takes the others down."""
    cfg = settings(ctx)
    started = time.perf_counter()
    _require_free_port(cfg)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    database: EmbeddedServer | None = None
    if cfg.embedded_database:
        # This process holds the server and supervises it; the children are handed its URL and never start or stop it.
        database = EmbeddedServer(cfg.data_dir)
        env[DATABASE_URL_ENV] = str(make_url(database.uri).set(database=DATABASE_NAME).render_as_string(hide_password=False))
        out.print(f"[dim]embedded PostgreSQL in {cfg.data_dir / 'pg'}[/dim]")
    try:
        result = migrate.upgrade(cfg)
        out.print(f"[dim]database at revision {result.after}[/dim]")
        base = [sys.executable, "-m", "konstruct", "--config", str(cfg.config_path)]
        if state(ctx).verbose:
            base.append("--verbose")
        parts = [
            Part("gateway", [*base, "gateway"], signal.SIGTERM, "cyan", ready_url=f"http://{cfg.gateway.host}:{cfg.gateway.port}/readyz"),
            Part("worker", [*base, "worker"], signal.SIGINT, "magenta", ready_line=" ready: "),  # SIGINT is huey's graceful stop
        ]
        standby = (
            Part("standby", [*base, "worker", "--standby"], signal.SIGTERM, "magenta", ready_line="standby: warm")
            if cfg.up.standby
            else None
        )
        Supervisor(cfg, parts, standby, database, env, started).run()
    finally:
        if database is not None:
            database.release()


def _require_free_port(cfg: Settings) -> None:
    """Say so at once when the gateway's port is taken, instead of restarting a crashing gateway."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.gateway.host, cfg.gateway.port))
        except OSError as exc:
            raise ConfigError(
                f"gateway.port {cfg.gateway.port} on {cfg.gateway.host} is not available ({exc.strerror}): "
                "stop what uses it, or set another port (KONSTRUCT_GATEWAY__PORT=…)"
            ) from None


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child before exec: a SIGTERM when `up` itself dies, even by SIGKILL, so no part outlives it."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_STARTED = re.compile(r"standby: started worker pid (\d+)")
_ENDED = re.compile(r"standby: worker pid (\d+) ended with code (-?\d+)")


class Forked:
    """A worker the spare forked: not `up`'s own child, so it is watched by pid, and its exit code is what the
    spare (its parent, which reaps it) reported. The same few methods as a Popen."""

    def __init__(self, spare: subprocess.Popen[str]) -> None:
        self.spare = spare
        self.pid: int | None = None  # known once the spare says so
        self.returncode: int | None = None
        self.asked = time.monotonic()

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self.pid is None:
            if self.spare.poll() is not None or time.monotonic() - self.asked > 10:
                self.returncode = -1  # the spare died before forking, or never answered
            return self.returncode
        try:
            gone = psutil.Process(self.pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            gone = True
        if gone and self.spare.poll() is not None:
            self.returncode = -1  # reaped by someone else: the code is unknown
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.pid is not None and self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("worker", timeout or 0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode


@dataclass
class Part:
    """One process `up` runs, with what it needs to tell whether it is ready and how often it died."""

    name: str
    argv: list[str]
    stop_signal: int
    color: str
    ready_line: str | None = None  # a line in its log that says it is ready
    ready_url: str | None = None  # or a URL that answers 200 once it is
    process: subprocess.Popen[str] | Forked | None = None
    label: list[str] = field(default_factory=list)  # the log prefix of the current process
    ready: bool = False
    started_at: float = 0.0
    quick_deaths: int = 0  # deaths in a row, each before the part had run up.stable_after seconds
    deaths: list[float] = field(default_factory=list)
    last_exit: dict[str, Any] | None = None
    next_start: float = 0.0

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    """Runs the parts with prefixed logs, restarts any that dies (the embedded database too) for as long as it runs,
    with capped backoff for a part that keeps dying; stops everything on SIGINT/SIGTERM. Its state is kept in
    `.konstruct/up.json` for `doctor` and the status page."""

    def __init__(
        self,
        cfg: Settings,
        parts: list[Part],
        standby: Part | None,
        database: EmbeddedServer | None,
        env: dict[str, str],
        started: float,
    ) -> None:
        self.cfg = cfg
        self.parts = parts
        self.standby = standby
        self.database = database
        self.env = env
        self.started = started
        self.stopping = threading.Event()
        self.announced = False
        self.state_path = cfg.data_dir / STATE_FILE
        self.database_down_since: float | None = None
        self._reviving: threading.Thread | None = None
        self._forking: Forked | None = None  # asked of the spare, its pid not yet known
        self._written = 0.0
        self._dirty = True

    def run(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopping.set())
        for part in [*self.parts, *([self.standby] if self.standby else [])]:
            self._spawn(part)
        last_db_check = 0.0
        try:
            while not self.stopping.wait(0.05):
                now = time.monotonic()
                self._check_ready()
                if self.database is not None and now - last_db_check >= self.cfg.up.check_interval:
                    last_db_check = now
                    self._check_database()
                for part in self.parts:
                    if part.process is not None and part.process.poll() is not None:
                        self._died(part)
                    if part.process is None and now >= part.next_start:
                        self._start(part)
                if self.standby is not None:
                    if self.standby.process is not None and self.standby.process.poll() is not None:
                        self._died(self.standby)
                    if self.standby.process is None and now >= self.standby.next_start:
                        self._spawn(self.standby)
                if self._dirty or now - self._written > 1.0:  # at least every second: `running_for` moves on
                    self._write_state()
                    self._written = now
        finally:
            self._stop_all()

    # -- the parts --

    def _start(self, part: Part) -> None:
        """Start a part that is down: a worker is forked, ready, by the warm spare when there is one (milliseconds),
        else started from scratch (seconds of imports)."""
        spare = self.standby
        if part.name == "worker" and spare is not None and spare.alive() and spare.ready:
            assert isinstance(spare.process, subprocess.Popen)
            part.process = Forked(spare.process)
            part.ready, part.started_at, part.label = False, time.monotonic(), [part.name]
            self._forking = part.process
            spare.process.send_signal(signal.SIGUSR1)
            self._dirty = True
            return
        self._spawn(part)

    def _spawn(self, part: Part) -> None:
        # A new session: Ctrl-C reaches only this process, which forwards exactly one signal to each child.
        part.process = subprocess.Popen(
            part.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        part.label = [part.name]
        part.ready = False
        part.started_at = time.monotonic()
        self._dirty = True
        threading.Thread(target=self._pump, args=(part, part.process, part.label), daemon=True).start()

    def _pump(self, part: Part, process: subprocess.Popen[str], label: list[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            owner, shown = part, label[0]
            if line.startswith(FORKED_PREFIX):  # a line of a worker the spare forked: it speaks as the worker
                owner = next((p for p in self.parts if isinstance(p.process, Forked) and p.process.spare is process), part)
                line, shown = line.removeprefix(FORKED_PREFIX), "worker"
            elif part is self.standby:
                self._spare_said(process, line)
            if owner.ready_line and owner.ready_line in line and (owner is part or isinstance(owner.process, Forked)):
                owner.ready = True
                self._dirty = True
            # Text, not markup: a child's log line is printed exactly as written.
            out.print(Text.assemble((f"{shown:>7} | ", part.color), line))

    def _spare_said(self, spare: subprocess.Popen[str], line: str) -> None:
        """The spare reports each worker it forks (its pid) and how each ended (its exit code)."""
        started = _STARTED.search(line)
        if started and self._forking is not None and self._forking.spare is spare:
            self._forking.pid = int(started[1])
            self._forking = None
            return
        ended = _ENDED.search(line)
        if ended:
            for part in self.parts:
                if isinstance(part.process, Forked) and part.process.pid == int(ended[1]):
                    part.process.returncode = int(ended[2])

    def _died(self, part: Part) -> None:
        assert part.process is not None
        code = part.process.returncode
        now = time.monotonic()
        lived = now - part.started_at
        part.process = None
        part.ready = False
        part.deaths = [t for t in part.deaths if time.time() - t < RECENT] + [time.time()]
        part.last_exit = {"code": code, "at": time.time(), "after_seconds": round(lived, 1)}
        part.quick_deaths = part.quick_deaths + 1 if lived < self.cfg.up.stable_after else 1
        delay = 0.0 if part.quick_deaths <= 1 else min(0.5 * 2 ** (part.quick_deaths - 2), self.cfg.up.max_backoff)
        part.next_start = now + delay
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        when = f"restarting in {delay:g}s (it keeps dying)" if delay else "restarting"
        err.print(f"[yellow]{part.name} {how} after {lived:.1f}s; {when}[/yellow]")
        self._dirty = True

    def _check_ready(self) -> None:
        for part in self.parts:
            if part.ready_url and part.alive() and not part.ready:
                try:
                    with urllib.request.urlopen(part.ready_url, timeout=1) as response:
                        part.ready = response.status == 200
                except OSError:
                    continue
                self._dirty = True
        if not self.announced and all(p.ready for p in self.parts):
            self.announced = True
            took = time.perf_counter() - self.started
            out.print(f"[green bold]Konstruct is up[/green bold] in {took:.2f}s — gateway {self.cfg.gateway.public_url}  (Ctrl-C to stop)")

    # -- the embedded database --

    def _check_database(self) -> None:
        assert self.database is not None
        if self.database.pid() is not None or (self._reviving is not None and self._reviving.is_alive()):
            return
        self.database_down_since = self.database_down_since or time.time()
        err.print("[yellow]the embedded PostgreSQL is not running; starting it again[/yellow]")
        self._reviving = threading.Thread(target=self._revive_database, name="revive-database", daemon=True)
        self._reviving.start()
        self._dirty = True

    def _revive_database(self) -> None:
        assert self.database is not None
        delay = 0.25
        while not self.stopping.is_set():
            try:
                self.database.restart()
            except KonstructError as exc:
                err.print(f"[yellow]{exc}; trying again in {delay:g}s[/yellow]")
                if self.stopping.wait(delay):
                    return
                delay = min(delay * 2, self.cfg.up.max_backoff)
                continue
            took = time.time() - (self.database_down_since or time.time())
            out.print(f"[dim]embedded PostgreSQL is back (down for {took:.1f}s)[/dim]")
            self.database_down_since = None
            self._dirty = True
            return

    # -- state and stopping --

    def _write_state(self) -> None:
        self._dirty = False
        now = time.time()

        def describe(part: Part) -> dict[str, Any]:
            state = "running" if part.alive() and part.ready else "starting" if part.alive() else "waiting to restart"
            return {
                "pid": part.process.pid if part.process is not None else None,
                "state": state,
                "running_for": round(time.monotonic() - part.started_at, 1) if part.alive() else None,
                "restarts": len([t for t in part.deaths if now - t < RECENT]),
                "crash_looping": part.quick_deaths >= 3,
                "last_exit": part.last_exit,
            }

        data: dict[str, Any] = {
            "pid": os.getpid(),
            "updated_at": now,
            "recent_seconds": RECENT,
            "gateway": self.cfg.gateway.public_url,
            "parts": {part.name: describe(part) for part in self.parts},
        }
        if self.standby is not None:
            data["parts"]["standby"] = describe(self.standby)
        if self.database is not None:
            data["database"] = {
                "pid": self.database.pid(),
                "restarts": len(self.database.restarts),
                "last_restart_at": self.database.restarts[-1] if self.database.restarts else None,
                "down_since": self.database_down_since,
            }
        write_state(self.state_path, data)

    def _stop_all(self) -> None:
        out.print("[dim]stopping…[/dim]")
        deadline = time.monotonic() + self.cfg.llm.timeout + 15
        # The spare last: it reaps the worker it forked.
        for group in (self.parts, [self.standby] if self.standby else []):
            running = [p for p in group if p.alive()]
            for part in running:
                assert part.process is not None
                part.process.send_signal(part.stop_signal)
            for part in running:
                assert part.process is not None
                try:
                    part.process.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    err.print(f"[yellow]{part.name} did not stop in time; killing it[/yellow]")
                    part.process.kill()
                    part.process.wait()
        self.state_path.unlink(missing_ok=True)
        out.print("[dim]stopped[/dim]")
