"""Replying in Slack from the worker: a thinking status (or a placeholder) at once, then the answer.

In a DM with the app (its Messages tab, where Slack's agent threads are) the thread gets a status — "is
thinking…" with loading messages saying what the agent does — which Slack clears when the answer is posted;
a new thread is titled from its first question; the answer is streamed into the thread as the model writes it
(konstruct.channels.slack.stream). Elsewhere (a mention in a channel) a `_thinking…_` placeholder is posted and
the answer replaces it.

Posting is paced per channel (Slack allows about one message a second per channel) and every call
honours 429 Retry-After, so bursts are slowed down, never dropped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct import feedback
from konstruct.channels.connections import SecretCache
from konstruct.channels.slack.approvals import request_blocks
from konstruct.channels.slack.client import web_client
from konstruct.channels.slack.feedback import feedback_block
from konstruct.channels.slack.format import SlackMessage, markdown_messages
from konstruct.channels.slack.stream import SlackStream, stop_stream, stream_ts
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import ChannelConnection
from konstruct.messaging import ApprovalRequest, ChannelError, Reply, Target, mark_sent

log = logging.getLogger(__name__)

SLACK_FILE_HOSTS = ("files.slack.com",)


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


class SlackChannel:
    name = "slack"

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.tokens = SecretCache(db, settings, "slack", "bot_token")
        self._pace: dict[tuple[str, str], tuple[asyncio.Lock, list[float]]] = {}

    async def prepare(self, target: Target) -> str | None:
        """In an agent thread: set its status (and title a new thread), post nothing, return None. Elsewhere, or
        when Slack refuses the status: post the placeholder, whose ts is where the answer will go. Either way a
        retry first looks for what an earlier attempt posted (a placeholder, or an answer, by their metadata)."""
        client = await self._client(target)
        if target.retry:
            found = await self._find_placeholder(client, target)
            if found is not None:
                return found
        thread = status_thread(target)
        if thread is not None:
            starts = target.payload.get("thread_ts") in (None, target.payload.get("ts"))
            if starts and not target.retry and target.question.strip():
                await self._title(client, target, thread)  # the question starts this thread: name it, once
            if await self._status(client, target, thread, [READING]):
                return None
        response = await self._post(client, target, self.settings.slack.placeholder, metadata=answer_marker(target))
        return str(response["ts"])

    async def working(self, target: Target, what: str) -> None:
        """Show what the agent does now as the thread's loading message; a placeholder is left as it is."""
        thread = status_thread(target)
        if thread is not None and target.reply_ref is None:
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
        channel, thread = target.payload["channel"], target.payload.get("thread_ts")
        try:
            if thread:
                response = await client.conversations_replies(channel=channel, ts=thread, include_all_metadata=True, limit=200)
            else:
                response = await client.conversations_history(
                    channel=channel, oldest=target.payload.get("ts"), include_all_metadata=True, limit=200
                )
        except SlackApiError as exc:
            raise ChannelError(f"Slack refused to list the thread: {exc.response.get('error')}") from None
        for message in response.get("messages") or []:
            metadata = message.get("metadata") or {}
            if (
                metadata.get("event_type") == PLACEHOLDER_EVENT
                and (metadata.get("event_payload") or {}).get("answers") == target.inbound_external_id
            ):
                return str(message["ts"])
        return None

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
        """Is this target's answer streamed? In a DM with the app (its agent threads, where the status shows the agent
        at work until the stream begins); a channel mention keeps its placeholder, which a stream (a new message)
        cannot replace."""
        return self.settings.slack.stream and status_thread(target) is not None

    async def stream(self, target: Target) -> SlackStream | None:
        """A sink streaming the answer into the thread; None where it is not streamed, or where an earlier attempt
        already showed something (send() then finishes or replaces that)."""
        if not self._streams(target) or target.reply_ref is not None:
            return None  # not streamed here, or a placeholder (the status was refused) or an earlier attempt's message
        return SlackStream(await self._client(target), target, str(status_thread(target)), self.settings.slack.stream_interval,
                           self._feedback_blocks, self._replace, self.send, answer_marker)  # fmt: skip

    async def send(self, reply: Reply) -> str | None:
        """Replace the placeholder (or an earlier attempt's unfinished stream) with the first part of the answer; post
        the rest in the thread. The last part carries the thumbs up/down that rate the stored reply."""
        client = await self._client(reply.target)
        ts = stream_ts(reply.target.reply_ref)
        if ts is not None:  # a stream a dead attempt left open: closed first, then the whole answer goes in its place
            with contextlib.suppress(SlackApiError):
                await stop_stream(client, reply.target.payload["channel"], ts)
            return await self._deliver(client, reply, ts)
        return await self._deliver(client, reply, reply.target.reply_ref)

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
                await self._post(client, target, **message)
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
        return web_client(self.settings, await self._token(target))

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
        async with self.db.tenant(tenant_id=tenant_id) as session:
            team = await session.scalar(
                select(ChannelConnection.external_id)
                .where(ChannelConnection.kind == "slack", ChannelConnection.status == "connected")
                .order_by(ChannelConnection.created_at)
                .limit(1)
            )
        if team is None:
            raise ChannelError("the tenant has no connected Slack workspace")
        return web_client(self.settings, await self.tokens.get(tenant_id, team))

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
