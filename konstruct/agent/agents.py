"""Agents: a name, a role, a persona and a model, belonging to one tenant."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from konstruct import audit
from konstruct.db.engine import Database
from konstruct.db.models import Agent
from konstruct.errors import ConflictError, ValidationError
from konstruct.tenancy.tenants import TenantInfo, agent_not_found

MAX_PERSONA = 20_000
MAX_PROMPTS = 4  # Slack shows at most four suggested prompts
MAX_PROMPT = 2_000  # characters of one suggested prompt (what it sends when clicked)


@dataclass(frozen=True)
class AgentInfo:
    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    role: str
    persona: str
    model: str | None
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    suggested_prompts: tuple[str, ...] = ()  # offered when a person opens the agent's Messages tab in Slack

    @classmethod
    def from_row(cls, row: Agent) -> AgentInfo:
        return cls(row.id, row.tenant_id, row.name, row.role, row.persona, row.model, dict(row.settings), row.created_at, row.updated_at,
                   tuple(row.suggested_prompts or ()))  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "tenant_id": str(self.tenant_id),
            "name": self.name,
            "role": self.role,
            "persona": self.persona,
            "model": self.model,
            "settings": self.settings,
            "suggested_prompts": list(self.suggested_prompts),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


def _check(name: str | None = None, role: str | None = None, persona: str | None = None, model: str | None = None) -> None:
    if name is not None and not (1 <= len(name.strip()) <= 100):
        raise ValidationError("an agent name must be 1 to 100 characters")
    if role is not None and not role.strip():
        raise ValidationError("an agent needs a role, e.g. --role 'Support specialist'")
    if persona is not None and not persona.strip():
        raise ValidationError("an agent needs a persona: --persona TEXT or --persona-file FILE")
    if persona is not None and len(persona) > MAX_PERSONA:
        raise ValidationError(f"the persona is {len(persona)} characters; the limit is {MAX_PERSONA}")
    if model is not None and not model.strip():
        raise ValidationError("--model must not be empty (leave it out to use llm.model from the config)")


def check_prompts(prompts: list[str]) -> list[str]:
    """Suggested prompts as Slack takes them: at most four, none empty or too long (surrounding spaces dropped)."""
    cleaned = [p.strip() for p in prompts]
    if len(cleaned) > MAX_PROMPTS:
        raise ValidationError(f"{len(cleaned)} suggested prompts: Slack shows at most {MAX_PROMPTS}")
    for prompt in cleaned:
        if not prompt:
            raise ValidationError("a suggested prompt must not be empty (use --clear-suggested-prompts to remove them all)")
        if len(prompt) > MAX_PROMPT:
            raise ValidationError(f"a suggested prompt is {len(prompt)} characters; the limit is {MAX_PROMPT}")
    return cleaned


async def create_agent(
    db: Database,
    tenant: TenantInfo,
    *,
    name: str,
    role: str,
    persona: str,
    model: str | None,
    actor: str,
    suggested_prompts: list[str] | None = None,
) -> AgentInfo:
    _check(name, role, persona, model)
    prompts = check_prompts(suggested_prompts or [])
    try:
        async with db.tenant(tenant_id=tenant.id) as session:
            row = await session.scalar(
                insert(Agent)
                .values(
                    tenant_id=tenant.id,
                    name=name.strip(),
                    role=role.strip(),
                    persona=persona.strip(),
                    model=model,
                    suggested_prompts=prompts,
                )
                .returning(Agent)
            )
            assert row is not None
            await audit.record(
                session,
                tenant_id=tenant.id,
                actor=actor,
                action="agent.created",
                target=row.name,
                detail={"role": row.role, "model": model, **({"suggested_prompts": prompts} if prompts else {})},
            )
            return AgentInfo.from_row(row)
    except IntegrityError:
        raise ConflictError(f"tenant {tenant.slug!r} already has an agent named {name!r}") from None


async def list_agents(db: Database, tenant: TenantInfo) -> list[AgentInfo]:
    async with db.tenant(tenant_id=tenant.id) as session:
        rows = await session.scalars(select(Agent).order_by(Agent.name))
        return [AgentInfo.from_row(row) for row in rows]


async def get_agent(db: Database, tenant: TenantInfo, name: str) -> AgentInfo:
    async with db.tenant(tenant_id=tenant.id) as session:
        row = await session.scalar(select(Agent).where(Agent.name == name))
        if row is None:
            raise agent_not_found(tenant, name, list(await session.scalars(select(Agent.name))))
        return AgentInfo.from_row(row)


SETTING_KEYS = ("tools", "escalation_rules", "fallbacks", "tool_policy")


def check_tools(names: list[str], servers: Sequence[str] = ()) -> list[str]:
    """Tool names an agent may enable: known to this installation (built in or from a plugin), or naming one of these
    MCP `servers` (`shop`, `shop__*`, `shop__lookup_order`; update_agent checks MCP names against the tenant's servers)."""
    from konstruct.agent.mcp_servers import server_of
    from konstruct.agent.tools.registry import default_registry

    registry = default_registry()
    unknown = [name for name in registry.validate_names(names) if server_of(name) not in servers]
    if unknown:
        raise ValidationError(f"unknown tool(s) {', '.join(unknown)}: available are {', '.join(registry.names())}")
    return list(dict.fromkeys(names))


async def _checked_tools(db: Database, tenant: TenantInfo, agent: str, names: list[str]) -> list[str]:
    """Built-in and plugin tools, and the tenant's MCP servers' (whole servers or single tools) serving this agent."""
    from konstruct.agent import mcp_servers
    from konstruct.agent.tools.registry import default_registry

    names = list(dict.fromkeys(names))
    unknown = default_registry().validate_names(names)
    if unknown:
        await mcp_servers.check_tool_names(db, tenant, agent, unknown)
    return names


def check_tool_policy_form(given: dict[str, str]) -> dict[str, str]:
    """Approval policies (tool name → allow | ask | ask:operators | deny), each valid, for a built-in or plugin tool
    or an MCP server's (SERVER__TOOL: whether the tenant's server has it is checked against it, check_tool_policy)."""
    from konstruct.agent.mcp_servers import SEPARATOR
    from konstruct.agent.tools.policy import check_policies
    from konstruct.agent.tools.registry import default_registry

    registry = default_registry()
    return check_policies(given, lambda name: registry.get(name) is not None or SEPARATOR in name)


async def check_tool_policy(db: Database, tenant: TenantInfo, agent: str, given: dict[str, str]) -> dict[str, str]:
    """check_tool_policy_form, and each MCP tool named is one of a tenant's server serving this agent."""
    from konstruct.agent import mcp_servers
    from konstruct.agent.tools.registry import default_registry

    checked = check_tool_policy_form(given)
    registry = default_registry()
    provided = [name for name in checked if registry.get(name) is None]
    if provided:
        await mcp_servers.check_tool_names(db, tenant, agent, provided)
    return checked


def check_rules(rules: list[str]) -> list[str]:
    """Escalation rules, each parsed now so a bad one is refused with the position of the mistake."""
    from konstruct.agent.rules import RuleError, parse

    for text in rules:
        try:
            parse(text)
        except RuleError as exc:
            raise ValidationError(f"escalation rule {text!r}: {exc}") from None
    return rules


async def update_agent(db: Database, tenant: TenantInfo, name: str, *, changes: dict[str, Any], actor: str) -> AgentInfo:
    changes = {key: value for key, value in changes.items() if value is not None}
    if not changes:
        raise ValidationError(
            "nothing to change: pass at least one of --name, --role, --persona, --persona-file, --model, --fallbacks, --tools, "
            "--tool-policy, --escalation-rule, --suggested-prompt, --clear-suggested-prompts"
        )
    _check(**{key: changes.get(key) for key in ("name", "role", "persona", "model")})
    if "tools" in changes:
        changes["tools"] = await _checked_tools(db, tenant, name, changes["tools"])
    if "tool_policy" in changes:
        changes["tool_policy"] = await check_tool_policy(db, tenant, name, changes["tool_policy"])
    if "escalation_rules" in changes:
        changes["escalation_rules"] = check_rules(changes["escalation_rules"])
    if "suggested_prompts" in changes:
        changes["suggested_prompts"] = check_prompts(changes["suggested_prompts"])
    if "fallbacks" in changes:
        for fallback in changes["fallbacks"]:
            if not fallback or len(fallback) > 200 or any(c.isspace() for c in fallback):
                raise ValidationError(f"--fallbacks: {fallback!r} is not a model name, e.g. anthropic/claude-3-5-haiku-20241022")
    agent = await get_agent(db, tenant, name)
    if "tool_policy_updates" in changes:  # `--tool-policy NAME=…`: some tools' policies change, None drops one
        updates = changes.pop("tool_policy_updates")
        merged = {**(agent.settings.get("tool_policy") or {}), **updates}
        changes["tool_policy"] = await check_tool_policy(
            db, tenant, name, {key: value for key, value in merged.items() if value is not None}
        )
    new_settings = {**agent.settings, **{key: changes.pop(key) for key in SETTING_KEYS if key in changes}}
    try:
        async with db.tenant(tenant_id=tenant.id) as session:
            row = await session.scalar(
                update(Agent).where(Agent.id == agent.id).values(**changes, settings=new_settings, updated_at=func.now()).returning(Agent)
            )
            assert row is not None
            detail = {key: (value if key != "persona" else f"{len(value)} characters") for key, value in changes.items()}
            detail.update({key: new_settings[key] for key in SETTING_KEYS if new_settings.get(key) != agent.settings.get(key)})
            await audit.record(session, tenant_id=tenant.id, actor=actor, action="agent.updated", target=name, detail=detail)
            return AgentInfo.from_row(row)
    except IntegrityError:
        raise ConflictError(f"tenant {tenant.slug!r} already has an agent named {changes.get('name')!r}") from None


async def delete_agent(db: Database, tenant: TenantInfo, name: str, *, actor: str) -> AgentInfo:
    agent = await get_agent(db, tenant, name)
    async with db.tenant(tenant_id=tenant.id) as session:
        await session.execute(delete(Agent).where(Agent.id == agent.id))
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="agent.deleted", target=name)
    return agent
