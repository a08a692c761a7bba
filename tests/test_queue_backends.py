"""The other queue backends: SQLite in the data directory, and Redis for scale-out."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from konstruct.agent.agents import create_agent
from konstruct.db.engine import Database
from konstruct.tenancy.tenants import create_tenant
from tests.conftest import write_config
from tests.fakes.llm import FakeLLM
from tests.helpers import Proc, cli_env, free_port, konstruct_in_process, wait_for


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: .ci/run installs it (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import socket

    def accepting() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(accepting, 10, "redis-server to listen")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_chat_through_each_queue_backend(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, database_url: str, fake_llm: FakeLLM, db: Database
) -> None:
    queue_url = f"sqlite:///{tmp_path / 'queue.db'}" if backend == "sqlite" else request.getfixturevalue("redis_url")
    config = write_config(tmp_path / "site", database_url, fake_llm.url, queue={"url": queue_url})
    tenant = await create_tenant(db, name="Acme", slug="acme", actor="test")
    await create_agent(db, tenant, name="Ava", role="Support", persona="Brief.", model=None, actor="test")
    worker = Proc("worker", ["worker"], config=config, log_dir=tmp_path)
    try:
        worker.wait_for_log(" ready: ")
        result = konstruct_in_process("chat", "-t", "acme", "-a", "Ava", "-m", f"via {backend}", config=config)
        assert result.returncode == 0, result.stderr + worker.log()
        assert result.stdout.strip() == f"[fake-model] You said: via {backend}"
    finally:
        assert worker.stop() == 0


def test_unknown_queue_url_is_a_clear_error(tmp_path: Path, database_url: str, fake_llm: FakeLLM) -> None:
    config = write_config(tmp_path, database_url, fake_llm.url, queue={"url": "amqp://rabbit"})
    result = konstruct_in_process("doctor", config=config)
    assert result.returncode == 1
    assert "queue.url" in result.stdout and "not supported" in result.stdout


def test_running_a_task_costs_the_queue_no_statement_and_revoking_is_refused(tmp_path: Path, database_url: str, fake_llm: FakeLLM) -> None:
    """Konstruct never revokes a task, so huey neither looks up revocation flags before a task nor deletes its flag
    after it: running a task it has taken costs the storage no statement (SQLite's trace hook sees every one)."""
    from konstruct.config import load_settings
    from konstruct.db.urls import resolve_urls
    from konstruct.errors import QueueError
    from konstruct.worker.queue import make_queue

    config = write_config(tmp_path, database_url, fake_llm.url, queue={"url": f"sqlite:///{tmp_path / 'queue.db'}"})
    settings = load_settings(config)
    queue = make_queue(settings, resolve_urls(settings))
    ran: list[int] = []

    @queue.huey.task(name="probe")
    def probe(n: int) -> None:
        ran.append(n)

    result = probe(7)
    task = queue.huey.dequeue()
    statements: list[str] = []
    queue.huey.storage.conn.set_trace_callback(statements.append)
    queue.huey.execute(task)
    assert ran == [7]
    assert statements == []  # no revocation flags read before the task, none deleted after it
    for revoke in (result.revoke, lambda: probe.revoke(), lambda: queue.huey.revoke_by_id(task.id)):
        with pytest.raises(QueueError, match="does not revoke"):
            revoke()
    queue.close()


def test_huey_is_imported_without_redis_and_psycopg_until_a_queue_uses_them(tmp_path: Path, database_url: str, redis_url: str) -> None:
    """huey imports the redis client and psycopg whenever they are installed (~90 ms of `chat`). In a fresh process:
    `chat`'s imports and its queue (the database's: the task is a row of the inbox's own transaction) import neither;
    a Redis queue gets redis and puts a task through a real Redis; the database's queue gets psycopg as it connects."""
    redis_config = write_config(tmp_path / "redis", database_url, "http://127.0.0.1:9/v1", queue={"url": redis_url, "name": "probe"})
    database_config = write_config(tmp_path / "database", database_url, "http://127.0.0.1:9/v1", queue={"name": "probe"})
    probe = f"""
import sys, uuid
from konstruct.cli import command
command().commands["chat"]
from konstruct.config import load_settings
from konstruct.db import migrate
from konstruct.db.urls import resolve_urls
from konstruct.worker.queue import make_queue
def imported():
    return sorted(name for name in ("redis", "psycopg") if name in sys.modules)
settings = load_settings({str(database_config)!r})
queue = make_queue(settings, resolve_urls(settings))
row = queue.outbox(uuid.uuid4(), uuid.uuid4())
assert row is not None and row.table == "huey_task" and row.data, row
assert imported() == [], imported()
settings = load_settings({str(redis_config)!r})
redis_queue = make_queue(settings, resolve_urls(settings))
assert imported() == ["redis"], imported()
redis_queue.enqueue_memory(uuid.uuid4(), uuid.uuid4())
assert redis_queue.pending() == 1
assert redis_queue.huey.dequeue().name == "remember_message" and redis_queue.pending() == 0
redis_queue.close()
assert queue.pending() == 0 and imported() == ["psycopg", "redis"], imported()
queue.close()
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=cli_env())
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
