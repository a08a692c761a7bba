"""A loopback fake of Slack's Web API (what slack_sdk's `AsyncWebClient(base_url=fake.url)` calls).

A real HTTP server on 127.0.0.1. It records every call, keeps the messages the bot posts, grants
OAuth installs from codes a test registers, serves private files only to a registered bot token
(anyone else gets the 302 to a sign-in page that real Slack gives), and can be told to rate limit
a method with HTTP 429 and `Retry-After`.

Only the methods konstruct uses are implemented: `auth.test`, `oauth.v2.access`, `chat.postMessage`
(with message `metadata`, and `blocks` checked as Slack does for the `markdown` blocks konstruct sends:
at most 50 blocks, at most 12,000 characters of markdown text in one message; `context_actions` feedback buttons and
`actions` blocks of buttons shaped as Slack's reference has them), `users.info` (users a test registers, with their
email), `chat.update`, `conversations.replies` and `conversations.history` (metadata
only with `include_all_metadata`, as Slack does), `apps.connections.open` (an app-level token's Socket Mode URL,
served by tests/fakes/slack_socket.py), `views.open` (a modal, kept in `views`), the external file upload
(`files.getUploadURLExternal`, a POST of the bytes to the URL it gives, `files.completeUploadExternal` sharing them in a
channel or thread as a message of the bot's with `files`), and the agent-thread methods `assistant.threads.setStatus` (status and
up to 10 loading messages; cleared, as Slack does, when the app posts in that thread), `setSuggestedPrompts` (up
to 4 prompts, each with a title and a message; a thread_ts is accepted and, as for an agent_view app, sets
nothing) and `setTitle`, each checking its arguments as Slack's reference has them. The streaming methods: `chat.startStream` (in a
thread; outside a DM only with `recipient_user_id` and `recipient_team_id`; it clears the thread's status, as a post
does), `chat.appendStream` (`markdown_text` required, at most 12,000 characters a call, only while the message
streams) and `chat.stopStream` (a last `markdown_text`, `blocks` shown under the streamed text, `metadata`); the
message's text is what was appended, in order (`streams` keeps each call's piece). Where Slack's behaviour is not
documented the fake is strict: a message still streaming cannot be `chat.update`d (stop it first), and a stream with
no append for `stream_expiry` seconds stops streaming, as Slack's do. `chat.delete` deletes one of the bot's own
messages (`deleted` keeps what it deleted); `conversations.replies` takes `oldest`/`inclusive` (the thread's parent
stays first). A test can `hold` a method: its work is done at once (e.g. the stream is created) but its answer waits
until the test sets the event, so a worker can be killed inside that window. Anything else answers `{"ok": false, "error": "unknown_method"}`.
Like real Slack, every answer except a rate limit is HTTP 200 with `"ok"` telling success from failure.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import mimetypes
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from tests.fakes.server import QuietHandler, serve, shutdown
from tests.fakes.slack_socket import FakeSocketMode


@dataclass
class Call:
    method: str
    token: str | None
    args: dict[str, Any]
    rate_limited: bool = False
    at: float = field(default_factory=time.monotonic)  # when it arrived: waits (Retry-After) can be measured
    peer: tuple[str, int] | None = None  # the client's address and port: the TCP connection it came over


@dataclass
class Answer:
    status: int
    payload: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def sign(body: bytes, secret: str, timestamp: int | None = None) -> dict[str, str]:
    """The headers Slack sends with a request to an app: `v0=` HMAC-SHA256 of `v0:{ts}:{body}` with the signing secret."""
    ts = str(timestamp if timestamp is not None else int(time.time()))
    signature = "v0=" + hmac.new(secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": signature, "Content-Type": "application/json"}


MAX_BLOCKS = 50
MAX_LOADING_MESSAGES = 10  # assistant.threads.setStatus rotates through at most 10
MAX_SUGGESTED_PROMPTS = 4
MARKDOWN_LIMIT = 12_000  # characters of markdown-block text per message, all its markdown blocks together


def _blocks(raw: Any) -> list[dict[str, Any]] | str | None:
    """The message's blocks (form-encoded calls send them as JSON text), or Slack's error for them."""
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return "invalid_blocks_format"
    if not isinstance(raw, list) or not all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in raw):
        return "invalid_blocks_format"
    if len(raw) > MAX_BLOCKS:
        return "invalid_blocks"
    if not all(_context_actions_ok(b) for b in raw if b["type"] == "context_actions"):
        return "invalid_blocks"
    if not all(_actions_ok(b) for b in raw if b["type"] == "actions"):
        return "invalid_blocks"
    markdown = [b.get("text") for b in raw if b["type"] == "markdown"]
    if not all(isinstance(t, str) and t for t in markdown):
        return "invalid_blocks"
    if sum(len(t) for t in markdown) > MARKDOWN_LIMIT:
        return "msg_blocks_too_long"
    return raw


def _context_actions_ok(block: dict[str, Any]) -> bool:
    """A context_actions block as Slack's reference has it: 1-5 elements, feedback_buttons with a positive and a
    negative button (plain_text of at most 75 characters, a value of at most 2,000), a block_id of at most 255."""
    elements, block_id = block.get("elements"), block.get("block_id")
    if not isinstance(elements, list) or not 0 < len(elements) <= 5:
        return False
    if block_id is not None and not (isinstance(block_id, str) and 0 < len(block_id) <= 255):
        return False
    for element in elements:
        if not isinstance(element, dict) or element.get("type") not in ("feedback_buttons", "icon_button"):
            return False
        if element["type"] != "feedback_buttons":
            continue
        for key in ("positive_button", "negative_button"):
            button = element.get(key)
            text = button.get("text") if isinstance(button, dict) else None
            if not isinstance(button, dict) or not isinstance(button.get("value"), str) or not 0 < len(button["value"]) <= 2000:
                return False
            if not isinstance(text, dict) or text.get("type") != "plain_text" or not 0 < len(str(text.get("text") or "")) <= 75:
                return False
    return True


def _actions_ok(block: dict[str, Any]) -> bool:
    """An actions block as Slack's reference has it: 1-25 elements; a button with plain_text of at most 75 characters,
    an action_id of at most 255 (unique in the block), a value of at most 2,000, a style of primary or danger if any."""
    elements, block_id = block.get("elements"), block.get("block_id")
    if not isinstance(elements, list) or not 0 < len(elements) <= 25:
        return False
    if block_id is not None and not (isinstance(block_id, str) and 0 < len(block_id) <= 255):
        return False
    ids = [e.get("action_id") for e in elements if isinstance(e, dict)]
    if len(ids) != len(set(ids)):
        return False
    for element in elements:
        if not isinstance(element, dict) or element.get("type") != "button":
            return False
        text, value = element.get("text"), element.get("value")
        if not isinstance(text, dict) or text.get("type") != "plain_text" or not 0 < len(str(text.get("text") or "")) <= 75:
            return False
        if not isinstance(element.get("action_id"), str) or not 0 < len(element["action_id"]) <= 255:
            return False
        if value is not None and not (isinstance(value, str) and len(value) <= 2000):
            return False
        if element.get("style") not in (None, "primary", "danger"):
            return False
    return True


def _ts_key(ts: str) -> tuple[int, int]:
    seconds, _, fraction = ts.partition(".")
    return int(seconds or 0), int(fraction or 0)


@dataclass
class FakeSlack:
    client_id: str = "111.222"
    client_secret: str = "fake-client-secret"
    retry_after: int = 1
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    oauth_codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    rate_limit: dict[str, int] = field(default_factory=dict)
    refuse: dict[str, str] = field(default_factory=dict)  # method -> the error Slack answers it with (e.g. missing_scope)
    calls: list[Call] = field(default_factory=list)
    messages: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    files: dict[str, tuple[dict[str, Any], bytes]] = field(default_factory=dict)  # file id -> (file object, bytes)
    downloads: list[tuple[str, str | None]] = field(default_factory=list)  # (path, bearer token) of every GET /files-pri/...
    app_tokens: dict[str, str] = field(default_factory=dict)  # app-level token (xapp-…) -> team id, for Socket Mode
    statuses: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (channel, thread_ts) -> status shown now
    suggested_prompts: dict[str, dict[str, Any]] = field(default_factory=dict)  # channel -> the prompts its Messages tab offers
    titles: dict[tuple[str, str], str] = field(default_factory=dict)  # (channel, thread_ts) -> the thread's title
    socket: FakeSocketMode | None = None  # the websocket server `apps.connections.open` points to
    users: dict[str, dict[str, Any]] = field(default_factory=dict)  # user id -> the user object `users.info` returns
    streams: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (channel, ts) -> state, pieces
    stream_expiry: float = 300.0
    deleted: list[dict[str, Any]] = field(default_factory=list)  # messages chat.delete removed, with their channel
    hold: dict[str, threading.Event] = field(default_factory=dict)  # method -> answered only once the event is set
    views: list[dict[str, Any]] = field(default_factory=list)  # modals opened (views.open): the view and its trigger_id
    uploads: dict[str, dict[str, Any]] = field(default_factory=dict)  # file id -> name, length, bytes (files.getUploadURLExternal)
    _seq: int = 0
    _last_ts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def origin(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        """The `base_url` for slack_sdk's clients: it must end with a slash."""
        return f"{self.origin}/api/"

    def reset(self) -> None:
        with self._lock:
            self.retry_after = 1
            self.tokens.clear()
            self.oauth_codes.clear()
            self.rate_limit.clear()
            self.refuse.clear()
            self.calls.clear()
            self.messages.clear()
            self.files.clear()
            self.downloads.clear()
            self.app_tokens.clear()
            self.streams.clear()
            self.stream_expiry = 300.0
            self.deleted.clear()
            for held in self.hold.values():
                held.set()  # a test that held a method and failed lets its caller go
            self.hold.clear()
            self.statuses.clear()
            self.suggested_prompts.clear()
            self.titles.clear()
            self.views.clear()
            self.uploads.clear()
            self.users.clear()
        if self.socket is not None:
            self.socket.reset()

    def calls_to(self, method: str) -> list[Call]:
        with self._lock:
            return [call for call in self.calls if call.method == method]

    def messages_in(self, channel: str) -> list[dict[str, Any]]:
        """What the app (a bot) posted in a channel, oldest first."""
        with self._lock:
            found = [dict(m) for (c, _), m in self.messages.items() if c == channel and m.get("bot_id")]
        return sorted(found, key=lambda m: _ts_key(m["ts"]))

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def add_token(
        self,
        token: str,
        *,
        team_id: str = "T0000000001",
        team: str = "Fake Team",
        user_id: str = "U0000000BOT",
        bot_id: str = "B0000000001",
    ) -> dict[str, Any]:
        """Register a bot token (what `auth.test` and the other methods accept)."""
        info = {"team_id": team_id, "team": team, "user_id": user_id, "bot_id": bot_id, "url": self._team_url(team)}
        with self._lock:
            self.tokens[token] = info
        return info

    def add_user(self, user_id: str, email: str, *, team_id: str = "T0000000001", name: str = "someone") -> None:
        """A person of a workspace, as `users.info` describes them (the email needs users:read.email, which we have)."""
        with self._lock:
            self.users[user_id] = {"id": user_id, "team_id": team_id, "name": name, "is_bot": False,
                                   "profile": {"email": email, "real_name": name, "display_name": name}}  # fmt: skip

    def add_app_token(self, token: str, *, team_id: str = "T0000000001") -> None:
        """Register an app-level token (what `apps.connections.open` accepts)."""
        with self._lock:
            self.app_tokens[token] = team_id

    def start_socket_mode(self) -> FakeSocketMode:
        """Start the Socket Mode websocket server that `apps.connections.open` hands out URLs of."""
        if self.socket is None:
            self.socket = FakeSocketMode().start()
        return self.socket

    def add_oauth_code(
        self,
        code: str,
        *,
        team_id: str = "T0000000001",
        team: str = "Fake Team",
        bot_user_id: str = "U0000000BOT",
        bot_id: str = "B0000000001",
        access_token: str | None = None,
        app_id: str = "A0000000001",
        authed_user_id: str = "U0000000001",
        scope: str = "app_mentions:read,chat:write,files:read,im:history",
    ) -> dict[str, Any]:
        """Register a single-use code for `oauth.v2.access`; it grants this install."""
        grant = {
            "team_id": team_id,
            "team": team,
            "bot_user_id": bot_user_id,
            "bot_id": bot_id,
            "access_token": access_token or f"xoxb-{team_id}-{code}",
            "app_id": app_id,
            "authed_user_id": authed_user_id,
            "scope": scope,
        }
        with self._lock:
            self.oauth_codes[code] = grant
        return grant

    def add_message(self, channel: str, text: str, *, user: str = "U0000000001", thread_ts: str | None = None) -> dict[str, Any]:
        """Store a message a person wrote (it reached the app as an event), so `conversations.replies` returns it."""
        with self._lock:
            ts = self._new_ts()
            message: dict[str, Any] = {"type": "message", "text": text, "ts": ts, "user": user}
            if thread_ts:
                message["thread_ts"] = thread_ts
            self.messages[(channel, ts)] = message
            return dict(message)

    def add_file(self, name: str, mimetype: str, content: bytes, *, team_id: str = "T0000000001") -> dict[str, Any]:
        """Store bytes; return the file object as it appears in a message event's `files`."""
        with self._lock:
            file_id = f"F{self._next():010d}"
        extension = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        url = f"{self.origin}/files-pri/{team_id}-{file_id}/{quote(name)}"
        info: dict[str, Any] = {
            "id": file_id,
            "name": name,
            "title": name,
            "mimetype": mimetype,
            "filetype": extension or mimetype.rsplit("/", 1)[-1],
            "size": len(content),
            "url_private": url,
            "url_private_download": f"{url}?download=1",
        }
        with self._lock:
            self.files[file_id] = (info, content)
        return dict(info)

    @staticmethod
    def _team_url(team: str) -> str:
        return f"https://{re.sub(r'[^a-z0-9]+', '-', team.lower()).strip('-') or 'fake'}.slack.com/"

    def _new_ts(self) -> str:
        """A message ts as Slack makes them: the time in microseconds (unique, increasing), so a message posted after
        a person's (whose ts a test takes from the clock) is newer than it, as `oldest` look-ups need."""
        self._next()
        now = max(int(time.time() * 1_000_000), self._last_ts + 1)
        self._last_ts = now
        return f"{now // 1_000_000}.{now % 1_000_000:06d}"

    # The Web API. Called with the lock held.

    def _answer(self, method: str, token: str | None, basic: tuple[str, str] | None, args: dict[str, Any]) -> Answer:
        call = Call(method, token, args)
        self.calls.append(call)
        if self.rate_limit.get(method, 0) > 0:
            self.rate_limit[method] -= 1
            call.rate_limited = True
            return Answer(429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(self.retry_after)})
        if method in self.refuse:
            return Answer(200, {"ok": False, "error": self.refuse[method]})
        if method == "oauth.v2.access":
            return Answer(200, self._oauth_v2_access(basic, args))
        if method == "apps.connections.open":
            return Answer(200, self._apps_connections_open(token))
        if method == "auth.test":
            info = self.tokens.get(token or "")
            if info is None:
                return Answer(200, {"ok": False, "error": "invalid_auth"})
            return Answer(200, self._auth_test(info))
        handlers = {
            "chat.postMessage": self._chat_post_message,
            "chat.update": self._chat_update,
            "chat.delete": self._chat_delete,
            "conversations.replies": self._conversations_replies,
            "conversations.history": self._conversations_history,
            "chat.startStream": self._chat_start_stream,
            "chat.appendStream": self._chat_append_stream,
            "chat.stopStream": self._chat_stop_stream,
            "assistant.threads.setStatus": self._set_status,
            "assistant.threads.setSuggestedPrompts": self._set_suggested_prompts,
            "assistant.threads.setTitle": self._set_title,
            "views.open": self._views_open,
            "files.getUploadURLExternal": self._get_upload_url,
            "files.completeUploadExternal": self._complete_upload,
            "users.info": self._users_info,
        }
        handler = handlers.get(method)
        if handler is None:
            return Answer(200, {"ok": False, "error": "unknown_method"})
        if not token:
            return Answer(200, {"ok": False, "error": "not_authed"})
        info = self.tokens.get(token)
        if info is None:
            return Answer(200, {"ok": False, "error": "invalid_auth"})
        return Answer(200, handler(info, args))

    def _users_info(self, info: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        """A user of the token's own workspace; anyone else is user_not_found, as Slack answers."""
        user = self.users.get(str(args.get("user") or ""))
        if user is None or user["team_id"] != info["team_id"]:
            return {"ok": False, "error": "user_not_found"}
        return {"ok": True, "user": dict(user)}

    def _apps_connections_open(self, token: str | None) -> dict[str, Any]:
        """A Socket Mode URL for an app-level token; bot tokens are refused as Slack refuses them."""
        if not token:
            return {"ok": False, "error": "not_authed"}
        if token.startswith("xoxb-"):
            return {"ok": False, "error": "not_allowed_token_type"}
        if token not in self.app_tokens:
            return {"ok": False, "error": "invalid_auth"}
        if self.socket is None:
            return {"ok": False, "error": "socket_mode_not_enabled"}  # the fake's own: no websocket server started
        return {"ok": True, "url": self.socket.url_for(token)}

    def _auth_test(self, info: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "url": info.get("url") or self._team_url(info["team"]),
            "team": info["team"],
            "user": "konstruct-bot",
            "team_id": info["team_id"],
            "user_id": info["user_id"],
            "bot_id": info["bot_id"],
            "is_enterprise_install": False,
        }

    def _oauth_v2_access(self, basic: tuple[str, str] | None, args: dict[str, Any]) -> dict[str, Any]:
        client_id, client_secret = basic or (args.get("client_id"), args.get("client_secret"))
        if client_id != self.client_id:
            return {"ok": False, "error": "invalid_client_id"}
        if client_secret != self.client_secret:
            return {"ok": False, "error": "bad_client_secret"}
        grant = self.oauth_codes.pop(str(args.get("code") or ""), None)  # single use: a second exchange finds nothing
        if grant is None:
            return {"ok": False, "error": "invalid_code"}
        if grant.get("redirect_uri") and args.get("redirect_uri") != grant["redirect_uri"]:
            return {"ok": False, "error": "bad_redirect_uri"}
        self.tokens[grant["access_token"]] = {
            "team_id": grant["team_id"],
            "team": grant["team"],
            "user_id": grant["bot_user_id"],
            "bot_id": grant["bot_id"],
            "url": self._team_url(grant["team"]),
        }
        return {
            "ok": True,
            "access_token": grant["access_token"],
            "token_type": "bot",
            "scope": grant["scope"],
            "bot_user_id": grant["bot_user_id"],
            "app_id": grant["app_id"],
            "team": {"id": grant["team_id"], "name": grant["team"]},
            "enterprise": None,
            "is_enterprise_install": False,
            "authed_user": {"id": grant["authed_user_id"]},
        }

    def _chat_post_message(self, info: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        channel = args.get("channel")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        text, blocks = args.get("text"), _blocks(args.get("blocks"))
        if isinstance(blocks, str):
            return {"ok": False, "error": blocks}
        if not text and not blocks and not args.get("attachments"):
            return {"ok": False, "error": "no_text"}
        ts = self._new_ts()
        message: dict[str, Any] = {"type": "message", "text": text or "", "ts": ts, "user": info["user_id"], "bot_id": info["bot_id"]}
        if args.get("thread_ts"):
            message["thread_ts"] = str(args["thread_ts"])
        if blocks:
            message["blocks"] = blocks
        metadata = args.get("metadata")
        if isinstance(metadata, str):  # form-encoded calls send it as JSON text
            metadata = json.loads(metadata)
        if metadata:
            if not isinstance(metadata, dict) or not metadata.get("event_type") or not isinstance(metadata.get("event_payload"), dict):
                return {"ok": False, "error": "invalid_metadata_format"}
            message["metadata"] = metadata
        self.messages[(str(channel), ts)] = message
        if message.get("thread_ts"):
            self.statuses.pop((str(channel), message["thread_ts"]), None)  # Slack clears the status when the app posts there
        return {"ok": True, "channel": channel, "ts": ts, "message": self._shown(message, True)}

    @staticmethod
    def _shown(message: dict[str, Any], with_metadata: Any) -> dict[str, Any]:
        shown = dict(message)
        if str(with_metadata).lower() not in ("true", "1"):
            shown.pop("metadata", None)
        return shown

    def _chat_update(self, info: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        channel, ts = str(args.get("channel") or ""), str(args.get("ts") or "")
        message = self.messages.get((channel, ts))
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        if message.get("user") != info["user_id"] or self._streaming(channel, ts):
            return {"ok": False, "error": "cant_update_message"}
        text, blocks = args.get("text"), _blocks(args.get("blocks"))
        if isinstance(blocks, str):
            return {"ok": False, "error": blocks}
        if not text and not blocks:
            return {"ok": False, "error": "no_text"}
        message["text"] = text or ""
        if blocks:
            message["blocks"] = blocks
        message["edited"] = {"user": info["user_id"], "ts": self._new_ts()}
        return {"ok": True, "channel": channel, "ts": ts, "text": message["text"], "message": dict(message)}

    def _chat_delete(self, info: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        """A bot token deletes only that bot's own messages (a streaming one too: its stream ends with it)."""
        channel, ts = str(args.get("channel") or ""), str(args.get("ts") or "")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        message = self.messages.get((channel, ts))
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        if message.get("user") != info["user_id"]:
            return {"ok": False, "error": "cant_delete_message"}
        del self.messages[(channel, ts)]
        if (channel, ts) in self.streams:
            self.streams[(channel, ts)]["state"] = "deleted"
        self.deleted.append({**message, "channel": channel})
        return {"ok": True, "channel": channel, "ts": ts}

    def _streaming(self, channel: str, ts: str) -> bool:
        stream = self.streams.get((channel, ts))
        if stream is None or stream["state"] != "streaming":
            return False
        if time.monotonic() - stream["last"] > self.stream_expiry:
            stream["state"] = "expired"
            return False
        return True

    def _chat_start_stream(self, info: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        channel, thread = str(args.get("channel") or ""), args.get("thread_ts")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        if not thread:
            return {"ok": False, "error": "invalid_arguments"}  # streamed messages are replies to a person
        if not channel.startswith("D"):
            if not args.get("recipient_user_id"):
                return {"ok": False, "error": "missing_recipient_user_id"}
            if not args.get("recipient_team_id"):
                return {"ok": False, "error": "missing_recipient_team_id"}
        text = args.get("markdown_text")
        if text is not None and args.get("chunks") is not None:
            return {"ok": False, "error": "invalid_arguments"}
        if text is not None and (not isinstance(text, str) or len(text) > MARKDOWN_LIMIT):
            return {"ok": False, "error": "msg_too_long"}
        ts = self._new_ts()
        message: dict[str, Any] = {"type": "message", "text": text or "", "ts": ts, "user": info["user_id"], "bot_id": info["bot_id"],
                                   "thread_ts": str(thread), "blocks": [{"type": "markdown", "text": text}] if text else []}  # fmt: skip
        self.messages[(channel, ts)] = message
        self.statuses.pop((channel, str(thread)), None)  # the app posted in the thread: Slack clears its status
        self.streams[(channel, ts)] = {"state": "streaming", "last": time.monotonic(), "pieces": [text] if text else []}
        return {"ok": True, "channel": channel, "ts": ts}

    def _stream_piece(self, info: dict[str, Any], args: dict[str, Any], *, required: bool) -> tuple[dict[str, Any], str] | str:
        """(the stream's message, the text to append) or Slack's error."""
        channel, ts, text = str(args.get("channel") or ""), str(args.get("ts") or ""), args.get("markdown_text")
        message = self.messages.get((channel, ts))
        if message is None:
            return "message_not_found"
        if message.get("user") != info["user_id"]:
            return "cant_update_message"
        if not self._streaming(channel, ts):
            return "message_not_in_streaming_state"
        if required and not text:
            return "no_text"
        if text is not None and (not isinstance(text, str) or len(text) > MARKDOWN_LIMIT):
            return "msg_too_long"
        if len(message["text"]) + len(text or "") > MARKDOWN_LIMIT:
            return "msg_too_long"
        return message, str(text or "")

    def _append(self, channel: str, ts: str, message: dict[str, Any], text: str) -> None:
        if text:
            message["text"] += text
            message["blocks"] = [{"type": "markdown", "text": message["text"]}]
            self.streams[(channel, ts)]["pieces"].append(text)
        self.streams[(channel, ts)]["last"] = time.monotonic()

    def _chat_append_stream(self, info: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        found = self._stream_piece(info, args, required=True)
        if isinstance(found, str):
            return {"ok": False, "error": found}
        channel, ts = str(args["channel"]), str(args["ts"])
        self._append(channel, ts, *found)
        return {"ok": True, "channel": channel, "ts": ts}

    def _chat_stop_stream(self, info: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        found = self._stream_piece(info, args, required=False)
        if isinstance(found, str):
            return {"ok": False, "error": found}
        blocks = _blocks(args.get("blocks"))
        if isinstance(blocks, str):
            return {"ok": False, "error": blocks}
        metadata = args.get("metadata")
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        if metadata and (not isinstance(metadata, dict) or not metadata.get("event_type")):
            return {"ok": False, "error": "invalid_metadata_format"}
        channel, ts = str(args["channel"]), str(args["ts"])
        message, text = found
        self._append(channel, ts, message, text)
        message["blocks"] = [*([{"type": "markdown", "text": message["text"]}] if message["text"] else []), *(blocks or [])]
        if metadata:
            message["metadata"] = metadata
        self.streams[(channel, ts)]["state"] = "stopped"
        return {"ok": True, "channel": channel, "ts": ts, "message": dict(message)}

    def _conversations_replies(self, info: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        channel, ts = str(args.get("channel") or ""), str(args.get("ts") or "")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        if not ts:
            return {"ok": False, "error": "invalid_arguments"}
        oldest, inclusive = _ts_key(str(args.get("oldest") or "0")), str(args.get("inclusive")).lower() in ("true", "1")
        thread = [
            self._shown(message, args.get("include_all_metadata"))
            for (in_channel, message_ts), message in self.messages.items()
            if in_channel == channel
            and (
                message_ts == ts
                or (message.get("thread_ts") == ts and (_ts_key(message_ts) > oldest or (inclusive and _ts_key(message_ts) == oldest)))
            )
        ]
        thread.sort(key=lambda message: _ts_key(message["ts"]))
        return {"ok": True, "messages": thread, "has_more": False}

    def _conversations_history(self, info: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        """Top-level messages of a channel, newest first, from `oldest` on (thread replies are not in history)."""
        channel = str(args.get("channel") or "")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        oldest = _ts_key(str(args.get("oldest") or "0"))
        found = [
            self._shown(message, args.get("include_all_metadata"))
            for (in_channel, message_ts), message in self.messages.items()
            if in_channel == channel and _ts_key(message_ts) >= oldest and message.get("thread_ts") in (None, message_ts)
        ]
        found.sort(key=lambda message: _ts_key(message["ts"]), reverse=True)
        limit = int(args.get("limit") or 100)
        return {"ok": True, "messages": found[:limit], "has_more": len(found) > limit}

    @staticmethod
    def _thread_args(args: dict[str, Any], *, thread_required: bool = True) -> tuple[str, str] | str:
        """(channel_id, thread_ts), or Slack's error for them."""
        channel, thread = args.get("channel_id"), args.get("thread_ts")
        if not isinstance(channel, str) or not channel:
            return "channel_not_found"
        if thread is None and not thread_required:
            return channel, ""
        if not isinstance(thread, str) or not re.fullmatch(r"\d+\.\d+", thread):
            return "invalid_thread_ts"
        return channel, thread

    @staticmethod
    def _json_arg(value: Any) -> Any:
        if isinstance(value, str):  # form-encoded calls send arrays as JSON text
            try:
                return json.loads(value)
            except ValueError:
                return None
        return value

    def _set_status(self, info: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        where = self._thread_args(args)
        if isinstance(where, str):
            return {"ok": False, "error": where}
        status = args.get("status")
        if not isinstance(status, str):
            return {"ok": False, "error": "invalid_arguments"}
        loading = self._json_arg(args.get("loading_messages"))
        if loading is not None and (
            not isinstance(loading, list) or len(loading) > MAX_LOADING_MESSAGES or not all(isinstance(m, str) and m for m in loading)
        ):
            return {"ok": False, "error": "invalid_arguments"}
        if status:
            self.statuses[where] = {"status": status, "loading_messages": list(loading or [])}
        else:
            self.statuses.pop(where, None)  # an empty status clears it
        return {"ok": True}

    def _set_suggested_prompts(self, info: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        where = self._thread_args(args, thread_required=False)
        if isinstance(where, str):
            return {"ok": False, "error": where}
        prompts = self._json_arg(args.get("prompts"))
        if not isinstance(prompts, list) or not 0 < len(prompts) <= MAX_SUGGESTED_PROMPTS:
            return {"ok": False, "error": "invalid_arguments"}
        for prompt in prompts:
            if not isinstance(prompt, dict) or not all(isinstance(prompt.get(k), str) and prompt[k] for k in ("title", "message")):
                return {"ok": False, "error": "invalid_arguments"}
        title = args.get("title")
        if title is not None and not isinstance(title, str):
            return {"ok": False, "error": "invalid_arguments"}
        channel, thread = where
        if not thread:  # with a thread_ts an agent_view app's call silently sets nothing (Slack's reference)
            self.suggested_prompts[channel] = {"prompts": prompts, "title": title}
        return {"ok": True}

    def _set_title(self, info: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        where = self._thread_args(args)
        if isinstance(where, str):
            return {"ok": False, "error": where}
        title = args.get("title")
        if not isinstance(title, str) or not title.strip():
            return {"ok": False, "error": "invalid_arguments"}
        self.titles[where] = title
        return {"ok": True}

    def _views_open(self, info: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        """A modal, opened with the trigger_id of an interaction (Slack's expire in 3 s; the fake keeps them all)."""
        view = self._json_arg(args.get("view"))
        if not isinstance(args.get("trigger_id"), str) or not args["trigger_id"]:
            return {"ok": False, "error": "invalid_trigger_id"}
        if not isinstance(view, dict) or view.get("type") != "modal" or not isinstance(view.get("title"), dict):
            return {"ok": False, "error": "invalid_arguments"}
        self.views.append({"trigger_id": args["trigger_id"], "view": view})
        return {"ok": True, "view": {"id": f"V{self._next():010d}", **view}}

    def _get_upload_url(self, info: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        """Step 1 of Slack's external upload: a URL to POST the bytes to, and the file's id."""
        name, length = args.get("filename"), str(args.get("length") or "")
        if not isinstance(name, str) or not name or not length.isdigit():
            return {"ok": False, "error": "invalid_arguments"}
        file_id = f"F{self._next():010d}"
        self.uploads[file_id] = {"name": name, "length": int(length), "data": None}
        return {"ok": True, "upload_url": f"{self.origin}/upload/v1/{file_id}", "file_id": file_id}

    def _complete_upload(self, info: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        """Step 3: share the uploaded files in a channel (a thread), as one message from the bot carrying them."""
        files = self._json_arg(args.get("files"))
        channel = args.get("channel_id")
        if not isinstance(files, list) or not files or not all(isinstance(f, dict) and f.get("id") in self.uploads for f in files):
            return {"ok": False, "error": "invalid_arguments"}
        if any(self.uploads[f["id"]]["data"] is None for f in files):
            return {"ok": False, "error": "file_not_found"}  # never uploaded
        shared = [{"id": f["id"], "name": self.uploads[f["id"]]["name"], "title": f.get("title") or "", "size": len(self.uploads[f["id"]]["data"])}
                  for f in files]  # fmt: skip
        if channel:
            ts = self._new_ts()
            message: dict[str, Any] = {
                "type": "message",
                "text": "",
                "ts": ts,
                "user": info["user_id"],
                "bot_id": info["bot_id"],
                "files": shared,
            }
            if args.get("thread_ts"):
                message["thread_ts"] = str(args["thread_ts"])
            self.messages[(str(channel), ts)] = message
        return {"ok": True, "files": [{"id": f["id"], "title": f["title"]} for f in shared]}

    def _upload(self, path: str, data: bytes) -> int:
        """Step 2: the bytes of a file, POSTed to the URL step 1 gave; its length must be the one announced."""
        upload = self.uploads.get(path.rsplit("/", 1)[-1])
        if upload is None or len(data) != upload["length"]:
            return 400
        upload["data"] = data
        return 200

    # Private files. Called with the lock held.

    def _download(self, path: str, token: str | None) -> tuple[int, str, bytes]:
        self.downloads.append((path, token))
        if not token or token not in self.tokens:
            return 302, "", b""
        match = re.fullmatch(r"/files-pri/(?P<team>[^/]+)-(?P<id>[^/-]+)/(?P<name>[^/]+)", path)
        stored = self.files.get(match["id"]) if match else None
        if stored is None or urlsplit(stored[0]["url_private"]).path != path:
            return 404, "text/plain", b"file not found"
        info, content = stored
        return 200, info["mimetype"] or mimetypes.guess_type(info["name"])[0] or "application/octet-stream", content

    def start(self, port: int = 0) -> FakeSlack:
        fake = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def _handle(self) -> None:
                raw = self.read_body()
                parts = urlsplit(self.path)
                token, basic = self._credentials()
                if parts.path.startswith("/api/"):
                    args = self._args(parts.query, raw)
                    if args is None:
                        self._send(Answer(200, {"ok": False, "error": "invalid_json"}))
                        return
                    if token is None and isinstance(args.get("token"), str):
                        token = args["token"]  # Slack still takes a token in the body
                    method = parts.path[len("/api/") :].strip("/")
                    with fake._lock:
                        answer = fake._answer(method, token, basic, args)
                        fake.calls[-1].peer = self.client_address[:2]
                        held = fake.hold.get(method)
                    if held is not None:
                        held.wait(60)  # done, not answered yet: the window a test kills a worker in
                    self._send(answer)
                elif parts.path.startswith("/files-pri/") and self.command == "GET":
                    with fake._lock:
                        status, content_type, data = fake._download(parts.path, token)
                    if status == 302:
                        self.send_bytes(302, "", b"", {"Location": f"{fake.origin}/signin"})
                    else:
                        self.send_bytes(status, content_type, data)
                elif parts.path.startswith("/upload/v1/") and self.command == "POST":
                    with fake._lock:
                        status = fake._upload(parts.path, raw)
                    self.send_bytes(status, "text/plain", f"OK - {len(raw)}".encode() if status == 200 else b"bad upload")
                elif parts.path == "/signin" and self.command == "GET":
                    page = b"<!DOCTYPE html><html><head><title>Sign in | Slack</title></head><body>Sign in to your workspace</body></html>"
                    self.send_bytes(200, "text/html; charset=utf-8", page)
                else:
                    self._send(Answer(404, {"ok": False, "error": f"no route {parts.path}"}))

            def _credentials(self) -> tuple[str | None, tuple[str, str] | None]:
                """The bearer token, or the client id and secret of HTTP Basic auth."""
                scheme, _, value = (self.headers.get("Authorization") or "").strip().partition(" ")
                if scheme.lower() == "bearer" and value.strip():
                    return value.strip(), None
                if scheme.lower() == "basic":
                    with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                        user, _, password = base64.b64decode(value.strip(), validate=True).decode("latin-1").partition(":")
                        return None, (user, password)
                return None, None

            def _args(self, query: str, raw: bytes) -> dict[str, Any] | None:
                """Query string and body together: form values are single strings, JSON is as sent. None when JSON is broken."""
                args: dict[str, Any] = {k: v[0] if len(v) == 1 else v for k, v in parse_qs(query, keep_blank_values=True).items()}
                content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                if content_type == "application/json" and raw.strip():
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        return None
                    if not isinstance(body, dict):
                        return None
                    args.update(body)
                elif raw:
                    form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
                    args.update({k: v[0] if len(v) == 1 else v for k, v in form.items()})
                return args

            def _send(self, answer: Answer) -> None:
                self.send_bytes(answer.status, "application/json; charset=utf-8", json.dumps(answer.payload).encode(), answer.headers)

        self._server = serve(Handler, port, "fake-slack")
        return self

    def stop(self) -> None:
        if self.socket is not None:
            self.socket.stop()
        shutdown(self._server)
