"""The human desk in Slack: an escalation's thread (its card with the Take it / Hand back / Close buttons, the person's
messages mirrored under it), humans' replies in that thread, and clicks on its buttons.

Everything posted carries message metadata naming what it is (the card: `konstruct_desk` with the handoff id; a post:
`konstruct_desk_post` with its marker), so an attempt that died after posting finds its post instead of posting again.
A reply in the thread from a person (never our bot) is stored in the inbox like any event (unique per channel and ts,
so a Slack retry is found, not sent twice) and delivered by the worker. Button clicks arrive signed at
/slack/interactive (action ids `desk:take`, `desk:handback`, `desk:close`; the hand-back note comes from a modal,
callback id `desk:handback:<handoff id>`); the workspace that signed a click decides the tenant, and the handoff must
be that tenant's and its thread in the channel the click came from.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from typing import Any

from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy import select, update

from konstruct import inbox
from konstruct.channels.connections import ResolveCache, Resolved
from konstruct.channels.slack.client import web_client
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.db.models import Handoff
from konstruct.errors import ConflictError, NotFoundError
from konstruct.handoff import desk, replies, state
from konstruct.messaging import ChannelError, DeskCard, DeskFile, DeskThread

log = logging.getLogger("konstruct.slack")

CARD_EVENT = "konstruct_desk"
POST_EVENT = "konstruct_desk_post"
PREFIX = "desk:"
HANDBACK_VIEW = "desk:handback:"
NOTE_BLOCK, NOTE_ACTION = "desk_note", "note"
_SLACK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
SECTION_LIMIT = 3000


def who(owner: str | None) -> str:
    """An owner as Slack shows it: a mention for a Slack user, the name otherwise."""
    if owner is None:
        return "nobody yet"
    return f"<@{owner.removeprefix('slack:')}>" if owner.startswith("slack:") else owner


def _button(text: str, action: str, handoff_id: uuid.UUID, style: str | None = None) -> dict[str, Any]:
    button: dict[str, Any] = {"type": "button", "text": {"type": "plain_text", "text": text}, "action_id": f"{PREFIX}{action}",
                              "value": str(handoff_id)}  # fmt: skip
    return {**button, "style": style} if style else button


def card_text(card: DeskCard) -> str:
    return f":rotating_light: A conversation needs a human: {card.person} on {card.channel}: {card.reason}"[:SECTION_LIMIT]


def card_blocks(card: DeskCard) -> list[dict[str, Any]]:
    """The card: who, where, why, the summary and the last turns, who has it, and the buttons while it is open."""
    lines = [f":rotating_light: *{card.person}* on {card.channel} needs a human", f"*Why:* {card.category or 'escalated'} — {card.reason}"]
    if card.summary:
        lines.append(f"*Summary:* {card.summary}")
    if card.link and card.link.startswith("http"):
        lines.append(f"<{card.link}|Open the conversation>")
    blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)[:SECTION_LIMIT]}}]
    if card.turns:
        quoted = "\n".join(f"> *{speaker}:* {' '.join(said.split())}" for speaker, said in card.turns)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*Last turns:*\n{quoted}"[:SECTION_LIMIT]}})
    if card.outcome is not None:
        status = f"*Ended:* {card.outcome.replace('_', ' ')} ({who(card.ended_by)}). Owner: {who(card.owner)}"
    else:
        status = f"*Owner:* {who(card.owner)}. Reply in this thread to answer the person."
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": status}]})
    if card.outcome is None:
        buttons = [_button("Hand back to the agent", "handback", card.handoff_id), _button("Close", "close", card.handoff_id, "danger")]
        if card.owner is None:
            buttons.insert(0, _button("Take it", "take", card.handoff_id, "primary"))
        blocks.append({"type": "actions", "block_id": f"desk:{card.handoff_id}", "elements": buttons})
    return blocks


def _metadata(kind: str, payload: dict[str, str]) -> dict[str, Any]:
    return {"event_type": kind, "event_payload": payload}


async def open_desk(client: AsyncWebClient, team: str, where: str, card: DeskCard, search_since: float | None) -> DeskThread:
    """Post the card as a thread's root (or find the one an earlier attempt posted since search_since)."""
    try:
        if search_since is not None and where[:1] in "CGD":
            history = await client.conversations_history(channel=where, oldest=f"{search_since:.6f}", include_all_metadata=True, limit=200)
            for message in history.get("messages") or []:
                metadata = message.get("metadata") or {}
                if metadata.get("event_type") == CARD_EVENT and (metadata.get("event_payload") or {}).get("handoff") == str(
                    card.handoff_id
                ):
                    return DeskThread(team, where, str(message["ts"]))
        posted = await client.chat_postMessage(channel=where, text=card_text(card), blocks=card_blocks(card),
                                               metadata=_metadata(CARD_EVENT, {"handoff": str(card.handoff_id)}))  # fmt: skip
    except SlackApiError as exc:
        raise ChannelError(f"Slack refused the desk thread: {exc.response.get('error')}") from None
    return DeskThread(team, str(posted.get("channel") or where), str(posted["ts"]))


async def update_card(client: AsyncWebClient, thread: DeskThread, card: DeskCard) -> None:
    try:
        await client.chat_update(channel=thread.where, ts=thread.ts, text=card_text(card), blocks=card_blocks(card))
    except SlackApiError as exc:
        raise ChannelError(f"Slack refused to redraw the desk card: {exc.response.get('error')}") from None


async def post(client: AsyncWebClient, thread: DeskThread, text: str, marker: str, files: list[DeskFile]) -> str:
    """Post in the thread (links to files that have one), then attach the files that came as bytes."""
    links = [f"<{f.url}|{f.name}>" for f in files if f.url]
    try:
        posted = await client.chat_postMessage(channel=thread.where, thread_ts=thread.ts, text="\n".join([text, *links]),
                                               metadata=_metadata(POST_EVENT, {"marker": marker}))  # fmt: skip
        uploads = [{"content": f.data, "filename": f.name, "title": f.name} for f in files if f.data is not None]
        if uploads:
            await client.files_upload_v2(file_uploads=uploads, channel=thread.where, thread_ts=thread.ts, request_file_info=False)
    except SlackApiError as exc:
        raise ChannelError(f"Slack refused a desk post: {exc.response.get('error')}") from None
    except SlackRequestError as exc:
        raise ChannelError(f"Slack refused a file for the desk: {exc}") from None
    return str(posted["ts"])


async def markers(client: AsyncWebClient, thread: DeskThread) -> dict[str, str]:
    try:
        replies_ = await client.conversations_replies(channel=thread.where, ts=thread.ts, include_all_metadata=True, limit=1000)
    except SlackApiError as exc:
        raise ChannelError(f"Slack refused to list the desk thread: {exc.response.get('error')}") from None
    found: dict[str, str] = {}
    for message in replies_.get("messages") or []:
        metadata = message.get("metadata") or {}
        marker = (metadata.get("event_payload") or {}).get("marker")
        if metadata.get("event_type") == POST_EVENT and isinstance(marker, str):
            found.setdefault(marker, str(message["ts"]))
    return found


async def edit(client: AsyncWebClient, thread: DeskThread, ts: str, text: str) -> None:
    try:
        await client.chat_update(channel=thread.where, ts=ts, text=text)
    except SlackApiError as exc:
        raise ChannelError(f"Slack refused to update a desk line: {exc.response.get('error')}") from None


# -- the gateway's side: replies in a desk thread, clicks on its buttons --


async def thread_reply(db: Database, queue: inbox.Doorbell, resolved: Resolved, team_id: str, event: dict[str, Any]) -> bool:
    """A person's message in one of the tenant's open desk threads: kept in the inbox as a reply to the escalated person
    (True: handled here, whatever came of it). False when the message is in no desk thread."""
    thread, channel = event.get("thread_ts"), event["channel"]
    if not thread or thread == event["ts"]:
        return False
    async with db.tenant(tenant_id=resolved.tenant_id) as session:
        conversation_id = await session.scalar(
            select(Handoff.conversation_id).where(Handoff.desk_where == channel, Handoff.desk_ts == thread, Handoff.ended_at.is_(None))
        )
    if conversation_id is None:
        return False
    text = (event.get("text") or "").strip()
    if not text:
        log.info("a file-only message in a desk thread is not forwarded to the person")
        return True
    try:
        await replies.store_reply(db, queue, tenant_id=resolved.tenant_id, conversation_id=conversation_id, author=f"slack:{event['user']}",
                                  text=text, external_id=f"{channel}:{event['ts']}",
                                  origin={"kind": "slack", "team": team_id, "channel": channel, "ts": event["ts"]})  # fmt: skip
    except ConflictError as exc:
        log.info("desk reply not kept: %s", exc)
    return True


def is_desk(payload: dict[str, Any]) -> bool:
    """Is this interaction a click on a desk card's buttons, or the hand-back modal's submission?"""
    if payload.get("type") == "view_submission":
        view = payload.get("view")
        return isinstance(view, dict) and str(view.get("callback_id") or "").startswith(HANDBACK_VIEW)
    actions = payload.get("actions")
    return payload.get("type") == "block_actions" and isinstance(actions, list) and any(
        isinstance(a, dict) and str(a.get("action_id") or "").startswith(PREFIX) for a in actions[:25])  # fmt: skip


class DeskClicks:
    """The desk's part of /slack/interactive: act on a verified click (status, error to answer)."""

    def __init__(self, settings: Settings, db: Database, connections: ResolveCache) -> None:
        self.settings, self.db, self.connections = settings, db, connections

    async def interact(self, resolved: Resolved | None, team_id: str | None, payload: dict[str, Any]) -> tuple[int, str | None]:
        if resolved is None or team_id is None or resolved.status != "connected":
            return 403, "this workspace is not connected"
        user = payload.get("user")
        user_id = user.get("id") if isinstance(user, dict) else None
        if not isinstance(user_id, str) or not _SLACK_ID.fullmatch(user_id):
            return 400, "no user.id"
        parsed = _parse(payload)
        if parsed is None:
            return 400, "not a desk action"
        verb, handoff_id, note, trigger = parsed
        try:
            conversation_id, where = await self._handoff(resolved.tenant_id, handoff_id)
        except NotFoundError as exc:
            return 404, str(exc)
        clicked_in = _channel(payload)
        if clicked_in is not None and clicked_in != where:
            return 403, "the click is not from this escalation's desk thread"
        actor = f"slack:{user_id}"
        try:
            if verb == "handback" and trigger and await self._ask_note(team_id, trigger, handoff_id):
                return 200, None  # the modal's submission hands it back, with the note
            await self._act(resolved.tenant_id, conversation_id, verb, actor, note)
        except ConflictError as exc:
            log.info("desk click on %s: %s", handoff_id, exc)
        await self._redraw(resolved.tenant_id, team_id, handoff_id)
        return 200, None

    async def _handoff(self, tenant_id: uuid.UUID, handoff_id: uuid.UUID) -> tuple[uuid.UUID, str | None]:
        async with self.db.tenant(tenant_id=tenant_id) as session:
            row = (await session.execute(select(Handoff.conversation_id, Handoff.desk_where).where(Handoff.id == handoff_id))).first()
        if row is None:
            raise NotFoundError("no such escalation for this workspace's tenant")
        return row.conversation_id, row.desk_where

    async def _act(self, tenant_id: uuid.UUID, conversation_id: uuid.UUID, verb: str, actor: str, note: str | None) -> None:
        if verb == "take":
            await state.take(self.db, tenant_id=tenant_id, conversation_id=conversation_id, who=actor)
        elif verb == "close":
            await state.end(self.db, tenant_id=tenant_id, conversation_id=conversation_id, how=state.CLOSE, actor=actor)
        else:
            await state.end(self.db, tenant_id=tenant_id, conversation_id=conversation_id, how=state.HAND_BACK, actor=actor, note=note)

    async def _client(self, team_id: str) -> AsyncWebClient | None:
        entry = await self.connections.get("slack", team_id)
        token = entry[1].get("bot_token") if entry else None
        return web_client(self.settings, token) if token else None

    async def _ask_note(self, team_id: str, trigger: str, handoff_id: uuid.UUID) -> bool:
        """Open the hand-back modal (an optional note for the agent); False when Slack would not, so it is handed back as is."""
        client = await self._client(team_id)
        if client is None:
            return False
        view = {
            "type": "modal", "callback_id": f"{HANDBACK_VIEW}{handoff_id}", "title": {"type": "plain_text", "text": "Hand back"},
            "submit": {"type": "plain_text", "text": "Hand back"}, "close": {"type": "plain_text", "text": "Cancel"},
            "blocks": [{"type": "input", "block_id": NOTE_BLOCK, "optional": True, "label": {"type": "plain_text", "text": "A note for the agent"},
                        "element": {"type": "plain_text_input", "action_id": NOTE_ACTION, "multiline": True, "max_length": 2000}}],
        }  # fmt: skip
        try:
            await asyncio.wait_for(client.views_open(trigger_id=trigger, view=view), timeout=2.5)
        except (SlackApiError, TimeoutError) as exc:
            log.warning("could not open the hand-back modal: %s", type(exc).__name__)
            return False
        return True

    async def _redraw(self, tenant_id: uuid.UUID, team_id: str, handoff_id: uuid.UUID) -> None:
        """Show the new owner or end at once (bounded: the worker's periodic check redraws what this could not)."""
        async with self.db.tenant(tenant_id=tenant_id) as session:
            handoff = await session.get(Handoff, handoff_id)
            if handoff is None or not handoff.desk_ts or not handoff.desk_where:
                return
            card = await desk.card_for(session, handoff, last_turns=self.settings.escalation.last_turns)
            thread = DeskThread(team_id, handoff.desk_where, handoff.desk_ts)
        client = await self._client(team_id)
        if client is None:
            return
        try:
            await asyncio.wait_for(update_card(client, thread, card), timeout=2.5)
        except (ChannelError, TimeoutError) as exc:
            log.warning("could not redraw the desk card of %s now: %s", handoff_id, type(exc).__name__)
            return
        async with self.db.tenant(tenant_id=tenant_id) as session:
            await session.execute(update(Handoff).where(Handoff.id == handoff_id).values(card_dirty=False))


def _parse(payload: dict[str, Any]) -> tuple[str, uuid.UUID, str | None, str | None] | None:
    """(verb, handoff id, note, trigger id) of a desk interaction; None when it is not shaped as one."""
    if payload.get("type") == "view_submission":
        view = payload["view"]
        note = (((view.get("state") or {}).get("values") or {}).get(NOTE_BLOCK) or {}).get(NOTE_ACTION) or {}
        value = note.get("value") if isinstance(note, dict) else None
        return _with_id("handback", str(view.get("callback_id"))[len(HANDBACK_VIEW) :], value if isinstance(value, str) else None, None)
    action = next(a for a in payload["actions"] if isinstance(a, dict) and str(a.get("action_id") or "").startswith(PREFIX))
    verb = str(action["action_id"])[len(PREFIX) :]
    trigger = payload.get("trigger_id")
    if verb not in ("take", "handback", "close"):
        return None
    return _with_id(verb, action.get("value"), None, trigger if isinstance(trigger, str) else None)


def _with_id(verb: str, raw: Any, note: str | None, trigger: str | None) -> tuple[str, uuid.UUID, str | None, str | None] | None:
    try:
        return verb, uuid.UUID(str(raw)), note, trigger
    except ValueError:
        return None


def _channel(payload: dict[str, Any]) -> str | None:
    container, channel = payload.get("container"), payload.get("channel")
    found = container.get("channel_id") if isinstance(container, dict) else None
    if found is None and isinstance(channel, dict):
        found = channel.get("id")
    return found if isinstance(found, str) else None
