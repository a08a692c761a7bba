"""Slack Web API clients: honour 429 Retry-After, retry connection errors."""

from __future__ import annotations

import asyncio
import random

import aiohttp
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import AsyncConnectionErrorRetryHandler
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.web.async_client import AsyncWebClient

from konstruct.config import Settings

MAX_RETRY_AFTER = 120.0


def retry_after_seconds(response: HttpResponse) -> float:
    """Seconds Slack asked us to wait. slack_sdk's own handler reads only the header's first character with
    the async client (aiohttp gives a string, not a list), so 'Retry-After: 30' would wait 3 s."""
    for name, value in response.headers.items():
        if name.lower() == "retry-after":
            raw = value[0] if isinstance(value, list) else value
            try:
                return min(max(float(raw), 0.0), MAX_RETRY_AFTER)
            except ValueError:
                break
    return 1.0


class RetryAfterHandler(AsyncRetryHandler):
    """Retries HTTP 429 after exactly as long as Slack asked (plus a little jitter): nothing is dropped."""

    async def _can_retry_async(
        self, *, state: RetryState, request: HttpRequest, response: HttpResponse | None = None, error: Exception | None = None
    ) -> bool:
        return response is not None and response.status_code == 429

    async def prepare_for_next_attempt_async(
        self, *, state: RetryState, request: HttpRequest, response: HttpResponse | None = None, error: Exception | None = None
    ) -> None:
        if response is None:
            raise error or RuntimeError("no response to retry")
        state.next_attempt_requested = True
        await asyncio.sleep(retry_after_seconds(response) + random.random() * 0.2)
        state.increment_current_attempt()


def web_client(settings: Settings, token: str | None = None, session: aiohttp.ClientSession | None = None) -> AsyncWebClient:
    """A client for one bot token; rate-limited calls wait for Retry-After and are retried, never dropped. Without a
    `session` slack_sdk opens (and closes) an HTTP session, and so a connection, for every call."""
    return AsyncWebClient(
        token=token,
        base_url=settings.slack.api_url,
        timeout=15,
        session=session,
        retry_handlers=[AsyncConnectionErrorRetryHandler(max_retry_count=2), RetryAfterHandler(max_retry_count=10)],
    )


class PooledSession:
    """One aiohttp session per event loop for a long-lived owner (the worker's Slack channel): its keep-alive connections
    are reused by every call instead of a TCP connection (and TLS handshake) opened per call. `close()` when done."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:  # a session is bound to its loop
            self._session, self._loop = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)), loop
        return self._session

    async def close(self) -> None:
        session, loop, self._session, self._loop = self._session, self._loop, None, None
        if session is not None and not session.closed and loop is asyncio.get_running_loop():
            await session.close()
