"""The model set-up: `init` writes [llm] and makes one real test call (model up, down, refused, unknown, a key variable
not set); `init` on an existing konstruct.toml changes only [llm]; `doctor` calls the model and shows what the running
worker sees (its key, its config's age); the worker's model error names the configured variable; a command before the
first `up` on the embedded default sets the database up itself."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.llm import probe
from konstruct.llm.service import CallContext, LLMService
from konstruct.tenancy.tenants import create_tenant
from tests.conftest import write_config
from tests.fakes.llm import FakeLLM
from tests.helpers import Proc, cli_env, free_port, konstruct, konstruct_in_process, wait_for

KEY = "sk-model-setup-77aa88bb"


def init(site: Path, *flags: str, **env: str) -> Any:
    return konstruct_in_process("init", "--dir", str(site), *flags, env=cli_env(**env))


def one_line_error(result: Any, *needles: str) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in line, line
    return line


def test_init_makes_one_test_call_and_says_plainly_what_failed(tmp_path: Path, fake_llm: FakeLLM) -> None:
    site = tmp_path / "site"
    flags = ["--llm-model", "openai/fake-model", "--llm-api-base", fake_llm.url, "--llm-api-key-env", "FAKE_KEY"]
    ok = init(site, *flags, FAKE_KEY=KEY)
    assert ok.returncode == 0, ok.stderr
    assert "model openai/fake-model answered in" in ok.stdout
    [call] = fake_llm.requests
    assert call.headers["authorization"] == f"Bearer {KEY}" and call.body["max_tokens"] <= 16
    written = tomllib.loads((site / "konstruct.toml").read_text())["llm"]
    assert written == {"model": "openai/fake-model", "api_base": fake_llm.url, "api_key": {"$env": "FAKE_KEY"}}
    assert KEY not in (site / "konstruct.toml").read_text() + ok.stdout

    # The key variable not set in this shell: said before anything is sent; the config is written all the same.
    missing = init(site, "--force", *flags)
    one_line_error(missing, "key variable FAKE_KEY not set in this shell", "konstruct.toml is written", "konstruct doctor")
    assert len(fake_llm.requests) == 1
    assert tomllib.loads((site / "konstruct.toml").read_text())["llm"]["api_key"] == {"$env": "FAKE_KEY"}

    fake_llm.bad_keys.add(KEY)
    refused = init(site, "--force", *flags, FAKE_KEY=KEY)
    assert KEY not in one_line_error(refused, "401 bad key", "$FAKE_KEY")
    fake_llm.bad_keys.clear()

    fake_llm.fail_models["nope"] = 404
    unknown = init(
        site, "--force", "--llm-model", "openai/nope", "--llm-api-base", fake_llm.url, "--llm-api-key-env", "FAKE_KEY", FAKE_KEY=KEY
    )
    one_line_error(unknown, "unknown model openai/nope")

    dead = f"http://127.0.0.1:{free_port()}/v1"
    down = init(site, "--force", "--llm-model", "openai/fake-model", "--llm-api-base", dead)  # a local server: no key needed
    one_line_error(down, f"server at {dead} not reachable")
    assert tomllib.loads((site / "konstruct.toml").read_text())["llm"] == {"model": "openai/fake-model", "api_base": dead}

    skipped = init(site, "--force", "--llm-model", "openai/fake-model", "--llm-api-base", dead, "--no-test-call")
    assert skipped.returncode == 0 and "answered" not in skipped.stdout, skipped.stderr


def test_init_on_an_existing_config_changes_only_the_model(tmp_path: Path, fake_llm: FakeLLM) -> None:
    site = tmp_path / "site"
    first = init(site)
    assert first.returncode == 0 and "the default" in first.stdout, first.stderr
    config = site / "konstruct.toml"
    config.write_text(config.read_text().replace("[gateway]", "[gateway]\n# my own note\nport = 8123", 1))
    key = (site / ".konstruct" / "secret.key").read_text()
    before = config.read_text()

    again = init(site)
    one_line_error(again, "exists already: pass --force", "--llm-model")
    assert config.read_text() == before

    changed = init(site, "--llm-model", "openai/fake-model", "--llm-api-base", fake_llm.url)
    assert changed.returncode == 0, changed.stderr
    assert "Updated [llm]" in changed.stdout and "model openai/fake-model answered in" in changed.stdout
    after = config.read_text()
    assert "# my own note\nport = 8123" in after and "# Konstruct configuration." in after
    assert [line for line in after.splitlines() if not line.lstrip().startswith(("model", "api_base", "# model", "# api_base"))] == [
        line for line in before.splitlines() if not line.lstrip().startswith(("# model", "# api_base"))
    ]
    cfg = load_settings(config)
    assert (cfg.llm.model, cfg.llm.api_base, cfg.gateway.port) == ("openai/fake-model", fake_llm.url, 8123)
    assert (site / ".konstruct" / "secret.key").read_text() == key


def checks(result: Any) -> dict[str, dict[str, str]]:
    return {c["check"]: c for c in json.loads(result.stdout)["checks"]}


def test_doctor_calls_the_model(tmp_path: Path, database_url: str, fake_llm: FakeLLM) -> None:
    up = write_config(tmp_path / "up", database_url, fake_llm.url)
    llm = checks(konstruct_in_process("doctor", "--json", config=up))["llm"]
    assert llm["status"] == "ok" and "model openai/fake-model answered in" in llm["detail"], llm
    assert fake_llm.requests[-1].headers["authorization"] == "Bearer sk-test-key-0001"

    dead = f"http://127.0.0.1:{free_port()}/v1"
    down = konstruct_in_process("doctor", "--json", config=write_config(tmp_path / "down", database_url, dead))
    assert down.returncode == 1
    llm = checks(down)["llm"]
    assert llm["status"] == "fail" and f"server at {dead} not reachable" in llm["detail"], llm

    missing = write_config(tmp_path / "missing", database_url, fake_llm.url, llm={"api_key": {"$env": "DOCTOR_KEY"}})
    result = konstruct_in_process("doctor", "--json", config=missing, env=cli_env(DOCTOR_KEY=""))
    llm = checks(result)["llm"]
    assert llm["status"] == "fail" and "key variable DOCTOR_KEY not set in this shell" in llm["detail"], llm


def test_doctor_shows_what_the_running_worker_sees(tmp_path: Path, database_url: str, fake_llm: FakeLLM) -> None:
    # The worker runs in a shell where the key variable is empty; this shell has it. Its model error names the variable.
    config = write_config(tmp_path, database_url, fake_llm.url, llm={"api_key": {"$env": "WORKER_KEY"}})
    here = cli_env(WORKER_KEY=KEY)
    worker = Proc("worker", ["worker"], config=config, log_dir=tmp_path, env=cli_env(WORKER_KEY=""))
    try:
        worker.wait_for_log(" ready: ")
        seen = checks(konstruct_in_process("doctor", "--json", config=config, env=here))
        assert seen["llm"]["status"] == "ok", seen
        assert seen["worker key"]["status"] == "fail" and "$WORKER_KEY" in seen["worker key"]["detail"], seen
        assert seen["worker config"]["status"] == "ok", seen

        for args in (["tenant", "create", "Acme", "--slug", "acme"],
                     ["agent", "create", "--tenant", "acme", "--name", "Ava", "--role", "Support", "--persona", "Brief."]):  # fmt: skip
            assert konstruct_in_process(*args, config=config, env=here).returncode == 0
        chat = konstruct_in_process("chat", "--tenant", "acme", "--agent", "Ava", "--message", "hi", "--json", config=config, env=here)
        answer = json.loads(chat.stdout)
        assert answer["status"] == "failed" and "WORKER_KEY not set in the worker's environment" in answer["error"], answer
        assert "OPENAI_API_KEY" not in answer["error"] + worker.log()

        stat = config.stat()
        os.utime(config, (stat.st_atime, stat.st_mtime + 300))  # the file changed 5 minutes after the worker read it
        later = checks(konstruct_in_process("doctor", "--json", config=config, env=here))
        detail = later["worker config"]["detail"]
        assert later["worker config"]["status"] == "warn" and "runs a config 5 min older than konstruct.toml" in detail, later
    finally:
        worker.stop()
    assert KEY not in worker.log()


def test_a_command_before_the_first_up_sets_the_embedded_database_up(tmp_path: Path, fake_llm: FakeLLM) -> None:
    # Real processes on a fresh data directory with its own embedded server (each starts and stops it).
    config = write_config(tmp_path, None, fake_llm.url)
    current = konstruct("db", "current", "--json", config=config, timeout=120)  # even a read-only look
    assert current.returncode == 0, current.stderr
    assert "first run: set up the embedded database" in current.stderr and json.loads(current.stdout)["at_head"] is True
    created = konstruct("tenant", "create", "Acme Inc", config=config, timeout=120)
    assert created.returncode == 0, created.stderr
    assert "first run" not in created.stderr and "acme-inc" in created.stdout
    listed = konstruct("tenant", "list", "--json", config=config, timeout=120)
    assert listed.returncode == 0 and "first run" not in listed.stderr, listed.stderr
    assert [t["slug"] for t in json.loads(listed.stdout)] == ["acme-inc"]
    # An upgrade that died part-way (the app role's password written, the upgrade not completed) is done again.
    (tmp_path / ".konstruct" / "migrated").unlink()
    again = konstruct("tenant", "list", "--json", config=config, timeout=120)
    assert again.returncode == 0 and "first run" in again.stderr, again.stderr
    assert (tmp_path / ".konstruct" / "migrated").read_text().strip() == json.loads(current.stdout)["head"]
    wait_for(lambda: not (tmp_path / ".konstruct" / "pg" / "postmaster.pid").exists(), 30, "the embedded server to stop")


def on_a_terminal(argv: list[str], answers: str, env: dict[str, str]) -> tuple[int, str]:
    """Run a real process on a pseudo-terminal, type the answers, and return its exit code and what it showed."""
    primary, secondary = pty.openpty()
    process = subprocess.Popen(argv, stdin=secondary, stdout=secondary, stderr=secondary, env=env, close_fds=True)
    os.close(secondary)
    os.write(primary, answers.encode())
    seen = b""
    while True:
        if not select.select([primary], [], [], 60)[0]:
            process.kill()
            raise AssertionError(f"it waits for more input:\n{seen.decode()}")
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the process exited and closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(primary)
    return process.wait(60), seen.decode()


def test_init_asks_for_the_model_on_a_terminal(tmp_path: Path, fake_llm: FakeLLM) -> None:
    # No --llm-* flag on a terminal: it asks (model, API base, key variable: none for a local server).
    argv = [sys.executable, "-m", "konstruct", "init", "--dir", str(tmp_path / "site")]
    code, text = on_a_terminal(argv, f"openai/fake-model\n{fake_llm.url}\n\n", cli_env())
    assert code == 0, text
    assert "Model (litellm's provider/model)" in text and "API base" in text and "Environment variable holding the key" in text
    assert "model openai/fake-model answered in" in text
    config = tmp_path / "site" / "konstruct.toml"
    assert tomllib.loads(config.read_text())["llm"] == {"model": "openai/fake-model", "api_base": fake_llm.url}
    assert fake_llm.requests[-1].headers["authorization"] == "Bearer no-key"

    # Again on the existing file: asked again with the current values as defaults (Enter keeps the API base).
    code, text = on_a_terminal(argv, "openai/other-model\n\nOTHER_KEY\n", cli_env(OTHER_KEY=KEY))
    assert code == 0 and "Updated" in text and "[llm] in" in text and "model openai/other-model answered in" in text, text
    assert "[openai/fake-model]" in text and f"[{fake_llm.url}]" in text
    assert tomllib.loads(config.read_text())["llm"]["api_key"] == {"$env": "OTHER_KEY"}
    assert fake_llm.requests[-1].headers["authorization"] == f"Bearer {KEY}" and KEY not in text


async def test_a_server_of_ones_own_needs_no_key(
    tmp_path: Path, database_url: str, fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No llm.api_key and no OPENAI_API_KEY, but an API base: litellm's client insists on a key, the server takes any.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = write_config(tmp_path, database_url, fake_llm.url)
    config.write_text("\n".join(line for line in config.read_text().splitlines() if not line.startswith("api_key")) + "\n")
    cfg = load_settings(config)
    assert cfg.llm.api_key is None
    db = Database(cfg)
    try:
        tenant = await create_tenant(db, name="Local", slug=None, actor="test")
        answer = await LLMService(cfg, db).complete(
            CallContext(tenant.id), model=cfg.llm.model, messages=[{"role": "user", "content": "hi"}]
        )
    finally:
        await db.dispose()
    assert answer.text == "[fake-model] You said: hi"
    assert fake_llm.requests[-1].headers["authorization"] == f"Bearer {probe.LOCAL_SERVER_KEY}"
