"""Replying in Slack from the worker: a thinking status (or a placeholder) at once, then the answer.

In a DM with the app (its Messages tab, where Slack's agent threads are) the thread gets a status — "is
thinking…" with loading messages saying what the agent does — which Slack clears when the answer is posted;
a new thread is titled from its first question. Elsewhere (a mention in a channel), or where Slack refuses the status,
a `_thinking…_` placeholder shows it. The answer is streamed into the thread as the model writes it
(konstruct.channels.slack.stream), and a placeholder is deleted once the stream shows text; where Slack refuses the
stream (or streaming is off) the placeholder is replaced by the answer, or the answer is posted whole.

Posting is paced per channel (Slack allows about one message a second per channel) and every call
honours 429 Retry-After, so bursts are slowed down, never dropped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct import feedback
from konstruct.channels.connections import SecretCache
from konstruct.channels.slack import desk
from konstruct.channels.slack.approvals import request_blocks
from konstruct.channels.slack.client import PooledSession, web_client
from konstruct.channels.slack.feedback import feedback_block
from konstruct.channels.slack.format import SlackMessage, markdown_messages
from konstruct.channels.slack.stream import (
    PENDING,
    SlackStream,
    delete_message,
    is_pending,
    pending_ref,
    placeholder_ts,
    stop_stream,
    stream_ts,
)
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import ChannelConnection, InboundMessage, Message
from konstruct.messaging import ApprovalRequest, ChannelError, DeskCard, DeskFile, DeskThread, Reply, Target, mark_sent

log = logging.getLogger(__name__)

SLACK_FILE_HOSTS = ("files.slack.com",)
SLACK_TS = re.compile(r"\d+\.\d+")


def file_host_allowed(settings: Settings, url: str) -> bool:
    """May the bot token be sent to this url_private? Only to Slack's file host over HTTPS, or to the
    configured Slack API's own origin (a test fake): an event, forgeable by whoever holds a
    single-workspace signing secret, must not choose where the token goes."""
    parts, api = urlsplit(url), urlsplit(settings.slack.api_url)
    if parts.scheme == "https" and parts.hostname in SLACK_FILE_HOSTS and parts.port in (None, 443):
        return True
    return (parts.scheme, parts.hostname, parts.port) == (api.scheme, api.hostname, api.port) and parts.hostname is not None


POST_INTERVAL = 1.0  # seconds between posts to one channel
# Message metadata that ties a placeholder, or the first message of an answer posted without one, to the message it
# answers: a retry whose earlier attempt died before recording it finds it and answers there, never posting twice.
PLACEHOLDER_EVENT = "konstruct_placeholder"
PART_EVENT = "konstruct_part"  # the later parts of a split answer: every message the app posts is marked (see leftovers)
ANSWERED_BELOW = "_(answered below)_"  # what a placeholder Slack will not let us delete says instead
THINKING = "is thinking…"  # the status; its loading messages say what the agent does
READING = "reading the thread…"
MAX_LOADING = 150  # characters of one loading message we send (a tool name comes from the model)
MAX_TITLE = 60  # characters of a thread title taken from its first question


def status_thread(target: Target) -> str | None:
    """The thread whose status can show the agent working: in a DM with the app (its agent threads), the thread the
    message is in or starts (and is answered in). None elsewhere (a channel mention), where a placeholder does it."""
    if target.payload.get("channel_type") != "im":
        return None
    thread = target.payload.get("thread_ts") or target.payload.get("ts")
    return str(thread) if thread else None


def thread_title(question: str) -> str:
    """A thread's title from its first question: one line, at most MAX_TITLE characters."""
    line = " ".join(question.split())
    return line if len(line) <= MAX_TITLE else line[: MAX_TITLE - 1].rstrip() + "…"


def answer_marker(target: Target) -> dict[str, Any]:
    """The metadata a placeholder, or an answer's first message posted without one, carries (see PLACEHOLDER_EVENT)."""
    return {"event_type": PLACEHOLDER_EVENT, "event_payload": {"answers": target.inbound_external_id}}


def ts_key(ts: str) -> tuple[int, int]:
    """A Slack ts (seconds.micro) as numbers, to order messages by."""
    seconds, _, fraction = ts.partition(".")
    return int(seconds or 0), int(fraction or 0)


def part_marker(target: Target) -> dict[str, Any]:
    """The metadata of an answer's later parts: no retry answers in them, and a retry's look-up knows them for ours."""
    return {"event_type": PART_EVENT, "event_payload": {"answers": target.inbound_external_id}}


def stream_thread(target: Target) -> str | None:
    """The thread an answer can be streamed into: a DM's (its agent thread), or the channel thread the message is in
    or starts, where Slack needs the person it answers (the payload's `user`). None where it cannot be."""
    thread = status_thread(target)
    if thread is not None:
        return thread
    thread = target.payload.get("thread_ts")
    return str(thread) if thread and target.payload.get("user") and target.payload.get("team_id") else None


def recipient(target: Target) -> tuple[str, str] | None:
    """startStream's recipient outside a DM (Slack requires it there): the person, and the event's workspace."""
    if target.payload.get("channel_type") == "im":
        return None
    return str(target.payload["user"]), str(target.payload["team_id"])


class SlackChannel:
    name = "slack"
    reports_delivery = False

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.tokens = SecretCache(db, settings, "slack", "bot_token")
        self._pace: dict[tuple[str, str], tuple[asyncio.Lock, list[float]]] = {}
        self._http = PooledSession()  # every Web API call of this worker over the same keep-alive connections

    async def close(self) -> None:
        await self._http.close()

    async def prepare(self, target: Target) -> str | None:
        """In an agent thread: set its status (and title a new thread), post nothing, return None. Elsewhere, or
        when Slack refuses the status: post the placeholder, whose ts is where the answer will go. Either way a
        retry first looks for what an earlier attempt posted (a placeholder, or an answer, by their metadata)."""
        client = await self._client(target)
        if target.retry:
            found = await self._find_placeholder(client, target)
            if found is not None:  # no stream was started (none starts before the pending marker is recorded): answer there
                return found
        thread = status_thread(target)
        if thread is not None:
            starts = target.payload.get("thread_ts") in (None, target.payload.get("ts"))
            if starts and not target.retry and target.question.strip():
                await self._title(client, target, thread)  # the question starts this thread: name it, once
            if await self._status(client, target, thread, [READING]):
                return self._ref(target, None)
        response = await self._post(client, target, self.settings.slack.placeholder, metadata=answer_marker(target))
        return self._ref(target, str(response["ts"]))

    def _ref(self, target: Target, placeholder: str | None) -> str | None:
        """What prepare() records: where the answer will be streamed, the pending marker (one write, before any stream
        can start, so a retry knows to look for one); else the placeholder's ts (None: a status, nothing posted)."""
        return pending_ref(placeholder) if self._streams(target) else placeholder

    async def working(self, target: Target, what: str) -> None:
        """Show what the agent does now as the thread's loading message; a placeholder is left as it is."""
        thread = status_thread(target)
        if thread is not None and target.reply_ref in (None, PENDING):  # the status shows, not a placeholder or the answer
            await self._status(await self._client(target), target, thread, [what[:MAX_LOADING]])

    async def _status(self, client: AsyncWebClient, target: Target, thread: str, loading: list[str]) -> bool:
        """Set the thread's status; False when Slack refuses it (e.g. an app without the scope)."""
        try:
            await client.assistant_threads_setStatus(
                channel_id=target.payload["channel"], thread_ts=thread, status=THINKING, loading_messages=loading
            )
        except SlackApiError as exc:
            log.warning("Slack refused the thread status: %s", exc.response.get("error"))
            return False
        return True

    async def _title(self, client: AsyncWebClient, target: Target, thread: str) -> None:
        try:
            await client.assistant_threads_setTitle(
                channel_id=target.payload["channel"], thread_ts=thread, title=thread_title(target.question)
            )
        except SlackApiError as exc:  # a thread without a title still gets its answer
            log.warning("Slack refused the thread title: %s", exc.response.get("error"))

    async def _find_placeholder(self, client: AsyncWebClient, target: Target) -> str | None:
        return self._marked(await self._listed(client, target), target)

    @staticmethod
    def _marked(messages: list[dict[str, Any]], target: Target) -> str | None:
        """The first message marked as answering the target's message (a placeholder, or an answer's first part)."""
        for message in messages:
            metadata = message.get("metadata") or {}
            if (
                metadata.get("event_type") == PLACEHOLDER_EVENT
                and (metadata.get("event_payload") or {}).get("answers") == target.inbound_external_id
            ):
                return str(message["ts"])
        return None

    async def _listed(self, client: AsyncWebClient, target: Target) -> list[dict[str, Any]]:
        """The messages after the target's message in its thread (or channel), with their metadata, oldest first."""
        channel, thread, after = target.payload["channel"], target.payload.get("thread_ts"), target.payload.get("ts")
        try:
            if thread:
                response = await client.conversations_replies(
                    channel=channel, ts=thread, oldest=after, include_all_metadata=True, limit=200
                )
            else:
                response = await client.conversations_history(channel=channel, oldest=after, include_all_metadata=True, limit=200)
        except SlackApiError as exc:
            raise ChannelError(f"Slack refused to list the thread: {exc.response.get('error')}") from None
        messages = [m for m in response.get("messages") or [] if isinstance(m, dict) and SLACK_TS.fullmatch(str(m.get("ts")))]
        return sorted(messages, key=lambda m: ts_key(m["ts"]))

    async def leftovers(self, client: AsyncWebClient, target: Target) -> tuple[str | None, str | None]:
        """(the placeholder, a stream left) of an attempt that died after recording the pending marker. The stream is
        one it started and never recorded: the app's, after the message, unmarked (every other message the app posts
        is marked) and neither a stored reply nor any turn's recorded reference. It is stopped, and the answer goes in
        it; the placeholder then goes at once. (A second such stream, which no attempt leaves, is deleted.)"""
        messages = await self._listed(client, target)
        placeholder = self._marked(messages, target) or placeholder_ts(target.reply_ref)
        streams = await self._unrecorded(client, target, messages)
        channel = str(target.payload["channel"])
        for ts in streams:
            with contextlib.suppress(SlackApiError):
                await stop_stream(client, channel, ts)
        for extra in streams[1:]:
            await delete_message(client, channel, extra)
        if not streams:
            return placeholder, None
        if placeholder is not None and placeholder != streams[0]:
            await self._drop(client, target, placeholder)
        return None, streams[0]

    async def _unrecorded(self, client: AsyncWebClient, target: Target, messages: list[dict[str, Any]]) -> list[str]:
        """The ts of the app's unmarked messages after the target's message that no turn recorded (see leftovers)."""
        me, known = await client.auth_test(), await self._recorded(target)
        after = ts_key(str(target.payload.get("ts") or "0"))
        return [
            str(m["ts"])
            for m in messages
            if (m.get("user") == me.get("user_id") or (m.get("bot_id") and m.get("bot_id") == me.get("bot_id")))
            and ts_key(m["ts"]) > after
            and (m.get("metadata") or {}).get("event_type") not in (PLACEHOLDER_EVENT, PART_EVENT)
            and m["ts"] not in known
        ]

    async def _recorded(self, target: Target) -> set[str]:
        """The ts of every message this conversation's turns recorded: replies sent, placeholders, streams."""
        async with self.db.tenant(tenant_id=target.tenant_id) as session:
            refs = await session.scalars(
                select(InboundMessage.reply_ref).where(
                    InboundMessage.conversation_id == target.conversation_id, InboundMessage.reply_ref.is_not(None)
                )
            )
            sent = await session.scalars(
                select(Message.external_id).where(Message.conversation_id == target.conversation_id, Message.external_id.is_not(None))
            )
            known = {ts for ref in refs if (ts := stream_ts(ref) or placeholder_ts(ref))}
            return known | {str(ts) for ts in sent}

    async def _drop(self, client: AsyncWebClient, target: Target, placeholder: str) -> None:
        """Delete the placeholder (the answer shows elsewhere); if Slack will not, it stops saying the agent thinks."""
        channel = str(target.payload["channel"])
        if await delete_message(client, channel, placeholder):
            return
        try:
            await client.chat_update(channel=channel, ts=placeholder, text=ANSWERED_BELOW)
        except SlackApiError as exc:
            log.warning("Slack refused to change the placeholder either (%s)", exc.response.get("error"))

    async def attachments(self, target: Target) -> list[dict[str, Any]]:
        """Images (downloaded with the bot token) as image parts; other files named by name and type."""
        files = target.payload.get("files") or []
        if not files:
            return []
        token = await self._token(target)
        parts: list[dict[str, Any]] = []
        async with httpx.AsyncClient(timeout=20, follow_redirects=False) as http:
            for file in files:
                name, mimetype = file.get("name", "file"), file.get("mimetype", "application/octet-stream")
                size = int(file.get("size") or 0)
                url = file.get("url_private")
                if (
                    mimetype.startswith("image/")
                    and isinstance(url, str)
                    and file_host_allowed(self.settings, url)
                    and size <= self.settings.slack.max_image_bytes
                ):
                    data = await self._download(http, url, token)
                    if data is not None:
                        parts.append(
                            {"type": "image_url", "image_url": {"url": f"data:{mimetype};base64,{base64.b64encode(data).decode()}"}}
                        )
                        continue
                parts.append(
                    {"type": "text", "text": f"(Attached file: {name}, {mimetype}, {size} bytes; its content is not shown to you.)"}
                )
        return parts

    def _streams(self, target: Target) -> bool:
        """Is this target's answer streamed? In a thread (a DM's, or a channel's, see stream_thread), with streaming on."""
        return self.settings.slack.stream and stream_thread(target) is not None

    async def stream(self, target: Target) -> SlackStream | None:
        """A sink streaming the answer into the thread; None where it is not streamed, or where the pending marker is not
        recorded (prepare() failed: nothing may start that a retry could not find) or an earlier attempt's recorded
        stream is there (send() finishes or replaces it). On a retry, what the attempt before left is looked up first."""
        if not self._streams(target) or not is_pending(target.reply_ref):
            return None
        client = await self._client(target)
        placeholder, left = await self.leftovers(client, target) if target.retry else (placeholder_ts(target.reply_ref), None)
        started = functools.partial(self._drop, client, target, placeholder) if placeholder is not None else None
        return SlackStream(client, target, str(stream_thread(target)), self.settings.slack.stream_interval, self._feedback_blocks,
                           self._replace, self.send, answer_marker, recipient=recipient(target), started=started, left=left)  # fmt: skip

    async def send(self, reply: Reply) -> str | None:
        """Replace the placeholder (or an earlier attempt's unfinished stream) with the first part of the answer; post
        the rest in the thread. The last part carries the thumbs up/down that rate the stored reply."""
        client = await self._client(reply.target)
        target = reply.target
        ts = stream_ts(target.reply_ref)
        if ts is not None:  # a stream a dead attempt left open: closed first, then the whole answer goes in its place
            with contextlib.suppress(SlackApiError):
                await stop_stream(client, target.payload["channel"], ts)
            return await self._deliver(client, reply, ts)
        if is_pending(target.reply_ref):  # a stream may have started unrecorded (on a retry), else the placeholder if any
            placeholder, left = await self.leftovers(client, target) if target.retry else (placeholder_ts(target.reply_ref), None)
            return await self._deliver(client, reply, left or placeholder)
        return await self._deliver(client, reply, target.reply_ref)

    async def _replace(self, reply: Reply, ts: str) -> str | None:
        """Put the whole reply in the message `ts` (a stopped stream), split as any reply."""
        return await self._deliver(await self._client(reply.target), reply, ts)

    async def _deliver(self, client: AsyncWebClient, reply: Reply, ts: str | None) -> str | None:
        target = reply.target
        first, *rest = await self._with_feedback(target, markdown_messages(reply.text) or markdown_messages("…"))
        first_ts: str | None = None
        try:
            if ts:
                await client.chat_update(channel=target.payload["channel"], ts=ts, **first)
                first_ts = ts
            else:
                # Marked like a placeholder, so a retry after a crash before the turn was recorded updates it instead.
                first_ts = str((await self._post(client, target, **first, metadata=answer_marker(target)))["ts"])
            for message in rest:
                await self._post(client, target, **message, metadata=part_marker(target))
        except SlackApiError as exc:
            raise ChannelError(f"Slack refused the reply: {exc.response.get('error')}") from None
        return first_ts

    async def _with_feedback(self, target: Target, messages: list[SlackMessage]) -> list[dict[str, Any]]:
        """The reply's messages, the last with the feedback block naming the stored reply (found by the message it answers)."""
        parts: list[dict[str, Any]] = [dict(message) for message in messages]
        parts[-1]["blocks"] = [*parts[-1]["blocks"], *await self._feedback_blocks(target)]
        return parts

    async def _feedback_blocks(self, target: Target) -> list[dict[str, Any]]:
        """The feedback block for the reply stored for this target's message; none when there is no stored reply."""
        reply_id = await feedback.reply_for(self.db, target.tenant_id, channel=self.name, inbound_external_id=target.inbound_external_id)
        return [feedback_block(reply_id)] if reply_id is not None else []

    async def _post(
        self,
        client: AsyncWebClient,
        target: Target,
        text: str,
        metadata: dict[str, Any] | None = None,
        blocks: list[dict[str, Any]] | None = None,
    ) -> Any:
        channel = target.payload["channel"]
        lock, last = self._pace.setdefault((target.payload.get("team_id", ""), channel), (asyncio.Lock(), [0.0]))
        async with lock:
            wait = last[0] + POST_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                response = await client.chat_postMessage(
                    channel=channel, text=text, blocks=blocks, thread_ts=target.payload.get("thread_ts"), mrkdwn=True, metadata=metadata
                )
            except SlackApiError as exc:
                raise ChannelError(f"Slack refused a message: {exc.response.get('error')}") from None
            last[0] = time.monotonic()
        return response

    async def _download(self, http: httpx.AsyncClient, url: str, token: str) -> bytes | None:
        response = await http.get(url, headers={"Authorization": f"Bearer {token}"})
        if response.status_code != 200 or len(response.content) > self.settings.slack.max_image_bytes:
            return None  # Slack answers an unauthorised download with a redirect to its login page
        return response.content

    async def _client(self, target: Target) -> AsyncWebClient:
        return web_client(self.settings, await self._token(target), self._http.get())

    async def _token(self, target: Target) -> str:
        return await self.tokens.get(target.tenant_id, target.payload.get("team_id", ""))

    def link(self, target: Target) -> str | None:
        team, channel = target.payload.get("team_id"), target.payload.get("channel")
        if not team or not channel:
            return None
        thread = target.payload.get("thread_ts")
        base = f"https://app.slack.com/client/{team}/{channel}"
        return f"{base}/thread/{channel}-{thread}" if thread else base

    async def notify(self, tenant_id: uuid.UUID, where: str, text: str) -> None:
        """Post to a channel (C…) or person (U…) through the tenant's connected Slack workspace."""
        client = await self._workspace_client(tenant_id)
        try:
            await client.chat_postMessage(channel=where, text=text)
        except SlackApiError as exc:
            raise ChannelError(f"Slack refused the notice: {exc.response.get('error')}") from None

    async def _workspace_client(self, tenant_id: uuid.UUID) -> AsyncWebClient:
        """A client for the tenant's (first) connected Slack workspace."""
        return web_client(self.settings, await self.tokens.get(tenant_id, await self._first_team(tenant_id)), self._http.get())

    async def ask(self, request: ApprovalRequest, where: str | None) -> str | None:
        """The request with Approve/Deny buttons: in the conversation's thread, or in the room `where` (operators)."""
        text, blocks = request.question(), request_blocks(request)
        target = request.target
        if where is None:
            response = await self._post(await self._client(target), target, text, blocks=blocks)
            return str(response["ts"])
        # A Slack conversation's own workspace; for another channel's conversation, the tenant's workspace.
        client = await (self._client(target) if target.payload.get("team_id") else self._workspace_client(target.tenant_id))
        try:
            response = await client.chat_postMessage(channel=where, text=text, blocks=blocks)
        except SlackApiError as exc:
            raise ChannelError(f"Slack refused the approval request: {exc.response.get('error')}") from None
        return str(response["ts"])

    async def record_sent(self, session: AsyncSession, message_id: uuid.UUID, external_id: str | None) -> None:
        await mark_sent(session, message_id, external_id)

    # -- the human desk (konstruct.messaging.Desk; drawn in channels/slack/desk.py) --

    async def _first_team(self, tenant_id: uuid.UUID) -> str:
        async with self.db.tenant(tenant_id=tenant_id) as session:
            team = await session.scalar(
                select(ChannelConnection.external_id)
                .where(ChannelConnection.kind == "slack", ChannelConnection.status == "connected")
                .order_by(ChannelConnection.created_at)
                .limit(1)
            )
        if team is None:
            raise ChannelError("the tenant has no connected Slack workspace")
        return str(team)

    async def _desk_client(self, tenant_id: uuid.UUID, team: str) -> AsyncWebClient:
        return web_client(self.settings, await self.tokens.get(tenant_id, team), self._http.get())

    async def _paced(self, team: str, channel: str) -> None:
        """Wait for this channel's next posting slot (about one message a second per channel)."""
        lock, last = self._pace.setdefault((team, channel), (asyncio.Lock(), [0.0]))
        async with lock:
            wait = last[0] + POST_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            last[0] = time.monotonic()

    async def open_desk(self, tenant_id: uuid.UUID, where: str, card: DeskCard, *, search_since: float | None) -> DeskThread:
        team = await self._first_team(tenant_id)
        await self._paced(team, where)
        return await desk.open_desk(await self._desk_client(tenant_id, team), team, where, card, search_since)

    async def update_card(self, tenant_id: uuid.UUID, thread: DeskThread, card: DeskCard) -> None:
        await desk.update_card(await self._desk_client(tenant_id, thread.team), thread, card)

    async def desk_post(self, tenant_id: uuid.UUID, thread: DeskThread, text: str, *, marker: str, files: Sequence[DeskFile] = ()) -> str:
        await self._paced(thread.team, thread.where)
        return await desk.post(await self._desk_client(tenant_id, thread.team), thread, text, marker, list(files))

    async def desk_markers(self, tenant_id: uuid.UUID, thread: DeskThread) -> dict[str, str]:
        return await desk.markers(await self._desk_client(tenant_id, thread.team), thread)

    async def desk_edit(self, tenant_id: uuid.UUID, thread: DeskThread, ts: str, text: str) -> None:
        await desk.edit(await self._desk_client(tenant_id, thread.team), thread, ts, text)
