"""MCP servers declared in plan/apply (`[[tenants.mcp]]`), and `konstruct secrets rotate` re-encrypting their
secrets. Against the real MCP server tests/test_mcp.py uses (the SDK's own, streamable HTTP on loopback), through the
real CLI in-process and a real database; secrets come from the environment and are never printed in full."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet, InvalidToken

from konstruct import audit
from konstruct.config import load_settings
from konstruct.db.engine import Database
from konstruct.db.urls import resolve_urls
from konstruct.secrets import master_keys
from konstruct.tenancy.tenants import get_tenant
from tests import test_mcp
from tests.conftest import write_config
from tests.fakes.mcp_server import LoopbackMcp
from tests.helpers import cli_env, konstruct_in_process

STDIO = list(test_mcp.STDIO)
TOKEN = "shop-token-1a2b3c4d5e6f"
OTHER = "shop-token-0000aaaa7777"
ERP_KEY = "erp-key-5566778899"

# tests/test_mcp.py's fixtures: the loopback MCP server of the module, and a config that may reach it.
shop, config_path = test_mcp.shop, test_mcp.config_path


def run(config: Path, *args: str, **env: str) -> tuple[int, str]:
    done = konstruct_in_process(*args, config=config, env=cli_env(**{"SHOP_TOKEN": TOKEN, "ERP_KEY": ERP_KEY, **env}))
    text = done.stdout + done.stderr
    assert "Traceback" not in text and TOKEN not in text and OTHER not in text and ERP_KEY not in text, text
    return done.returncode, text


def plan(config: Path, file: Path, *extra: str, **env: str) -> list[dict[str, Any]]:
    code, text = run(config, "plan", "-f", str(file), "--json", *extra, **env)
    assert code == 0, text
    return list(json.loads(text))


def summary(changes: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(c["action"], c["kind"], f"{c['tenant']}/{c['name']}") for c in changes]


def declaration(shop_url: str, *, timeout: int = 20, erp: bool = True) -> str:
    text = f"""
[[tenants]]
slug = "acme"
name = "Acme"
[[tenants.agents]]
name = "Ava"
role = "Support"
persona = "Brief."
tools = ["calculator", "shop__lookup_order"]
[[tenants.agents]]
name = "Bob"
role = "Sales"
persona = "Keen."
[[tenants.mcp]]
name = "shop"
url = "{shop_url}"
headers = {{ Authorization = "Bearer $env:SHOP_TOKEN", X-Shop = "acme" }}
agents = ["Ava"]
timeout = {timeout}
"""
    if erp:
        text += f'[[tenants.mcp]]\nname = "erp"\ncommand = {json.dumps(STDIO)}\nenv = {{ ERP_KEY = "$env:ERP_KEY" }}\ncheck = false\n'
    return text


def audit_actions(config: Path) -> list[str]:
    async def go() -> list[str]:
        db = Database(load_settings(config))
        try:
            return [e.action for e in await audit.events(db, (await get_tenant(db, "acme")).id)]
        finally:
            await db.dispose()

    return asyncio.run(go())


def test_declared_servers_plan_apply_idempotently_and_go_only_with_prune(config_path: Path, tmp_path: Path, shop: LoopbackMcp) -> None:
    file = tmp_path / "tenants.toml"
    file.write_text(declaration(shop.url))
    first = plan(config_path, file)
    assert summary(first)[-2:] == [("create", "mcp", "acme/shop"), ("create", "mcp", "acme/erp")]
    fields = {c["name"]: c["fields"] for c in first if c["kind"] == "mcp"}
    assert fields["shop"]["headers.Authorization"] == {"now": None, "then": "…" + TOKEN[-4:]}
    assert fields["shop"]["headers.X-Shop"] == {"now": None, "then": "…"}  # too short to show any of it
    assert fields["shop"]["url"]["then"] == shop.url and fields["shop"]["agents"]["then"] == ["Ava"]
    assert fields["erp"]["transport"]["then"] == "stdio" and fields["erp"]["env.ERP_KEY"]["then"] == "…" + ERP_KEY[-4:]

    code, text = run(config_path, "apply", "-f", str(file))
    assert code == 0 and "applied" in text, text
    servers = {s["name"]: s for s in json.loads(run(config_path, "mcp", "list", "-t", "acme", "--json")[1])}
    assert len(servers["shop"]["tools"]) == 8 and servers["shop"]["agents"] == ["Ava"] and servers["shop"]["timeout_seconds"] == 20
    assert servers["erp"]["tools"] == [] and servers["erp"]["command"] == STDIO  # check = false: stored without connecting
    assert shop.authorization == f"Bearer {TOKEN}"  # apply connected with the declared header
    ava = json.loads(run(config_path, "agent", "show", "Ava", "-t", "acme", "--json")[1])
    assert ava["settings"]["tools"] == ["calculator", "shop__lookup_order"]  # the agent's tools name a server made in the same apply
    assert plan(config_path, file) == []  # idempotent
    code, text = run(config_path, "apply", "-f", str(file))
    assert code == 0 and "nothing to do" in text

    file.write_text(declaration(shop.url, timeout=5, erp=False))
    [change] = plan(config_path, file, SHOP_TOKEN=OTHER)
    assert summary([change]) == [("change", "mcp", "acme/shop")]
    assert change["fields"] == {
        "timeout_seconds": {"now": 20.0, "then": 5.0},
        "headers.Authorization": {"now": "…" + TOKEN[-4:], "then": "…" + OTHER[-4:]},
    }
    assert summary(plan(config_path, file, "--prune", SHOP_TOKEN=OTHER)) == [("change", "mcp", "acme/shop"), ("delete", "mcp", "acme/erp")]
    [alike] = plan(config_path, file, SHOP_TOKEN=OTHER[:-4] + TOKEN[-4:])  # another value that ends alike: still told apart
    assert alike["fields"]["headers.Authorization"] == {"now": "…" + TOKEN[-4:], "then": "…" + TOKEN[-4:] + " (changed)"}
    assert run(config_path, "apply", "-f", str(file), SHOP_TOKEN=OTHER)[0] == 0
    assert shop.authorization == f"Bearer {OTHER}"
    assert {s["name"] for s in json.loads(run(config_path, "mcp", "list", "-t", "acme", "--json")[1])} == {"shop", "erp"}  # no --prune
    code, text = run(config_path, "apply", "-f", str(file), "--prune", SHOP_TOKEN=OTHER)
    assert code == 0 and "erp" in text
    assert [s["name"] for s in json.loads(run(config_path, "mcp", "list", "-t", "acme", "--json")[1])] == ["shop"]
    assert plan(config_path, file, "--prune", SHOP_TOKEN=OTHER) == []
    actions = audit_actions(config_path)
    assert actions.count("mcp.added") == 2 and "mcp.changed" in actions and "mcp.removed" in actions


BAD = (
    ('url = "URL"\nheaders = { Authorization = "Bearer abc123" }', "headers.Authorization: a secret is never written in the file"),
    ('url = "URL"\nheaders = { X-Tenant = "$env:NOT_SET_ANYWHERE" }', "headers.X-Tenant: environment variable NOT_SET_ANYWHERE is not set"),
    ('command = "python x.py"\nenv = { ERP_SECRET = "hunter2hunter2" }', "env.ERP_SECRET: a secret is never written in the file"),
    ('url = "URL"\ncommand = "python x.py"', "give url (streamable HTTP) or command (stdio), one of them"),
    ('command = "python x.py"\nheaders = { X-A = "b" }', "headers are for a url server"),
    ('url = "URL"\nagents = ["Zed"]', "no agent 'Zed' is declared"),
    ('url = "URL"\ntimeout = 0', "timeout"),
    ('url = ""', "give the server's http:// or https:// endpoint"),
    ('url = "URL"\ncolour = "red"', "colour"),
)


def test_bad_declarations_are_one_line_each(config_path: Path, tmp_path: Path, shop: LoopbackMcp, database_url: str) -> None:
    file = tmp_path / "bad.toml"
    head = '[[tenants]]\nslug = "acme"\nname = "Acme"\n[[tenants.agents]]\nname = "Ava"\nrole = "R"\npersona = "P"\n'
    for body, words in BAD:
        file.write_text(head + '[[tenants.mcp]]\nname = "shop"\n' + body.replace("URL", shop.url) + "\n")
        code, text = run(config_path, "plan", "-f", str(file))
        assert code == 1 and words in text and len(text.strip().splitlines()) == 1, (body, text)
    file.write_text(head + 'tools = ["crm__find"]\n[[tenants.mcp]]\nname = "shop"\nurl = "' + shop.url + '"\n')
    code, text = run(config_path, "plan", "-f", str(file))
    assert code == 1 and "unknown tool(s) crm__find" in text
    file.write_text(head + f'[[tenants.mcp]]\nname = "shop"\nurl = "{shop.url}"\n[[tenants.mcp]]\nname = "shop"\nurl = "{shop.url}"\n')
    assert "declared twice" in run(config_path, "plan", "-f", str(file))[1]

    file.write_text(head + f'[[tenants.mcp]]\nname = "shop"\nurl = "{shop.url}"\n')
    strict = write_config(tmp_path / "strict", database_url, "http://127.0.0.1:1")  # [mcp] allow_private off, the default
    code, text = run(strict, "plan", "-f", str(file))
    assert code == 1 and "private or reserved address" in text
    file.write_text(head + '[[tenants.mcp]]\nname = "shop"\nurl = "http://127.0.0.1:1/mcp"\n')
    code, text = run(config_path, "apply", "-f", str(file))
    assert code == 1 and "could not connect to MCP server shop" in text and "check = false" in text, text


def owner_bytes(config: Path) -> list[bytes]:
    """mcp_servers.secrets as the table owner reads it (bypassing row-level security)."""
    with psycopg.connect(resolve_urls(load_settings(config)).owner_sync().replace("+psycopg", "")) as conn:
        return [bytes(row[0]) for row in conn.execute("select secrets from mcp_servers where secrets is not null").fetchall()]


def test_rotation_reencrypts_mcp_secrets_and_the_server_still_connects(config_path: Path, shop: LoopbackMcp) -> None:
    assert run(config_path, "tenant", "create", "Acme")[0] == 0
    code, text = run(config_path, "mcp", "add", "shop", "-t", "acme", "--url", shop.url, "--header", "Authorization=Bearer $env:SHOP_TOKEN")
    assert code == 0, text
    [before] = owner_bytes(config_path)
    [old_key] = master_keys(load_settings(config_path))
    assert TOKEN in Fernet(old_key.encode()).decrypt(before).decode()

    code, text = run(config_path, "secrets", "rotate", "--json")
    assert code == 0 and json.loads(text)["secrets_reencrypted"] == 1, text
    [after] = owner_bytes(config_path)
    new_key, kept = master_keys(load_settings(config_path))
    assert after != before and kept == old_key
    with pytest.raises(InvalidToken):
        Fernet(old_key.encode()).decrypt(after)  # the old key alone no longer opens it
    assert TOKEN in Fernet(new_key.encode()).decrypt(after).decode()

    shop.authorization = None
    code, text = run(config_path, "mcp", "test", "shop", "-t", "acme")
    assert code == 0 and "connected" in text and shop.authorization == f"Bearer {TOKEN}", text
    code, text = run(config_path, "secrets", "rotate", "--drop-old", "--json")
    assert code == 0 and json.loads(text)["old_keys_dropped"] == 1, text
    assert master_keys(load_settings(config_path)) == [new_key]
    shop.authorization = None
    code, text = run(config_path, "mcp", "show", "shop", "-t", "acme")
    assert code == 0 and "…" + TOKEN[-4:] in text  # shown by hint, only
    code, text = run(config_path, "mcp", "test", "shop", "-t", "acme")
    assert code == 0 and shop.authorization == f"Bearer {TOKEN}", text
    with pytest.raises(InvalidToken):
        Fernet(old_key.encode()).decrypt(owner_bytes(config_path)[0])
