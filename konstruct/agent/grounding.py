"""What the pipeline knows of knowledge retrieval: the passages it is given, how they enter the prompt, and the
sources footer on answers that used them.

The retrieval itself (konstruct.knowledge.search) sits above the agent and is handed to the pipeline as a callable,
like remembering and notifying, so `agent` imports nothing of `knowledge`.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Passage:
    """One retrieved chunk, with where it came from and how it ranked (ranks are 1-based; None: not found that way)."""

    chunk_id: int
    source_id: uuid.UUID
    source: str  # the source's name, as the model cites it
    uri: str  # the path or URL it was read from
    heading: str
    content: str
    score: float  # reciprocal rank fusion of the two ranks
    vector_rank: int | None = None
    distance: float | None = None  # cosine distance to the question
    text_rank: int | None = None
    text_score: float | None = None  # ts_rank_cd of the full-text match

    @property
    def link(self) -> str | None:
        """The URL a person can open, for a source read from the web."""
        return self.uri if self.uri.startswith(("http://", "https://")) else None

    def as_json(self) -> dict[str, Any]:
        return {
            "chunk_id": self.chunk_id, "source_id": str(self.source_id), "source": self.source, "uri": self.uri,
            "heading": self.heading, "content": self.content, "score": round(self.score, 6), "vector_rank": self.vector_rank,
            "distance": None if self.distance is None else round(self.distance, 6), "text_rank": self.text_rank,
            "text_score": None if self.text_score is None else round(self.text_score, 6),
        }  # fmt: skip


# (tenant_id, agent_id, question, k) → the k best passages the agent may read; [] when the tenant has no knowledge.
Retrieve = Callable[[uuid.UUID, uuid.UUID, str, int], Awaitable[Sequence[Passage]]]

INSTRUCTIONS = (
    "Passages from {tenant}'s own documents that may answer the message. Answer from them when they cover the question; "
    "when they do not, say that the documents do not cover it rather than guess. Cite each source you used by its name "
    "in square brackets, e.g. [{example}]."
)


def prompt_section(tenant_name: str, passages: Sequence[Passage]) -> str:
    """The block of the system prompt that carries the passages, each under its source's name and heading."""
    if not passages:
        return ""
    head = INSTRUCTIONS.format(tenant=tenant_name, example=passages[0].source)
    return head + "\n\n" + _blocks(passages) + "\n\n"


def _blocks(passages: Sequence[Passage]) -> str:
    return "\n\n".join(f"Source: {p.source}{' — ' + p.heading if p.heading else ''}\n{p.content.strip()}" for p in passages)


def cited(text: str, passages: Sequence[Passage]) -> list[Passage]:
    """The sources an answer used, once each in the order first retrieved: those it names (as `[name]` or plainly)."""
    lowered = text.casefold()
    seen: dict[uuid.UUID, Passage] = {}
    for passage in passages:
        if passage.source_id not in seen and passage.source.casefold() in lowered:
            seen[passage.source_id] = passage
    return list(seen.values())


def with_sources(text: str, passages: Sequence[Passage]) -> str:
    """The answer with a short footer naming the sources it used (a URL source with its link); unchanged when it
    used none. Plain text, so Slack and WhatsApp both show it (and both make the URLs clickable)."""
    used = cited(text, passages)
    if not used:
        return text
    names = [f"{p.source} ({p.link})" if p.link and p.link != p.source else p.source for p in used]
    return f"{text.rstrip()}\n\nSources: " + "; ".join(names)


def as_tool_output(passages: Sequence[Passage]) -> str:
    """What `knowledge_search` gives the model: the passages under their sources."""
    if not passages:
        return "Nothing in the documents matched."
    return _blocks(passages)
