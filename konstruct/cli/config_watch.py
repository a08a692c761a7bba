"""How `up` notices that konstruct.toml changed, and which of the changed settings its parts can take up.

The file is polled (its stat, then a hash of its bytes); an edit is read only once the file has stayed the same
for one poll, so an editor's half-written file is not mistaken for the new configuration.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from konstruct.config import Settings, load_settings

# What `up` itself works from (its data directory and lock, the database it migrated and hands to its children,
# its own supervision settings): a change takes a restart of `up`. The parts keep the old values meanwhile
# (`up` pins them in their environment), so a part that restarts never mixes the two.
NEEDS_UP_RESTART = ("data.", "database.url", "database.app_password", "up.")
# Read by a command, not by the parts: `konstruct apply` applies the declared tenants.
NOT_FOR_THE_PARTS = ("tenants",)


@dataclass(frozen=True)
class Change:
    """A valid edit: the settings the parts run with from now on, and the names of what changed."""

    settings: Settings  # the new file, with what needs a restart of `up` kept as it was
    applied: list[str]  # taken up by restarting the parts
    needs_restart: list[str]  # waits for a restart of `up`
    not_for_the_parts: list[str]  # the parts never read it (the declared tenants: `konstruct apply`)


def changed_settings(old: Settings, new: Settings) -> list[str]:
    """The dotted names of the settings that differ (secrets compared by value, never shown)."""
    names: list[str] = []
    for name in type(old).model_fields:
        if name == "config_path":
            continue
        before, after = getattr(old, name), getattr(new, name)
        if isinstance(before, BaseModel):
            names += [f"{name}.{key}" for key in type(before).model_fields if getattr(before, key) != getattr(after, key)]
        elif before != after:
            names.append(name)
    return names


def _keep_for_up(old: Settings, new: Settings) -> Settings:
    database = new.database.model_copy(update={"url": old.database.url, "app_password": old.database.app_password})
    return new.model_copy(update={"data": old.data, "up": old.up, "database": database})


class ConfigWatch:
    """Polls one config file; `poll()` says when it was edited."""

    def __init__(self, current: Settings) -> None:
        assert current.config_path is not None
        self.path: Path = current.config_path
        self.current = current  # what the parts run with
        self._stat = self._stat_now()
        self._digest = self._digest_now()
        self._pending: tuple[int, int, int] | None = None

    def _stat_now(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _digest_now(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def poll(self) -> Change | None:
        """None while nothing new was written; a Change for a valid edit (made current with `accept`); ConfigError
        (once per edit) for an invalid one, or a file that is gone."""
        stat = self._stat_now()
        if stat == self._stat:
            self._pending = None
            return None
        if stat != self._pending and stat is not None:
            self._pending = stat  # still being written, perhaps: read it when it stayed so for one poll
            return None
        self._stat, self._pending = stat, None
        digest = self._digest_now()
        if digest == self._digest and digest is not None:
            return None  # touched, not changed
        self._digest = digest
        new = load_settings(self.path)
        names = changed_settings(self.current, new)
        needs_restart = [name for name in names if name.startswith(NEEDS_UP_RESTART)]
        elsewhere = [name for name in names if name in NOT_FOR_THE_PARTS]
        applied = [name for name in names if name not in needs_restart and name not in elsewhere]
        return Change(_keep_for_up(self.current, new), applied, needs_restart, elsewhere)

    def accept(self, change: Change) -> None:
        """The parts are being restarted with this change: compare later edits with it."""
        self.current = change.settings
