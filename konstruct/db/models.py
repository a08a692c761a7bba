"""The tables, as SQLAlchemy models. The DDL (with row-level security) lives in migrations/."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import BigInteger, Boolean, Date, Float, ForeignKey, Identity, Integer, LargeBinary, Numeric, SmallInteger, Text
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NOW = sql_text("now()")


class Base(DeclarativeBase):
    pass


def _id() -> Mapped[uuid.UUID]:
    return mapped_column(UUID(as_uuid=True), primary_key=True, server_default=sql_text("gen_random_uuid()"))


def _tenant_id() -> Mapped[uuid.UUID]:
    return mapped_column(UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False)


def _created() -> Mapped[datetime]:
    return mapped_column(TIMESTAMP(timezone=True), nullable=False, server_default=NOW)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = _id()
    slug: Mapped[str] = mapped_column(Text, unique=True)
    name: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="active")
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _created()
    allowed_hosts: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=sql_text("'{}'"))
    escalation_target: Mapped[str | None] = mapped_column(Text)
    contact_email: Mapped[str | None] = mapped_column(Text)
    stripe_customer_id: Mapped[str | None] = mapped_column(Text)
    billing_exempt: Mapped[bool] = mapped_column(Boolean, server_default=sql_text("false"))


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    name: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(Text)
    persona: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(Text)
    settings: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=sql_text("'{}'::jsonb"))
    suggested_prompts: Mapped[list[str]] = mapped_column(JSONB, server_default=sql_text("'[]'::jsonb"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _created()


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    agent_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("agents.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(Text)
    external_id: Mapped[str] = mapped_column(Text)
    person: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="open")
    created_at: Mapped[datetime] = _created()
    last_message_at: Mapped[datetime] = _created()
    summary: Mapped[str | None] = mapped_column(Text)
    summary_until: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    escalated_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    escalation_reason: Mapped[str | None] = mapped_column(Text)
    # person_asked | rule | tool_failure | budget (konstruct.agent.escalation.CATEGORIES); escalation_reason explains it
    escalation_category: Mapped[str | None] = mapped_column(Text)


class InboundMessage(Base):
    """The inbox: a message is stored here before it is acknowledged or queued."""

    __tablename__ = "inbound_messages"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    conversation_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("conversations.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(Text)
    external_id: Mapped[str] = mapped_column(Text)
    sender: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text, server_default="")
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=sql_text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(Text, server_default="received")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    worker_id: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = _created()
    claimed_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    reply_ref: Mapped[str | None] = mapped_column(Text)
    suspect: Mapped[bool] = mapped_column(Boolean, server_default=sql_text("false"))  # in flight when a worker died
    crashes: Mapped[int] = mapped_column(Integer, server_default="0")  # deaths while it ran alone: what max_attempts counts
    solo: Mapped[bool] = mapped_column(Boolean, server_default=sql_text("false"))  # this claim runs alone on its worker
    requeued_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))


class Message(Base):
    """Conversation history, both directions."""

    __tablename__ = "messages"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    conversation_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("conversations.id", ondelete="CASCADE"))
    inbound_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), ForeignKey("inbound_messages.id", ondelete="SET NULL"))
    direction: Mapped[str] = mapped_column(Text)
    author: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    # message: what the person or the model said; notice: a fixed text sent in the agent's place (an apology,
    # "paused", a hand-over), shown to people but never given back to the model as the agent's words.
    kind: Mapped[str] = mapped_column(Text, server_default=sql_text("'message'"))
    external_id: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    status_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    created_at: Mapped[datetime] = _created()


class AuditEvent(Base):
    """Append-only: the app role may insert and read, never update or delete."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    actor: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    target: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=sql_text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _created()
    # Set by the database (trigger konstruct_audit_chain): the event's place in its tenant's hash chain.
    seq: Mapped[int] = mapped_column(BigInteger)
    prev_hash: Mapped[bytes | None] = mapped_column(LargeBinary)
    hash: Mapped[bytes] = mapped_column(LargeBinary)


class Memory(Base):
    """Something an agent remembers about one person, with its embedding (all-MiniLM-L6-v2, 384 dimensions)."""

    __tablename__ = "memories"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    agent_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("agents.id", ondelete="CASCADE"))
    person: Mapped[str] = mapped_column(Text)
    content: Mapped[str] = mapped_column(Text)
    embedding: Mapped[Any] = mapped_column(Vector(384))
    inbound_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    created_at: Mapped[datetime] = _created()


class ChannelConnection(Base):
    """A Slack workspace (or WhatsApp number) connected to one tenant. Secrets only encrypted."""

    __tablename__ = "channel_connections"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    kind: Mapped[str] = mapped_column(Text)
    external_id: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text, server_default="")
    mode: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="connected")
    default_agent_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), ForeignKey("agents.id", ondelete="SET NULL"))
    credentials: Mapped[bytes] = mapped_column(LargeBinary)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=sql_text("'{}'::jsonb"))
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _created()


class ChannelRoute(Base):
    """Which agent answers in one channel of a connection."""

    __tablename__ = "channel_routes"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    connection_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("channel_connections.id", ondelete="CASCADE"))
    external_channel: Mapped[str] = mapped_column(Text)
    agent_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("agents.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = _created()


class DeliveryStatus(Base):
    """The furthest status a channel reported for one message it carried (WhatsApp: by wamid)."""

    __tablename__ = "delivery_statuses"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    channel: Mapped[str] = mapped_column(Text)
    external_id: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    status_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    updated_at: Mapped[datetime] = _created()


class WorkerHeartbeat(Base):
    """Which workers are alive. Holds no tenant data, so it has no row-level security."""

    __tablename__ = "worker_heartbeats"

    worker_id: Mapped[str] = mapped_column(Text, primary_key=True)
    hostname: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = _created()
    seen_at: Mapped[datetime] = _created()
    in_flight: Mapped[int] = mapped_column(Integer, server_default="0")
    has_platform_key: Mapped[bool | None] = mapped_column(Boolean)  # it can read the platform LLM key (null: none set)
    config_mtime: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))  # of the konstruct.toml it loaded


class LLMKey(Base):
    """A tenant's own provider API key: the Fernet token and a hint, never the key."""

    __tablename__ = "llm_keys"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    provider: Mapped[str] = mapped_column(Text)
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    hint: Mapped[str] = mapped_column(Text)
    api_base: Mapped[str | None] = mapped_column(Text)
    added_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()


class LLMUsage(Base):
    """One LLM call: who, which model, tokens, cost and latency (failed calls too)."""

    __tablename__ = "llm_usage"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    agent_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), ForeignKey("agents.id", ondelete="SET NULL"))
    conversation_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), ForeignKey("conversations.id", ondelete="SET NULL"))
    purpose: Mapped[str] = mapped_column(Text, server_default="reply")
    model: Mapped[str] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(Integer, server_default="0")
    cost_usd: Mapped[Decimal] = mapped_column(Numeric(18, 8), server_default="0")
    latency_ms: Mapped[int] = mapped_column(Integer, server_default="0")
    key_source: Mapped[str] = mapped_column(Text, server_default="platform")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()


class Budget(Base):
    __tablename__ = "budgets"

    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    monthly_usd: Mapped[Decimal] = mapped_column(Numeric(14, 4))
    alerts: Mapped[list[int]] = mapped_column(ARRAY(Integer), server_default=sql_text("'{80}'"))
    action: Mapped[str] = mapped_column(Text, server_default="block")
    downgrade_model: Mapped[str | None] = mapped_column(Text)
    updated_by: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = _created()


class BudgetMonth(Base):
    __tablename__ = "budget_months"

    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    month: Mapped[date] = mapped_column(Date, primary_key=True)
    spent_usd: Mapped[Decimal] = mapped_column(Numeric(18, 8), server_default="0")
    alerts_sent: Mapped[list[int]] = mapped_column(ARRAY(Integer), server_default=sql_text("'{}'"))
    limit_notified: Mapped[bool] = mapped_column(Boolean, server_default=sql_text("false"))


class BudgetReservation(Base):
    __tablename__ = "budget_reservations"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    estimate_usd: Mapped[Decimal] = mapped_column(Numeric(18, 8))
    created_at: Mapped[datetime] = _created()
    expires_at: Mapped[datetime] = mapped_column(TIMESTAMP(timezone=True))


class Subscription(Base):
    """A Stripe subscription as last decided from its events."""

    __tablename__ = "subscriptions"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    customer_id: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    price_id: Mapped[str | None] = mapped_column(Text)
    plan: Mapped[str | None] = mapped_column(Text)
    current_period_end: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, server_default=sql_text("false"))
    past_due_since: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    state_at: Mapped[int] = mapped_column(BigInteger, server_default="0")
    state_rank: Mapped[int] = mapped_column(Integer, server_default="0")
    last_invoice: Mapped[str | None] = mapped_column(Text)
    details_at: Mapped[int] = mapped_column(BigInteger, server_default="0")
    details_rank: Mapped[int] = mapped_column(Integer, server_default="0")
    invoice_at: Mapped[int] = mapped_column(BigInteger, server_default="0")
    updated_at: Mapped[datetime] = _created()


class StripeEvent(Base):
    """A Stripe event id seen (stored before acting on it). Holds no tenant data."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    type: Mapped[str] = mapped_column(Text)
    created: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = _created()
    processed_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    outcome: Mapped[str | None] = mapped_column(Text)


class User(Base):
    """A person who signs in (status page) or is acted as (`--as`). Passwords only as scrypt hashes."""

    __tablename__ = "users"

    id: Mapped[uuid.UUID] = _id()
    email: Mapped[str] = mapped_column(Text, unique=True)
    name: Mapped[str] = mapped_column(Text, server_default="")
    password_hash: Mapped[str | None] = mapped_column(Text)
    platform_admin: Mapped[bool] = mapped_column(Boolean, server_default=sql_text("false"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _created()


class Membership(Base):
    __tablename__ = "memberships"

    tenant_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()


class Invitation(Base):
    """A single-use invitation: only the SHA-256 of its token is kept."""

    __tablename__ = "invitations"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    email: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(Text)
    token_hash: Mapped[bytes] = mapped_column(LargeBinary)
    expires_at: Mapped[datetime] = mapped_column(TIMESTAMP(timezone=True))
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    sent_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    accepted_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    accepted_by: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), ForeignKey("users.id", ondelete="SET NULL"))
    revoked_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))


class ReplyFeedback(Base):
    """A person's vote on one stored reply: +1 (thumbs up) or -1 (thumbs down); one per person per reply, changeable."""

    __tablename__ = "reply_feedback"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    message_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("messages.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(Text)
    voter: Mapped[str] = mapped_column(Text)  # the channel's id of the person (a Slack user id)
    value: Mapped[int] = mapped_column(SmallInteger)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _created()


TENANT_TABLES = frozenset(table.name for table in Base.metadata.sorted_tables if "tenant_id" in table.c or table.name == "tenants")


class KnowledgeSource(Base):
    """One document (file or URL) a tenant added; its chunks are what agents retrieve. See migration 0017."""

    __tablename__ = "knowledge_sources"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    uri: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)  # markdown | text | html | pdf
    agent_ids: Mapped[list[uuid.UUID]] = mapped_column(ARRAY(UUID(as_uuid=True)), server_default=sql_text("'{}'"))
    content_hash: Mapped[str | None] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(BigInteger, server_default="0")
    chunks: Mapped[int] = mapped_column(Integer, server_default="0")
    status: Mapped[str] = mapped_column(Text, server_default="ready")  # ready | failed
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _created()


class KnowledgeChunk(Base):
    """A piece of a source: heading path, text, full-text vector (generated) and embedding (384 dimensions)."""

    __tablename__ = "knowledge_chunks"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    source_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("knowledge_sources.id", ondelete="CASCADE"))
    ordinal: Mapped[int] = mapped_column(Integer)
    heading: Mapped[str] = mapped_column(Text, server_default="")
    content: Mapped[str] = mapped_column(Text)
    embedding: Mapped[Any] = mapped_column(Vector(384))


class KnowledgeJob(Base):
    """An ingest (add or sync) queued for the worker, with its progress and per-file results."""

    __tablename__ = "knowledge_jobs"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    kind: Mapped[str] = mapped_column(Text)  # add | sync
    request: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=sql_text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(Text, server_default="queued")  # queued | running | done | failed
    total: Mapped[int] = mapped_column(Integer, server_default="0")
    done: Mapped[int] = mapped_column(Integer, server_default="0")
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=sql_text("'[]'::jsonb"))
    error: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    started_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    worker_id: Mapped[str | None] = mapped_column(Text)  # the worker running it (its claim), kept fresh by heartbeat_at
    heartbeat_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")  # claims so far (worker.max_attempts caps them)
    requeued_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))  # when the sweeper last rang for it


class McpServer(Base):
    """A tenant's MCP server: streamable HTTP at `url`, or a `command` the worker runs over stdio (platform admins only)."""

    __tablename__ = "mcp_servers"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    name: Mapped[str] = mapped_column(Text)
    transport: Mapped[str] = mapped_column(Text)  # http | stdio
    url: Mapped[str | None] = mapped_column(Text)
    command: Mapped[list[str] | None] = mapped_column(JSONB(none_as_null=True))
    secrets: Mapped[bytes | None] = mapped_column(LargeBinary)  # encrypted {"headers": {...}, "env": {...}}
    secret_hints: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=sql_text("'{}'::jsonb"))
    agents: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default="{}")
    timeout_seconds: Mapped[float] = mapped_column(Float, server_default="30")
    tools: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=sql_text("'[]'::jsonb"))
    tools_seen_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    created_by: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = _created()


class Handoff(Base):
    """One escalation of a conversation to humans: its desk thread, owner, times and outcome (see konstruct.handoff)."""

    __tablename__ = "handoffs"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    conversation_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("conversations.id", ondelete="CASCADE"))
    reason: Mapped[str | None] = mapped_column(Text)
    desk_kind: Mapped[str | None] = mapped_column(Text)  # the channel the desk thread is in: slack
    desk_team: Mapped[str | None] = mapped_column(Text)
    desk_where: Mapped[str | None] = mapped_column(Text)
    desk_ts: Mapped[str | None] = mapped_column(Text)  # the thread's root message; None until it is posted
    owner: Mapped[str | None] = mapped_column(Text)
    taken_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    first_human_reply_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    reminded_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    outcome: Mapped[str | None] = mapped_column(Text)  # resolved_by_human | handed_back | closed | abandoned
    ended_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
    ended_by: Mapped[str | None] = mapped_column(Text)
    card_dirty: Mapped[bool] = mapped_column(Boolean, server_default=sql_text("false"))  # the desk card needs redrawing
    created_at: Mapped[datetime] = _created()


class DeskMirror(Base):
    """What a desk thread shows for one history row (a person's message, the status line under a human's reply)."""

    __tablename__ = "desk_mirrors"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    handoff_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("handoffs.id", ondelete="CASCADE"))
    message_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("messages.id", ondelete="CASCADE"))
    desk_ts: Mapped[str] = mapped_column(Text)
    shown_status: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()


class ToolApproval(Base):
    """A call of an `ask` tool waiting for (or given) a human's decision, with what its turn needs to go on. See migration 0021."""

    __tablename__ = "tool_approvals"

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = _tenant_id()
    agent_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("agents.id", ondelete="CASCADE"))
    conversation_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("conversations.id", ondelete="CASCADE"))
    inbound_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), ForeignKey("inbound_messages.id", ondelete="CASCADE"))
    tool_call_id: Mapped[str] = mapped_column(Text)
    tool: Mapped[str] = mapped_column(Text)
    arguments: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=sql_text("'{}'::jsonb"))  # as the model wrote them
    shown_arguments: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=sql_text("'{}'::jsonb"))  # secrets redacted
    approver: Mapped[str] = mapped_column(Text)  # person | operators
    channel: Mapped[str] = mapped_column(Text)
    person: Mapped[str] = mapped_column(Text)  # the conversation's person, in the channel's terms
    resume: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=sql_text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(Text, server_default="pending")  # pending | approved | denied | expired
    requested_at: Mapped[datetime] = _created()
    expires_at: Mapped[datetime] = mapped_column(TIMESTAMP(timezone=True))
    request_ref: Mapped[str | None] = mapped_column(Text)  # where the request was shown (a Slack ts, a wamid)
    decided_by: Mapped[str | None] = mapped_column(Text)
    decided_at: Mapped[datetime | None] = mapped_column(TIMESTAMP(timezone=True))
