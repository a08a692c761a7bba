"""Slack replies: the model's Markdown, as-is, in `markdown` blocks, cut into messages Slack accepts.

Slack's `markdown` block takes standard Markdown and does the translating itself, so an escaped `\\*`
stays a literal star and links, mentions and code reach Slack as written. What is left to us is length:
a markdown block holds at most 12,000 characters, and that limit is cumulative over all the markdown
blocks of one message, so each message carries one block and a long answer becomes several messages
(cut by konstruct.channels.text.split_message).
"""

from __future__ import annotations

from typing import TypedDict

from konstruct.channels.text import split_message

__all__ = ["FALLBACK_LIMIT", "MARKDOWN_LIMIT", "SlackMessage", "markdown_messages"]

MARKDOWN_LIMIT = 12_000  # characters of markdown-block text per message (all its markdown blocks together)
FALLBACK_LIMIT = 4_000  # Slack's advice for a message's top-level text; it only feeds notifications here

# --- messages ----------------------------------------------------------------------------------


class SlackMessage(TypedDict):
    """The arguments of one chat.postMessage / chat.update call that carry the content."""

    text: str  # the fallback: notifications and screen readers use it, the message shows the blocks
    blocks: list[dict[str, str]]


def markdown_messages(markdown: str, limit: int = MARKDOWN_LIMIT) -> list[SlackMessage]:
    """One message per chunk of `markdown` (see split_message): a single markdown block, plus its text
    as the fallback, cut to FALLBACK_LIMIT. Empty text gives []."""
    return [{"text": _fallback(chunk), "blocks": [{"type": "markdown", "text": chunk}]} for chunk in split_message(markdown, limit)]


def _fallback(chunk: str) -> str:
    """The notification text: Slack reads a message's `text` as mrkdwn, where `<!channel>`, `<!here>` or `<@U…>`
    from the model would notify people, so &, < and > are escaped (Slack's own rule for literal text)."""
    if len(chunk) > FALLBACK_LIMIT:
        cut = chunk.rfind(" ", 0, FALLBACK_LIMIT - 20)
        chunk = chunk[: cut if cut > 0 else FALLBACK_LIMIT - 21].rstrip() + "…"
    return chunk.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")[:FALLBACK_LIMIT]
