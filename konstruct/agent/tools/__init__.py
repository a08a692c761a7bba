"""Tools agents can call: the registry, the built-ins and ``konstruct.tools`` entry-point plugins."""

from __future__ import annotations

from konstruct.agent.tools.registry import Registry, Tool, ToolContext, ToolError, ToolResult, build_registry, default_registry

__all__ = ["Registry", "Tool", "ToolContext", "ToolError", "ToolResult", "build_registry", "default_registry"]
