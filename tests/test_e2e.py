"""End to end, as in the README: init in an empty folder, create a tenant and an agent, `konstruct up`
on the embedded database, chat, stop with Ctrl-C (SIGINT)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psycopg

from tests.fakes.llm import FakeLLM
from tests.helpers import Proc, cli_env, free_port, konstruct


def test_init_up_chat_on_the_embedded_defaults(tmp_path: Path, fake_llm: FakeLLM) -> None:
    site = tmp_path / "site"
    port = free_port()
    # The platform key comes from the environment, as a reference in the file: never written down.
    env = cli_env(FAKE_PROVIDER_KEY="sk-e2e-secret-9876")
    init = konstruct(
        "init", "--dir", str(site), "--llm-model", "openai/fake-model", "--llm-api-base", fake_llm.url,
        "--llm-api-key-env", "FAKE_PROVIDER_KEY", "--port", str(port), env=env,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    assert "sk-e2e-secret-9876" not in (site / "konstruct.toml").read_text()
    shown = json.loads(konstruct("config", "show", "--json", env=env, cwd=site).stdout)
    assert shown["gateway"]["public_url"] == f"http://127.0.0.1:{port}"  # not written down: it follows the port

    up = Proc("up", ["up"], config=None, log_dir=tmp_path, env=env, cwd=site)  # finds ./konstruct.toml
    try:
        up.wait_for_log("Konstruct is up", timeout=90)
        for args in (
            ["tenant", "create", "Acme Robotics", "--slug", "acme"],
            ["agent", "create", "--tenant", "acme", "--name", "Ava", "--role", "Support", "--persona", "You help Acme's customers."],
        ):
            result = konstruct(*args, env=env, cwd=site)
            assert result.returncode == 0, result.stderr
        chat = konstruct("chat", "--tenant", "acme", "--agent", "Ava", "--message", "Hello, who are you?", env=env, cwd=site)
        assert chat.returncode == 0, chat.stderr + up.log()
        assert chat.stdout.strip() == "[fake-model] You said: Hello, who are you?"
        assert fake_llm.requests[-1].headers["authorization"] == "Bearer sk-e2e-secret-9876"

        up.wait_for_log("standby: warm", timeout=60)  # else doctor rightly warns that the spare is still starting
        doctor = konstruct("doctor", "--json", env=env, cwd=site)
        assert doctor.returncode == 0, doctor.stdout
        assert all(c["status"] == "ok" for c in json.loads(doctor.stdout)["checks"]), doctor.stdout

        # The rows are in the embedded database (read as its superuser, over its unix socket).
        pgdata = site / ".konstruct" / "pg"
        with psycopg.connect(f"postgresql://postgres@/konstruct?host={pgdata}") as conn:
            conversations = conn.execute("select channel, person, agent_id is not null from conversations").fetchall()
            assert len(conversations) == 1 and conversations[0][0] == "terminal"
            statuses = conn.execute("select status from inbound_messages").fetchall()
            assert statuses == [("replied",)]
            actions = {row[0] for row in conn.execute("select action from audit_events")}
            assert {"tenant.created", "agent.created", "message.received", "message.replied"} <= actions
    finally:
        code = up.stop(signal.SIGINT, timeout=60)
    log = up.log()
    assert code == 0, log
    assert "stopped" in log and "worker stopped" in log
    assert "sk-e2e-secret-9876" not in log
