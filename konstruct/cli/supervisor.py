"""`up`'s supervisor: runs the parts with prefixed logs, restarts any that dies, and takes up edits of konstruct.toml."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil
from rich.markup import escape
from rich.text import Text

from konstruct.cli.common import err, out
from konstruct.cli.config_watch import Change, ConfigWatch
from konstruct.config import Settings
from konstruct.errors import ConfigError, KonstructError
from konstruct.supervision import FORKED_PREFIX, HELD_ENV, RECENT, STATE_FILE, write_state

if TYPE_CHECKING:  # psycopg: imported once `up` has started its parts
    from konstruct.db.embedded import EmbeddedServer


def ready_url(cfg: Settings) -> str:
    return f"http://{_connect_host(cfg.gateway.host)}:{cfg.gateway.port}/readyz"


def _connect_host(host: str) -> str:
    """Where to reach a server listening on host: a wildcard address is reached on loopback."""
    if host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def address(cfg: Settings) -> str:
    """Where the gateway listens and where people reach it, as `up` prints it."""
    listening = f"http://{_connect_host(cfg.gateway.host)}:{cfg.gateway.port}"
    public = cfg.gateway.public_url.rstrip("/")
    return public if public == listening else f"{public} (listening on {cfg.gateway.host}:{cfg.gateway.port})"


def require_free_port(cfg: Settings) -> None:
    """Say so at once when the gateway's port is taken, instead of restarting a crashing gateway."""
    with socket.socket(socket.AF_INET6 if ":" in cfg.gateway.host else socket.AF_INET) as sock:
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


def _popen(argv: list[str], env: dict[str, str], stdin: int) -> subprocess.Popen[str]:
    # A new session: Ctrl-C reaches only `up`, which forwards exactly one signal to each child.
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=stdin,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )


def hold(parts: list[Part]) -> dict[str, subprocess.Popen[str]]:
    """Start the parts before the database is ready: each imports what it runs meanwhile (most of its start-up, ~1 s
    on two cores), then waits on its standard input until the supervisor releases it with the database's whereabouts
    (konstruct.supervision.released). With the migration check that no longer imports alembic on a database at head,
    a warm `up` is ready 1.79 s after launch instead of 2.03 s (bench/foundation.py, median of 3, two cores)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[HELD_ENV] = "1"
    return {part.name: _popen(part.argv, env, subprocess.PIPE) for part in parts}


def let_go(held: dict[str, subprocess.Popen[str]]) -> None:
    """Stop the held parts never released (`up` failed or was stopped before its database was ready). They hold no
    connection or file of their own yet: killing them loses nothing."""
    for process in held.values():
        process.kill()
        process.wait()
    held.clear()


STANDBY_AFTER = 15.0  # seconds after `up` starts its parts: the warm spare starts then even if they are not ready yet

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


@dataclass
class Retiring:
    """A part's previous process after an edit of konstruct.toml: asked to stop once `when()` holds (its successor
    is ready, or at once), killed when it has not stopped in time."""

    part: Part
    process: subprocess.Popen[str] | Forked
    when: Callable[[], bool]
    exclusive: bool = False  # the successor starts only once this one is gone (a gateway keeping its address)
    asked_at: float | None = None


class Supervisor:
    """Runs the parts with prefixed logs, restarts any that dies (the embedded database too) for as long as it runs,
    with capped backoff for a part that keeps dying; restarts them with the new configuration when konstruct.toml
    is edited; stops everything on SIGINT/SIGTERM. Its state is kept in `.konstruct/up.json` for `doctor` and the
    status page."""

    def __init__(
        self,
        cfg: Settings,
        parts: list[Part],
        standby: Part | None,
        database: EmbeddedServer | None,
        env: dict[str, str],
        started: float,
        watch: ConfigWatch | None = None,
        held: dict[str, subprocess.Popen[str]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.parts = parts
        self.standby = standby
        self.database = database
        self.env = env
        self.started = started
        self.stopping = threading.Event()
        # Set by a part's line that may mean it is ready (and by a stop): the loop looks at once, not at its next
        # round (50 ms): the gateway's /readyz was tried a mean 25 ms after it answered, on a warm `up`'s ready.
        self._wake = threading.Event()
        self.announced = False
        self.state_path = cfg.data_dir / STATE_FILE
        self.database_down_since: float | None = None
        self._reviving: threading.Thread | None = None
        self._forking: Forked | None = None  # asked of the spare, its pid not yet known
        self._written = 0.0
        self._dirty = True
        self.watch = watch  # konstruct.toml, polled every up.check_interval
        self.retiring: list[Retiring] = []
        self._rollout: Iterator[None] | None = None
        self.config_applied_at = time.time()
        self.needs_restart: list[str] = []
        self.held = held if held is not None else {}  # parts started early (see hold), released by run

    def all_parts(self) -> list[Part]:
        return [*self.parts, *([self.standby] if self.standby else [])]

    def part(self, name: str) -> Part:
        return next(p for p in self.all_parts() if p.name == name)

    def run(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop())
        for part in self.parts:
            early = self.held.pop(part.name, None)
            if early is not None:
                self._release(part, early)
            else:
                self._spawn(part)
        if self.standby is not None:
            # The spare imports everything and warms up: started beside the others it took a third of two cores from
            # them while they started (`up` ready in 3.35 s instead of 1.9-2.1 s). It starts once they are ready, or
            # after STANDBY_AFTER seconds if they are not.
            self.standby.next_start = time.monotonic() + STANDBY_AFTER
        last_check = 0.0
        try:
            while not self.stopping.is_set():
                self._wake.wait(0.05)
                self._wake.clear()
                if self.stopping.is_set():
                    break
                now = time.monotonic()
                self._check_ready()
                if now - last_check >= self.cfg.up.check_interval:
                    last_check = now
                    if self.database is not None:
                        self._check_database()
                    self._check_config()
                self._tend(now)
                if self._dirty or now - self._written > 1.0:  # at least every second: `running_for` moves on
                    self._write_state()
                    self._written = now
        finally:
            self._stop_all()

    def _stop(self) -> None:
        self.stopping.set()
        self._wake.set()

    def _tend(self, now: float) -> None:
        """One round: restart what died, retire what was replaced, move a rollout on."""
        for part in self.all_parts():
            if part.process is not None and part.process.poll() is not None:
                self._died(part)
            if part.process is None and now >= part.next_start and not self._held(part):
                self._start(part)
        self._tend_retiring(now)
        if self._rollout is not None:
            try:
                next(self._rollout)
            except StopIteration:
                self._rollout = None

    # -- the parts --

    def _held(self, part: Part) -> bool:
        return any(r.part is part and r.exclusive for r in self.retiring)

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
        self._adopt(part, _popen(part.argv, self.env, subprocess.DEVNULL))

    def _release(self, part: Part, process: subprocess.Popen[str]) -> None:
        """Let a part started by hold() go on: it is sent what of the parts' environment it does not have yet."""
        news = {name: value for name, value in self.env.items() if os.environ.get(name) != value}
        assert process.stdin is not None
        with contextlib.suppress(OSError):  # it died meanwhile: seen, and restarted, as any part that dies
            process.stdin.write(json.dumps(news) + "\n")
            process.stdin.close()
        self._adopt(part, process)

    def _adopt(self, part: Part, process: subprocess.Popen[str]) -> None:
        part.process = process
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
            current = owner.process is process or (isinstance(owner.process, Forked) and owner.process.spare is process)
            if owner.ready_line and owner.ready_line in line and current:  # a retired process's lines do not count
                owner.ready = True
                self._dirty = True
                self._wake.set()
            elif owner.ready_url and not owner.ready and current:  # its start-up lines: is /readyz answering yet?
                self._wake.set()
            # Text, not markup: a child's log line is printed exactly as written.
            out.print(Text.assemble((f"{shown:>7} | ", part.color), line))

    def _forks(self) -> list[Forked]:
        processes = [p.process for p in self.parts] + [r.process for r in self.retiring]
        return [p for p in processes if isinstance(p, Forked)]

    def _spare_said(self, spare: subprocess.Popen[str], line: str) -> None:
        """The spare reports each worker it forks (its pid) and how each ended (its exit code)."""
        started = _STARTED.search(line)
        if started and self._forking is not None and self._forking.spare is spare:
            self._forking.pid = int(started[1])
            self._forking = None
            return
        ended = _ENDED.search(line)
        if ended:
            for forked in self._forks():
                if forked.spare is spare and forked.pid == int(ended[1]):
                    forked.returncode = int(ended[2])

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
            if self.standby is not None and self.standby.process is None:
                self.standby.next_start = min(self.standby.next_start, time.monotonic())
            took = time.perf_counter() - self.started
            out.print(f"[green bold]Konstruct is up[/green bold] in {took:.2f}s — gateway {address(self.cfg)}  (Ctrl-C to stop)")
            for problem in self.cfg.unreadable_references():  # what will fail when used: said now, not at the first message
                out.print(f"[yellow]warning:[/yellow] {escape(problem)}", highlight=False)

    # -- edits of konstruct.toml --

    def _check_config(self) -> None:
        """Take up an edit of konstruct.toml: a valid one restarts the parts (what only a restart of `up` can apply is
        named); an invalid one is told in one line and changes nothing."""
        if self.watch is None:
            return
        try:
            change = self.watch.poll()
            if change is not None and change.applied:
                self._check_address(change.settings)
        except ConfigError as exc:
            err.print(f"[red]konstruct.toml changed but is not applied: {exc} — still running with the previous configuration[/red]")
            return
        if change is None:
            return
        self.needs_restart = change.needs_restart
        self._write_state()  # before it is said: whoever reads the line below finds the state file saying so too
        self._dirty = True  # and again once the roll-out below is under way
        if change.needs_restart:
            err.print(
                f"[yellow]restart `konstruct up` to apply {', '.join(change.needs_restart)} (until then the parts keep the previous value)[/yellow]"
            )
        if change.not_for_the_parts:
            out.print(f"[yellow]{escape('[[tenants]]')} changed: `konstruct plan` shows what `konstruct apply` would change[/yellow]")
        if not change.applied:
            if not change.needs_restart and not change.not_for_the_parts:
                out.print("[dim]konstruct.toml changed; no setting differs[/dim]")
            self.watch.accept(change)  # nothing to restart for
            return
        self.watch.accept(change)
        out.print(f"konstruct.toml changed ({', '.join(change.applied)}): restarting the parts one at a time")
        self._rollout = self._roll_out(change)  # replaces one under way: its retired processes still stop as planned

    def _check_address(self, new: Settings) -> None:
        if (new.gateway.host, new.gateway.port) != (self.cfg.gateway.host, self.cfg.gateway.port):
            require_free_port(new)

    def _roll_out(self, change: Change) -> Iterator[None]:
        """The parts restarted with the new settings one at a time, so the gateway is down as briefly as possible and
        the worker not at all: the gateway (the old one stops first when it keeps its address, else once the new one
        answers), then a new spare (the forked workers take their settings from it), then the worker (the old one stops
        once the new one is ready; the old spare once the workers it forked are gone)."""
        old, new = self.cfg, change.settings
        self.cfg = new
        gateway = self.part("gateway")
        gateway.ready_url = ready_url(new)
        self._replace(gateway, exclusive=(old.gateway.host, old.gateway.port) == (new.gateway.host, new.gateway.port))
        while not gateway.ready:
            yield
        if self.standby is not None:
            previous = self.standby.process
            self._replace(self.standby, exclusive=False, when=lambda: previous is None or self._forks_gone(previous))
            deadline = time.monotonic() + 60  # no warm spare by then: the worker starts from scratch
            while not self.standby.ready and time.monotonic() < deadline:
                yield
        worker = self.part("worker")
        self._replace(worker, exclusive=False)
        while not worker.ready or self.retiring:  # applied once no process of the old settings takes new work
            yield
        self.config_applied_at = time.time()
        self._dirty = True
        out.print(f"[green]konstruct.toml applied[/green] — gateway {address(new)}")

    def _replace(self, part: Part, *, exclusive: bool, when: Callable[[], bool] | None = None) -> None:
        """Retire the part's process; the loop starts its successor at once (or, when exclusive, once it is gone)."""
        previous = part.process
        part.process, part.ready, part.next_start, part.quick_deaths = None, False, 0.0, 0
        if previous is not None and previous.poll() is None:
            ready: Callable[[], bool] = lambda: part.ready  # noqa: E731
            self.retiring.append(Retiring(part, previous, when or ((lambda: True) if exclusive else ready), exclusive))
        self._dirty = True

    def _forks_gone(self, spare: subprocess.Popen[str] | Forked) -> bool:
        return not any(forked.spare is spare and forked.poll() is None for forked in self._forks())

    def _tend_retiring(self, now: float) -> None:
        for old in list(self.retiring):
            if old.process.poll() is not None:
                self.retiring.remove(old)
                out.print(f"[dim]previous {old.part.name} stopped[/dim]")
                self._dirty = True
            elif old.asked_at is None:
                if old.when() and old.process.pid is not None:
                    old.process.send_signal(old.part.stop_signal)
                    old.asked_at = now
            elif now - old.asked_at > self._grace():
                err.print(f"[yellow]previous {old.part.name} did not stop in time; killing it[/yellow]")
                old.process.kill()

    def _grace(self) -> float:
        return self.cfg.llm.timeout + 15

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
            "config": {
                "path": str(self.cfg.config_path),
                "applied_at": self.config_applied_at,
                "restarting_parts": self._rollout is not None,
                "needs_up_restart": self.needs_restart,
            },
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
        deadline = time.monotonic() + self._grace()
        spares = [p for p in (self.standby,) if p is not None]
        running = [(p, p.process) for p in self.all_parts() if p.process is not None and p.process.poll() is None]
        running += [(r.part, r.process) for r in self.retiring if r.process.poll() is None]
        # The spares last: each reaps the workers it forked.
        for group in ([r for r in running if r[0] not in spares], [r for r in running if r[0] in spares]):
            for part, process in group:
                process.send_signal(part.stop_signal)
            for part, process in group:
                try:
                    process.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    err.print(f"[yellow]{part.name} did not stop in time; killing it[/yellow]")
                    process.kill()
                    process.wait()
        self.state_path.unlink(missing_ok=True)
        out.print("[dim]stopped[/dim]")
