"""The channels a worker can reply through, and which of them can carry an escalation notice."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping

from konstruct.channels.terminal import TerminalChannel
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.errors import ValidationError
from konstruct.messaging import Channel

# The channels whose modules import an SDK or HTTP client (slack_sdk with aiohttp, httpx): ~0.18 s of CPU, a fifth
# of a worker's imports, on the path to its "ready" (and so to `up`'s) when imported with the rest.
LAZY_MODULES = ("konstruct.channels.slack.channel", "konstruct.channels.whatsapp.channel")


def _slack(settings: Settings, db: Database) -> Channel:
    from konstruct.channels.slack.channel import SlackChannel

    return SlackChannel(settings, db)


def _whatsapp(settings: Settings, db: Database) -> Channel:
    from konstruct.channels.whatsapp.channel import WhatsAppChannel

    return WhatsAppChannel(settings, db)


_KINDS: dict[str, Callable[[Settings, Database], Channel]] = {
    "terminal": lambda settings, db: TerminalChannel(),
    "slack": _slack,
    "whatsapp": _whatsapp,
}


class Channels(Mapping[str, Channel]):
    """Every channel by name, each built (its module imported) the first time it is looked up: a worker is ready
    without the SDKs, and `preload` imports them just after, before the first reply needs one. Used on the worker's
    event loop only."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self._settings, self._db = settings, db
        self._built: dict[str, Channel] = {}

    def __getitem__(self, name: str) -> Channel:
        channel = self._built.get(name)
        if channel is None:
            make = _KINDS[name]  # KeyError for a name that is no channel, as a dict says it
            channel = self._built[name] = make(self._settings, self._db)
        return channel

    def __iter__(self) -> Iterator[str]:
        return iter(_KINDS)

    def __len__(self) -> int:
        return len(_KINDS)

    def built(self) -> list[Channel]:
        """The channels looked up so far: the only ones with anything to close."""
        return list(self._built.values())


def channels(settings: Settings, db: Database) -> Channels:
    return Channels(settings, db)


def preload() -> None:
    """Import what the lazily built channels need (in a thread once a worker is ready; in the spare before it forks)."""
    for name in LAZY_MODULES:
        importlib.import_module(name)


def validate_escalation_target(target: str) -> str:
    """An escalation target names a channel that can notify (`Channel.notify`) and a place in it: today
    Slack's, a channel (C…, G…) or a person (U…, D…)."""
    kind, _, where = target.partition(":")
    if kind != "slack" or not where or where[0] not in "CGUD":
        raise ValidationError("an escalation target is slack:CHANNEL_ID or slack:USER_ID, e.g. slack:C0123ABCD")
    return target
