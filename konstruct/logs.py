"""Logging that stays readable through an outage: one line per interval, not a traceback per request."""

from __future__ import annotations

import logging
import os
import threading
import time

OUTAGE_INTERVAL = 10.0  # seconds between two lines about the same outage from one logger
VERBOSE_ENV = "KONSTRUCT_VERBOSE"  # "1": debug logging in processes started for a command given --verbose


def setup_logging(verbose: bool | None = None) -> None:
    """How every process of Konstruct logs: one line a record, time, level, logger. verbose None: as the process that
    started this one was told (VERBOSE_ENV), for processes started without a command line (the gateway's uvicorn
    processes when gateway.workers > 1)."""
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV) == "1"
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("huey", "huey.consumer", "huey.consumer.Scheduler", "httpx2", "mcp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    install_outage_filter()


class OutageFilter(logging.Filter):
    """Collapses records caused by an unreachable database into one line per logger and interval.

    The first record of an interval passes without its traceback, naming the error and how many
    like it were held back since the last one; the rest are dropped."""

    def __init__(self, interval: float = OUTAGE_INTERVAL) -> None:
        super().__init__()
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        # Here, not at the top: the database stack is heavy, and `up`, which installs this filter, does not use it.
        from konstruct.db.engine import unavailable

        if not unavailable(exc):
            return True
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(record.name, (float("-inf"), 0))
            if now - last < self.interval:
                self._last[record.name] = (last, held + 1)
                return False
            self._last[record.name] = (now, 0)
        more = f" ({held} more like it in the last {self.interval:g}s)" if held else ""
        record.msg = f"{record.getMessage()}: the database is unavailable ({type(exc).__name__}){more}"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        return True


class Throttled:
    """A logger's warning at most once per interval for one key, counting what it held back."""

    def __init__(self, logger: logging.Logger, interval: float = OUTAGE_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(key, (float("-inf"), 0))
            if now - last < self.interval:
                self._last[key] = (last, held + 1)
                return
            self._last[key] = (now, 0)
        self.logger.warning("%s%s", message, f" ({held} more like it in the last {self.interval:g}s)" if held else "")


def install_outage_filter() -> None:
    """Put the filter on every handler of the root logger (call after logging is configured)."""
    outage = OutageFilter()
    for handler in logging.getLogger().handlers:
        handler.addFilter(outage)
