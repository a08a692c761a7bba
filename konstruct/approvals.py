"""Tool approvals: a call of an `ask` tool waits for a human's yes or no, decided exactly once.

The agent stores the pending call with what its turn needs to go on and parks the inbox row as `waiting` (the
sweeper leaves such a row alone). A decision — a Slack button, a WhatsApp reply button, the terminal's y/n, `konstruct
approval approve|deny`, or the worker's expiry — is one conditional UPDATE (`… WHERE status = 'pending'`): a double
click or a retried interaction finds it decided and changes nothing. The transaction that decides also puts the inbox
row back to `received`; the doorbell is rung after it commits (a lost ring is the sweeper's, as for any message), and
any worker resumes the turn. Every decision is audited.

Who may decide: an operator (a principal allowed `approval.decide` in the tenant: the caller checks that, e.g. a CLI
user, or a Slack user whose email belongs to one) always; the person in the conversation only where the tool's
policy says `person`, and only from that conversation's channel (and workspace).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from konstruct import audit, inbox
from konstruct.db import lookup
from konstruct.db.engine import Database
from konstruct.db.models import Agent, InboundMessage, ToolApproval
from konstruct.errors import NotFoundError, PermissionDenied, ValidationError
from konstruct.tenancy.tenants import TenantInfo

PENDING, APPROVED, DENIED, EXPIRED = "pending", "approved", "denied", "expired"
STATUSES = (PENDING, APPROVED, DENIED, EXPIRED)
PERSON, OPERATORS = "person", "operators"
APPROVERS = (PERSON, OPERATORS)
WAITING = "waiting"  # the inbox row's state while its turn waits for a decision
EXPIRY_ACTOR = "system:expiry"


@dataclass(frozen=True)
class ApprovalInfo:
    id: uuid.UUID
    tenant_id: uuid.UUID
    agent_id: uuid.UUID
    conversation_id: uuid.UUID
    inbound_id: uuid.UUID
    tool_call_id: str
    tool: str
    arguments: dict[str, Any]  # redacted: what is shown and audited
    approver: str
    channel: str
    person: str
    status: str
    requested_at: datetime
    expires_at: datetime
    request_ref: str | None
    decided_by: str | None
    decided_at: datetime | None
    agent: str = ""

    @classmethod
    def from_row(cls, row: ToolApproval, agent: str = "") -> ApprovalInfo:
        return cls(row.id, row.tenant_id, row.agent_id, row.conversation_id, row.inbound_id, row.tool_call_id, row.tool,
                   dict(row.shown_arguments), row.approver, row.channel, row.person, row.status, row.requested_at, row.expires_at,
                   row.request_ref, row.decided_by, row.decided_at, agent)  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "agent": self.agent,
            "tool": self.tool,
            "arguments": self.arguments,
            "approver": self.approver,
            "channel": self.channel,
            "person": self.person,
            "status": self.status,
            "conversation_id": str(self.conversation_id),
            "inbound_id": str(self.inbound_id),
            "requested_at": self.requested_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "decided_by": self.decided_by,
            "decided_at": self.decided_at.isoformat() if self.decided_at else None,
        }


@dataclass(frozen=True)
class Decider:
    """Who is deciding. operator: the caller verified they may (`approval.decide` in the tenant). Otherwise the
    person in a channel, who may decide only a `person` approval of their own conversation; `origin` holds facts the
    conversation's inbound message must carry (e.g. {"team_id": …} for the Slack workspace the click came from)."""

    actor: str  # for the audit log, e.g. "slack:U0123", "user:ann@example.com"
    operator: bool = False
    channel: str | None = None
    person: str | None = None
    origin: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    approval: ApprovalInfo  # as it is now (decided by this call or earlier)
    changed: bool  # False: it was decided already (a double click), nothing changed


async def create(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    agent_id: uuid.UUID,
    conversation_id: uuid.UUID,
    inbound_id: uuid.UUID,
    tool_call_id: str,
    tool: str,
    arguments: dict[str, Any],
    shown: dict[str, Any],
    approver: str,
    channel: str,
    person: str,
    resume: dict[str, Any],
    expire_after: float,
    actor: str,
) -> ToolApproval:
    """Store a pending call (in the caller's transaction), audited; `expire_after` in minutes."""
    if approver not in APPROVERS:
        raise ValidationError(f"an approver is one of {', '.join(APPROVERS)}")
    row = ToolApproval(
        tenant_id=tenant_id, agent_id=agent_id, conversation_id=conversation_id, inbound_id=inbound_id, tool_call_id=tool_call_id[:256],
        tool=tool, arguments=arguments, shown_arguments=shown, approver=approver, channel=channel, person=person, resume=resume,
        expires_at=datetime.now(UTC) + timedelta(minutes=expire_after),
    )  # fmt: skip
    session.add(row)
    await session.flush()
    await session.refresh(row)
    await audit.record(session, tenant_id=tenant_id, actor=actor, action="approval.requested", target=str(row.id),
                       detail={"tool": tool, "arguments": shown, "approver": approver, "conversation_id": str(conversation_id)})  # fmt: skip
    return row


async def mark_shown(db: Database, tenant_id: uuid.UUID, approval_id: uuid.UUID, ref: str) -> None:
    """Record where the request was shown (so a retried turn does not show it again)."""
    async with db.tenant(tenant_id=tenant_id) as session:
        await session.execute(update(ToolApproval).where(ToolApproval.id == approval_id).values(request_ref=ref[:500]))


async def hold(db: Database, tenant_id: uuid.UUID, approval_id: uuid.UUID, inbound_id: uuid.UUID, worker_id: str) -> bool:
    """Park the turn (inbox row processing → waiting) while the approval is pending: True. False when it was decided
    meanwhile (the row stays with the caller, who goes on). The approval row is locked first, as `decide` locks it,
    so a decision either sees the row waiting (and puts it back) or is seen here."""
    async with db.tenant(tenant_id=tenant_id) as session:
        status = await session.scalar(select(ToolApproval.status).where(ToolApproval.id == approval_id).with_for_update())
        if status != PENDING:
            return False
        await session.execute(
            update(InboundMessage)
            .where(InboundMessage.id == inbound_id, InboundMessage.status == "processing", InboundMessage.worker_id == worker_id)
            .values(status=WAITING, worker_id=None, claimed_at=None, solo=False)
        )
    return True


async def decide(db: Database, queue: inbox.Doorbell, *, tenant_id: uuid.UUID, approval_id: uuid.UUID, approve: bool,
                 decider: Decider) -> Decision:  # fmt: skip
    """Approve or deny, once. NotFoundError for an approval this tenant does not have; PermissionDenied for a decider
    who may not decide it. A decision already taken is returned unchanged (changed=False)."""
    async with db.tenant(tenant_id=tenant_id) as session:
        row = await session.get(ToolApproval, approval_id)
        if row is None:
            raise NotFoundError(f"no approval {approval_id} here: see `konstruct approval list`")
        await _check(session, row, decider)
        changed, ring = await _settle(session, row, APPROVED if approve else DENIED, decider.actor)
        await session.refresh(row)
        info = ApprovalInfo.from_row(row)
    if ring:
        await inbox.ring_again(db, queue, tenant_id, row.inbound_id, suspect=False)
    return Decision(info, changed)


async def _check(session: AsyncSession, row: ToolApproval, decider: Decider) -> None:
    if decider.operator:
        return
    if row.approver == OPERATORS:
        raise PermissionDenied(f"{decider.actor} may not decide this call: the tenant's operators approve {row.tool}")
    if decider.channel != row.channel or decider.person != row.person:
        raise PermissionDenied(f"{decider.actor} may not decide this call: only the person in the conversation may")
    if decider.origin:
        same = await session.scalar(
            select(InboundMessage.id).where(InboundMessage.id == row.inbound_id, InboundMessage.payload.contains(decider.origin))
        )
        if same is None:
            raise PermissionDenied(f"{decider.actor} may not decide this call: it was asked in another workspace")


async def _settle(session: AsyncSession, row: ToolApproval, status: str, actor: str) -> tuple[bool, bool]:
    """The one conditional UPDATE; (decided now, the inbox row was put back to received and needs its doorbell)."""
    decided = await session.scalar(
        update(ToolApproval)
        .where(ToolApproval.id == row.id, ToolApproval.status == PENDING)
        .values(status=status, decided_by=actor[:200], decided_at=func.now())
        .returning(ToolApproval.id)
    )
    if decided is None:
        return False, False
    back = await session.scalar(
        update(InboundMessage)
        .where(InboundMessage.id == row.inbound_id, InboundMessage.status == WAITING)
        .values(status="received")
        .returning(InboundMessage.id)
    )
    await audit.record(session, tenant_id=row.tenant_id, actor=actor, action=f"approval.{status}", target=str(row.id),
                       detail={"tool": row.tool, "arguments": row.shown_arguments, "conversation_id": str(row.conversation_id)})  # fmt: skip
    return True, back is not None


async def expire_due(db: Database, queue: inbox.Doorbell) -> int:
    """Deny every pending approval past its expiry (the model is told when its turn resumes); how many expired."""
    async with db.system() as session:
        due = (await session.execute(text("select id, tenant_id from konstruct_due_approvals()"))).all()
    expired = 0
    for approval_id, tenant_id in due:
        async with db.tenant(tenant_id=tenant_id) as session:
            row = await session.get(ToolApproval, approval_id)
            changed, ring = await _settle(session, row, EXPIRED, EXPIRY_ACTOR) if row is not None else (False, False)
        expired += changed
        if ring:
            await inbox.ring_again(db, queue, tenant_id, row.inbound_id, suspect=False)  # type: ignore[union-attr]
    return expired


async def list_approvals(db: Database, tenant: TenantInfo, *, status: str | None = None, limit: int = 100) -> list[ApprovalInfo]:
    """The tenant's approvals, newest first (only those in `status`, if given)."""
    if status is not None and status not in STATUSES:
        raise ValidationError(f"--status is one of {', '.join(STATUSES)}")
    async with db.tenant(tenant_id=tenant.id) as session:
        query = select(ToolApproval, Agent.name).join(Agent, Agent.id == ToolApproval.agent_id)
        if status is not None:
            query = query.where(ToolApproval.status == status)
        rows = await session.execute(query.order_by(ToolApproval.requested_at.desc()).limit(limit))
        return [ApprovalInfo.from_row(row, name) for row, name in rows.all()]


async def find(db: Database, tenant: TenantInfo, ref: str) -> uuid.UUID:
    """An approval by its id or the first 8+ characters of it."""
    return await lookup.by_id_prefix(db, tenant.id, tenant.slug, ToolApproval.id, ref, what="approval",
                                     listing=f"konstruct approval list --tenant {tenant.slug}")  # fmt: skip


async def pending_for(db: Database, tenant_id: uuid.UUID, inbound_id: uuid.UUID) -> ApprovalInfo | None:
    """The approval the turn of this inbox row waits for, if any (the terminal asks its y/n on it)."""
    async with db.tenant(tenant_id=tenant_id) as session:
        row = await session.scalar(
            select(ToolApproval)
            .where(ToolApproval.inbound_id == inbound_id, ToolApproval.status == PENDING)
            .order_by(ToolApproval.requested_at.desc())
        )
        return ApprovalInfo.from_row(row) if row is not None else None
