"""The Slack app manifest: what it subscribes to is what bolt listens to, its scopes cover every Web API call in the
code, its URLs are the gateway's, and `konstruct channel slack-manifest` prints it as JSON or YAML."""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk.web.async_client import AsyncWebClient

import konstruct
from konstruct.agent.agents import create_agent
from konstruct.channels.slack import api
from konstruct.channels.slack.events import SlackEvents
from konstruct.channels.slack.manifest import EVENTS_PATH, OAUTH_REDIRECT_PATH, app_manifest
from konstruct.channels.slack.oauth import make_state
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.gateway.app import create_app
from konstruct.tenancy.tenants import create_tenant
from tests.helpers import konstruct_in_process

ROOT = Path(konstruct.__file__).parent

# Event types Slack sends that the app might one day listen to: a listener for any of them must be in the manifest.
KNOWN_EVENTS = [
    "app_mention", "app_home_opened", "app_context_changed", "app_uninstalled", "assistant_thread_started",
    "assistant_thread_context_changed", "channel_created", "member_joined_channel", "message", "reaction_added",
    "reaction_removed", "team_join", "tokens_revoked", "user_change", "file_shared", "pin_added",
]  # fmt: skip
# slack_sdk helpers that call several methods, not one `api_call`.
HELPERS = {
    "chat_stream": ("chat.startStream", "chat.appendStream", "chat.stopStream"),
    "files_upload_v2": ("files.getUploadURLExternal", "files.completeUploadExternal"),
}


def subscription_body(subscription: str) -> dict[str, Any]:
    """The event a subscription delivers: `message.im` is a `message` with channel_type `im`."""
    event_type, _, kind = subscription.partition(".")
    event: dict[str, Any] = {"type": event_type, "ts": "1.000001", "channel": "C1", "user": "U1"}
    if kind:
        event["channel_type"] = {"channels": "channel", "groups": "group"}.get(kind, kind)
    return {"type": "event_callback", "team_id": "T1", "event": event}


async def matching(listener: Any, body: dict[str, Any]) -> bool:
    request = AsyncBoltRequest(body=json.dumps(body), headers={"content-type": "application/json"})
    return bool(await listener.async_matches(req=request, resp=BoltResponse(status=200)))


def manifest(socket_mode: bool = False) -> dict[str, Any]:
    return app_manifest("https://konstruct.example.com/", name="Konstruct", description="An agent.", socket_mode=socket_mode)


async def test_the_registered_listeners_are_the_manifest_events(settings: Settings, db: Database) -> None:
    app = SlackEvents(settings, db, queue=None)._app("any-signing-secret")  # type: ignore[arg-type]
    subscriptions = manifest()["settings"]["event_subscriptions"]["bot_events"]
    listeners = list(app._async_listeners)
    catch_all = [x for x in listeners if await matching(x, subscription_body("konstruct_no_such_event"))]
    assert len(catch_all) == 1, "one listener acknowledges every other event"
    specific = [x for x in listeners if x not in catch_all]
    assert len(specific) >= 4
    for listener in specific:
        heard = {t for t in KNOWN_EVENTS if await matching(listener, subscription_body(t))}
        assert heard, f"a listener for an event not in KNOWN_EVENTS: add it there, and to api.EVENT_SUBSCRIPTIONS: {listener}"
        assert heard <= {s.partition(".")[0] for s in subscriptions}, f"listened to but not subscribed in the manifest: {heard}"
    for subscription in subscriptions:  # nothing subscribed that nothing listens to
        assert [x for x in specific if await matching(x, subscription_body(subscription))], subscription


def web_api_methods() -> dict[str, set[str]]:
    """Slack methods called anywhere in konstruct (`client.chat_postMessage(...)` → chat.postMessage), by module."""
    names = {name for name, _ in inspect.getmembers(AsyncWebClient, inspect.isfunction) if not name.startswith("_")}
    found: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names:
                attr = node.func.attr
                source = inspect.getsource(getattr(AsyncWebClient, attr))
                methods = HELPERS.get(attr) or tuple(re.findall(r'api_call\(\s*"([\w.]+)"', source))
                assert methods, f"{attr}: a slack_sdk helper this test does not know; add what it calls to HELPERS"
                for method in methods:
                    found.setdefault(method, set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_scopes_cover_every_web_api_method_called() -> None:
    called = web_api_methods()
    # The scan finds the calls it must (so it can fail): the reply path, its look-ups and the connect check.
    assert {"chat.postMessage", "chat.update", "conversations.replies", "conversations.history", "auth.test"} <= set(called)
    scopes = set(manifest()["oauth_config"]["scopes"]["bot"])
    for method, where in called.items():
        assert method in api.METHOD_SCOPES, f"{method} (called in {sorted(where)}) has no entry in api.METHOD_SCOPES"
        assert set(api.METHOD_SCOPES[method]) <= scopes, method
    for subscription in manifest()["settings"]["event_subscriptions"]["bot_events"]:
        assert set(api.SUBSCRIPTION_SCOPES[subscription]) <= scopes, subscription
    assert set(api.FILE_SCOPES) <= scopes  # images in messages are downloaded with the bot token
    assert scopes == set(api.bot_scopes()) and "chat:write" in scopes and "channels:history" in scopes


def test_urls_are_the_gateways_or_none_in_socket_mode(settings: Settings) -> None:
    http, socket = manifest(), manifest(socket_mode=True)
    assert http["settings"]["event_subscriptions"]["request_url"] == "https://konstruct.example.com/slack/events"
    assert http["settings"]["interactivity"] == {"is_enabled": True, "request_url": "https://konstruct.example.com/slack/interactive"}
    assert http["oauth_config"]["redirect_urls"] == ["https://konstruct.example.com/slack/oauth_redirect"]
    assert http["settings"]["socket_mode_enabled"] is False and socket["settings"]["socket_mode_enabled"] is True
    assert "request_url" not in json.dumps(socket) and "redirect_urls" not in socket["oauth_config"]
    assert socket["settings"]["event_subscriptions"]["bot_events"] == http["settings"]["event_subscriptions"]["bot_events"]
    assert http["features"]["agent_view"]["agent_description"] == "An agent."
    assert http["features"]["bot_user"]["display_name"] == "Konstruct"
    paths = {route.path for route in create_app(settings).routes}  # type: ignore[attr-defined]
    assert {EVENTS_PATH, OAUTH_REDIRECT_PATH} <= paths


async def test_an_install_asks_for_the_manifest_scopes(settings: Settings, db: Database) -> None:
    settings.slack.client_id, settings.gateway.public_url = "111.222", "https://konstruct.example.com"
    tenant = await create_tenant(db, name="Acme", slug="acme", actor="test")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            response = await client.get("/slack/install", params={"state": make_state(settings, tenant.id)})
    assert response.status_code == 302, response.text
    query = parse_qs(urlsplit(response.headers["location"]).query)
    assert query["scope"] == [",".join(api.bot_scopes())]


async def test_the_command_prints_json_and_yaml(config_path: Path, settings: Settings, db: Database) -> None:
    tenant = await create_tenant(db, name="Acme Inc", slug="acme", actor="test")
    await create_agent(db, tenant, name="Ava", role="Answers support questions", persona="Brief.", model=None, actor="test")
    printed = konstruct_in_process("channel", "slack-manifest", "--json", config=config_path)
    assert printed.returncode == 0, printed.stderr
    data = json.loads(printed.stdout)
    public = settings.gateway.public_url.rstrip("/")
    assert data["settings"]["event_subscriptions"]["request_url"] == f"{public}/slack/events"
    assert data["settings"]["event_subscriptions"]["bot_events"] == api.bot_events()
    assert data["oauth_config"]["scopes"]["bot"] == api.bot_scopes()
    assert data["features"]["agent_view"]["agent_description"]
    as_yaml = konstruct_in_process("channel", "slack-manifest", "--yaml", "--socket-mode", "--tenant", "acme", config=config_path)
    assert as_yaml.returncode == 0, as_yaml.stderr
    parsed = yaml.safe_load(as_yaml.stdout)
    assert parsed["settings"]["socket_mode_enabled"] is True and "request_url" not in as_yaml.stdout
    assert parsed["display_information"]["name"] == "Acme Inc"
    description = parsed["features"]["agent_view"]["agent_description"]
    assert "Ava: Answers support questions" in description and len(description) <= 300
    assert parsed["oauth_config"]["scopes"] == data["oauth_config"]["scopes"]


@pytest.mark.parametrize(
    "args, says",
    [
        (["--json", "--yaml"], "choose one of --json and --yaml"),
        (["--tenant", "nobody"], "nobody"),
    ],
)
def test_mistakes_are_one_red_line(config_path: Path, args: list[str], says: str) -> None:
    result = konstruct_in_process("channel", "slack-manifest", *args, config=config_path)
    assert result.returncode == 1
    assert says in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_long_tenant_description_is_cut_to_slacks_limits() -> None:
    from konstruct.channels.slack.manifest import agent_description

    description = agent_description("Acme", [(f"agent{i}", "x" * 40) for i in range(20)])
    assert len(description) == 300 and description.endswith("…")
    long = app_manifest("http://h", name="N" * 80, description=description, socket_mode=False)
    assert len(long["display_information"]["name"]) <= 35 and len(long["display_information"]["description"]) <= 140
