"""Slack's thumbs up/down under an answer: the `context_actions` block with a `feedback_buttons` element that goes
out with each reply, and reading a click on it back from a `block_actions` interaction.

The block names the stored reply (its message id, in the block_id); the buttons carry Slack's own values,
"positive" and "negative". Which tenant the click counts for is never read from the block: it is the tenant of
the workspace whose signed request carried it (konstruct.channels.slack.interactive)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from slack_sdk.models.blocks import ContextActionsBlock, FeedbackButtonObject, FeedbackButtonsElement

ACTION_ID = "konstruct_feedback"
BLOCK_PREFIX = "konstruct_feedback:"
VALUES = {"positive": 1, "negative": -1}
_SLACK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class MalformedInteraction(ValueError):
    """A signed interaction that is not shaped as Slack sends one: answered 400, nothing stored."""


def feedback_block(reply_id: uuid.UUID) -> dict[str, Any]:
    """The block that puts 👍 / 👎 under the reply with this stored message id."""
    block = ContextActionsBlock(
        block_id=f"{BLOCK_PREFIX}{reply_id}",
        elements=[
            FeedbackButtonsElement(
                action_id=ACTION_ID,
                positive_button=FeedbackButtonObject(text="👍", accessibility_label="Good answer", value="positive"),
                negative_button=FeedbackButtonObject(text="👎", accessibility_label="Bad answer", value="negative"),
            )
        ],
    )
    blocks: dict[str, Any] = block.to_dict()
    return blocks


@dataclass(frozen=True)
class FeedbackClick:
    reply_id: uuid.UUID
    value: int  # +1 or -1
    voter: str  # the Slack user id of the person who clicked
    channel: str | None  # the Slack channel the message with the buttons is in


def feedback_click(payload: dict[str, Any]) -> FeedbackClick | None:
    """The feedback click in a `block_actions` payload; None when the interaction is something else (not ours to
    act on). MalformedInteraction when it claims to be a click on our buttons but is not shaped like one."""
    if payload.get("type") != "block_actions":
        return None
    actions = payload.get("actions")
    if not isinstance(actions, list) or not actions or len(actions) > 25:
        raise MalformedInteraction("block_actions without actions")
    ours = [a for a in actions if isinstance(a, dict) and a.get("action_id") == ACTION_ID]
    if not ours:
        return None
    action = ours[0]
    if action.get("type") != "feedback_buttons":
        raise MalformedInteraction("the feedback action is not a feedback_buttons action")
    raw = action.get("value")
    value = VALUES.get(raw) if isinstance(raw, str) else None
    if value is None:
        raise MalformedInteraction("a feedback action's value is positive or negative")
    return FeedbackClick(_reply_id(action.get("block_id")), value, _voter(payload.get("user")), _channel(payload))


def _reply_id(block_id: Any) -> uuid.UUID:
    if not isinstance(block_id, str) or not block_id.startswith(BLOCK_PREFIX):
        raise MalformedInteraction("the feedback action's block_id names no reply")
    try:
        return uuid.UUID(block_id[len(BLOCK_PREFIX) :])
    except ValueError:
        raise MalformedInteraction("the feedback action's block_id names no reply") from None


def _voter(user: Any) -> str:
    voter = user.get("id") if isinstance(user, dict) else None
    if not isinstance(voter, str) or not _SLACK_ID.fullmatch(voter):
        raise MalformedInteraction("no user.id")
    return voter


def _channel(payload: dict[str, Any]) -> str | None:
    """The conversation the clicked message is in (container.channel_id, or channel.id); None when Slack named none."""
    container, channel = payload.get("container"), payload.get("channel")
    found = container.get("channel_id") if isinstance(container, dict) else None
    if found is None and isinstance(channel, dict):
        found = channel.get("id")
    if found is None:
        return None
    if not isinstance(found, str) or not _SLACK_ID.fullmatch(found):
        raise MalformedInteraction("bad channel id")
    return found
