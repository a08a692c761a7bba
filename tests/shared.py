"""One database and one real worker per test module, shared by its tests.

A worker costs seconds to start (litellm, and the embedding model where memory is on); a module whose tests only need
chats answered starts one. Each test then works in tenants of its own (`unique_slug`), which row-level security keeps
apart in the shared database, as it keeps real customers apart on one installation.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy.engine import URL

from tests.conftest import write_config
from tests.helpers import Proc


def unique_slug(base: str) -> str:
    """A tenant slug no other test of the shared database uses."""
    return f"{base}-{uuid.uuid4().hex[:6]}"


def _admin(pg_server: URL) -> psycopg.Connection:
    return psycopg.connect(pg_server.set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True)


@contextmanager
def module_database(pg_server: URL, template_db: str) -> Iterator[str]:
    """A database cloned from the migrated template, for the tests of one module."""
    name = f"m_{uuid.uuid4().hex[:16]}"
    with _admin(pg_server) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        yield pg_server.set(database=name).render_as_string(hide_password=False)
    finally:
        with _admin(pg_server) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class SharedWorker:
    config: Path
    database_url: str
    worker: Proc


@contextmanager
def shared_worker(pg_server: URL, template_db: str, path: Path, llm_url: str, **sections: dict[str, object]) -> Iterator[SharedWorker]:
    """A database of its own, a config under `path` and a worker running on both, stopped at the end."""
    with module_database(pg_server, template_db) as database_url:
        config = write_config(path, database_url, llm_url, **sections)
        worker = Proc("worker", ["worker"], config=config, log_dir=path)
        try:
            worker.wait_for_log(" ready: ")
            yield SharedWorker(config, database_url, worker)
        finally:
            worker.stop()
