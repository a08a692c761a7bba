"""Shared fixtures: one embedded PostgreSQL per session, a fresh database per test, the fake LLM.

Each test gets its own database, cloned from a migrated template (CREATE DATABASE … TEMPLATE),
so tests that run real gateway and worker processes are isolated as well as in-process ones.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

# The CLI's consoles (konstruct.cli.common) take their width from COLUMNS when first imported, which may be before a
# test's own environment applies (in-process CLI calls; a pytest-xdist worker imports in another order): the same
# width as cli_env() gives processes, for every way of running the suite.
os.environ["COLUMNS"] = "200"

import psycopg
import pytest
from sqlalchemy.engine import URL, make_url

from konstruct.config import Settings, _toml_value, load_settings
from konstruct.db import migrate
from konstruct.db.embedded import start_embedded
from konstruct.db.engine import Database
from konstruct.secrets import create_secret_key_file
from tests.fakes.llm import FakeLLM
from tests.helpers import Proc, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# Seconds each module took in one `make test` (tests and their fixtures; 3 processes on 2 cores), for the order only:
# pytest-xdist hands whole modules (--dist loadfile) to whichever process is free, in collection order, so the longest
# go first and the short ones fill the gaps at the end (a long module collected last kept one process busy for ~45 s
# after the others had finished). A module not listed counts as short; a stale figure costs time, never a test.
MODULE_SECONDS = {
    "hostile": 77,
    "up": 65,
    "crash_safety": 41,
    "cli": 39,
    "slack_feedback": 34,
    "brain": 29,
    "knowledge_ingest": 28,
    "model_setup": 28,
    "readme": 26,
    "chat_tty": 24,
    "approvals": 21,
    "slack_stream": 21,
    "e2e": 21,
    "handoff": 21,
    "slack_socket": 21,
    "slack_agent": 20,
    "knowledge_search": 17,
    "billing": 17,
    "slack": 17,
    "permissions": 16,
    "worker": 15,
    "budget": 15,
    "embedding": 14,
    "status_page": 13,
    "keys": 12,
    "whatsapp": 12,
    "knowledge_recovery": 11,
    "onboard": 11,
    "mcp": 9,
    "isolation": 9,
    "chat": 9,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first (a stable sort: each module's own tests keep their order)."""
    items.sort(key=lambda item: -MODULE_SECONDS.get(Path(str(item.path)).stem.removeprefix("test_"), 0))


APP_PASSWORD = "test-app-password"
TEMPLATE = "konstruct_template"


@pytest.fixture(scope="module", autouse=True)
def no_process_left() -> Iterator[None]:
    """After each module, every process its tests started (tests/helpers.py Proc) has stopped: one left running would
    cost the rest of the suite its CPU. Any left is killed, and the module fails."""
    yield
    left = Proc.leftovers()
    for process in left:
        process.kill()
        process.wait()
    if left:
        pytest.fail(f"processes left running after the module, killed now: {[str(p.args) for p in left]}")


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> URL:
    """The superuser URL of an embedded PostgreSQL + pgvector, started once for the session."""
    data = tmp_path_factory.mktemp("embedded")
    url = make_url(start_embedded(data))
    # Durability against power loss is not what the suite tests (a killed process loses nothing with these off;
    # only the OS crashing would): without the flushes, cloning a test database takes 0.02 s instead of 0.15 s.
    with _admin(url) as conn:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            conn.execute(f"ALTER SYSTEM SET {setting} = off")
        conn.execute("SELECT pg_reload_conf()")
    return url


def _admin(pg_server: URL) -> psycopg.Connection:
    return psycopg.connect(pg_server.set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True)


@pytest.fixture(scope="session")
def template_db(pg_server: URL, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database migrated to head, cloned for every test."""
    with _admin(pg_server) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    url = pg_server.set(database=TEMPLATE).render_as_string(hide_password=False)
    settings = Settings(
        database={"url": url, "app_password": APP_PASSWORD},  # type: ignore[arg-type]
        data={"dir": tmp_path_factory.mktemp("template-data")},  # type: ignore[arg-type]
    )
    migrate.upgrade(settings)
    return TEMPLATE


@pytest.fixture
def database_url(pg_server: URL, template_db: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    with _admin(pg_server) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield pg_server.set(database=name).render_as_string(hide_password=False)
    with _admin(pg_server) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def fake_llm_server() -> Iterator[FakeLLM]:
    fake = FakeLLM().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_llm(fake_llm_server: FakeLLM) -> FakeLLM:
    fake_llm_server.reset()
    return fake_llm_server


def write_config(path: Path, database_url: str | None, llm_url: str, **sections: dict[str, object]) -> Path:
    """A konstruct.toml for tests: an external database URL (the test database; None: an embedded server of its
    own under path/.konstruct), the fake LLM."""
    port = free_port()
    values: dict[str, dict[str, object]] = {
        "database": {"url": database_url, "app_password": APP_PASSWORD} if database_url else {},
        "gateway": {"port": port, "public_url": f"http://127.0.0.1:{port}"},
        "llm": {"model": "openai/fake-model", "api_base": llm_url, "api_key": "sk-test-key-0001", "timeout": 10, "retries": 0},
        "worker": {"heartbeat_interval": 0.5, "stale_after": 5, "received_grace": 30},
        # Long-term memory loads a sentence-transformers model in the worker: on only where a test is about it.
        "memory": {"enabled": False},
    }
    for name, extra in sections.items():
        values.setdefault(name, {}).update(extra)
    lines = []
    for name, section in values.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in section.items()]
    path.mkdir(parents=True, exist_ok=True)
    config = path / "konstruct.toml"
    config.write_text("\n".join(lines) + "\n")
    create_secret_key_file(path / ".konstruct" / "secret.key")
    return config


@pytest.fixture
def config_path(tmp_path: Path, database_url: str, fake_llm: FakeLLM) -> Path:
    return write_config(tmp_path, database_url, fake_llm.url)


@pytest.fixture
def settings(config_path: Path) -> Settings:
    return load_settings(config_path)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    database = Database(settings)
    yield database
    await database.dispose()
