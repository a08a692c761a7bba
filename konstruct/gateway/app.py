"""The gateway: a Starlette app with health and readiness, the Slack, WhatsApp and Stripe webhooks, the status page and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from konstruct import inbox
from konstruct.billing import events as billing_events
from konstruct.bodies import read_body
from konstruct.channels.slack import oauth
from konstruct.channels.slack.events import SlackEvents
from konstruct.channels.slack.interactive import SlackInteractions
from konstruct.channels.slack.sockets import SocketHolder
from konstruct.channels.whatsapp.webhook import WhatsAppWebhook
from konstruct.config import CONFIG_ENV, Settings, load_settings
from konstruct.db.engine import Database
from konstruct.db.urls import resolve_urls
from konstruct.errors import DatabaseUnavailable, KonstructError
from konstruct.gateway import protocol
from konstruct.gateway.headers import SecurityHeaders
from konstruct.logs import VERBOSE_ENV, Throttled, setup_logging
from konstruct.web import metrics, pages
from konstruct.worker.queue import make_queue

log = logging.getLogger("konstruct.gateway")
outage_log = Throttled(log)
HEALTH_INTERVAL = 1.0  # seconds between the gateway's own database checks


class DatabaseHealth:
    """Whether the database answered lately: a ping every second, and every request that found it down."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.down_since: float | None = None
        self.error = ""

    def failed(self, error: str) -> None:
        if self.down_since is None:
            self.down_since = time.time()
            log.warning("the database is unavailable (%s): webhooks answer 503 until it is back", error)
        self.error = error

    def ok(self) -> None:
        if self.down_since is not None:
            log.info("the database is back after %.1fs", time.time() - self.down_since)
        self.down_since = None

    async def watch(self) -> None:
        """Until cancelled. asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancel that arrives as the
        ping finishes (gh-86296), and the loop went on pinging after the lifespan ended (a test session hung on it)."""
        while True:
            try:
                async with asyncio.timeout(max(HEALTH_INTERVAL * 3, 1)):
                    await self.db.ping()
                self.ok()
            except Exception as exc:
                self.failed(type(exc.__cause__ or exc).__name__ if not isinstance(exc, KonstructError) else str(exc))
            await asyncio.sleep(HEALTH_INTERVAL)


async def healthz(request: Request) -> Response:
    """The process is up and the database answers (503 while it does not, so a balancer or `up` can tell)."""
    health: DatabaseHealth = request.app.state.health
    if health.down_since is not None:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(health.down_since))
        return JSONResponse({"status": "unhealthy", "database": f"unavailable since {since}: {health.error}"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """The database and the queue are reachable: ready for traffic."""
    state = request.app.state
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(state.db.ping(), timeout=5)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = str(exc) if isinstance(exc, KonstructError) else type(exc).__name__
    try:
        pending = await asyncio.wait_for(asyncio.to_thread(state.queue.pending), timeout=5)
        checks["queue"] = "ok"
        checks["queue_pending"] = str(pending)
    except Exception as exc:
        checks["queue"] = str(exc) if isinstance(exc, KonstructError) else type(exc).__name__
    ready = checks.get("database") == "ok" and checks.get("queue") == "ok"
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503)


async def slack_events(request: Request) -> Response:
    """Slack Events API: verified, stored and queued before the 200."""
    slack: SlackEvents = request.app.state.slack
    return await slack.handle(request)


async def slack_interactive(request: Request) -> Response:
    """Slack interactivity (feedback clicks on answers): verified like events, stored before the 200."""
    interactions: SlackInteractions = request.app.state.slack_interactions
    return await interactions.handle(request)


async def whatsapp_verify(request: Request) -> Response:
    """Meta's webhook subscription handshake."""
    whatsapp: WhatsAppWebhook = request.app.state.whatsapp
    return await whatsapp.verify(request)


async def whatsapp_receive(request: Request) -> Response:
    """WhatsApp Cloud API deliveries: signature checked, stored, then 200."""
    whatsapp: WhatsAppWebhook = request.app.state.whatsapp
    return await whatsapp.receive(request)


async def stripe_webhook(request: Request) -> Response:
    """Stripe events: signature verified over the raw body, each event id processed once."""
    settings: Settings = request.app.state.settings
    if not settings.billing.enabled or settings.billing.webhook_secret is None:
        return JSONResponse({"error": "billing is off on this installation"}, status_code=404)
    body = await read_body(request)
    if body is None:
        return JSONResponse({"error": "body too large"}, status_code=413)
    try:
        event = billing_events.verify(settings, body, request.headers.get("stripe-signature"))
    except billing_events.BadSignature as exc:
        log.warning("stripe webhook refused: %s", exc)
        return JSONResponse({"error": "invalid signature"}, status_code=400)
    except billing_events.NotAnEvent as exc:
        log.warning("signed stripe webhook refused: %s", exc)
        return JSONResponse({"error": str(exc)}, status_code=400)
    outcome = await billing_events.handle(request.app.state.db, settings, event)
    return JSONResponse({"received": True, "outcome": outcome.status})


async def konstruct_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, KonstructError)
    if isinstance(exc, DatabaseUnavailable):
        # Quick and quiet: Slack, Meta and Stripe deliver again; one log line per interval says why.
        request.app.state.health.failed(str(exc))
        outage_log.warning("database-down", f"{request.method} {request.url.path}: 503, the database is unavailable")
        return JSONResponse({"error": "temporarily unavailable, try again shortly"}, status_code=503, headers={"Retry-After": "1"})
    request_id = uuid.uuid4().hex[:12]
    log.warning("request %s %s %s: %s", request_id, request.method, request.url.path, exc)
    if "text/html" in request.headers.get("accept", ""):  # a person at the status page: a page, not JSON
        return await pages.error_page(request, exc)
    return JSONResponse({"error": str(exc), "request_id": request_id}, status_code=exc.http_status)


WARM_CONNECTIONS = 2  # the group commit writes one batch at a time: the first burst needs about this many


async def _warm(app: Starlette, settings: Settings) -> None:
    """Just after ready: a few pooled connections opened, the store statement planned on each, and the bolt apps
    built, so the first burst of webhooks does not wait for them (the pool grows to database.pool_size as needed).
    Before ready, with all ten connections, this took 0.1 s of a warm `up`'s start; just after ready, ten backends
    starting at once slowed the worker's first heartbeat, so `up`'s ready, from 0.07 to 0.15 s (warm start median
    1.42 s with ten, 1.34 s with two, same session). The cost: a load that starts at full speed the moment the gateway
    is ready waits for the pool to grow in its first second (bench/slack_events.py --knee 1250, 20 s: p99 85 and 124 ms
    with two, 50 and 81 ms with ten). A webhook that comes meanwhile only does what it would have done without it."""
    connections = min(WARM_CONNECTIONS, settings.database.pool_size)
    try:
        await app.state.db.warm(connections)
        await inbox.warm(app.state.db, app.state.queue, connections)
        await app.state.slack.warm()
    except Exception as exc:  # not fatal: /readyz tells whether the database is reachable
        log.warning("could not warm up at startup: %s", type(exc).__name__)
    gc.freeze()  # what the warm-up made lives as long as the process too


def create_app(settings: Settings) -> Starlette:
    """Build the gateway for these settings; connections open on startup, close on shutdown."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        urls = resolve_urls(settings)
        app.state.settings = settings
        app.state.db = Database(settings, urls)
        app.state.queue = make_queue(settings, urls)
        app.state.slack = SlackEvents(settings, app.state.db, app.state.queue)
        app.state.slack_interactions = SlackInteractions(settings, app.state.db, app.state.queue)
        app.state.whatsapp = WhatsAppWebhook(settings, app.state.db, app.state.queue)
        app.state.health = DatabaseHealth(app.state.db)
        # Everything alive now lives as long as the process: keep it out of the collector's way, so garbage collection
        # does not pause request handling to walk the imported modules. No collection first: it took 0.1 s before
        # ready and found ~2,000 unreachable objects of ~270,000 (kept for good now, a few hundred kB at most).
        gc.freeze()
        warming = asyncio.ensure_future(_warm(app, settings))
        watcher = asyncio.ensure_future(app.state.health.watch())
        # Socket Mode apps: this process takes the sockets no other gateway holds (and keeps trying for the rest).
        app.state.sockets = SocketHolder(settings, app.state.db, app.state.slack)
        app.state.sockets.handlers["interactive"] = app.state.slack_interactions.from_socket  # feedback clicks
        holder = asyncio.ensure_future(app.state.sockets.run())
        log.info("gateway ready on %s:%s", settings.gateway.host, settings.gateway.port)
        try:
            yield
        finally:
            for task in (warming, watcher, holder):
                task.cancel()
            for task in (holder, watcher, warming):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await app.state.sockets.stop()
            await app.state.db.dispose()
            app.state.queue.close()

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/slack/events", slack_events, methods=["POST"]),
            Route("/slack/interactive", slack_interactive, methods=["POST"]),
            Route("/slack/install", oauth.install),
            Route("/slack/oauth_redirect", oauth.oauth_redirect),
            Route("/whatsapp/webhook", whatsapp_verify, methods=["GET"]),
            Route("/whatsapp/webhook", whatsapp_receive, methods=["POST"]),
            Route("/stripe/webhook", stripe_webhook, methods=["POST"]),
            Route("/metrics", metrics.metrics),
            *pages.ROUTES,
        ],
        exception_handlers={KonstructError: konstruct_error},
        middleware=[Middleware(SecurityHeaders)],
        lifespan=lifespan,
    )


def app_from_config() -> Starlette:
    """The app for one of several gateway processes (uvicorn's factory): logging as the gateway command set it up in
    the process that started this one (without it, this process's own lines, `gateway ready` and Socket Mode's among
    them, were dropped: only warnings came out, unformatted)."""
    setup_logging()
    settings = load_settings()
    protocol.configure(settings.gateway)
    return create_app(settings)


def run_gateway(settings: Settings) -> None:
    """Serve the gateway with uvicorn until SIGINT/SIGTERM."""
    import uvicorn

    # uvicorn re-raises SIGTERM after its graceful shutdown; exit through Python instead, so atexit
    # handlers (releasing the embedded database) run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    protocol.configure(settings.gateway)
    app: Any = create_app(settings)
    if settings.gateway.workers > 1:
        # Several processes: uvicorn imports the app in each, from the same config file and environment.
        os.environ[CONFIG_ENV] = str(settings.config_path)
        os.environ[VERBOSE_ENV] = "1" if logging.getLogger().isEnabledFor(logging.DEBUG) else ""
        app = "konstruct.gateway.app:app_from_config"
    uvicorn.run(
        app,
        factory=settings.gateway.workers > 1,
        workers=settings.gateway.workers,
        host=settings.gateway.host,
        port=settings.gateway.port,
        log_level="info",
        access_log=False,
        lifespan="on",
        loop="uvloop",  # asyncpg and the HTTP parser are several times cheaper on uvloop + httptools
        # httptools, with the header size limit and read timeout uvicorn lacks (konstruct/gateway/protocol.py).
        http="konstruct.gateway.protocol:BoundedHttpToolsProtocol",
        timeout_keep_alive=settings.gateway.keep_alive,
        limit_concurrency=settings.gateway.max_connections,
        # X-Forwarded-For is weighed by the status page against [web] trusted_proxies, not by uvicorn
        # (which would believe any loopback peer).
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
