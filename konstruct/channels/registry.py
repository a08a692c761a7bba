"""The channels a worker can reply through, and which of them can carry an escalation notice."""

from __future__ import annotations

from konstruct.channels.slack.channel import SlackChannel
from konstruct.channels.terminal import TerminalChannel
from konstruct.channels.whatsapp.channel import WhatsAppChannel
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.errors import ValidationError
from konstruct.messaging import Channel


def channels(settings: Settings, db: Database) -> dict[str, Channel]:
    return {"terminal": TerminalChannel(), "slack": SlackChannel(settings, db), "whatsapp": WhatsAppChannel(settings, db)}


def validate_escalation_target(target: str) -> str:
    """An escalation target names a channel that can notify (`Channel.notify`) and a place in it: today
    Slack's, a channel (C…, G…) or a person (U…, D…)."""
    kind, _, where = target.partition(":")
    if kind != "slack" or not where or where[0] not in "CGUD":
        raise ValidationError("an escalation target is slack:CHANNEL_ID or slack:USER_ID, e.g. slack:C0123ABCD")
    return target
