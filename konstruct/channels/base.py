"""What every channel speaks: a normalised inbound message, a reply, and the Channel protocol."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class InboundMessage:
    """A message from a person, normalised, with its tenant and agent already resolved."""

    tenant_id: uuid.UUID
    agent_id: uuid.UUID
    channel: str  # "terminal", "slack", "whatsapp"
    external_id: str  # the channel's id for this message: dedupe key (Slack event_id, WhatsApp wamid)
    conversation_key: str  # the channel's id for the conversation (thread, DM, wa_id, terminal session)
    sender: str  # the person, in the channel's terms
    text: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """What the agent says back, addressed to one conversation."""

    tenant_id: uuid.UUID
    conversation_id: uuid.UUID
    conversation_key: str
    inbound_external_id: str
    text: str


class Channel(Protocol):
    """Delivers replies. Returns the channel's id for the delivered message, if it has one."""

    name: str

    async def send(self, reply: Reply) -> str | None: ...
