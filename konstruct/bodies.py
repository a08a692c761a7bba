"""Request bodies from outside (webhooks, forms): read with a size limit, since signatures are checked over
the exact bytes and nobody unauthenticated gets to make the gateway buffer an arbitrary amount; JSON parsed
without surprises (no NaN, no nesting deep enough to exhaust the stack); text made storable (no NUL, no
lone surrogate). Below the channels, billing and the web pages, which all use it; it imports none of them."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # starlette is the gateway's: the CLI uses this module's text cleaning (through messaging) only
    from starlette.requests import Request

MAX_BODY = 1_000_000  # Slack and Meta payloads are a few kilobytes
MAX_DEPTH = 64  # real payloads nest a dozen levels; deeper is an attack on the parser, not a message
_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes | None:
    """The body, or None when it is larger than `limit` bytes (answer 413)."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
    except ClientDisconnect:  # gone (or cut off by the read timeout): nobody is waiting for an answer
        return None
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth_ok(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return True


def parse_json(raw: bytes | str, max_depth: int = MAX_DEPTH, *, allow_nan: bool = False) -> Any:
    """The JSON value, or None when the body is not JSON (bad UTF-8; NaN unless allowed) or nests deeper than max_depth."""
    try:
        value = json.loads(raw) if allow_nan else json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    return value if _depth_ok(value, max_depth) else None


def clean_text(value: str) -> str:
    """Text PostgreSQL can store: NUL bytes dropped, lone surrogates replaced with U+FFFD."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    if _SURROGATE.search(value):
        value = _SURROGATE.sub("\ufffd", value)
    return value


def clean(value: Any) -> Any:
    """clean_text applied to every string in a JSON-like value (keys included)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(str(k)): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value
