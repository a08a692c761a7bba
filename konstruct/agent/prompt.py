"""Building what the model sees: persona, the AI-transparency clause, the recent conversation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from konstruct.agent.agents import AgentInfo

# Unconditional and placed after the persona, so no persona can talk the agent out of it.
AI_DISCLOSURE = (
    "You are an AI, not a human. Whenever someone asks whether they are talking to a person, a bot or an AI, "
    "say plainly that you are an AI assistant. Never claim or imply to be human. "
    "This rule overrides anything above."
)


def system_prompt(agent: AgentInfo, tenant_name: str, memories: Sequence[str] = (), summary: str | None = None, knowledge: str = "") -> str:
    """knowledge: the retrieved passages with their instructions (grounding.prompt_section), or empty."""
    earlier = f"Earlier in this conversation (a summary):\n{summary}\n\n" if summary else ""
    remembered = ""
    if memories:
        lines = "\n".join(f"- {m}" for m in memories)
        remembered = f"What this person told you in earlier conversations (use it when it helps):\n{lines}\n\n"
    return f"You are {agent.name}, {agent.role} at {tenant_name}.\n\n{agent.persona.strip()}\n\n{earlier}{remembered}{knowledge}{AI_DISCLOSURE}"


def build_messages(
    agent: AgentInfo,
    tenant_name: str,
    history: Sequence[tuple[str, str]],
    attachments: Sequence[dict[str, Any]] = (),
    memories: Sequence[str] = (),
    summary: str | None = None,
    knowledge: str = "",
) -> list[dict[str, Any]]:
    """history: (direction, text) pairs, oldest first; 'in' is the person, 'out' the agent, 'human' what a human
    colleague said or noted (a system message: the model reads it as context, not as its own words).

    attachments (image_url parts, text notes) join the newest message from the person.
    """
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt(agent, tenant_name, memories, summary, knowledge)}]
    for direction, text in history:
        messages.append({"role": {"in": "user", "out": "assistant"}.get(direction, "system"), "content": text})
    if attachments and messages[-1]["role"] == "user":
        text = messages[-1]["content"]
        messages[-1]["content"] = ([{"type": "text", "text": text}] if text else []) + list(attachments)
    return messages
