"""`konstruct worker`: a huey consumer whose tasks feed the worker runtime."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import signal
import threading

# The Postgres queue's driver (huey's storage connects with it; konstruct.worker.queue leaves its import to first use,
# for the commands that only queue): here with the worker's other imports, so that it is frozen out of the collector
# with them and a spare's forked workers share it instead of each importing it as it first connects (~45 ms).
import psycopg  # noqa: F401

from konstruct.channels import registry
from konstruct.config import Settings
from konstruct.db.urls import resolve_urls
from konstruct.llm.client import load_litellm
from konstruct.startup import collector_paused
from konstruct.supervision import FORKED_PREFIX
from konstruct.worker.queue import make_queue, set_worker
from konstruct.worker.runtime import WorkerRuntime

log = logging.getLogger("konstruct.worker")


def warm_up(model: str) -> None:
    """Do now what the first message would otherwise pay for (~1.5 s of CPU on a small machine): litellm's import,
    the MCP client's import (the mcp SDK), the channels' SDKs, the tokenizer behind budget estimates, and the model's
    provider resolved. Starts no thread and opens no connection, so the standby can fork after it."""
    litellm = load_litellm()
    import konstruct.agent.tools.mcp_client  # noqa: F401  (offered on every turn)

    registry.preload()

    with contextlib.suppress(Exception):
        litellm.token_counter(model=model, messages=[{"role": "user", "content": "warm-up"}])
    with contextlib.suppress(Exception):
        litellm.get_llm_provider(model=model)


NO_FULL_PASS = 1_000_000  # the oldest generation's threshold during the warm-up: no full pass of the collector


def _warm_up_and_freeze(model: str) -> None:
    """warm_up in a worker that started on its own, then what it imported kept out of the garbage collector's way.

    A full pass of the collector walks every object it tracks and stops every conversation meanwhile; a worker tracks
    over half a million once litellm is imported, nearly all of them modules' for good. bench/worker_throughput.py
    (2 s LLM, concurrency 256, 2,048 answers; gc.callbacks timing each pass): unfrozen, 9 full passes of 0.09-0.48 s,
    growing with the run, 2.1-2.6 s in all; frozen at ready and again here (as the spare does before it forks, and the
    gateway once started), 10-11 passes of 0.03-0.2 s, 1.0-1.1 s in all. Answers/s moved within the machine's noise
    (70.4 and 69.7 against 64.9 and 78.8, runs interleaved).

    The warm-up runs beside the first answers, so the collector stays on for the young generations (the first answers'
    cyclic garbage is still collected) but makes no full pass until it is done. Each full pass walked every object the
    imports had made so far, more each time: 6 passes of 35-180 ms in a warm-up alone, 1.1 s of the collector's time in
    all against 0.2-0.26 s without them (three runs each). In bench/slack_events.py, worker during, 1,000/s: 7 full passes
    of 94-401 ms in the first 10 s, each stopping every conversation in flight, against none. At the end, what it
    imported is frozen without a full collection first (that one pass took 0.63 s with the first answers in flight)."""
    young, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, NO_FULL_PASS)
    try:
        warm_up(model)
    finally:
        gc.freeze()
        gc.set_threshold(young, middle, old)


def serve_as_spare(settings: Settings) -> bool:
    """Do the slow start-up work (imports, litellm) once, then fork a ready worker each time SIGUSR1 asks for one.

    `up` keeps one such spare, so a worker that dies is replaced in milliseconds instead of after seconds of
    imports. The spare holds no thread, connection or loop when it forks (only imported modules), so the child
    starts clean. Returns True in a forked child (which goes on to run the worker), False in the spare when it is
    told to stop (SIGINT/SIGTERM). The spare reaps its children and says how each ended."""
    wanted = {signal.SIGUSR1, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)  # held until sigwait, so none is lost meanwhile
    with collector_paused():  # nothing else runs here: no pass at all, then frozen (see _warm_up_and_freeze)
        warm_up(settings.llm.model)
    # Frozen, the imported modules stay shared with every forked worker (copy-on-write).
    if threading.active_count() > 1:  # forking a process with threads could copy a held lock into the child
        log.error("standby: %d threads after warm-up; cannot fork workers safely", threading.active_count())
        return False
    log.info("standby: warm, waiting to start workers")
    while True:
        taken = signal.sigwait(wanted)
        if taken == signal.SIGCHLD:
            _reap()
            continue
        if taken != signal.SIGUSR1:
            _stop_children()
            log.info("standby stopped")
            return False
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)
            for handler in logging.getLogger().handlers:
                handler.setFormatter(logging.Formatter(FORKED_PREFIX + "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
            return True
        children.add(pid)
        log.info("standby: started worker pid %d", pid)


children: set[int] = set()  # workers this spare forked that have not ended


def _reap(block: bool = False) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        log.info("standby: worker pid %d ended with code %d", pid, os.waitstatus_to_exitcode(status))


def _stop_children() -> None:
    """Told to stop (by `up`, or because `up` died): the workers it forked stop gracefully first."""
    for pid in list(children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
    _reap(block=True)


def run_worker(settings: Settings, *, threads: int = 4, periodic: bool = True, standby: bool = False) -> None:
    """Run until SIGINT (graceful) or SIGTERM. Blocks. standby: be the spare that forks ready workers (see serve_as_spare)."""
    if standby and not serve_as_spare(settings):
        return
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
        gc.freeze()  # what the start-up made lives as long as the process (see _warm_up_and_freeze)
        log.info("worker %s ready: %d conversations at once", runtime.worker_id, settings.worker.concurrency)
        # After "ready", not beside the start-up: on the GIL the two took turns, and `up` waited for both.
        runtime.load_in_background(None if standby else functools.partial(_warm_up_and_freeze, settings.llm.model))
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
