"""The tool layer: registry, argument checks, built-ins (web_fetch against a loopback server) and entry-point plugins."""

from __future__ import annotations

import asyncio
import importlib.metadata
import ipaddress
import json
import logging
import re
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from konstruct.agent.tools import Registry, Tool, ToolContext, ToolError, build_registry, default_registry, web
from konstruct.agent.tools.builtin import builtin_tools
from konstruct.agent.tools.calculator import evaluate, format_number
from konstruct.agent.tools.registry import redact
from tests.fakes.server import LoopbackServer, QuietHandler, serve, shutdown


def make_ctx(
    allowed: tuple[str, ...] = (), *, allow_private: bool = False, services: dict[str, Any] | None = None, **web: Any
) -> ToolContext:
    """A tool context; `web` sets web_fetch's rules as [agent] settings would (private_networks, web_seconds, ca_file)."""
    return ToolContext(uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), "someone", allowed, allow_private, services or {}, **web)


# ---------------------------------------------------------------- registry


async def _echo(args: dict[str, Any], ctx: ToolContext) -> str:
    return json.dumps(args, sort_keys=True)


ECHO = Tool(
    "echo",
    "Echo the arguments.",
    {
        "type": "object",
        "properties": {
            "text": {"type": "string"},
            "times": {"type": "integer", "minimum": 1, "maximum": 3},
            "mode": {"type": "string", "enum": ["loud", "quiet"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "ratio": {"type": ["number", "null"]},
        },
        "required": ["text"],
        "additionalProperties": False,
    },
    _echo,
)


def _tool(name: str, run: Any, **kwargs: Any) -> Tool:
    return Tool(name, f"{name} for tests", {"type": "object", "properties": {}}, run, **kwargs)


async def _slow(args: dict[str, Any], ctx: ToolContext) -> str:
    await asyncio.Event().wait()  # never finishes: only the registry's timeout ends it
    return "too late"


async def _crash(args: dict[str, Any], ctx: ToolContext) -> str:
    raise RuntimeError("disk on fire " + "x" * 1000)


async def _refuse(args: dict[str, Any], ctx: ToolContext) -> str:
    raise ToolError("not today")


async def _huge(args: dict[str, Any], ctx: ToolContext) -> str:
    return "a" * 20_000


@pytest.fixture
def registry() -> Registry:
    return Registry([ECHO, _tool("slow", _slow), _tool("crash", _crash), _tool("refuse", _refuse), _tool("huge", _huge)])


def test_specs_names_and_duplicates(registry: Registry) -> None:
    assert registry.names() == ["crash", "echo", "huge", "refuse", "slow"]
    specs = registry.specs(["echo", "nope", "slow", "echo"])
    assert [s["function"]["name"] for s in specs] == ["echo", "slow"]
    assert specs[0] == {
        "type": "function",
        "function": {"name": "echo", "description": "Echo the arguments.", "parameters": ECHO.parameters},
    }
    assert registry.validate_names(["echo", "nope", "web_fetch"]) == ["nope", "web_fetch"]
    assert registry.get("echo") is ECHO and registry.get("nope") is None
    with pytest.raises(ValueError, match="already registered"):
        registry.register(ECHO)


@pytest.mark.parametrize("name", ["Echo", "1tool", "with-dash", "", "a" * 65])
def test_tool_names_are_checked(name: str) -> None:
    with pytest.raises(ValueError, match="invalid tool name"):
        _tool(name, _echo)


def test_parameters_must_be_an_object_schema() -> None:
    with pytest.raises(ValueError, match="type object"):
        Tool("bad", "bad", {"type": "string"}, _echo)


async def test_call_ok_with_json_or_dict(registry: Registry) -> None:
    result = await registry.call("echo", '{"text": "hi", "times": 2.0}', make_ctx(), timeout=1)
    assert result.ok and result.arguments == {"text": "hi", "times": 2}
    assert result.output == '{"text": "hi", "times": 2}'
    assert isinstance(result.duration_ms, int) and result.duration_ms >= 0
    result = await registry.call("echo", {"text": "hi", "tags": ["a"], "ratio": None}, make_ctx(), timeout=1)
    assert result.ok and result.arguments == {"text": "hi", "tags": ["a"], "ratio": None}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"text": ', "not valid JSON"),
        ("[1, 2]", "must be a JSON object, not array"),
        ("{}", "text is required"),
        ('{"text": 5}', "text must be string, not integer"),
        ('{"text": "a", "times": true}', "times must be integer, not boolean"),
        ('{"text": "a", "times": 1.5}', "times must be integer, not number"),
        ('{"text": "a", "times": 9}', "times must be at most 3"),
        ('{"text": "a", "mode": "shouty"}', 'mode must be one of "loud", "quiet"'),
        ('{"text": "a", "tags": ["x", 1]}', "tags[1] must be string"),
        ('{"text": "a", "ratio": "1"}', "ratio must be number or null, not string"),
        ('{"text": "a", "extra": 1}', "extra is not an accepted argument"),
    ],
)
async def test_bad_arguments(registry: Registry, raw: str, message: str) -> None:
    result = await registry.call("echo", raw, make_ctx(), timeout=1)
    assert not result.ok
    assert message in result.output
    assert "Traceback" not in result.output


async def test_empty_arguments_mean_none(registry: Registry) -> None:
    result = await registry.call("huge", "", make_ctx(), timeout=1)
    assert result.ok and result.arguments == {}


async def test_unknown_tool(registry: Registry) -> None:
    result = await registry.call("nope", "{}", make_ctx(), timeout=1)
    assert not result.ok and "no tool named 'nope'" in result.output


async def test_timeout(registry: Registry) -> None:
    started = time.monotonic()
    result = await registry.call("slow", "{}", make_ctx(), timeout=0.2)
    assert not result.ok and "did not finish within 0.2 seconds" in result.output
    assert time.monotonic() - started < 2


async def test_failures_become_messages(registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="konstruct.tools"):
        result = await registry.call("crash", "{}", make_ctx(), timeout=1)
    assert not result.ok
    assert result.output.startswith("error: RuntimeError: disk on fire")
    assert len(result.output) <= len("error: ") + 500
    assert "Traceback" not in result.output
    assert "tool crash failed" in caplog.text
    result = await registry.call("refuse", "{}", make_ctx(), timeout=1)
    assert not result.ok and result.output == "error: not today"


async def test_output_is_truncated(registry: Registry) -> None:
    result = await registry.call("huge", "{}", make_ctx(), timeout=1)
    assert result.ok and len(result.output) <= 8_000
    assert result.output.startswith("aaa") and result.output.endswith("[truncated: 20000 characters in all]")


async def test_redaction() -> None:
    secret = Tool(
        "login",
        "login",
        {"type": "object", "properties": {"user": {"type": "string"}, "pin": {"type": "string"}, "options": {"type": "object"}}},
        _echo,
        secret_args=("pin",),
    )
    arguments = {
        "user": "ann",
        "pin": "1234",
        "options": {"API-Key": "k", "api_key": "k", "Authorization": "Bearer x", "nested": [{"refresh_token": "t", "ok": 1}], "keep": "me"},
    }
    result = await Registry([secret]).call("login", json.dumps(arguments), make_ctx(), timeout=1)
    assert result.ok and result.arguments == arguments
    assert result.redacted_arguments == {
        "user": "ann",
        "pin": "[redacted]",
        "options": {
            "API-Key": "[redacted]",
            "api_key": "[redacted]",
            "Authorization": "[redacted]",
            "nested": [{"refresh_token": "[redacted]", "ok": 1}],
            "keep": "me",
        },
    }
    assert redact({"password": "p", "my_secret_thing": 1, "Token": 2, "apikey": 3, "name": 4}) == {
        "password": "[redacted]",
        "my_secret_thing": "[redacted]",
        "Token": "[redacted]",
        "apikey": "[redacted]",
        "name": 4,
    }


# ---------------------------------------------------------------- plugins


async def _ping(args: dict[str, Any], ctx: ToolContext) -> str:
    return "pong"


def make_tools() -> list[Tool]:
    """A plugin factory returning several tools (used through a fake entry point)."""
    return [_tool("ping", _ping), _tool("ping_two", _ping)]


def make_nothing() -> str:
    return "not a tool"


PLAIN_TOOL = _tool("plain", _ping)
NOT_A_TOOL = 42
CLASHING = _tool("calculator", _ping)


async def test_dice_plugin_from_entry_points() -> None:
    registry = default_registry()
    assert registry is default_registry()
    assert {"current_time", "calculator", "web_fetch", "memory_search", "escalate_to_human", "roll_dice"} <= set(registry.names())
    result = await registry.call("roll_dice", '{"sides": 6, "count": 4}', make_ctx(), timeout=1)
    assert result.ok, result.output
    match = re.fullmatch(r"Rolled 4d6: (\d+), (\d+), (\d+), (\d+) \(total (\d+)\)", result.output)
    assert match is not None
    rolls = [int(x) for x in match.groups()[:4]]
    assert all(1 <= r <= 6 for r in rolls) and sum(rolls) == int(match.group(5))
    for bad in ('{"sides": 1}', '{"sides": 1001}', '{"sides": 6, "count": 0}', '{"sides": 6, "count": 101}', '{"count": 2}'):
        assert not (await registry.call("roll_dice", bad, make_ctx(), timeout=1)).ok


def test_broken_plugins_are_skipped(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    group = "konstruct.tools"
    fake = [
        importlib.metadata.EntryPoint("missing", "konstruct_no_such_module_xyz:tool", group),
        importlib.metadata.EntryPoint("factory", "tests.test_tools:make_tools", group),
        importlib.metadata.EntryPoint("plain", "tests.test_tools:PLAIN_TOOL", group),
        importlib.metadata.EntryPoint("number", "tests.test_tools:NOT_A_TOOL", group),
        importlib.metadata.EntryPoint("nothing", "tests.test_tools:make_nothing", group),
        importlib.metadata.EntryPoint("clash", "tests.test_tools:CLASHING", group),
    ]
    seen: list[str] = []

    def entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        seen.append(group)
        return fake

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    with caplog.at_level(logging.WARNING, logger="konstruct.tools"):
        registry = build_registry()
    assert seen == ["konstruct.tools"]
    assert {"ping", "ping_two", "plain"} <= set(registry.names())
    assert registry.get("calculator") is not CLASHING
    for name in ("missing", "number", "nothing"):
        assert f"tool plugin {name!r}" in caplog.text
    assert "'calculator' is already registered" in caplog.text
    assert set(build_registry(plugins=False).names()) == {t.name for t in builtin_tools()}


# ---------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("2 ** 3 ** 2", "512"),
        ("(2 ** 3) ** 2", "64"),
        ("-2 ** 2", "-4"),
        ("2 ** -1", "0.5"),
        ("--3", "3"),
        ("-(4 - 6) * +2", "4"),
        ("7 / 2", "3.5"),
        ("7 // 2", "3"),
        ("-7 % 3", "2"),
        ("10 - 4 - 3", "3"),
        ("64 / 4 / 2", "8.0"),
        ("0.1 + 0.2", "0.3"),
        ("1.5e3 + .5 + 2.", "1502.5"),
        ("2E-3", "0.002"),
        ("sqrt(16) + abs(-3)", "7.0"),
        ("round(2.567, 2)", "2.57"),
        ("round(2.5)", "2"),
        ("min(3, 1, 2) + max(4, 9)", "10"),
        ("max(5)", "5"),
        ("log(e)", "1.0"),
        ("log(8, 2)", "3.0"),
        ("sin(pi / 2) + cos(0) + tan(0)", "2.0"),
        ("PI", "3.14159265358979"),
        ("2 ** 64", "18446744073709551616"),
        ("12345678901234567890 * 10", "123456789012345678900"),
    ],
)
def test_calculator_values(expression: str, expected: str) -> None:
    assert format_number(evaluate(expression)) == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("1 / 0", "division by zero"),
        ("1 // 0", "division by zero"),
        ("1 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("1 +", "syntax error at position 4: expected a number, a name or '(', found the end of the expression"),
        ("2 * * 3", "syntax error at position 5"),
        ("(1 + 2", "syntax error at position 7: expected ')'"),
        ("1 + 2)", "syntax error at position 6: expected an operator, found ')'"),
        ("2 3", "syntax error at position 3"),
        ("2 ^ 3", "position 3: unexpected character '^' (use ** for powers)"),
        ("__import__(os)", "unknown name '__import__' at position 1"),
        ("open('x')", 'syntax error at position 6: unexpected character "\'"'),
        ("1 + x", "unknown name 'x' at position 5"),
        ("sqrt 4", "syntax error at position 6: expected '('"),
        ("sqrt(1, 2)", "sqrt takes 1 argument, got 2"),
        ("round(1, 2, 3)", "round takes 1 to 2 arguments, got 3"),
        ("round(1.5, 0.5)", "whole number"),
        ("sqrt(-1)", "math domain error"),
        ("log(0)", "math domain error"),
        ("log(8, 1)", "math domain error"),
        ("9 ** 9 ** 9", "too large"),
        ("10 ** 400", "too large"),
        ("2.0 ** 5000", "too large"),
        ("1e308 * 10", "too large"),
        ("1e999", "too large"),
        ("(-8) ** (1 / 3)", "not a real number"),
        ("1" + " + 1" * 200, "the limit is 500"),
        ("(" * 60 + "1" + ")" * 60, "nested too deeply"),
        ("-" * 60 + "1", "nested too deeply"),
        ("", "empty"),
    ],
)
def test_calculator_errors(expression: str, message: str) -> None:
    with pytest.raises(ToolError) as error:
        evaluate(expression)
    assert message in str(error.value)


async def test_calculator_tool() -> None:
    registry = build_registry(plugins=False)
    result = await registry.call("calculator", '{"expression": "(1250 * 1.2) / 12"}', make_ctx(), timeout=1)
    assert result.ok and result.output == "125.0"
    result = await registry.call("calculator", '{"expression": "1/0"}', make_ctx(), timeout=1)
    assert not result.ok and result.output == "error: division by zero"


# ---------------------------------------------------------------- current_time


async def test_current_time() -> None:
    registry = build_registry(plugins=False)
    for args, zone, offset in (("{}", "UTC", "+00:00"), ('{"timezone": "Asia/Kolkata"}', "Asia/Kolkata", "+05:30")):
        result = await registry.call("current_time", args, make_ctx(), timeout=1)
        assert result.ok, result.output
        match = re.fullmatch(r"(\S+) \((\w+), (\S+)\)", result.output)
        assert match is not None and match.group(3) == zone
        moment = datetime.fromisoformat(match.group(1))
        assert match.group(1).endswith(offset)
        assert abs(moment - datetime.now(UTC)) < timedelta(seconds=10)
        assert match.group(2) == moment.strftime("%A")
    for bad in ("Mars/Olympus_Mons", "../../etc/passwd", "/etc/localtime"):
        result = await registry.call("current_time", json.dumps({"timezone": bad}), make_ctx(), timeout=1)
        assert not result.ok and "unknown time zone" in result.output


# ---------------------------------------------------------------- memory_search, escalate_to_human


async def test_memory_search() -> None:
    calls: list[tuple[str, int]] = []

    async def search(query: str, limit: int) -> list[str]:
        calls.append((query, limit))
        return ["likes tea", "lives in Lyon"][:limit]

    registry = build_registry(plugins=False)
    ctx = make_ctx(services={"memory_search": search})
    result = await registry.call("memory_search", '{"query": "drinks"}', ctx, timeout=1)
    assert result.ok and result.output == "Memories found:\n1. likes tea\n2. lives in Lyon"
    result = await registry.call("memory_search", '{"query": "drinks", "limit": 1}', ctx, timeout=1)
    assert result.output == "Memories found:\n1. likes tea"
    assert calls == [("drinks", 5), ("drinks", 1)]
    for bad in ('{"query": "x", "limit": 0}', '{"query": "x", "limit": 11}', '{"query": ""}'):
        assert not (await registry.call("memory_search", bad, ctx, timeout=1)).ok
    assert len(calls) == 2

    async def nothing(query: str, limit: int) -> list[str]:
        return []

    result = await registry.call("memory_search", '{"query": "x"}', make_ctx(services={"memory_search": nothing}), timeout=1)
    assert result.ok and result.output == "No memories matched."
    result = await registry.call("memory_search", '{"query": "x"}', make_ctx(), timeout=1)
    assert not result.ok and result.output == "error: memory is not available"


async def test_escalate_to_human() -> None:
    reasons: list[str] = []

    async def escalate(reason: str) -> str:
        reasons.append(reason)
        return "ticket 7"

    registry = build_registry(plugins=False)
    result = await registry.call("escalate_to_human", '{"reason": "wants a refund"}', make_ctx(services={"escalate": escalate}), timeout=1)
    assert result.ok and "handed to a human" in result.output and "ticket 7" in result.output
    assert reasons == ["wants a refund"]
    result = await registry.call("escalate_to_human", '{"reason": "x"}', make_ctx(), timeout=1)
    assert not result.ok and "not available" in result.output


# ---------------------------------------------------------------- web_fetch

PAGE = b"""<!doctype html><html><head><title>Opening hours</title><style>p { color: red }</style>
<script>var secret = "do not show";</script></head>
<body><h1>Opening   hours</h1><p>Mon&ndash;Fri &amp; Sat</p><ul><li>9 to 5</li><li>10 to 2</li></ul>
<noscript>enable js</noscript><table><tr><td>a</td><td>b</td></tr></table></body></html>"""


SLOW_PAGE = threading.Event()


class WebHandler(QuietHandler):
    def do_GET(self) -> None:
        path = self.path
        if path == "/hello":
            self.send_bytes(200, "text/plain; charset=utf-8", "héllo".encode())
        elif path == "/page":
            self.send_bytes(200, "text/html; charset=utf-8", PAGE)
        elif path == "/big":
            self.send_bytes(200, "text/plain", b"x" * 300_000)
        elif path == "/host":
            self.send_bytes(200, "text/plain", f"host={self.headers.get('Host')}".encode())
        elif path == "/image":
            self.send_bytes(200, "image/png", b"\x89PNG" + bytes(100))
        elif path == "/slow":
            SLOW_PAGE.wait(30)  # answers only once the test is done with it
            self.send_bytes(200, "text/plain", b"late")
        elif path.startswith("/go?"):
            self.send_bytes(302, "", b"", {"Location": path.removeprefix("/go?")})
        elif path.startswith("/chain/"):
            hops = int(path.rsplit("/", 1)[1])
            target = f"/chain/{hops - 1}" if hops else "/hello"
            self.send_bytes(307, "", b"", {"Location": target})
        else:
            self.send_bytes(404, "text/plain", b"no such page")


@pytest.fixture(scope="module")
def web_server() -> Iterator[LoopbackServer]:
    server = serve(WebHandler, 0, "tools-web")
    yield server
    shutdown(server)


@pytest.fixture
def base(web_server: LoopbackServer) -> str:
    return f"http://127.0.0.1:{web_server.server_address[1]}"


LOOPBACK = make_ctx(("127.0.0.1",), allow_private=True)


async def fetch_tool(url: str, ctx: ToolContext) -> Any:
    return await build_registry(plugins=False).call("web_fetch", {"url": url}, ctx, timeout=15)


async def test_web_fetch_allowed_host(base: str) -> None:
    result = await fetch_tool(f"{base}/hello", LOOPBACK)
    assert result.ok, result.output
    assert result.output == f"URL: {base}/hello\nStatus: 200\nContent-Type: text/plain; charset=utf-8\n\nhéllo"
    result = await fetch_tool(f"{base}/missing", LOOPBACK)
    assert result.ok and "Status: 404" in result.output and result.output.endswith("no such page")


async def test_web_fetch_html_to_text(base: str) -> None:
    result = await fetch_tool(f"{base}/page", LOOPBACK)
    assert result.ok, result.output
    text = result.output.split("\n\n", 1)[1]
    assert text == "Opening hours\nOpening hours\nMon–Fri & Sat\n- 9 to 5\n- 10 to 2\na b"
    assert "secret" not in text and "color" not in text and "enable js" not in text


async def test_web_fetch_binary_is_described(base: str) -> None:
    result = await fetch_tool(f"{base}/image", LOOPBACK)
    assert result.ok and result.output.endswith("(binary content of 104 bytes, not shown)")


async def test_web_fetch_host_not_allowed(base: str) -> None:
    result = await fetch_tool(f"{base}/hello", make_ctx(("example.com", "*.example.org"), allow_private=True))
    assert not result.ok and result.output == "error: 127.0.0.1 is not on this workspace's web allow-list"
    result = await fetch_tool("ftp://127.0.0.1/file", LOOPBACK)
    assert not result.ok and "only http and https" in result.output
    result = await fetch_tool("http://user:pw@127.0.0.1/", LOOPBACK)
    assert not result.ok and "user name or password" in result.output


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/hello",
        "http://10.0.0.1/",
        "http://[::1]:{port}/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]:{port}/",
        "http://0.0.0.0:{port}/",
        "http://localhost:{port}/hello",
    ],
)
async def test_web_fetch_private_addresses_refused(web_server: LoopbackServer, url: str) -> None:
    url = url.format(port=web_server.server_address[1])
    ctx = make_ctx(("127.0.0.1", "10.0.0.1", "::1", "169.254.169.254", "::ffff:127.0.0.1", "0.0.0.0", "localhost"))
    result = await fetch_tool(url, ctx)
    assert not result.ok
    assert "resolves to a private or reserved address" in result.output


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.215.14", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),
        ("169.254.169.254", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("ff02::1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::a9fe:a9fe", False),
        ("2002:7f00:1::", False),
    ],
)
def test_is_public(address: str, public: bool) -> None:
    assert web.is_public(ipaddress.ip_address(address)) is public


def test_host_allow_list() -> None:
    allowed = ("Example.com.", "*.docs.example.org", "bücher.de", "[::1]")
    assert web.host_allowed("example.com", allowed)
    assert web.host_allowed("EXAMPLE.COM.", allowed)
    assert not web.host_allowed("www.example.com", allowed)
    assert web.host_allowed("a.docs.example.org", allowed) and web.host_allowed("a.b.docs.example.org", allowed)
    assert not web.host_allowed("docs.example.org", allowed)
    assert not web.host_allowed("evildocs.example.org", allowed)
    assert web.host_allowed("xn--bcher-kva.de", allowed)
    assert web.host_allowed("::1", allowed)
    assert not web.host_allowed("example.com", ())


async def test_web_fetch_connects_to_the_checked_address(base: str, web_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    lookups: list[str] = []

    async def resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        lookups.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(web, "resolve", resolve)
    port = web_server.server_address[1]
    result = await fetch_tool(f"http://pinned.test:{port}/host", make_ctx(("*.test", "pinned.test"), allow_private=True))
    assert result.ok, result.output
    assert result.output.endswith(f"host=pinned.test:{port}")
    assert lookups == ["pinned.test"]


async def test_web_fetch_redirects(base: str) -> None:
    result = await fetch_tool(f"{base}/go?/hello", LOOPBACK)
    assert result.ok and result.output.startswith(f"URL: {base}/hello\n") and result.output.endswith("héllo")
    result = await fetch_tool(f"{base}/chain/2", LOOPBACK)
    assert result.ok and result.output.endswith("héllo")
    result = await fetch_tool(f"{base}/chain/3", LOOPBACK)
    assert not result.ok and "more than 3 redirects" in result.output
    result = await fetch_tool(f"{base}/go?http://evil.example/steal", LOOPBACK)
    assert not result.ok and result.output == "error: evil.example is not on this workspace's web allow-list"


async def test_web_fetch_redirect_to_private_address_refused(web_server: LoopbackServer) -> None:
    # The loopback server stands in for a site web_fetch may reach ([agent] web_fetch_private_networks names its one
    # address); its redirect to another internal address is checked again by the real check, and refused.
    port = web_server.server_address[1]
    ctx = make_ctx(("127.0.0.1", "10.0.0.1"), private_networks=("127.0.0.1/32",))
    assert (await fetch_tool(f"http://127.0.0.1:{port}/hello", ctx)).ok
    result = await fetch_tool(f"http://127.0.0.1:{port}/go?http://10.0.0.1/admin", ctx)
    assert not result.ok and "10.0.0.1 resolves to a private or reserved address" in result.output
    assert not (await fetch_tool("http://10.0.0.1/admin", ctx)).ok  # nor as the first hop


async def test_web_fetch_private_networks_reach_only_those_networks(web_server: LoopbackServer) -> None:
    """The private-allowed path: a redirect within a listed network is followed; without the setting, refused."""
    port = web_server.server_address[1]
    hosts = ("127.0.0.1", "localhost")
    allowed = make_ctx(hosts, private_networks=("127.0.0.0/8", "::1/128"))
    result = await fetch_tool(f"http://127.0.0.1:{port}/go?http://localhost:{port}/hello", allowed)
    assert result.ok and result.output.endswith("héllo"), result.output
    refused = await fetch_tool(f"http://127.0.0.1:{port}/hello", make_ctx(hosts, private_networks=("10.0.0.0/8",)))
    assert not refused.ok and "127.0.0.1 resolves to a private or reserved address" in refused.output


def test_web_fetch_private_networks_setting_is_checked(tmp_path: Path) -> None:
    from konstruct.config import load_settings
    from konstruct.errors import ConfigError

    config = tmp_path / "konstruct.toml"
    config.write_text('[agent]\nweb_fetch_private_networks = ["10.20.0.0/24", "::1"]\n')
    assert load_settings(config).agent.web_fetch_private_networks == ["10.20.0.0/24", "::1"]
    config.write_text('[agent]\nweb_fetch_private_networks = ["intranet"]\n')
    with pytest.raises(ConfigError, match="intranet"):
        load_settings(config)


async def test_web_fetch_size_limit(base: str) -> None:
    page = await web.fetch(f"{base}/big", LOOPBACK)
    assert page.truncated and len(page.body) == web.MAX_BYTES == 200_000
    page = await web.fetch(f"{base}/hello", LOOPBACK)
    assert not page.truncated
    result = await fetch_tool(f"{base}/big", LOOPBACK)
    assert result.ok and "Note: only the first 200000 bytes were read" in result.output
    assert len(result.output) <= 8_000


async def test_web_fetch_time_limit(base: str) -> None:
    try:
        result = await fetch_tool(f"{base}/slow", make_ctx(("127.0.0.1",), allow_private=True, web_seconds=0.3))
    finally:
        SLOW_PAGE.set()
    assert not result.ok and "took longer than 0.3 seconds" in result.output


async def test_web_fetch_bad_url() -> None:
    result = await fetch_tool("http://", LOOPBACK)
    assert not result.ok and "error:" in result.output
    result = await fetch_tool("/relative/path", LOOPBACK)
    assert not result.ok and "only http and https" in result.output


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate (also its own CA) for localhost, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (folder / "key.pem").write_bytes(private)
    return str(folder / "cert.pem"), str(folder / "key.pem")


async def test_web_fetch_https_pinned_with_name_for_sni_and_certificate(tls_files: tuple[str, str]) -> None:
    """An https fetch by name: connected to the checked address, the name kept for SNI and the certificate check.
    The test's own CA is trusted the way an installation trusts an internal one ([agent] web_fetch_ca_file)."""
    cert, key = tls_files
    server_names: list[str | None] = []
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    server_context.sni_callback = lambda sock, name, context: server_names.append(name)
    server = LoopbackServer(("127.0.0.1", 0), WebHandler)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="tools-tls", daemon=True).start()
    try:
        port = server.server_address[1]
        ctx = make_ctx(("localhost", "127.0.0.1"), allow_private=True, ca_file=cert)
        page = await web.fetch(f"https://localhost:{port}/host", ctx)
        assert (page.status, page.body) == (200, f"host=localhost:{port}".encode())
        assert server_names == ["localhost"]
        # The certificate names localhost, not the address: checked against what the URL says, so refused.
        with pytest.raises(ToolError, match=r"could not connect to 127\.0\.0\.1: .*CERTIFICATE_VERIFY_FAILED"):
            await web.fetch(f"https://127.0.0.1:{port}/host", ctx)
        # Without the setting, the usual authorities only: the test's CA is not one of them.
        with pytest.raises(ToolError, match=r"could not connect to localhost: .*CERTIFICATE_VERIFY_FAILED"):
            await web.fetch(f"https://localhost:{port}/host", make_ctx(("localhost",), allow_private=True))
        missing = make_ctx(("localhost",), allow_private=True, ca_file=str(Path(cert).with_name("nope.pem")))
        with pytest.raises(ToolError, match="web_fetch_ca_file could not be read"):
            await web.fetch(f"https://localhost:{port}/host", missing)
    finally:
        shutdown(server)


def test_html_to_text() -> None:
    assert web.html_to_text("<p>a<br>b</p><script>x</script><div> c &lt; d </div>") == "a\nb\nc < d"
