"""Approvals in Slack: the request (a message with Approve and Deny buttons) and a click on it.

The buttons' `action_id`s start with `approval:` and their value is the approval's id. A click reaches
`/slack/interactive` (or a Socket Mode envelope) verified as any interaction; the tenant is the one of the workspace
that signed it, never read from the click. Who clicked decides what they may decide (konstruct.approvals): the person
in the conversation (their Slack user id, in the same workspace) where the tool's policy asks them, or an operator —
a Slack user whose email (`users.info`) belongs to a user of the tenant allowed `approval.decide`. The message is then
changed to say who decided, off the request's path.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

from konstruct import approvals, inbox
from konstruct.channels.connections import Resolved, SecretCache
from konstruct.channels.slack.client import web_client
from konstruct.channels.slack.feedback import MalformedInteraction
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.errors import NotFoundError, PermissionDenied
from konstruct.messaging import ApprovalRequest
from konstruct.tenancy import access

log = logging.getLogger("konstruct.slack")

PREFIX = "approval:"
APPROVE, DENY = f"{PREFIX}approve", f"{PREFIX}deny"
_SLACK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SLACK_TS = re.compile(r"\d{1,12}\.\d{1,8}")


def request_blocks(request: ApprovalRequest) -> list[dict[str, Any]]:
    """The request as Block Kit: the question, the arguments, who decides, and the two buttons."""
    shown = "\n".join(f"• `{key}`: {str(value)[:300]}" for key, value in request.arguments.items()) or "• (no arguments)"
    who = "an operator" if request.approver == approvals.OPERATORS else "you"
    waiting = f"Waiting for {who} to decide; denied if nobody does within {request.expires_minutes:g} minutes."
    value = str(request.approval_id)
    buttons = [
        {"type": "button", "action_id": action, "text": {"type": "plain_text", "text": label}, "style": style, "value": value}
        for action, label, style in ((APPROVE, "Approve", "primary"), (DENY, "Deny", "danger"))
    ]
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{request.agent}* wants to call `{request.tool}`:\n{shown}"[:2900]}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": waiting}]},
        {"type": "actions", "block_id": f"{PREFIX}{value}", "elements": buttons},
    ]


@dataclass(frozen=True)
class ApprovalClick:
    approval_id: uuid.UUID
    approve: bool
    user: str  # the Slack user id of who clicked
    channel: str | None
    message_ts: str | None


def is_approval(payload: dict[str, Any]) -> bool:
    """A block_actions payload with an action of ours (action_id `approval:…`)."""
    actions = payload.get("actions") if payload.get("type") == "block_actions" else None
    return isinstance(actions, list) and any(isinstance(a, dict) and str(a.get("action_id", "")).startswith(PREFIX) for a in actions)


def approval_click(payload: dict[str, Any]) -> ApprovalClick:
    """The click in an approval payload; MalformedInteraction when it is not shaped like one."""
    action = next(a for a in payload["actions"] if isinstance(a, dict) and str(a.get("action_id", "")).startswith(PREFIX))
    if action.get("action_id") not in (APPROVE, DENY) or action.get("type") != "button":
        raise MalformedInteraction("an approval action is an Approve or Deny button")
    try:
        approval_id = uuid.UUID(str(action.get("value")))
    except ValueError:
        raise MalformedInteraction("an approval button's value names no approval") from None
    user = payload.get("user")
    clicker = user.get("id") if isinstance(user, dict) else None
    if not isinstance(clicker, str) or not _SLACK_ID.fullmatch(clicker):
        raise MalformedInteraction("no user.id")
    found = payload.get("container")
    container: dict[str, Any] = found if isinstance(found, dict) else {}
    channel, ts = container.get("channel_id"), container.get("message_ts")
    channel = channel if isinstance(channel, str) and _SLACK_ID.fullmatch(channel) else None
    ts = ts if isinstance(ts, str) and _SLACK_TS.fullmatch(ts) else None
    return ApprovalClick(approval_id, action["action_id"] == APPROVE, clicker, channel, ts)


class SlackApprovals:
    """Decides on approval clicks (the `approval:` branch of SlackInteractions)."""

    def __init__(self, settings: Settings, db: Database, queue: inbox.Doorbell | None) -> None:
        self.settings, self.db, self.queue = settings, db, queue
        self.tokens = SecretCache(db, settings, "slack", "bot_token")
        self._background: set[asyncio.Task[None]] = set()

    async def interact(self, resolved: Resolved, team_id: str, payload: dict[str, Any]) -> tuple[int, str | None]:
        """(HTTP status, why it was refused or None) for one verified click of workspace `team_id`."""
        try:
            click = approval_click(payload)
        except MalformedInteraction as exc:
            return 400, str(exc)
        if self.queue is None:
            return 503, "this gateway has no queue to resume the turn with"
        try:
            try:  # the person in the conversation, most often; an operator (one Slack look-up) otherwise
                decision = await self._decide(resolved, team_id, click, operator=False)
            except PermissionDenied:
                if not await self._operator(resolved, team_id, click.user):
                    raise
                decision = await self._decide(resolved, team_id, click, operator=True)
        except NotFoundError as exc:
            return 404, str(exc)
        except PermissionDenied as exc:
            return 403, str(exc)
        log.info(
            "approval %s %s by %s%s", click.approval_id, decision.approval.status, click.user, "" if decision.changed else " (already)"
        )
        if decision.changed and click.channel and click.message_ts:
            self._later(self._settled(resolved, team_id, click.channel, click.message_ts, click.user, decision.approval.status))
        return 200, None

    async def _decide(self, resolved: Resolved, team_id: str, click: ApprovalClick, *, operator: bool) -> approvals.Decision:
        assert self.queue is not None
        decider = approvals.Decider(
            f"slack:{click.user}", operator=operator, channel="slack", person=click.user, origin={"team_id": team_id}
        )
        return await approvals.decide(self.db, self.queue, tenant_id=resolved.tenant_id, approval_id=click.approval_id,
                                      approve=click.approve, decider=decider)  # fmt: skip

    async def _operator(self, resolved: Resolved, team_id: str, user: str) -> bool:
        """Is this Slack user one of the tenant's admins or operators? By their email, as Slack has it (`users.info`)."""
        try:
            token = await self.tokens.get(resolved.tenant_id, team_id)
            info = await web_client(self.settings, token).users_info(user=user)
        except Exception as exc:  # e.g. SlackApiError (no users:read.email scope): not known as an operator
            log.info("cannot look up Slack user %s: %s", user, type(exc).__name__)
            return False
        email = ((info.get("user") or {}).get("profile") or {}).get("email")
        if not isinstance(email, str) or not email:
            return False
        try:
            principal = await access.principal_for(self.db, email)
        except NotFoundError:
            return False
        return principal.can("approval.decide", resolved.tenant_id)

    async def _settled(self, resolved: Resolved, team_id: str, channel: str, ts: str, user: str, status: str) -> None:
        """The request message now says who decided (its buttons go)."""
        said = f"{'Approved' if status == approvals.APPROVED else 'Denied'} by <@{user}>."
        try:
            client = web_client(self.settings, await self.tokens.get(resolved.tenant_id, team_id))
            await client.chat_update(channel=channel, ts=ts, text=said,
                                     blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": said}}])  # fmt: skip
        except Exception as exc:  # the decision stands; only the message is stale
            log.warning("could not update the approval message: %s", type(exc).__name__)

    def _later(self, work: Any) -> None:
        task = asyncio.ensure_future(asyncio.wait_for(work, 10))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
