"""`konstruct worker`: a huey consumer whose tasks feed the worker runtime."""

from __future__ import annotations

import logging

from konstruct.config import Settings
from konstruct.db.urls import resolve_urls
from konstruct.worker.queue import make_queue, set_worker
from konstruct.worker.runtime import WorkerRuntime

log = logging.getLogger("konstruct.worker")


def run_worker(settings: Settings, *, threads: int = 4, periodic: bool = True) -> None:
    """Run until SIGINT (graceful) or SIGTERM. Blocks."""
    urls = resolve_urls(settings)
    queue = make_queue(settings, urls)
    runtime = WorkerRuntime(settings, urls, queue)
    try:
        runtime.start()
        set_worker(runtime)
        consumer = queue.huey.create_consumer(
            workers=threads,
            worker_type="thread",
            periodic=periodic,
            initial_delay=0.05,
            backoff=1.5,
            max_delay=0.5,
            check_worker_health=True,
        )
        runtime.stopping = consumer.stop_flag  # a graceful stop does not wait for slots to admit more work
        log.info("worker %s ready: %d conversations at once", runtime.worker_id, settings.worker.concurrency)
        consumer.run()
    except KeyboardInterrupt:
        # SIGINT before huey installed its own handler: nothing was admitted yet, so stopping is graceful.
        log.info("interrupted during start-up")
    finally:
        grace = settings.llm.timeout * (settings.llm.retries + 1) + 5
        runtime.stop(timeout=grace)
        set_worker(None)
        queue.close()
        log.info("worker stopped (%d messages handled)", runtime.done)
