"""Approvals on WhatsApp: the request as an interactive message with two reply buttons, and the tap on one.

The buttons' ids are `approval:approve:<id>` and `approval:deny:<id>`. A tap arrives as a message of type
`interactive` (`button_reply`) in a signed webhook; it is not a message for the agent to answer: it is handed to
konstruct.approvals as the decision of that person (their wa_id, on that business number), which decides only an
approval of their own conversation whose policy asks the person. Operators decide elsewhere (Slack, the CLI).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from konstruct import approvals, inbox
from konstruct.db.engine import Database
from konstruct.errors import NotFoundError, PermissionDenied
from konstruct.messaging import ApprovalRequest

log = logging.getLogger("konstruct.whatsapp")

PREFIX = "approval:"
BODY_LIMIT = 1024  # characters of an interactive message's body text


def request_body(request: ApprovalRequest, to: str) -> dict[str, Any]:
    """The Graph API message: the question and two reply buttons (titles of at most 20 characters)."""
    text = f"{request.question()}\n\nReply Approve or Deny (denied if nobody does within {request.expires_minutes:g} minutes)."
    buttons = [{"type": "reply", "reply": {"id": f"{PREFIX}{verb}:{request.approval_id}", "title": title}}
               for verb, title in (("approve", "Approve"), ("deny", "Deny"))]  # fmt: skip
    return {"recipient_type": "individual", "to": to, "type": "interactive",
            "interactive": {"type": "button", "body": {"text": text[:BODY_LIMIT]}, "action": {"buttons": buttons}}}  # fmt: skip


def parse_button(button_id: str | None) -> tuple[uuid.UUID, bool] | None:
    """(approval id, approve?) for one of our approval buttons; None for any other button (or none)."""
    if not button_id or not button_id.startswith(PREFIX):
        return None
    verb, _, value = button_id[len(PREFIX) :].partition(":")
    if verb not in ("approve", "deny"):
        return None
    try:
        return uuid.UUID(value), verb == "approve"
    except ValueError:
        return None


async def decide_tap(db: Database, queue: inbox.Doorbell, tenant_id: uuid.UUID, number: str, wa_id: str, button_id: str | None) -> bool:
    """Act on a tapped approval button; False when the button is not one of ours (then it is an ordinary message)."""
    parsed = parse_button(button_id)
    if parsed is None:
        return False
    approval_id, approve = parsed
    decider = approvals.Decider(f"whatsapp:{wa_id}", channel="whatsapp", person=wa_id, origin={"phone_number_id": number})
    try:
        decision = await approvals.decide(db, queue, tenant_id=tenant_id, approval_id=approval_id, approve=approve, decider=decider)
    except (NotFoundError, PermissionDenied) as exc:
        log.warning("WhatsApp approval tap refused: %s", exc)
        return True
    log.info("approval %s %s on WhatsApp%s", approval_id, decision.approval.status, "" if decision.changed else " (already)")
    return True
