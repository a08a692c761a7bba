"""Running real Konstruct processes from tests."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from tests.forkserver import Forked, ForkServer

if TYPE_CHECKING:
    import uuid
    from decimal import Decimal

    from konstruct.config import Settings
    from konstruct.db.engine import Database

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KONSTRUCT_")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", LITELLM_LOCAL_MODEL_COST_MAP="True", COLUMNS="200")
    env.update(extra)
    return env


_forkserver: ForkServer | None = None
_forkserver_lock = threading.Lock()


def forkserver() -> ForkServer:
    """This test process's fork server (tests/forkserver.py), started on first use, stopped at exit."""
    global _forkserver
    with _forkserver_lock:
        if _forkserver is None:
            _forkserver = ForkServer(Path(tempfile.mkdtemp(prefix="konstruct-fork-")), cli_env())
            atexit.register(_forkserver.close)
        return _forkserver


def konstruct(
    *args: str,
    config: Path | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    cold: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a child process and capture what it prints: forked from the fork server (its imports done),
    or with `cold` a new interpreter (what a shell pays for start-up)."""
    argv = [*(["--config", str(config)] if config is not None else []), *args]
    if cold:
        return subprocess.run(
            [sys.executable, "-m", "konstruct", *argv],
            capture_output=True, text=True, timeout=timeout, env=env or cli_env(), cwd=cwd, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, open(os.devnull, "rb") as null:
        child = forkserver().spawn(argv, env or cli_env(), cwd, null.fileno(), out.fileno(), err.fileno())
        try:
            code = child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(child.args, code, out.read().decode(), err.read().decode())


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def meter(
    db: Database,
    tenant_id: uuid.UUID,
    cost: Decimal,
    *,
    model: str = "openai/gpt-4o-mini",
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    latency_ms: int = 0,
) -> list[int]:
    """One LLM call accounted as the LLM service accounts it (its usage row, the month's spending); the alerts it crossed."""
    from konstruct.llm import ledger

    entry = ledger.Entry(
        tenant_id, None, None, "reply", "agent", model, "platform", prompt_tokens, completion_tokens, cost, latency_ms, None, None
    )
    return await ledger.ledger(db).account(entry)


async def wait_until(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float, what: str, interval: float = 0.05) -> T:
    """`wait_for` for async tests: await `probe()` until `done` holds for what it returned, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        await asyncio.sleep(interval)


STARTED: list[subprocess.Popen[bytes] | Forked] = []  # every Proc's process, for the module's end (tests/conftest.py)


class Proc:
    """A long-running konstruct process (up, gateway, worker) whose output goes to a log file.

    Forked from the fork server (a real process with its imports already done, tests/forkserver.py), except with
    `cold`, and always for `up`: supervision and start-up are what those tests are about, so they get a new interpreter.
    """

    def __init__(
        self,
        name: str,
        args: list[str],
        *,
        config: Path | None,
        log_dir: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        cold: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        argv = [*(["--config", str(config)] if config is not None else []), *args]
        self._log = self.log_path.open("w")
        self.process: subprocess.Popen[bytes] | Forked
        if cold or args[:1] == ["up"]:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "konstruct", *argv],
                stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env or cli_env(), cwd=cwd,
            )  # fmt: skip
        else:
            with open(os.devnull, "rb") as null:
                self.process = forkserver().spawn(argv, env or cli_env(), cwd, null.fileno(), self._log.fileno(), self._log.fileno())
        STARTED.append(self.process)

    @staticmethod
    def leftovers() -> list[subprocess.Popen[bytes] | Forked]:
        """The processes tests started that still run (a fixture that lost track of one, e.g. after replacing it)."""
        return [process for process in STARTED if process.poll() is None]

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            return text in self.log()

        wait_for(seen, timeout, f"{text!r} in the {self.name} log")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"{self.name} did not stop within {timeout}s:\n{self.log()}") from None
        self._log.close()
        return self.process.wait()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._log.close()


_in_process = threading.Lock()


def konstruct_in_process(
    *args: str, config: Path | None = None, env: dict[str, str] | None = None, cwd: Path | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI's real entry point (`konstruct.cli.main`) run in this process under typer's CliRunner: the same parser,
    commands, error handling and exit codes as `konstruct(...)`, without an interpreter start-up. For calls whose process
    boundary is not what the test is about; `konstruct(...)` stays for what a shell sees of a process.

    The environment is exactly `env` (default `cli_env()`) while the command runs; stdin is empty and not a terminal, as
    with `konstruct(...)`. It runs in a thread of its own, since commands call asyncio.run and the caller may be on a
    running loop; calls are serialised (the environment and argv are process-wide). An exception that escapes the entry
    point is printed as the interpreter would (a traceback on stderr, exit code 1), so "no traceback" checks still bite.
    """
    from typer.testing import CliRunner

    from konstruct import cli

    wanted = env if env is not None else cli_env()
    delta: dict[str, str | None] = {key: None for key in os.environ if key not in wanted}
    delta.update(wanted)
    argv = ["konstruct", *(["--config", str(config)] if config is not None else []), *args]
    result: dict[str, Any] = {}

    def invoke() -> None:
        runner = CliRunner()
        with _in_process, contextlib.chdir(cwd or Path.cwd()), runner.isolation(input=input or "", env=delta) as (stdout, stderr, _):
            saved_argv, sys.argv = sys.argv, argv
            code: int = 0
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.argv = saved_argv
                sys.stdout.flush()
                sys.stderr.flush()
            result.update(code=code, stdout=stdout.getvalue().decode(), stderr=stderr.getvalue().decode())

    thread = threading.Thread(target=invoke, name="konstruct-cli")
    thread.start()
    thread.join()
    return subprocess.CompletedProcess(argv, result["code"], result["stdout"], result["stderr"])


@contextlib.asynccontextmanager
async def gateway_in_process(settings: Settings, client: tuple[str, int] = ("127.0.0.1", 123)) -> AsyncIterator[httpx.AsyncClient]:
    """The real gateway app (lifespan included) in this process over ASGI, on the settings' database: for requests a
    gateway process adds nothing to. `client`: the peer address the app sees."""
    from konstruct.gateway.app import create_app

    app = create_app(settings)
    before = asyncio.all_tasks()  # another gateway's (a test may nest two)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            yield http
    # The lifespan's background loops end with it (a health watcher that outlived it once hung a test session).
    left = [task for task in asyncio.all_tasks() - before if task.get_coro().__qualname__.startswith(("DatabaseHealth.", "SocketHolder."))]  # type: ignore[union-attr]
    assert not left, f"the gateway's lifespan ended, these did not: {left}"
