"""An answer streamed into a Slack thread: chat.startStream, chat.appendStream at a bounded rate, chat.stopStream.

Text from the model is buffered and appended at most once every `slack.stream_interval` seconds (the first piece at
once, so the person sees the answer begin), each call under Slack's 12,000 characters and honouring 429 Retry-After
(the client's handler). The stream's message is the reply: when the stored reply is exactly what was streamed it is
closed with the feedback buttons; otherwise (a text part of a tool-call turn, an apology, an answer too long for one
message) it is closed and replaced by the reply, split as any other. A retry after a crash finds the message by the
reference recorded when the stream began (`stream:<ts>`), stops it and puts the whole answer in it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from konstruct.channels.slack.format import MARKDOWN_LIMIT, markdown_messages
from konstruct.messaging import Reply, Target

log = logging.getLogger(__name__)

STREAM_PREFIX = "stream:"  # a reply_ref naming a streamed message (else it names a placeholder)
PENDING = STREAM_PREFIX + "pending"  # a stream may start, its ts not recorded yet: a retry looks the thread up


def is_pending(reply_ref: str | None) -> bool:
    return reply_ref is not None and (reply_ref == PENDING or reply_ref.startswith(PENDING + ":"))


def pending_ref(placeholder: str | None) -> str:
    """The reference recorded before a stream may start (with the placeholder showing the agent at work, if any)."""
    return f"{PENDING}:{placeholder}" if placeholder else PENDING


def stream_ts(reply_ref: str | None) -> str | None:
    """The ts of a streamed message from its reference; None when the reference is not a stream's."""
    if not reply_ref or not reply_ref.startswith(STREAM_PREFIX) or is_pending(reply_ref):
        return None
    return reply_ref[len(STREAM_PREFIX) :]


def placeholder_ts(reply_ref: str | None) -> str | None:
    """The placeholder a reference names: a plain ts, or the one in a pending reference; None otherwise."""
    if is_pending(reply_ref):
        return str(reply_ref)[len(PENDING) + 1 :] or None
    return reply_ref if reply_ref and not reply_ref.startswith(STREAM_PREFIX) else None


async def stop_stream(client: AsyncWebClient, channel: str, ts: str, **extra: Any) -> bool:
    """chat.stopStream; False when Slack says the message is not streaming any more (stopped, or expired)."""
    try:
        await client.chat_stopStream(channel=channel, ts=ts, **extra)
    except SlackApiError as exc:
        if exc.response.get("error") in ("message_not_in_streaming_state", "message_not_found"):
            return False
        raise
    return True


async def delete_message(client: AsyncWebClient, channel: str, ts: str) -> bool:
    """chat.delete of one of the app's own messages; True when it is gone (already, too), False when Slack refuses."""
    try:
        await client.chat_delete(channel=channel, ts=ts)
    except SlackApiError as exc:
        if exc.response.get("error") == "message_not_found":
            return True
        log.warning("Slack refused to delete a message (%s)", exc.response.get("error"))
        return False
    return True


class SlackStream:
    """The StreamSink of one answer in one thread."""

    def __init__(
        self,
        client: AsyncWebClient,
        target: Target,
        thread: str,
        interval: float,
        feedback: Callable[[Target], Awaitable[list[dict[str, Any]]]],
        replace: Callable[[Reply, str], Awaitable[str | None]],
        post: Callable[[Reply], Awaitable[str | None]],
        marker: Callable[[Target], dict[str, Any]],
        *,
        recipient: tuple[str, str] | None = None,
        started: Callable[[], Awaitable[None]] | None = None,
        left: str | None = None,
    ) -> None:
        """recipient: the person and their workspace (recipient_user_id, _team_id), which Slack needs outside a DM. started: called once the
        stream shows text (the placeholder goes). left: a stream an earlier attempt started and never recorded, which
        the answer replaces (nothing more is streamed into it)."""
        self.client, self.target, self.thread, self.interval = client, target, thread, interval
        self._feedback, self._replace, self._post, self._marker = feedback, replace, post, marker
        self.recipient, self._started = recipient, started
        self.channel = str(target.payload["channel"])
        self.shown = ""  # what Slack has been sent
        self.pending = ""  # what the model wrote since
        self.ts: str | None = left
        self.broken = left is not None  # nothing more is streamed (Slack refused a call): finish() delivers another way
        self._last = 0.0

    async def append(self, text: str) -> str | None:
        if self.broken:
            return None
        self.pending += text
        if self.ts is not None and time.monotonic() - self._last < self.interval:
            return None
        return await self._flush()

    async def _flush(self) -> str | None:
        """Send what is pending, but never leading or trailing whitespace: what Slack shows stays the stored text."""
        if not self.shown:
            self.pending = self.pending.lstrip()
        piece = self.pending.rstrip()[: MARKDOWN_LIMIT - len(self.shown)]  # more goes out split, when it is finished
        if not piece:
            return None
        started, ts = self.ts is None, str(self.ts)
        try:
            if started:
                user, team = self.recipient or (None, None)
                response = await self.client.chat_startStream(
                    channel=self.channel, thread_ts=self.thread, markdown_text=piece, recipient_user_id=user, recipient_team_id=team
                )
                self.ts = ts = str(response["ts"])
            else:
                await self.client.chat_appendStream(channel=self.channel, ts=ts, markdown_text=piece)
        except SlackApiError as exc:
            log.warning("Slack stopped a streamed answer (%s); it is delivered whole instead", exc.response.get("error"))
            self.broken = True
            return None
        self.shown += piece
        self.pending = self.pending[len(piece) :]
        self._last = time.monotonic()
        if started and self._started is not None:
            await self._started()  # the answer shows: the placeholder that stood for it goes
        return STREAM_PREFIX + ts if started else None

    async def finish(self, reply: Reply) -> str | None:
        if self.ts is None:
            return await self._post(reply)  # never started (or refused at once): delivered as without streaming
        tail = self.pending.rstrip()
        whole = len(markdown_messages(reply.text)) == 1 and self.shown + tail == reply.text and len(reply.text) <= MARKDOWN_LIMIT
        if whole and not self.broken:
            # Marked as the answer to its message, as an answer posted whole is: a retry's look-up finds it.
            extra: dict[str, Any] = {"blocks": await self._feedback(self.target), "metadata": self._marker(self.target)}
            if tail:
                extra["markdown_text"] = tail
            try:
                if await stop_stream(self.client, self.channel, self.ts, **extra):
                    return self.ts
            except SlackApiError as exc:
                log.warning("Slack refused to close a streamed answer (%s); it is replaced instead", exc.response.get("error"))
        else:
            try:
                await stop_stream(self.client, self.channel, self.ts)
            except SlackApiError as exc:
                log.warning("Slack refused to stop a streamed answer (%s)", exc.response.get("error"))
        return await self._replace(reply, self.ts)
