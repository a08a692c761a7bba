"""up, gateway, worker: running Konstruct."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import typer
from rich.text import Text

from konstruct.cli.common import err, out, settings, setup_logging, state
from konstruct.config import Settings
from konstruct.db.embedded import start_embedded
from konstruct.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("gateway")(gateway)
    app.command("worker")(worker)


def gateway(ctx: typer.Context) -> None:
    """Run only the gateway (HTTP: webhooks, health). Scale out by running several behind a proxy."""
    cfg = settings(ctx)
    setup_logging(state(ctx).verbose)
    from konstruct.gateway.app import run_gateway

    run_gateway(cfg)


def worker(
    ctx: typer.Context,
    threads: int = typer.Option(4, "--threads", help="huey consumer threads that admit work (the LLM calls themselves run concurrently)."),
    no_periodic: bool = typer.Option(False, "--no-periodic", help="Do not schedule periodic tasks (run them on one worker only)."),
) -> None:
    """Run only the worker (answers messages). Stop gracefully with SIGINT."""
    cfg = settings(ctx)
    setup_logging(state(ctx).verbose)
    from konstruct.worker.main import run_worker

    run_worker(cfg, threads=threads, periodic=not no_periodic)


@dataclass
class Child:
    name: str
    argv: list[str]
    stop_signal: int
    color: str
    process: subprocess.Popen[str] | None = None
    restarts: list[float] = field(default_factory=list)
    ready: bool = False


def up(ctx: typer.Context) -> None:
    """Start the embedded database (if used), migrate, and run the gateway and a worker until Ctrl-C."""
    from konstruct.db import migrate

    cfg = settings(ctx)
    started = time.perf_counter()
    _require_free_port(cfg)
    if cfg.embedded_database:
        # This process holds the server open, so it outlives restarts of the children.
        start_embedded(cfg.data_dir)
        out.print(f"[dim]embedded PostgreSQL in {cfg.data_dir / 'pg'}[/dim]")
    result = migrate.upgrade(cfg)
    out.print(f"[dim]database at revision {result.after}[/dim]")
    base = [sys.executable, "-m", "konstruct", "--config", str(cfg.config_path)]
    if state(ctx).verbose:
        base.append("--verbose")
    children = [
        Child("gateway", [*base, "gateway"], signal.SIGTERM, "cyan"),
        Child("worker", [*base, "worker"], signal.SIGINT, "magenta"),  # SIGINT is huey's graceful stop
    ]
    Supervisor(cfg, children, started).run()


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


class Supervisor:
    """Runs the children with prefixed logs, restarts a crashed one, stops all on SIGINT/SIGTERM."""

    def __init__(self, cfg: Settings, children: list[Child], started: float) -> None:
        self.cfg = cfg
        self.children = children
        self.started = started
        self.stopping = threading.Event()
        self.announced = False

    def run(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopping.set())
        for child in self.children:
            self._spawn(child)
        try:
            while not self.stopping.wait(0.1):
                self._check_ready()
                for child in self.children:
                    if child.process is not None and child.process.poll() is not None:
                        self._restart(child)
        finally:
            self._stop_all()

    def _spawn(self, child: Child) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # A new session: Ctrl-C reaches only this process, which forwards exactly one signal to each child.
        child.process = subprocess.Popen(
            child.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )
        child.ready = False
        threading.Thread(target=self._pump, args=(child, child.process), daemon=True).start()

    def _pump(self, child: Child, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            if child.name == "worker" and " ready: " in line:
                child.ready = True
            # Text, not markup: a child's log line is printed exactly as written.
            out.print(Text.assemble((f"{child.name:>7} | ", child.color), line))

    def _check_ready(self) -> None:
        if self.announced:
            return
        gateway = next(c for c in self.children if c.name == "gateway")
        if not gateway.ready:
            url = f"http://{self.cfg.gateway.host}:{self.cfg.gateway.port}/readyz"
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    gateway.ready = response.status == 200
            except OSError:
                return
        if all(c.ready for c in self.children):
            self.announced = True
            took = time.perf_counter() - self.started
            out.print(f"[green bold]Konstruct is up[/green bold] in {took:.2f}s — gateway {self.cfg.gateway.public_url}  (Ctrl-C to stop)")

    def _restart(self, child: Child) -> None:
        assert child.process is not None
        code = child.process.returncode
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < 60] + [now]
        if len(child.restarts) > 5:
            err.print(f"[red]{child.name} keeps crashing (exit code {code}); stopping. See its log above.[/red]")
            self.stopping.set()
            raise typer.Exit(1)
        delay = min(2 ** (len(child.restarts) - 1), 30)
        err.print(f"[yellow]{child.name} exited with code {code}; restarting in {delay}s[/yellow]")
        if self.stopping.wait(delay):
            return
        self._spawn(child)

    def _stop_all(self) -> None:
        out.print("[dim]stopping…[/dim]")
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(child.stop_signal)
        deadline = time.monotonic() + self.cfg.llm.timeout + 15
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                err.print(f"[yellow]{child.name} did not stop in time; killing it[/yellow]")
                child.process.kill()
                child.process.wait()
        out.print("[dim]stopped[/dim]")
