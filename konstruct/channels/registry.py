"""The channels a worker can reply through."""

from __future__ import annotations

from konstruct.channels.base import Channel
from konstruct.channels.terminal import TerminalChannel
from konstruct.errors import ConfigError


def channels() -> dict[str, Channel]:
    return {"terminal": TerminalChannel()}


def channel_for(registry: dict[str, Channel], name: str) -> Channel:
    try:
        return registry[name]
    except KeyError:
        raise ConfigError(f"no channel {name!r} is configured on this worker") from None
