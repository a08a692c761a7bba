"""Start-up work: imports without the cyclic garbage collector, and without optional dependencies left unused.

Importing builds hundreds of thousands of objects (classes, functions, SQLAlchemy's and pydantic's tables), nearly
none of them garbage, and the collector walks the young ones every 700 allocations and everything now and then.
Measured on two cores: the gateway's imports 0.98 → 0.84 s, a warm `up` ready 1.85 → 1.78 s (median of 6);
`chat --message` showed no difference beyond its noise. The collector is paused around the imports only, and
restored as it was (a caller that turned it off keeps it off).

What the imports made is frozen (gc.freeze: moved out of the collector's generations, for good) before the collector
is on again. Without that, every one of those objects was still young: the first allocation after the pause started a
collection that walked them all, and another moved them up a generation; one such pass, 50 ms, showed up in
`chat --message` as a module that "took" 53 ms to import. The freeze keeps the few objects of the imports that were
garbage (about 2,000 of 270,000 in the gateway) for good.

Some libraries import every optional dependency they support that is installed, used or not: huey imports the redis
client (~45 ms) and psycopg (~45 ms) in every process that imports huey, most CLI commands among them, though a
command that queues a message through the inbox's own transaction uses neither. `unimported` keeps such a module out
of one import, and `OnFirstUse` stands for one until it is used (konstruct.worker.queue does both for huey).
"""

from __future__ import annotations

import gc
import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any


@contextmanager
def collector_paused() -> Iterator[None]:
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if collecting:
            gc.enable()


@contextmanager
def unimported(name: str) -> Iterator[None]:
    """Inside, importing the module `name` fails with ImportError, unless it is imported already: for a library that
    imports an optional dependency whenever it is installed, in a process that may never use it. After the block the
    module imports as usual, for whoever needs it. Meant for imports at a module's top, before any thread runs."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # type: ignore[assignment]  # the import system's "not importable" mark
    try:
        yield
    finally:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


class OnFirstUse(ModuleType):
    """Stands for the module `name` where a library keeps it as a global: the first attribute read imports it (once,
    under the import system's lock) and every read is the real module's attribute."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)
