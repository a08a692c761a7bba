"""A turn paused on an approval, and resumed: the agent's side of konstruct.approvals.

When the model calls an `ask` tool that has no decision yet, the tool loop raises `Paused` with what it needs to go
on (the messages so far, the step count, the calls still to run). `pause` stores the pending call (its own transaction),
shows the request where the approver is (`Channel.ask`: the conversation, or the tenant's escalation target for
operators), then parks the inbox row as `waiting` and frees the worker slot. A decision puts the row back to `received`
and rings; whichever worker takes it loads the decisions (`load_resume`) and the tool loop goes on from the stored
state: the approved call runs, a denied or expired one is reported to the model as not made.

A worker that dies anywhere in between loses nothing: before the row is parked it is still `processing`, so the sweeper
re-queues it and the retry finds the pending approval (`wait_again`: shown again if it never was, then parked).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct import approvals
from konstruct.agent.tools.policy import Policy
from konstruct.db.models import Tenant, ToolApproval
from konstruct.llm.client import ToolCall
from konstruct.messaging import ApprovalRequest, Channel

if TYPE_CHECKING:
    from konstruct.agent.pipeline import Pipeline, Turn

log = logging.getLogger("konstruct.approvals")

WAITING = approvals.WAITING


@dataclass
class LoopState:
    """Where the tool loop stopped: the messages so far (the last assistant turn and the results of its calls that
    ran), how many model turns with tool calls there were, and the calls of that turn still to run."""

    model: str
    messages: list[dict[str, Any]]
    steps: int
    calls: list[ToolCall]

    def as_json(self) -> dict[str, Any]:
        calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in self.calls]
        return {"model": self.model, "messages": self.messages, "steps": self.steps, "calls": calls}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoopState:
        calls = [ToolCall(str(c["id"]), str(c["name"]), str(c["arguments"])) for c in data.get("calls") or []]
        return cls(str(data.get("model") or ""), list(data.get("messages") or []), int(data.get("steps") or 0), calls)


class Waiting(Exception):
    """The turn is parked on an approval: nothing to store or deliver now."""


class Paused(Exception):
    """The tool loop reached an `ask` call without a decision."""

    def __init__(self, call: ToolCall, policy: Policy, arguments: dict[str, Any], shown: dict[str, Any], state: LoopState) -> None:
        super().__init__(f"{call.name} waits for approval")
        self.call, self.policy, self.arguments, self.shown, self.state = call, policy, arguments, shown, state


@dataclass
class Resume:
    """An inbox row's approvals, as its next attempt needs them: the latest one (the state to go on from) and every
    decision taken so far, by tool call id."""

    latest: uuid.UUID
    status: str
    shown: bool  # the request was shown somewhere
    state: LoopState
    decisions: dict[str, str] = field(default_factory=dict)

    @property
    def pending(self) -> bool:
        return self.status == approvals.PENDING


async def load_resume(session: AsyncSession, inbound_id: uuid.UUID) -> Resume | None:
    """The row's approvals (None: its turn never paused)."""
    rows = list(
        await session.scalars(select(ToolApproval).where(ToolApproval.inbound_id == inbound_id).order_by(ToolApproval.requested_at))
    )
    if not rows:
        return None
    latest = rows[-1]
    decisions = {row.tool_call_id: row.status for row in rows if row.status != approvals.PENDING}
    return Resume(latest.id, latest.status, latest.request_ref is not None, LoopState.from_json(dict(latest.resume)), decisions)


def refusal(status: str, tool: str, minutes: float) -> str:
    """What the model is told about a call that was not approved."""
    if status == approvals.EXPIRED:
        return f"error: nobody approved this call of {tool} within {minutes:g} minutes, so it was not made; say so, do not retry it"
    return f"error: the call of {tool} was denied by the person who approves it, so it was not made; say so, do not retry it"


async def pause(pipeline: Pipeline, turn: Turn, paused: Paused) -> bool:
    """Store the pending call, show the request, park the row. True: waiting now; False: decided meanwhile (the
    decisions are loaded into `turn.resume` and the caller goes on)."""
    db, inbound = pipeline.db, turn.inbound
    async with db.tenant(tenant_id=turn.tenant_id) as session:
        row = await approvals.create(
            session, tenant_id=turn.tenant_id, agent_id=turn.agent.id, conversation_id=turn.conversation_id, inbound_id=inbound.id,
            tool_call_id=paused.call.id, tool=paused.call.name, arguments=paused.arguments, shown=paused.shown,
            approver=paused.policy.approver, channel=inbound.channel, person=inbound.sender, resume=paused.state.as_json(),
            expire_after=pipeline.settings.approvals.expire_after, actor=f"agent:{turn.agent.name}",
        )  # fmt: skip
        approval_id = row.id
    await announce(pipeline, turn, approval_id, paused.call.name, paused.shown, paused.policy.approver)
    return await park(pipeline, turn, approval_id)


async def wait_again(pipeline: Pipeline, turn: Turn) -> bool:
    """A retried turn whose approval is still pending (its worker died before parking it): show the request if it
    never was, and park the row. False when it was decided meanwhile (then `turn.resume` holds the decision)."""
    assert turn.resume is not None
    if not turn.resume.shown:
        async with pipeline.db.tenant(tenant_id=turn.tenant_id) as session:
            row = await session.get(ToolApproval, turn.resume.latest)
        if row is not None:
            await announce(pipeline, turn, row.id, row.tool, dict(row.shown_arguments), row.approver)
    return await park(pipeline, turn, turn.resume.latest)


async def park(pipeline: Pipeline, turn: Turn, approval_id: uuid.UUID) -> bool:
    if await approvals.hold(pipeline.db, turn.tenant_id, approval_id, turn.inbound_id, pipeline.worker_id):
        log.info("message %s waits for approval %s", turn.inbound_id, approval_id)
        return True
    async with pipeline.db.tenant(tenant_id=turn.tenant_id) as session:
        turn.resume = await load_resume(session, turn.inbound_id)
    return False


async def announce(pipeline: Pipeline, turn: Turn, approval_id: uuid.UUID, tool: str, shown: dict[str, Any], approver: str) -> None:
    """Show the request where the approver is; a failure is logged (the CLI can still decide: `konstruct approval`)."""
    request = ApprovalRequest(approval_id, turn.target, turn.agent.name, tool, shown, approver, pipeline.settings.approvals.expire_after)
    channel, where = turn.channel, None
    if approver == approvals.OPERATORS:
        channel, where = await _operators_room(pipeline, turn)
        await pipeline.working(turn, f"waiting for a teammate to approve {tool}…")
    if channel is None:
        log.warning(
            "approval %s: nowhere to ask the %s; decide with `konstruct approval approve|deny %s`", approval_id, approver, approval_id
        )
        return
    try:
        ref = await channel.ask(request, where)
    except Exception as exc:
        log.warning("approval %s: %s could not ask (%s); decide with `konstruct approval approve|deny`", approval_id, channel.name, exc)
        return
    await approvals.mark_shown(pipeline.db, turn.tenant_id, approval_id, ref or f"{channel.name}:shown")


async def _operators_room(pipeline: Pipeline, turn: Turn) -> tuple[Channel | None, str | None]:
    """The channel and room of the tenant's escalation target (`slack:C…`), where its operators are."""
    async with pipeline.db.tenant(tenant_id=turn.tenant_id) as session:
        target = await session.scalar(select(Tenant.escalation_target).where(Tenant.id == turn.tenant_id))
    kind, _, where = (target or "").partition(":")
    channel = pipeline.channels.get(kind)
    return (channel, where) if channel is not None and where else (None, None)
