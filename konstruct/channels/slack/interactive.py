"""Slack's Interactivity request URL (`POST /slack/interactive`): feedback clicks on answers, and Approve/Deny clicks
on a tool call waiting for approval (konstruct.channels.slack.approvals).

Verified exactly as /slack/events is: the v0 signature over the raw bytes with the signing secret of the workspace's
connection (its own app's for a single workspace, the distributed app's otherwise), refused with 401 before anything
is read or stored. The workspace the signed request came from decides the tenant; the click names only the reply,
which must be that tenant's and answer a message from that workspace and channel. Nothing slow: one transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from konstruct import feedback, inbox
from konstruct.channels.connections import ResolveCache, Resolved
from konstruct.channels.slack.approvals import SlackApprovals, is_approval
from konstruct.channels.slack.desk import DeskClicks, is_desk
from konstruct.channels.slack.events import verify_request
from konstruct.channels.slack.feedback import MalformedInteraction, feedback_click
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.errors import NotFoundError

log = logging.getLogger("konstruct.slack")


@dataclass(frozen=True)
class Outcome:
    """What an interaction came to: an HTTP status and, for a refusal, why (said to Slack, logged)."""

    status: int
    error: str | None = None


class SlackInteractions:
    """The /slack/interactive endpoint; `interact` is the part after verification, for any transport."""

    def __init__(self, settings: Settings, db: Database, queue: inbox.Doorbell | None = None) -> None:
        self.settings = settings
        self.db = db
        self.connections = ResolveCache(db, settings)
        self.desk = DeskClicks(settings, db, self.connections)
        self.approvals = SlackApprovals(settings, db, queue)  # Approve/Deny clicks on a tool call (queue: to resume its turn)

    async def handle(self, request: Request) -> Response:
        signed = await verify_request(request, self.connections, self._signing_secret)
        if isinstance(signed, Response):
            return signed
        data, resolved, team_id = signed.data, signed.resolved, signed.team_id
        outcome = Outcome(400, "not an interaction payload") if data is None else await self.interact(resolved, team_id, data)
        if outcome.error is not None:
            log.warning("signed Slack interaction refused (%s): %s", outcome.status, outcome.error)
            return JSONResponse({"error": outcome.error}, status_code=outcome.status)
        return Response(status_code=outcome.status)

    async def from_socket(self, team_id: str | None, payload: dict[str, Any]) -> None:
        """An `interactive` envelope of a Socket Mode connection: authenticated by the socket itself, so acted on as
        a verified request would be; a refusal is logged (the envelope is acknowledged either way)."""
        entry = await self.connections.get("slack", team_id) if team_id else None
        outcome = await self.interact(entry[0] if entry else None, team_id, payload)
        if outcome.error is not None:
            log.warning("Socket Mode Slack interaction refused (%s): %s", outcome.status, outcome.error)

    async def _signing_secret(
        self, resolved: Resolved | None, credentials: dict[str, str], team_id: str | None, body: bytes, headers: dict[str, str]
    ) -> str | None:
        """The workspace's own app's secret for a single workspace, else the distributed app's (no guessing among
        single-workspace secrets for a request without a known team, as url_verification needs on /slack/events)."""
        if resolved is not None and resolved.mode == "single":
            return credentials.get("signing_secret")
        return self.settings.slack.signing_secret.get_secret_value() if self.settings.slack.signing_secret else None

    async def interact(self, resolved: Resolved | None, team_id: str | None, payload: dict[str, Any]) -> Outcome:
        """Act on a verified interaction from workspace `team_id` (its connection: `resolved`)."""
        if is_desk(payload):  # the human desk's buttons and hand-back modal (channels/slack/desk.py)
            return Outcome(*await self.desk.interact(resolved, team_id, payload))
        if is_approval(payload):
            if team_id is None or resolved is None or resolved.status != "connected":
                return Outcome(403, "this workspace is not connected")
            return Outcome(*await self.approvals.interact(resolved, team_id, payload))
        try:
            click = feedback_click(payload)
        except MalformedInteraction as exc:
            return Outcome(400, str(exc))
        if click is None:
            return Outcome(200)  # another kind of interaction: acknowledged, nothing to do
        if team_id is None:
            return Outcome(400, "no team")
        if resolved is None or resolved.status != "connected":
            return Outcome(403, "this workspace is not connected")
        origin = {"team_id": team_id, **({"channel": click.channel} if click.channel else {})}
        try:
            result = await feedback.vote(
                self.db, tenant_id=resolved.tenant_id, message_id=click.reply_id, channel="slack", voter=click.voter,
                value=click.value, origin=origin,
            )  # fmt: skip
        except NotFoundError as exc:
            return Outcome(404, str(exc))
        log.info("feedback %+d on reply %s%s", result.value, result.message_id, "" if result.changed else " (unchanged)")
        return Outcome(200)
