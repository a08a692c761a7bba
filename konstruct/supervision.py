"""What `konstruct up` tells about its parts, and how the inbox is doing: read by `doctor` and the status page.

`up` keeps its state in `up.json` in the data directory (written in one step, 0600); a reader believes it only
while the `up` that wrote it still runs. One `up` per data directory: it holds an flock on `up.lock` there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from konstruct.errors import ConflictError

if TYPE_CHECKING:  # `up` imports this module and needs no database session: SQLAlchemy stays out of its start-up
    from konstruct.db.engine import Database

STATE_FILE = "up.json"
LOCK_FILE = "up.lock"
FORKED_PREFIX = "@worker "  # how a worker forked by `up`'s spare marks its log lines on the spare's output
RECENT = 600.0  # seconds of deaths that count as recent
HELD_ENV = "KONSTRUCT_UP_HELD"  # set by `up` on a part it starts before its database is ready (see released)


def hold_up_lock(data_dir: Path) -> int:
    """Claim the data directory for this `up` (an flock on up.lock, which holds our pid) and return the descriptor,
    to be kept open for as long as `up` runs. The kernel drops the lock when the process dies, SIGKILL included; the
    descriptor is close-on-exec, so no child (parts, the embedded PostgreSQL) holds it on. ConflictError when taken."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f"pid {holder}" if holder.isdigit() else "its pid not written yet"
        stop = f"`kill {holder}`" if holder.isdigit() else "`kill` on it"
        raise ConflictError(
            f"another `konstruct up` ({who}) runs on the data directory {data_dir}: "
            f"stop it first (Ctrl-C in its terminal, or {stop}), or use another data.dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_up_lock(fd: int) -> None:
    """Let the data directory go (the file stays: removing it could let two `up`s lock two different files)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)


def released() -> bool:
    """In a part `up` started while its database was still starting (HELD_ENV set): wait, having imported what the
    part runs, for `up` to send on standard input the environment the part is to run with (one JSON line: where the
    database is), apply it and return True. False when `up` gave up first (end of input): the part then just exits.
    Any other process returns True at once."""
    if os.environ.pop(HELD_ENV, None) is None:
        return True
    line = sys.stdin.readline()
    if not line.strip():
        return False
    os.environ.update(json.loads(line))
    return True


def write_state(path: Path, data: dict[str, Any]) -> None:
    """Replace the state file in one step (0600), so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
    os.replace(tmp, path)


def read_state(data_dir: Path) -> dict[str, Any] | None:
    """What a running `up` last wrote about its parts, or None when no `up` runs on this data directory."""
    try:
        data = json.loads((data_dir / STATE_FILE).read_text())
        alive = psutil.pid_exists(int(data["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if alive else None


def summarise(state: dict[str, Any] | None) -> tuple[str, list[str]]:
    """("ok" or "warn", one line per part) for a person: which parts run, how often they restarted lately,
    which keep dying, and the embedded database's restarts."""
    if state is None:
        return "ok", ["no `konstruct up` runs on this data directory (parts may run on their own)"]
    status, lines = "ok", []
    minutes = int(state.get("recent_seconds", RECENT) // 60)
    for name, part in (state.get("parts") or {}).items():
        line = f"{name} {part.get('state')}"
        if part.get("restarts"):
            line += f", {part['restarts']} restarts in the last {minutes} min"
        last = part.get("last_exit")
        if last:
            line += f" (last exit code {last.get('code')} after {last.get('after_seconds')}s)"
        if part.get("crash_looping"):
            line += " — crash-looping, restarting with a growing pause"
            status = "warn"
        elif part.get("state") != "running":
            status = "warn"
        lines.append(line)
    database = state.get("database")
    if database:
        if database.get("down_since"):
            lines.append(f"database down since {time.strftime('%H:%M:%S', time.localtime(database['down_since']))}, being restarted")
            status = "warn"
        elif database.get("restarts"):
            at = time.strftime("%H:%M:%S", time.localtime(database["last_restart_at"]))
            lines.append(f"database restarted {database['restarts']} time(s), last at {at}")
        else:
            lines.append("database running")
    return status, lines


@dataclass(frozen=True)
class InboxHealth:
    received: int
    processing: int
    suspect: int  # in flight when a worker died, waiting to be answered alone
    given_up: int  # failed after worker.max_attempts in the period
    last_given_up: Any


async def inbox_health(db: Database, *, since: timedelta = timedelta(hours=24)) -> InboxHealth:
    """Counts across tenants (a SECURITY DEFINER read-out: no message text)."""
    from sqlalchemy import text  # `up` imports this module before it has started its parts: SQLAlchemy waits

    async with db.system() as session:
        row = (await session.execute(text("select * from konstruct_inbox_health(:since)"), {"since": since})).one()
    return InboxHealth(int(row.received), int(row.processing), int(row.suspect), int(row.given_up), row.last_given_up)
