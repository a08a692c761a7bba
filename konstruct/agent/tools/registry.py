"""The tool layer: what a tool is, the registry that runs tools for the model, and plugin discovery.

A tool is a name, a description, a JSON schema for its arguments and an async ``run(arguments, ctx)`` returning text.
``Registry.call`` never raises for a tool's failure: bad JSON, invalid arguments, a timeout, a ``ToolError`` or any
other exception become a ``ToolResult`` with ``ok=False`` and a short message meant for the model.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("konstruct.tools")

ENTRY_POINT_GROUP = "konstruct.tools"
MAX_OUTPUT = 8_000
MAX_ERROR = 500
REDACTED = "[redacted]"

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_SECRET_KEY = re.compile(r"(token|secret|password|api[_-]?key|authorization)", re.IGNORECASE)


class ToolError(Exception):
    """A tool failed in a way the model should be told; the message is safe to show."""


@dataclass(frozen=True)
class ToolContext:
    """Who a tool runs for, and the hooks the pipeline provides (e.g. "memory_search", "escalate")."""

    tenant_id: uuid.UUID
    agent_id: uuid.UUID
    conversation_id: uuid.UUID
    person: str
    allowed_hosts: tuple[str, ...]
    allow_private: bool = False
    services: Mapping[str, Callable[..., Awaitable[Any]]] = field(default_factory=dict)
    # web_fetch's rules from [agent]: private networks it may reach anyway, its time limit, extra trusted CAs.
    private_networks: tuple[str, ...] = ()
    web_seconds: float = 10.0
    ca_file: str | None = None


@dataclass(frozen=True)
class Tool:
    """A function the model may call."""

    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any], ToolContext], Awaitable[str]]
    secret_args: tuple[str, ...] = ()
    # Where it comes from ("builtin", "plugin", "mcp") and whether it only reads (an MCP server's readOnlyHint; None:
    # not said): the default approval policy is a function of these (konstruct.agent.tools.policy.default_policy).
    source: str = "builtin"
    read_only: bool | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"invalid tool name {self.name!r}: lower case letters, digits and _, starting with a letter, at most 64")
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name}: parameters must be a JSON schema of type object")

    def spec(self) -> dict[str, Any]:
        """The entry for the OpenAI-style ``tools`` list."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one call: ``output`` goes back to the model, ``redacted_arguments`` to the audit log."""

    ok: bool
    output: str
    arguments: dict[str, Any]
    redacted_arguments: dict[str, Any]
    duration_ms: int


class Registry:
    """Tools by name."""

    def __init__(self, tools: Sequence[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def specs(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """The ``tools`` list for an agent's enabled tools, in the given order; unknown names are skipped."""
        return [self._tools[name].spec() for name in dict.fromkeys(names) if name in self._tools]

    def validate_names(self, names: Sequence[str]) -> list[str]:
        """The names that are not registered."""
        return [name for name in names if name not in self._tools]

    async def call(self, name: str, raw_arguments: str | dict[str, Any] | None, ctx: ToolContext, *, timeout: float) -> ToolResult:
        """Run a tool for the model: parse and check the arguments, enforce the timeout, never raise for a tool's failure."""
        started = time.monotonic()
        arguments: dict[str, Any] = {}
        secret: tuple[str, ...] = ()

        def result(ok: bool, output: str) -> ToolResult:
            duration = int((time.monotonic() - started) * 1000)
            return ToolResult(ok, truncate(output, MAX_OUTPUT), arguments, redact(arguments, secret), duration)

        tool = self._tools.get(name)
        if tool is None:
            return result(False, f"error: there is no tool named {name!r}")
        secret = tool.secret_args
        try:
            arguments = parse_arguments(raw_arguments)
            problems = validate(arguments, tool.parameters)
        except ToolError as exc:
            return result(False, f"error: {exc}")
        if problems:
            return result(False, "error: invalid arguments: " + "; ".join(problems))
        try:
            output = await asyncio.wait_for(tool.run(arguments, ctx), timeout)
        except TimeoutError:
            return result(False, f"error: {name} did not finish within {timeout:g} seconds")
        except ToolError as exc:
            return result(False, "error: " + truncate(str(exc) or "the tool failed", MAX_ERROR))
        except Exception as exc:
            log.warning("tool %s failed", name, exc_info=True)
            return result(False, "error: " + truncate(f"{type(exc).__name__}: {exc}", MAX_ERROR))
        return result(True, output if isinstance(output, str) else str(output))


def truncate(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, saying so when cut."""
    if len(text) <= limit:
        return text
    note = f"\n[truncated: {len(text)} characters in all]"
    return text[: max(0, limit - len(note))] + note


def parse_arguments(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    """The arguments as a dict: JSON text (empty means none) or an already parsed dict."""
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return dict(raw)
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ToolError(f"the arguments are not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict):
        raise ToolError(f"the arguments must be a JSON object, not {_json_type(value)}")
    return value


_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def validate(arguments: dict[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Minimal JSON schema checks: required keys, declared types, enum, numeric and length bounds, extra keys.

    A float with an integral value (``3.0``) is accepted for an integer and replaced by the int in ``arguments``.
    """
    problems: list[str] = []
    _check(arguments, schema, "", problems)
    return problems


def _check(value: Any, schema: Mapping[str, Any], path: str, problems: list[str]) -> Any:
    where = path or "arguments"
    types = schema.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else list(types)
        if "integer" in allowed and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not any(_TYPES.get(t, lambda v: True)(value) for t in allowed):
            problems.append(f"{where} must be {' or '.join(allowed)}, not {_json_type(value)}")
            return value
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where} must be one of {', '.join(json.dumps(v) for v in schema['enum'])}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{where} must be at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{where} must be at most {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            problems.append(f"{where} must be at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            problems.append(f"{where} must be at most {schema['maxLength']} characters")
    if isinstance(value, dict):
        properties: Mapping[str, Any] = schema.get("properties", {})
        for key in schema.get("required", ()):
            if key not in value:
                problems.append(f"{_join(path, key)} is required")
        for key in list(value):
            if key in properties:
                value[key] = _check(value[key], properties[key], _join(path, key), problems)
            elif schema.get("additionalProperties") is False:
                problems.append(f"{_join(path, key)} is not an accepted argument")
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            value[index] = _check(item, schema["items"], f"{where}[{index}]", problems)
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def redact(value: Any, secret_names: Sequence[str] = ()) -> Any:
    """A copy of ``value`` with secret-looking keys (and ``secret_names``) replaced by "[redacted]", at any depth."""
    if isinstance(value, dict):
        return {
            key: REDACTED if key in secret_names or _SECRET_KEY.search(str(key)) else redact(item, secret_names)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item, secret_names) for item in value]
    return value


def plugin_tools() -> list[Tool]:
    """The tools of the installed ``konstruct.tools`` entry points; a broken plugin is logged and skipped."""
    try:
        entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception:
        log.exception("could not list the %s entry points", ENTRY_POINT_GROUP)
        return []
    tools: list[Tool] = []
    for entry_point in entry_points:
        try:
            tools.extend(_load(entry_point.load()))
        except Exception:
            log.exception("tool plugin %r (%s) could not be loaded; skipped", entry_point.name, entry_point.value)
    return tools


def _load(obj: Any) -> list[Tool]:
    if isinstance(obj, Tool):
        return [obj]
    if not callable(obj):
        raise TypeError(f"expected a Tool or a callable returning Tools, got {type(obj).__name__}")
    made = obj()
    items = [made] if isinstance(made, Tool) else list(made) if isinstance(made, list | tuple) else None
    if items is None or not all(isinstance(item, Tool) for item in items):
        raise TypeError(f"the factory returned {type(made).__name__}, not a Tool or a list of Tools")
    return items


def build_registry(*, plugins: bool = True) -> Registry:
    """A new registry with the built-in tools and (unless ``plugins`` is false) the installed plugins."""
    from konstruct.agent.tools.builtin import builtin_tools

    registry = Registry(builtin_tools())
    for tool in plugin_tools() if plugins else []:
        try:
            registry.register(tool)
        except ValueError as exc:
            log.error("tool plugin skipped: %s", exc)
    return registry


@functools.cache
def default_registry() -> Registry:
    """The process-wide registry: built-ins and entry-point plugins, built once."""
    return build_registry()
