"""One database and one real worker per test module, shared by its tests.

A worker costs seconds to start (litellm, and the embedding model where memory is on); a module whose tests only need
chats answered starts one. Each test then works in tenants of its own (`unique_slug`), which row-level security keeps
apart in the shared database, as it keeps real customers apart on one installation.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy import select
from sqlalchemy.engine import URL

from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.db.models import InboundMessage as InboxRow
from tests.conftest import write_config
from tests.helpers import Proc

FINISHED = ("replied", "failed", "ignored")


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
        shared = SharedWorker(config, database_url, Proc("worker", ["worker"], config=config, log_dir=path))
        try:
            shared.worker.wait_for_log(" ready: ")
            yield shared
        finally:
            shared.worker.stop()  # the one running now: a test may have replaced a killed one


@dataclass
class SharedStack:
    """A gateway and a worker on one database, shared by the tests of a module (each in tenants of its own)."""

    config: Path
    database_url: str
    log_dir: Path
    gateway: Proc
    worker: Proc
    base: str

    def replace_worker(self) -> Proc:
        """Stop the worker (if it runs) and start another: for a test about what a new worker finds."""
        self.worker.stop()
        self.worker = Proc("worker", ["worker"], config=self.config, log_dir=self.log_dir)
        self.worker.wait_for_log(" ready: ")
        return self.worker

    def ensure_worker(self) -> None:
        """A test that stopped the worker and failed before starting one leaves the next test a worker all the same."""
        if self.worker.process.poll() is not None:
            self.replace_worker()


@contextmanager
def shared_stack(pg_server: URL, template_db: str, path: Path, llm_url: str, **sections: dict[str, object]) -> Iterator[SharedStack]:
    """A database of its own, a config under `path`, a gateway and a worker on both, stopped at the end."""
    with module_database(pg_server, template_db) as database_url:
        config = write_config(path, database_url, llm_url, **sections)
        port = load_settings(config).gateway.port
        gateway = Proc("gateway", ["gateway"], config=config, log_dir=path)
        stack = SharedStack(
            config, database_url, path, gateway, Proc("worker", ["worker"], config=config, log_dir=path), f"http://127.0.0.1:{port}"
        )
        try:
            gateway.wait_for_log("Uvicorn running on")
            stack.worker.wait_for_log(" ready: ")
            yield stack
        finally:
            for proc in (stack.gateway, stack.worker):
                proc.stop()


async def wait_finished(db: Database, tenant_id: uuid.UUID, count: int | None = None, timeout: float = 30) -> bool:
    """Until the tenant's inbox holds `count` rows (any number: None), every one finished: nothing they bring is still
    to come. False when that did not happen within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with db.tenant(tenant_id=tenant_id) as session:
            states = list(await session.scalars(select(InboxRow.status)))
        if (count is None or len(states) == count) and all(s in FINISHED for s in states):
            return True
        await asyncio.sleep(0.05)
    return False
