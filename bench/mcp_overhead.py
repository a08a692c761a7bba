"""Overhead of one MCP tool call as the agent's tool loop makes it (Registry.call on the provided tool, pooled
connection reused) against a fresh connection per call, to a loopback MCP server (the SDK's own, tests/fakes).

    python bench/mcp_overhead.py [--calls 50]

Prints p50/p95 in milliseconds for both. No database or model involved: only the MCP path is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

from cryptography.fernet import Fernet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from konstruct.agent import mcp_servers
from konstruct.agent.tools import mcp_client
from konstruct.agent.tools.registry import Registry, ToolContext
from konstruct.config import Settings
from tests.fakes.mcp_server import LoopbackMcp


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def main(calls: int) -> None:
    settings = Settings(mcp={"allow_private": True}, secret_key=Fernet.generate_key().decode())  # type: ignore[arg-type]
    fake = LoopbackMcp().start()
    try:
        server = mcp_servers.draft(mcp_servers.ServerSpec("shop", "http", fake.url), settings, uuid.uuid4())
        listed = await mcp_client.probe(server, settings)
        remote = next(t for t in listed if t.name == "lookup_order")
        tool = mcp_client.as_tool(server, remote, settings, None)
        registry = Registry([tool])
        ctx = ToolContext(uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), "bench", ())
        await registry.call(tool.name, '{"order_id": "1"}', ctx, timeout=30)  # the pooled connection opens here
        reused: list[float] = []
        for n in range(calls):
            started = time.perf_counter()
            result = await registry.call(tool.name, f'{{"order_id": "{n}"}}', ctx, timeout=30)
            reused.append((time.perf_counter() - started) * 1000)
            assert result.ok, result.output
        fresh: list[float] = []
        for n in range(calls):
            started = time.perf_counter()
            async with mcp_client.open_client(server, settings) as client:
                await client.call_tool("lookup_order", {"order_id": str(n)})
            fresh.append((time.perf_counter() - started) * 1000)
        await mcp_client.close_pool()
        print(f"{calls} calls each to {fake.url}; handshakes seen by the server: {fake.handshakes}")
        for label, values in (("session reused", reused), ("fresh connection", fresh)):
            print(f"{label:>17}: p50 {statistics.median(values):6.1f} ms   p95 {pct(values, 95):6.1f} ms")
    finally:
        fake.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    asyncio.run(main(parser.parse_args().calls))
