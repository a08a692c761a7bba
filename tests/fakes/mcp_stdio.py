"""A real MCP server for tests, built with the official SDK's own server (`MCPServer`), over stdio when run as a
script (`python tests/fakes/mcp_stdio.py`: no project imports, since a stdio server gets a clean environment and no
PYTHONPATH); tests/fakes/mcp_server.py serves the same tools over streamable HTTP.

Tools: lookup_order (read-only), refund (changes things), slow (sleeps), fail (an error result), big (a long result),
env_keys (the names of its environment variables: what a stdio server inherited), and two whose names need
sanitising for OpenAI ("get.status" and a very long one).
"""

from __future__ import annotations

import asyncio
import json
import os

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

LONG_NAME = "a_tool_whose_name_is_far_too_long_to_fit_in_sixty_four_characters_with_a_prefix"


def build() -> MCPServer:
    server = MCPServer("shop", log_level="WARNING")

    @server.tool(description="Look up an order by its number: status and items.", annotations=ToolAnnotations(readOnlyHint=True))
    def lookup_order(order_id: str) -> str:
        return f"order {order_id}: shipped, 2 items"

    @server.tool(description="Refund an order (changes the order).")
    def refund(order_id: str, amount: float) -> str:
        return f"refunded {amount:.2f} on order {order_id}"

    @server.tool(description="Wait, then answer.", annotations=ToolAnnotations(readOnlyHint=True))
    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return f"slept {seconds}"

    @server.tool(description="Always fails.")
    def fail(reason: str) -> str:
        raise ToolError(f"the shop refused: {reason}")

    @server.tool(description="A very long answer.", annotations=ToolAnnotations(readOnlyHint=True))
    def big() -> str:
        return "x" * 100_000

    @server.tool(description="The names of this server's environment variables.", annotations=ToolAnnotations(readOnlyHint=True))
    def env_keys() -> str:
        return json.dumps(sorted(os.environ))

    @server.tool(name="get.status", description="A name with a dot.", annotations=ToolAnnotations(readOnlyHint=True))
    def get_status() -> str:
        return "all good"

    @server.tool(name=LONG_NAME, description="A name too long for OpenAI with the prefix.")
    def long_named() -> str:
        return "long"

    return server


if __name__ == "__main__":
    build().run("stdio")
