"""The channels a worker can reply through."""

from __future__ import annotations

from konstruct.channels.base import Channel
from konstruct.channels.terminal import TerminalChannel


def channels() -> dict[str, Channel]:
    return {"terminal": TerminalChannel()}
