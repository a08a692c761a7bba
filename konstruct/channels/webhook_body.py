"""Reading a webhook's raw body with a size limit: signatures are checked over the exact bytes, and nobody
unauthenticated gets to make the gateway buffer an arbitrary amount."""

from __future__ import annotations

from starlette.requests import Request

MAX_BODY = 1_000_000  # Slack and Meta payloads are a few kilobytes


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes | None:
    """The body, or None when it is larger than `limit` bytes (answer 413)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
