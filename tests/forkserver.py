"""A fork server for the suite's konstruct processes: real processes, without paying for the imports each time.

A konstruct worker or gateway spends seconds of CPU importing litellm, slack_sdk, sqlalchemy and the rest before it does
anything, and the suite starts such processes over a hundred times on two cores. This server is started once per test
process (`python -m tests.forkserver`), imports all of that once, and forks a child per request. The child is a real
process of its own (its own pid, signals, exit code, SIGKILL ends it at once): it resets what the fork carried over
(signal handlers, environment, working directory, standard streams, argv) and runs `python -m konstruct ARGS` as the
interpreter would. What a test then exercises is the real CLI, worker or gateway code from `main()` on; interpreter
start-up is all it skips. Tests about start-up and supervision (`up`, the README quick start, e2e) start real
interpreters instead (tests/helpers.py `Proc(cold=True)`).

Protocol, over a Unix socket: the client sends one JSON line {argv, env, cwd} with the child's stdin, stdout and stderr
as passed file descriptors; the server answers "pid N\\n", and "exit CODE\\n" when the child ends (CODE as Popen's
returncode: -N for signal N). Closing the server's stdin (the test process ended) kills every child and the server.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import io
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

_MAX_FDS = 3
_SERVER_PYTHONPATH = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]


class Forked:
    """The client side of one child: what tests use of subprocess.Popen (pid, poll, wait, send_signal, kill)."""

    def __init__(self, conn: socket.socket, args: list[str]) -> None:
        self.args = args
        self.returncode: int | None = None
        self._conn = conn
        self._buffer = b""
        self.pid = int(self._line(None).removeprefix("pid "))

    def _line(self, timeout: float | None) -> str:
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._conn], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            data = self._conn.recv(4096)
            if not data:
                raise RuntimeError("the fork server went away")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.wait(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = int(self._line(timeout).removeprefix("exit "))
            self._conn.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The test process's handle on its server, started on first use."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.path = directory / "forkserver.sock"
        self._lock = threading.Lock()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver", str(self.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=Path(__file__).parent.parent,
        )
        assert self._process.stdout is not None
        ready = self._process.stdout.readline()
        if ready != b"ready\n":
            raise RuntimeError(f"the fork server did not start: {ready!r}")

    def spawn(self, argv: list[str], env: dict[str, str], cwd: Path | None, stdin: int, stdout: int, stderr: int) -> Forked:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(self.path))
        request = json.dumps({"argv": argv, "env": env, "cwd": str(cwd or Path.cwd())}).encode() + b"\n"
        socket.send_fds(conn, [request], [stdin, stdout, stderr])
        return Forked(conn, ["konstruct", *argv])

    def close(self) -> None:
        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            self._process.wait(30)


# The server.


def _preload() -> None:
    """What a worker and a gateway import before they serve, imported once here: Konstruct's own modules first, so
    that huey is imported as in a worker started alone (konstruct.worker.queue imports it without the redis client)."""
    # Not konstruct.cli: its consoles read COLUMNS when imported, and each child has its own environment.
    import konstruct.gateway.app
    import konstruct.worker.runtime  # noqa: F401
    from konstruct.worker.main import warm_up

    _preload_libraries()
    warm_up("openai/fake-model")  # the suite's model (tests/conftest.py write_config)


def _preload_libraries() -> None:
    import huey.consumer  # noqa: F401
    import slack_bolt.async_app  # noqa: F401
    import slack_sdk.socket_mode.aiohttp  # noqa: F401
    import uvicorn  # noqa: F401


def _child(request: dict[str, Any], fds: list[int], server: socket.socket, others: list[socket.socket]) -> None:
    """In the forked child: become `python -m konstruct ARGV` started with this environment, cwd and streams."""
    code = 1
    try:
        server.close()
        for other in others:
            other.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        # sys.path as `python -m` builds it in that directory with that PYTHONPATH (a test's plugin lives there).
        theirs = [entry for entry in request["env"].get("PYTHONPATH", "").split(os.pathsep) if entry]
        rest = [entry for entry in sys.path[1:] if entry not in _SERVER_PYTHONPATH]
        sys.path[:] = [request["cwd"], *theirs, *rest]
        importlib.invalidate_caches()
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=unbuffered)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True)
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr  # type: ignore[misc]
        sys.argv = ["konstruct", *request["argv"]]
        try:
            runpy.run_module("konstruct", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except KeyboardInterrupt:  # as the interpreter does: a traceback, then die of the signal
            traceback.print_exc()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:
            traceback.print_exc()
        # As the interpreter finishes: wait for non-daemon threads, run atexit callbacks, flush.
        with contextlib.suppress(Exception):
            threading._shutdown()  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            atexit._run_exitfuncs()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        os._exit(code)


def serve(path: str) -> None:
    _preload()
    import gc

    gc.collect()
    gc.freeze()  # children share the preloaded pages instead of copying them when the collector walks them
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd hears of exits
    children: dict[int, socket.socket] = {}
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    lifeline = sys.stdin.fileno()
    try:
        while True:
            ready, _, _ = select.select([server, wake_r, lifeline], [], [], 1.0)
            if lifeline in ready and not os.read(lifeline, 1):
                return
            if server in ready:
                conn, _ = server.accept()
                message, fds, _, _ = socket.recv_fds(conn, 1 << 20, _MAX_FDS)
                request = json.loads(message)
                pid = os.fork()
                if pid == 0:
                    _child(request, fds, server, [wake_r, wake_w, *children.values(), conn])
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                conn.sendall(f"pid {pid}\n".encode())
            if wake_r in ready:  # a signal's byte: only there to end the select; a byte left over wakes it once more
                with contextlib.suppress(BlockingIOError):
                    wake_r.recv(4096)
            while children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                if pid in children:
                    conn = children.pop(pid)
                    with contextlib.suppress(OSError):
                        conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                    conn.close()
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


if __name__ == "__main__":
    serve(sys.argv[1])
