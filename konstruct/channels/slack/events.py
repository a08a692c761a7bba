"""Slack Events API in the gateway: verify (bolt), decide whether the agent should answer, store, queue, ack.

Nothing slow happens here: the answer is the worker's job. Each message is stored once, keyed by
channel + ts, so a retry, or the `message` and `app_mention` events Slack sends for one mention,
give one reply.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from slack_bolt.app.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from konstruct import inbox
from konstruct.bodies import parse_json, read_body
from konstruct.channels.connections import ResolveCache, Resolved, set_status, single_mode_candidates, unseal
from konstruct.channels.slack import desk
from konstruct.channels.slack.api import EVENT_SUBSCRIPTIONS
from konstruct.channels.slack.client import web_client
from konstruct.channels.slack.home import MessagesTab
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.errors import DatabaseUnavailable
from konstruct.messaging import InboundMessage, Routing, clean_message

log = logging.getLogger("konstruct.slack")

# Messages with these subtypes are people talking; every other subtype (edits, deletions, joins, bots) is not.
PEOPLE_SUBTYPES = {None, "file_share", "thread_broadcast"}
CONNECTION = "konstruct_connection"
CREDENTIALS = "konstruct_credentials"
UNAVAILABLE = "konstruct_unavailable"  # set by a listener that could not store: the request answers 503


# Slack's ids are short upper-case words (T…, C…, U…, Ev…); ts values are "seconds.micros". Anything else
# is not Slack's, and must not reach a btree index (an id of kilobytes overflows it).
SLACK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
SLACK_TS = re.compile(r"\d{1,12}\.\d{1,12}")
_TIMESTAMP = re.compile(r"\d{1,12}")
_SIGNATURE = re.compile(r"v0=[0-9a-f]{64}")


def parse_request(body: bytes, content_type: str | None) -> dict[str, Any] | None:
    """The event (JSON) or interaction (form `payload=`) as a dict; None when it is neither."""
    if content_type and content_type.startswith("application/x-www-form-urlencoded"):
        try:
            form = parse_qs(body.decode("utf-8"), max_num_fields=50)
        except (UnicodeDecodeError, ValueError):
            return None
        data = parse_json(form.get("payload", [""])[0])
    else:
        data = parse_json(body)
    return data if isinstance(data, dict) else None


def team_id_of(data: dict[str, Any] | None) -> str | None:
    """The workspace an event comes from (None for url_verification). Read before verification: only for routing."""
    if data is None:
        return None
    team, team_id = data.get("team"), data.get("team_id")
    if not isinstance(team_id, str) and isinstance(team, dict):
        team_id = team.get("id")
    return team_id if isinstance(team_id, str) and SLACK_ID.fullmatch(team_id) else None


def headers_well_formed(headers: dict[str, str]) -> bool:
    """Signature headers shaped as Slack sends them (so verifying them cannot raise)."""
    return bool(
        _TIMESTAMP.fullmatch(headers.get("x-slack-request-timestamp", "")) and _SIGNATURE.fullmatch(headers.get("x-slack-signature", ""))
    )


def signature_valid(secret: str, body: bytes, headers: dict[str, str], now: float | None = None) -> bool:
    """Slack's v0 signature over the raw bytes (slack_sdk's verifier decodes the body first, and raises on bad UTF-8)."""
    timestamp = headers.get("x-slack-request-timestamp", "")
    if not _TIMESTAMP.fullmatch(timestamp) or abs((now or time.time()) - int(timestamp)) > 300:
        return False
    expected = "v0=" + hmac.new(secret.encode(), b"v0:" + timestamp.encode() + b":" + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), headers.get("x-slack-signature", "").encode())


@dataclass(frozen=True)
class Signed:
    """A Slack request whose v0 signature checked out, with what was read to check it."""

    data: dict[str, Any] | None
    team_id: str | None
    resolved: Resolved | None
    credentials: dict[str, str]
    secret: str


SecretFor = Callable[[Resolved | None, dict[str, str], str | None, bytes, dict[str, str]], Awaitable[str | None]]


async def verify_request(request: Request, connections: ResolveCache, secret_for: SecretFor) -> Signed | Response:
    """Read a Slack request (bounded), find the workspace's connection and check the signature over the raw bytes with
    the secret `secret_for` picks: the Signed request, or the refusal to answer (413, or 401 for a missing, stale or
    wrong signature — then nothing may be stored, and nothing is told)."""
    body = await read_body(request)
    if body is None:
        return JSONResponse({"error": "payload too large"}, status_code=413)
    headers = dict(request.headers)
    if not headers_well_formed(headers):
        return JSONResponse({"error": "invalid request signature"}, status_code=401)
    data = parse_request(body, headers.get("content-type"))
    team_id = team_id_of(data)
    entry = await connections.get("slack", team_id) if team_id else None
    resolved, credentials = entry if entry else (None, {})
    secret = await secret_for(resolved, credentials, team_id, body, headers)
    if secret is None or not signature_valid(secret, body, headers):
        return JSONResponse({"error": "invalid request signature"}, status_code=401)
    return Signed(data, team_id, resolved, credentials, secret)


_EVENT_FIELDS = ("type", "subtype", "user", "text", "ts", "thread_ts", "channel", "channel_type", "bot_id", "event_ts", "tab")


def sanitized(data: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str]:
    """(the request as bolt may see it, or None; why not). Only the fields we use, each of the type we expect:
    bolt reads bodies assuming Slack's shapes, and a signed body of any other shape must not reach it."""
    if data is None:
        return None, "not a JSON object"
    kind = data.get("type")
    if kind == "url_verification":
        challenge = data.get("challenge")
        return ({"type": kind, "challenge": challenge}, "") if isinstance(challenge, str) else (None, "no challenge")
    if kind != "event_callback":
        return None, "not an event this app listens to"
    event, team_id, event_id = data.get("event"), data.get("team_id"), data.get("event_id")
    if not isinstance(event, dict) or not isinstance(event.get("type"), str) or not SLACK_ID.fullmatch(event["type"]):
        return None, "no event"
    if not isinstance(team_id, str) or not SLACK_ID.fullmatch(team_id):
        return None, "no team_id"
    if event_id is not None and not (isinstance(event_id, str) and SLACK_ID.fullmatch(event_id)):
        return None, "bad event_id"
    strict = event["type"] in ("message", "app_mention")  # what we store: every field must be right
    clean_event: dict[str, Any] = {}
    for key in _EVENT_FIELDS:
        value = event.get(key)
        if value is None:
            continue
        shape = SLACK_TS if key in ("ts", "thread_ts", "event_ts") else SLACK_ID
        ok = isinstance(value, str) and (key == "text" or shape.fullmatch(value) is not None)
        if ok:
            clean_event[key] = value
        elif strict:
            return None, f"bad event.{key}"
    if isinstance(event.get("files"), list):
        clean_event["files"] = [
            {
                k: f[k]
                for k in ("id", "name", "mimetype", "size", "url_private")
                if isinstance(f.get(k), str | int) and not isinstance(f[k], bool)
            }
            for f in event["files"][:20]
            if isinstance(f, dict)
        ]
    tokens = event.get("tokens")
    if isinstance(tokens, dict):
        clean_event["tokens"] = {
            k: [t for t in v if isinstance(t, str)] for k, v in tokens.items() if k in ("bot", "oauth") and isinstance(v, list)
        }
    body: dict[str, Any] = {"type": kind, "team_id": team_id, "event": clean_event}
    if event_id is not None:
        body["event_id"] = event_id
    return body, ""


def conversation_key(team_id: str, event: dict[str, Any]) -> tuple[str, str | None]:
    """(conversation key, thread to reply in). A thread is a conversation, in a DM too: Slack's agent messaging
    experience shows the app's Messages tab as a timeline of threads, each started by a person's message and
    answered in it (where the thread's status, title and streamed answers live)."""
    channel = event["channel"]
    root = event.get("thread_ts") or event["ts"]
    return f"{team_id}:{channel}:{root}", root


class SlackEvents:
    """The /slack/events endpoint."""

    def __init__(self, settings: Settings, db: Database, queue: inbox.Doorbell) -> None:
        self.settings = settings
        self.db = db
        self.queue = queue
        self.connections = ResolveCache(db, settings)
        self.messages_tab = MessagesTab(settings, db)
        self._apps: dict[str, AsyncApp] = {}
        self._singles: tuple[float, list[str]] = (float("-inf"), [])

    async def warm(self) -> None:
        """Build the bolt apps of the secrets known now (tens of milliseconds each), before traffic arrives."""
        if self.settings.slack.signing_secret:
            self._app(self.settings.slack.signing_secret.get_secret_value())
        for secret in (await self._single_secrets())[:100]:
            if secret:
                self._app(secret)

    async def handle(self, request: Request) -> Response:
        signed = await verify_request(request, self.connections, self._signing_secret)
        if isinstance(signed, Response):
            return signed
        usable, reason = sanitized(signed.data)
        if usable is None:
            # Authentic but unusable: a 200, so Slack does not retry (or disable the subscription), and nothing stored.
            log.warning("ignoring a signed Slack request: %s", reason)
            return JSONResponse({"ok": False, "ignored": reason})
        if await self._store_direct(usable, signed.resolved, signed.credentials):
            return Response(status_code=200)  # bolt's ack of an event: an empty 200
        # Verified above over the raw bytes; bolt gets the checked fields only (and so does not verify again).
        response = await self._dispatch(usable, signed.resolved, signed.credentials, signed.secret, dict(request.query_params))
        return Response(content=response.body, status_code=response.status, headers=response.first_headers_without_set_cookie())

    async def socket_event(self, payload: Any, team_id: str) -> None:
        """An `events_api` envelope from the Socket Mode connection of workspace `team_id` (authenticated by the
        socket itself): stored and queued, or ignored, when this returns; DatabaseUnavailable when it could not be
        stored (the envelope is then not acknowledged, and Slack delivers it again)."""
        usable, reason = sanitized(payload if isinstance(payload, dict) else None)
        if usable is None or usable.get("type") != "event_callback" or usable.get("team_id") != team_id:
            log.warning("ignoring a Socket Mode envelope of %s: %s", team_id, reason or "not an event of this workspace")
            return
        entry = await self.connections.get("slack", team_id)
        if entry is None:
            return
        resolved, credentials = entry
        if not await self._store_direct(usable, resolved, credentials):
            await self._dispatch(usable, resolved, credentials, credentials.get("signing_secret") or f"socket:{resolved.id}", {})

    async def _store_direct(self, usable: dict[str, Any], resolved: Resolved | None, credentials: dict[str, str]) -> bool:
        """A person's message or mention (nearly all of the traffic) goes straight to the listener bolt would call: bolt's
        dispatch (its request and context objects, middleware chain, listener matching, the authorize call and its ack
        runner) costs more than storing the message, and adds nothing here — the request is verified and sanitized, and
        _store itself skips bots, ourselves and edits (what bolt's self-event filter would). False for everything else."""
        event = usable.get("event")
        if usable.get("type") != "event_callback" or not isinstance(event, dict) or event.get("type") not in ("app_mention", "message"):
            return False
        context: dict[str, Any] = {CONNECTION: resolved, CREDENTIALS: credentials, "team_id": usable.get("team_id")}
        await self._store(event, usable, context, mention=event["type"] == "app_mention")
        return True

    async def _dispatch(
        self, usable: dict[str, Any], resolved: Resolved | None, credentials: dict[str, str], secret: str, query: dict[str, str]
    ) -> BoltResponse:
        """Run the checked request through bolt's listeners (which store the message before returning)."""
        bolt_request = AsyncBoltRequest(body=json.dumps(usable), query=query, headers={"content-type": "application/json"})
        bolt_request.context[CONNECTION] = resolved
        bolt_request.context[CREDENTIALS] = credentials
        response = await self._app(secret).async_dispatch(bolt_request)
        unavailable = bolt_request.context.get(UNAVAILABLE)
        if unavailable is not None:
            raise unavailable  # nothing was acknowledged: Slack delivers the event again
        return response

    async def _signing_secret(
        self, resolved: Resolved | None, credentials: dict[str, str], team_id: str | None, body: bytes, headers: dict[str, str]
    ) -> str | None:
        app_secret = self.settings.slack.signing_secret.get_secret_value() if self.settings.slack.signing_secret else None
        if resolved is not None and resolved.mode == "single":
            return credentials.get("signing_secret")
        if team_id is not None:
            return app_secret
        # url_verification carries no team: try the app's secret, then each single-workspace app's.
        candidates = ([app_secret] if app_secret else []) + await self._single_secrets()
        for candidate in candidates:
            if candidate and signature_valid(candidate, body, headers):
                return candidate
        return app_secret

    async def _single_secrets(self) -> list[str]:
        """Signing secrets of single-workspace apps, cached briefly (url_verification needs no team, so no look-up key)."""
        now = time.monotonic()
        if now - self._singles[0] > 5.0:
            blobs = await single_mode_candidates(self.db, "slack")
            self._singles = (now, [unseal(self.settings, blob).get("signing_secret") or "" for _, _, blob in blobs])
        return self._singles[1]

    def _app(self, secret: str) -> AsyncApp:
        key = hashlib.sha256(secret.encode()).hexdigest()
        app = self._apps.get(key)
        if app is not None:
            return app

        # bolt injects arguments by parameter name, so it is handed plain functions, not bound methods.
        async def authorize(context: dict[str, Any], team_id: str | None, enterprise_id: str | None) -> AuthorizeResult:
            return self._authorize(context, team_id, enterprise_id)

        async def on_mention(event: dict[str, Any], body: dict[str, Any], context: dict[str, Any]) -> None:
            await self._unless_down(context, self._store(event, body, context, mention=True))

        async def on_message(event: dict[str, Any], body: dict[str, Any], context: dict[str, Any]) -> None:
            await self._unless_down(context, self._store(event, body, context, mention=False))

        async def on_home_opened(event: dict[str, Any], body: dict[str, Any], context: dict[str, Any]) -> None:
            self._home_opened(event, body, context)

        async def on_uninstalled(context: dict[str, Any]) -> None:
            await self._unless_down(context, self._disconnect(context, "app_uninstalled"))

        async def on_tokens_revoked(event: dict[str, Any], context: dict[str, Any]) -> None:
            if isinstance(event.get("tokens"), dict) and event["tokens"].get("bot"):
                await self._unless_down(context, self._disconnect(context, "tokens_revoked"))

        async def on_other(event: dict[str, Any]) -> None:
            log.debug("ignoring Slack event %s", event.get("type"))

        app = AsyncApp(
            signing_secret=secret,
            authorize=authorize,
            client=web_client(self.settings),
            process_before_response=True,  # ack only after the message is stored
            request_verification_enabled=False,  # SlackEvents.handle verifies every request before bolt sees it
            ignoring_self_events_enabled=True,
            logger=logging.getLogger("konstruct.slack.bolt"),
        )
        listeners = {
            "app_mention": on_mention,
            "message": on_message,
            "app_home_opened": on_home_opened,
            "app_uninstalled": on_uninstalled,
            "tokens_revoked": on_tokens_revoked,
        }
        for event_type in EVENT_SUBSCRIPTIONS:  # what the manifest subscribes to is what is listened to
            app.event(event_type)(listeners[event_type])
        app.event(re.compile(".*"))(on_other)  # acknowledged, so Slack does not retry it
        self._apps[key] = app
        return app

    @staticmethod
    async def _unless_down(context: dict[str, Any], work: Coroutine[Any, Any, None]) -> None:
        """Run a listener's work; if the database is down, keep the error for handle() (a 503), not bolt's 500 and traceback."""
        try:
            await work
        except DatabaseUnavailable as exc:
            context[UNAVAILABLE] = exc

    def _authorize(self, context: dict[str, Any], team_id: str | None, enterprise_id: str | None) -> AuthorizeResult:
        resolved: Resolved | None = context.get(CONNECTION)
        if resolved is None or resolved.status != "connected":
            return AuthorizeResult(enterprise_id=enterprise_id, team_id=team_id)  # listeners see no connection and ignore
        return AuthorizeResult(
            enterprise_id=enterprise_id,
            team_id=team_id,
            bot_user_id=resolved.details.get("bot_user_id"),
            bot_id=resolved.details.get("bot_id"),
            bot_token=context.get(CREDENTIALS, {}).get("bot_token"),
        )

    def _home_opened(self, event: dict[str, Any], body: dict[str, Any], context: dict[str, Any]) -> None:
        """The Messages tab opened (not the Home tab): its suggested prompts are set after the ack (see home.py)."""
        resolved: Resolved | None = context.get(CONNECTION)
        token = context.get(CREDENTIALS, {}).get("bot_token")
        team_id = body.get("team_id") or context.get("team_id")
        if resolved is None or resolved.status != "connected" or not token or not team_id:
            return
        if event.get("tab") != "messages" or not event.get("channel"):
            return
        self.messages_tab.opened(
            tenant_id=resolved.tenant_id, connection_id=resolved.id, team_id=team_id, channel=event["channel"], token=token
        )

    async def _disconnect(self, context: dict[str, Any], reason: str) -> None:
        resolved: Resolved | None = context.get(CONNECTION)
        if resolved is None:
            return
        await set_status(self.db, resolved.tenant_id, resolved.id, "disconnected", actor="slack", reason=reason)
        self.connections.forget("slack", context.get("team_id") or "")

    async def _store(self, event: dict[str, Any], body: dict[str, Any], context: dict[str, Any], *, mention: bool) -> None:
        resolved: Resolved | None = context.get(CONNECTION)
        team_id = body.get("team_id") or context.get("team_id")
        if resolved is None or resolved.status != "connected" or not team_id:
            return
        bot_user_id = resolved.details.get("bot_user_id")
        if event.get("subtype") not in PEOPLE_SUBTYPES or event.get("bot_id") or not event.get("user") or event.get("user") == bot_user_id:
            return  # bots (ourselves included), edits, deletions, joins: never answered, so no loops
        if "channel" not in event or "ts" not in event:
            return
        if await desk.thread_reply(self.db, self.queue, resolved, team_id, event):
            return  # a human answering an escalated person from the desk: not a conversation with the agent
        text = event.get("text") or ""
        key, thread = conversation_key(team_id, event)
        is_dm = event.get("channel_type") == "im"
        if bot_user_id:
            text = text.replace(f"<@{bot_user_id}>", "").strip()
        files = event.get("files") or []
        stored = await inbox.accept(
            self.db,
            self.queue,
            clean_message(
                InboundMessage(
                    tenant_id=resolved.tenant_id,
                    agent_id=None,
                    # A mention or a DM may start a conversation; other thread messages only continue one.
                    routing=Routing(resolved.id, event["channel"], may_start=mention or is_dm),
                    channel="slack",
                    external_id=f"{event['channel']}:{event['ts']}",
                    conversation_key=key,
                    sender=event["user"],
                    text=text,
                    payload={
                        "team_id": team_id,
                        "channel": event["channel"],
                        "channel_type": event.get("channel_type"),  # "im": a DM with the app, where its agent threads are
                        "ts": event["ts"],
                        "user": event["user"],  # whom a stream outside a DM is for (startStream's recipient_user_id)
                        "thread_ts": thread,
                        "event_id": body.get("event_id"),
                        "files": files,
                        "received": time.time(),
                    },
                )
            ),
        )
        if stored is None and (mention or is_dm):
            log.warning("tenant %s has no agent to answer in Slack", resolved.tenant_id)
