"""The anchor of bench/slack_events.py: bare slack-bolt on Starlette, verifying each request's signature and acking
its event, storing nothing. Served by uvicorn as the gateway is (uvloop, httptools), e.g.

    BENCH_SIGNING=secret python -m uvicorn bench.bare_bolt:app --workers 2 --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

import os
from typing import Any

from slack_bolt.adapter.starlette.async_handler import AsyncSlackRequestHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def authorize(team_id: str | None, enterprise_id: str | None) -> AuthorizeResult:
    """No look-up and no network: the bench's one workspace, as a token store would answer."""
    return AuthorizeResult(enterprise_id=enterprise_id, team_id=team_id, bot_user_id="U0BENCHBOT", bot_token="xoxb-bench-token-0001")


bolt = AsyncApp(signing_secret=os.environ["BENCH_SIGNING"], authorize=authorize, process_before_response=True)


@bolt.event("app_mention")
async def on_mention(event: dict[str, Any]) -> None:
    """Acknowledged, nothing stored."""


handler = AsyncSlackRequestHandler(bolt)


async def events(request: Request) -> Response:
    return await handler.handle(request)


app = Starlette(routes=[Route("/slack/events", events, methods=["POST"])])
