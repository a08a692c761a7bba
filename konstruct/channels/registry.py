"""The channels a worker can reply through."""

from __future__ import annotations

from konstruct.channels.slack.channel import SlackChannel
from konstruct.channels.terminal import TerminalChannel
from konstruct.channels.whatsapp.channel import WhatsAppChannel
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.messaging import Channel


def channels(settings: Settings, db: Database) -> dict[str, Channel]:
    return {"terminal": TerminalChannel(), "slack": SlackChannel(settings, db), "whatsapp": WhatsAppChannel(settings, db)}
