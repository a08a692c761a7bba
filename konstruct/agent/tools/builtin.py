"""The built-in tools: current_time, calculator, web_fetch, memory_search, knowledge_search, escalate_to_human."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from konstruct.agent import grounding
from konstruct.agent.tools import calculator, web
from konstruct.agent.tools.registry import Tool, ToolContext, ToolError


async def _current_time(args: dict[str, Any], ctx: ToolContext) -> str:
    name = (args.get("timezone") or "UTC").strip() or "UTC"
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ToolError(f"unknown time zone {name!r}; use an IANA name such as Europe/Paris or America/New_York") from None
    now = datetime.now(UTC).astimezone(zone)
    return f"{now.isoformat(timespec='seconds')} ({now.strftime('%A')}, {name})"


async def _calculator(args: dict[str, Any], ctx: ToolContext) -> str:
    return calculator.format_number(calculator.evaluate(args["expression"]))


async def _web_fetch(args: dict[str, Any], ctx: ToolContext) -> str:
    page = await web.fetch(args["url"], ctx)
    head = [f"URL: {page.url}", f"Status: {page.status}", f"Content-Type: {page.content_type or '(none)'}"]
    if page.truncated:
        head.append(f"Note: only the first {web.MAX_BYTES} bytes were read")
    return "\n".join(head) + "\n\n" + page.text()


async def _memory_search(args: dict[str, Any], ctx: ToolContext) -> str:
    search = ctx.services.get("memory_search")
    if search is None:
        raise ToolError("memory is not available")
    found = await search(args["query"], int(args.get("limit", 5)))
    if not found:
        return "No memories matched."
    return "Memories found:\n" + "\n".join(f"{number}. {item}" for number, item in enumerate(found, 1))


async def _knowledge_search(args: dict[str, Any], ctx: ToolContext) -> str:
    search = ctx.services.get("knowledge_search")
    if search is None:
        raise ToolError("the documents are not available")
    return grounding.as_tool_output(await search(args["query"], args.get("limit")))


async def _escalate(args: dict[str, Any], ctx: ToolContext) -> str:
    escalate = ctx.services.get("escalate")
    if escalate is None:
        raise ToolError("escalation to a human is not available")
    category = args.get("category")  # person_asked | tool_failure; absent: the pipeline decides
    reference = await (escalate(args["reason"], category) if category else escalate(args["reason"]))
    done = "The conversation has been handed to a human teammate, who will follow up."
    return f"{done} Reference: {reference}" if isinstance(reference, str) and reference else done


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


CURRENT_TIME = Tool(
    "current_time",
    "The current date, time and weekday, in UTC or in a given IANA time zone.",
    _object({"timezone": {"type": "string", "description": "IANA time zone, e.g. Europe/Paris; UTC when omitted"}}, []),
    _current_time,
)
CALCULATOR = Tool(
    "calculator",
    "Evaluate an arithmetic expression exactly: + - * / // % ** and parentheses; functions sqrt, abs, round, min, max, "
    "log (natural, or log(x, base)), sin, cos, tan (radians); constants pi and e.",
    _object({"expression": {"type": "string", "description": "e.g. (1250 * 1.2) / 12 or sqrt(2) ** 2"}}, ["expression"]),
    _calculator,
)
WEB_FETCH = Tool(
    "web_fetch",
    "Fetch a web page or document over HTTP(S) and return its status, content type and text. "
    "Only the hosts this workspace allows can be fetched.",
    _object({"url": {"type": "string", "description": "an absolute http:// or https:// URL"}}, ["url"]),
    _web_fetch,
)
MEMORY_SEARCH = Tool(
    "memory_search",
    "Search what this person told you in earlier conversations; returns the closest matches.",
    _object(
        {
            "query": {"type": "string", "minLength": 1, "description": "what to look for"},
            "limit": {"type": "integer", "minimum": 1, "maximum": 10, "description": "how many matches (1-10, default 5)"},
        },
        ["query"],
    ),
    _memory_search,
)
KNOWLEDGE_SEARCH = Tool(
    "knowledge_search",
    "Search this organisation's own documents (policies, manuals, FAQs) for passages about a question; returns them "
    "under their source names, to answer from and cite.",
    _object(
        {
            "query": {"type": "string", "minLength": 1, "maxLength": 1000, "description": "the question or the words to look for"},
            "limit": {"type": "integer", "minimum": 1, "maximum": 20, "description": "how many passages (1-20, default 5)"},
        },
        ["query"],
    ),
    _knowledge_search,
)
ESCALATE_TO_HUMAN = Tool(
    "escalate_to_human",
    "Hand the conversation to a human teammate when you cannot or should not handle the request yourself.",
    _object(
        {
            "reason": {"type": "string", "minLength": 1, "maxLength": 2000, "description": "why a human is needed"},
            "category": {
                "type": "string",
                "enum": ["person_asked", "tool_failure"],
                "description": "person_asked: the person wants a human; tool_failure: a tool you needed failed",
            },
        },
        ["reason"],
    ),
    _escalate,
)


def builtin_tools() -> list[Tool]:
    """The tools every installation has."""
    return [CURRENT_TIME, CALCULATOR, WEB_FETCH, MEMORY_SEARCH, KNOWLEDGE_SEARCH, ESCALATE_TO_HUMAN]
