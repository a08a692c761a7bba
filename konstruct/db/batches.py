"""Group commit for a hot write path: what callers hand in while a write is in flight (or in the same turn of the event
loop) is written together, one write per group (a tenant: one transaction under its row-level security), and each
caller is answered only once the write that holds its item has finished.

Under load a transaction's round trips, its commit (a WAL flush) and any row lock it takes are shared by tens of
callers instead of paid by each; alone, an item waits for nothing (the first write starts at once).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from konstruct.db.engine import unavailable

if TYPE_CHECKING:
    from konstruct.db.engine import Database

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")
Writer = TypeVar("Writer")


@dataclass
class _Waiting(Generic[Item, Result]):
    item: Item
    done: asyncio.Future[Result]


class Batches(Generic[Item, Result]):
    """`write(items)` writes one group's items (all with the same `key`) and returns a result for each, in order.

    A group the database refuses (not an outage) is written again in halves, down to the item that fails alone: one
    bad item must not fail the others, and it costs log2 of the batch more writes, not one per item."""

    def __init__(
        self,
        write: Callable[[list[Item]], Awaitable[list[Result]]],
        key: Callable[[Item], Hashable],
        *,
        max_items: int = 200,
        what: str = "items",
    ) -> None:
        self.write, self.key, self.max_items, self.what = write, key, max_items, what
        self._waiting: list[_Waiting[Item, Result]] = []
        self._writer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (a CLI command's asyncio.run after another): nothing of the old one is kept
            self._loop, self._waiting, self._writer = loop, [], None
        done: asyncio.Future[Result] = loop.create_future()
        self._waiting.append(_Waiting(item, done))
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write_all())
        return await done

    async def _write_all(self) -> None:
        try:
            await asyncio.sleep(0)  # what this turn of the loop hands in joins the first batch
            while self._waiting:
                batch, self._waiting = self._waiting[: self.max_items], self._waiting[self.max_items :]
                groups: dict[Hashable, list[_Waiting[Item, Result]]] = {}
                for waiting in batch:
                    groups.setdefault(self.key(waiting.item), []).append(waiting)
                await asyncio.gather(*(self._write_group(group) for group in groups.values()))
        finally:
            self._writer = None

    async def _write_group(self, group: list[_Waiting[Item, Result]]) -> None:
        try:
            results = await self.write([waiting.item for waiting in group])
        except Exception as exc:
            if len(group) > 1 and not unavailable(exc):
                log.warning("a batch of %d %s failed (%s); writing it again in halves", len(group), self.what, type(exc).__name__)
                half = len(group) // 2
                await asyncio.gather(self._write_group(group[:half]), self._write_group(group[half:]))
                return
            for waiting in group:
                if not waiting.done.done():
                    waiting.done.set_exception(exc)
            return
        for waiting, result in zip(group, results, strict=True):
            if not waiting.done.done():  # a caller that gave up (its request was cancelled) is not answered
                waiting.done.set_result(result)


def per_database(make: Callable[[Database], Writer]) -> Callable[[Database], Writer]:
    """One writer per process and database, made on first use (its batches gather that database's callers)."""
    made: weakref.WeakKeyDictionary[Database, Writer] = weakref.WeakKeyDictionary()

    def get(db: Database) -> Writer:
        found = made.get(db)
        if found is None:
            found = made[db] = make(db)
        return found

    return get
