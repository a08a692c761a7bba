"""Approval policies: per tool and agent, `allow` (the model calls it), `ask` (a human approves each call first) or
`deny` (never offered, never run), and for `ask` who approves: `person` (the person in the conversation) or
`operators` (the tenant's admins and operators).

An agent's own choices live in its settings (`tool_policy`: tool name → "allow" | "ask" | "ask:operators" | "deny");
a tool without one gets `default_policy(tool)`, a function of the tool itself: a tool from an MCP server asks unless
its server marks it read-only; built-ins and plugins are allowed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from konstruct.agent.tools.registry import Registry, Tool
from konstruct.approvals import APPROVERS, OPERATORS, PERSON
from konstruct.errors import ValidationError

ALLOW, ASK, DENY = "allow", "ask", "deny"
MODES = (ALLOW, ASK, DENY)
RESET = "default"  # `--tool-policy NAME=default` drops the agent's own choice
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Policy:
    mode: str
    approver: str = PERSON

    def text(self) -> str:
        """As written in settings and on the command line: allow, deny, ask (the person), ask:operators."""
        return f"{ASK}:{OPERATORS}" if self.mode == ASK and self.approver == OPERATORS else self.mode


def parse_policy(value: str) -> Policy:
    """`allow`, `deny`, `ask`, `ask:person` or `ask:operators`; ValidationError for anything else."""
    mode, _, approver = value.strip().lower().partition(":")
    if mode not in MODES or (approver and (mode != ASK or approver not in APPROVERS)):
        raise ValidationError(f"{value!r} is not a tool policy: allow, deny, ask (the person approves) or ask:operators")
    return Policy(mode, approver or PERSON)


def default_policy(tool: Tool) -> Policy:
    """A tool's policy when the agent chose none: an MCP tool asks (the person) unless it only reads."""
    return Policy(ASK) if tool.origin.startswith("mcp:") and not tool.read_only else Policy(ALLOW)


def policies(registry: Registry, names: list[str], settings: Mapping[str, Any]) -> dict[str, Policy]:
    """The policy of each of the agent's tools the registry has."""
    chosen: Mapping[str, str] = settings.get("tool_policy") or {}
    found: dict[str, Policy] = {}
    for name in names:
        tool = registry.get(name)
        if tool is not None:
            found[name] = parse_policy(chosen[name]) if name in chosen else default_policy(tool)
    return found


def check_policies(given: Mapping[str, str], known: Callable[[str], bool]) -> dict[str, str]:
    """Policies as stored: each tool name known (`known`), each policy valid, written in its short form."""
    checked: dict[str, str] = {}
    for name, value in given.items():
        if not _NAME.match(name) or not known(name):
            raise ValidationError(f"--tool-policy: no tool named {name!r}; see the tools the installation has (`--tools`)")
        checked[name] = parse_policy(value).text()
    return checked


def parse_assignments(items: list[str]) -> dict[str, str | None]:
    """`NAME=POLICY` items from the command line; POLICY `default` (or empty) → None: the agent's choice is dropped."""
    found: dict[str, str | None] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValidationError(f"--tool-policy {item!r}: write NAME=POLICY, e.g. web_fetch=ask or web_fetch=ask:operators")
        value = value.strip()
        found[name.strip()] = None if value in ("", RESET) else parse_policy(value).text()
    return found
