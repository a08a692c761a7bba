"""Declarative tenants: a TOML file (or `[[tenants]]` in konstruct.toml) declares tenants, agents, routes,
budgets, invitations, knowledge sources and MCP servers (konstruct/declare_mcp.py); `plan` shows what would
change, `apply` makes it so through the same services (and audit events) as the commands. Idempotent;
deleting needs `prune`."""

from __future__ import annotations

import contextlib
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from konstruct import declare_mcp
from konstruct.agent import agents as agent_service
from konstruct.channels import connections
from konstruct.channels.registry import validate_escalation_target
from konstruct.config import Settings
from konstruct.db.engine import Database
from konstruct.errors import ConfigError, KonstructError, NotFoundError, ValidationError
from konstruct.knowledge import collect as knowledge_collect
from konstruct.knowledge import dedicated as knowledge_dedicated
from konstruct.knowledge import sources as knowledge_service
from konstruct.llm import budget as budget_service
from konstruct.tenancy import invitations, users
from konstruct.tenancy import tenants as tenant_service


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AgentSpec(_Spec):
    name: str = Field(min_length=1, max_length=100)
    role: str = Field(min_length=1)
    persona: str | None = None
    persona_file: str | None = None
    model: str | None = None
    tools: list[str] = Field(default_factory=list)
    tool_policy: dict[str, str] = Field(default_factory=dict)  # tool → allow | ask | ask:operators | deny
    escalation_rules: list[str] = Field(default_factory=list)
    fallbacks: list[str] = Field(default_factory=list)
    suggested_prompts: list[str] = Field(default_factory=list)  # at most 4 (check_prompts)


class BudgetSpec(_Spec):
    usd: float = Field(ge=0)
    alerts: list[int] = Field(default_factory=lambda: [80])
    action: str = "block"
    downgrade_model: str | None = None


class RouteSpec(_Spec):
    connection: str = Field(min_length=1, description="The Slack team id (or connection id) the channel belongs to.")
    channel: str = Field(min_length=1)
    agent: str = Field(min_length=1)


class InviteSpec(_Spec):
    email: str
    role: str


class KnowledgeSpec(_Spec):
    """A file, folder or URL the tenant's agents answer from (`konstruct knowledge add`); `knowledge sync` refreshes content."""

    path: str | None = None
    url: str | None = None
    agents: list[str] = Field(default_factory=list)
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)

    @property
    def target(self) -> str:
        return self.url or self.path or ""


class TenantSpec(_Spec):
    slug: str
    name: str
    contact_email: str | None = None
    escalation_target: str | None = None
    allowed_hosts: list[str] = Field(default_factory=list)
    agents: list[AgentSpec] = Field(default_factory=list)
    budget: BudgetSpec | None = None
    routes: list[RouteSpec] = Field(default_factory=list)
    invitations: list[InviteSpec] = Field(default_factory=list)
    knowledge: list[KnowledgeSpec] = Field(default_factory=list)
    mcp: list[declare_mcp.McpSpec] = Field(default_factory=list)


class Declaration(_Spec):
    tenants: list[TenantSpec] = Field(default_factory=list)


def load(path: Path | None, settings: Settings) -> Declaration:
    """The declaration from a file, or from konstruct.toml's [[tenants]]. Persona files are read relative to it."""
    if path is None:
        raw: dict[str, Any] = {"tenants": settings.tenants}
        base = settings.base_dir
    else:
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        base = path.parent
    try:
        declaration = Declaration(**raw)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValidationError(f"{path or 'konstruct.toml'}: {where}: {first['msg']}") from None
    slugs = [t.slug for t in declaration.tenants]
    if len(set(slugs)) != len(slugs):
        raise ValidationError("a tenant is declared twice: each slug once")
    for tenant in declaration.tenants:
        names = [a.name for a in tenant.agents]
        if len(set(names)) != len(names):
            raise ValidationError(f"tenant {tenant.slug}: an agent is declared twice")
        for agent in tenant.agents:
            if agent.persona_file:
                file = Path(agent.persona_file).expanduser()
                file = file if file.is_absolute() else base / file
                try:
                    agent.persona = file.read_text().strip()
                except OSError as exc:
                    raise ConfigError(f"tenant {tenant.slug}, agent {agent.name}: cannot read {file}: {exc.strerror}") from None
            if not agent.persona:
                raise ValidationError(f"tenant {tenant.slug}, agent {agent.name}: give persona or persona_file")
            agent_service.check_tools(agent.tools, [m.name for m in tenant.mcp])
            agent.tool_policy = agent_service.check_tool_policy_form(agent.tool_policy)
            agent_service.check_rules(agent.escalation_rules)
            agent_service.check_prompts(agent.suggested_prompts)
        if tenant.escalation_target:
            validate_escalation_target(tenant.escalation_target)
        for invite in tenant.invitations:
            users.check_email(invite.email)
            users.check_role(invite.role)
        _check_knowledge(tenant, base)
        declare_mcp.check(tenant.slug, tenant.mcp, set(names))
    return declaration


def _check_knowledge(tenant: TenantSpec, base: Path) -> None:
    """Each entry names a path or a URL (not both); paths become absolute (relative to the declaring file)."""
    for entry in tenant.knowledge:
        if bool(entry.path) == bool(entry.url):
            raise ValidationError(f"tenant {tenant.slug}: each knowledge entry needs a path or a url (one of them)")
        if entry.url:
            entry.url = knowledge_collect.normalise_url(entry.url)
        elif entry.path:
            path = Path(entry.path).expanduser()
            entry.path = str(path if path.is_absolute() else base / path)
        unknown = set(entry.agents) - {a.name for a in tenant.agents}
        if unknown and not tenant.agents:
            continue  # the agents may exist already; apply checks them
        if unknown:
            raise ValidationError(f"tenant {tenant.slug}: knowledge {entry.target}: no agent {sorted(unknown)[0]!r} is declared")


@dataclass
class Change:
    action: str  # create | change | delete
    kind: str  # tenant | agent | budget | route | invitation | knowledge | mcp
    tenant: str
    name: str
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # what changes: (now, then)
    spec: Any = None

    def as_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "kind": self.kind,
            "tenant": self.tenant,
            "name": self.name,
            "fields": {k: {"now": _plain(v[0]), "then": _plain(v[1])} for k, v in self.fields.items()},
        }


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, Decimal) else value


def _diff(now: dict[str, Any], then: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {key: (now.get(key), value) for key, value in then.items() if now.get(key) != value}


async def plan(db: Database, settings: Settings, declaration: Declaration, *, prune: bool) -> list[Change]:
    """What apply would do, in order. Nothing is written."""
    changes: list[Change] = []
    existing = {t.slug: t for t in await tenant_service.directory(db)}
    for spec in declaration.tenants:
        tenant = existing.get(spec.slug)
        wanted = {"name": spec.name, "contact_email": spec.contact_email, "escalation_target": spec.escalation_target,
                  "allowed_hosts": sorted(spec.allowed_hosts)}  # fmt: skip
        if tenant is None:
            changes.append(Change("create", "tenant", spec.slug, spec.slug, _diff({}, wanted), spec))
            changes += [Change("create", "agent", spec.slug, a.name, spec=a) for a in spec.agents]
            if spec.budget:
                changes.append(Change("create", "budget", spec.slug, "monthly", spec=spec.budget))
            changes += [
                Change("create", "route", spec.slug, f"{r.connection}/{r.channel}", {"agent": (None, r.agent)}, r) for r in spec.routes
            ]
            changes += [Change("create", "invitation", spec.slug, i.email, {"role": (None, i.role)}, i) for i in spec.invitations]
            changes += [Change("create", "knowledge", spec.slug, k.target, _knowledge_fields(k, set(), {}), k) for k in spec.knowledge]
            changes += await _mcp_changes(db, settings, None, spec, prune)
            continue
        changes += await _tenant_changes(db, settings, tenant, spec, wanted, prune)
    if prune:
        declared = {t.slug for t in declaration.tenants}
        changes += [Change("delete", "tenant", slug, slug) for slug in sorted(existing) if slug not in declared]
    return changes


async def _tenant_changes(
    db: Database, settings: Settings, tenant: tenant_service.TenantInfo, spec: TenantSpec, wanted: dict[str, Any], prune: bool
) -> list[Change]:
    changes: list[Change] = []
    current = await tenant_service.tenant_settings(db, tenant)
    now = {"name": tenant.name, **current, "allowed_hosts": sorted(current["allowed_hosts"])}
    if fields := _diff(now, wanted):
        changes.append(Change("change", "tenant", spec.slug, spec.slug, fields, spec))
    agents = {a.name: a for a in await agent_service.list_agents(db, tenant)}
    for a in spec.agents:
        agent = agents.get(a.name)
        then = {"role": a.role, "persona": a.persona, "model": a.model, "tools": a.tools, "tool_policy": a.tool_policy,
                "escalation_rules": a.escalation_rules,
                "fallbacks": a.fallbacks, "suggested_prompts": [p.strip() for p in a.suggested_prompts]}  # fmt: skip
        if agent is None:
            changes.append(Change("create", "agent", spec.slug, a.name, spec=a))
            continue
        have = {"role": agent.role, "persona": agent.persona, "model": agent.model, "tools": agent.settings.get("tools") or [],
                "tool_policy": agent.settings.get("tool_policy") or {},
                "escalation_rules": agent.settings.get("escalation_rules") or [], "fallbacks": agent.settings.get("fallbacks") or [],
                "suggested_prompts": list(agent.suggested_prompts)}  # fmt: skip
        if fields := _diff(have, then):
            changes.append(Change("change", "agent", spec.slug, a.name, fields, a))
    if prune:
        declared = {a.name for a in spec.agents}
        changes += [Change("delete", "agent", spec.slug, name) for name in sorted(agents) if name not in declared]
    info = await budget_service.get_budget(db, tenant, settings)
    if spec.budget is not None:
        b = spec.budget
        budget_then: dict[str, Any] = {
            "usd": Decimal(str(b.usd)),
            "alerts": sorted(set(b.alerts)),
            "action": b.action,
            "downgrade_model": b.downgrade_model,
        }
        budget_now: dict[str, Any] = {
            "usd": info.own_usd,
            "alerts": info.alerts,
            "action": info.action,
            "downgrade_model": info.downgrade_model,
        }
        if info.own_usd is None:
            changes.append(Change("create", "budget", spec.slug, "monthly", _diff({}, budget_then), b))
        elif fields := _diff(budget_now, budget_then):
            changes.append(Change("change", "budget", spec.slug, "monthly", fields, b))
    elif prune and info.own_usd is not None:
        changes.append(Change("delete", "budget", spec.slug, "monthly"))
    changes += await _route_changes(db, tenant, spec, prune)
    members = {m.email for m in await users.members(db, tenant)}
    pending = {i.email: i for i in await invitations.list_invitations(db, tenant) if i.state == "pending"}
    for i in spec.invitations:
        email = i.email.strip().lower()
        if email not in members and (email not in pending or pending[email].role != i.role):
            changes.append(Change("create", "invitation", spec.slug, email, {"role": (None, i.role)}, i))
    if prune:
        declared_emails = {i.email.strip().lower() for i in spec.invitations}
        changes += [Change("delete", "invitation", spec.slug, email) for email in sorted(pending) if email not in declared_emails]
    changes += await _knowledge_changes(db, tenant, spec, prune)
    changes += await _mcp_changes(db, settings, tenant, spec, prune)
    return changes


async def _mcp_changes(
    db: Database, settings: Settings, tenant: tenant_service.TenantInfo | None, spec: TenantSpec, prune: bool
) -> list[Change]:
    planned = await declare_mcp.changes(db, settings, tenant, spec.mcp, prune=prune)
    return [Change(action, "mcp", spec.slug, name, fields, entry) for action, name, fields, entry in planned]


def _declared_uris(entry: KnowledgeSpec) -> list[str]:
    """The sources an entry stands for: its URL, or the files of its path (not read, only listed)."""
    if entry.url:
        return [entry.url]
    found = knowledge_collect.collect([entry.target], include=entry.include, exclude=entry.exclude, read=False)
    return [item["uri"] for item in found.items]


def _knowledge_fields(entry: KnowledgeSpec, stored: set[str], agents: dict[str, list[str]]) -> dict[str, tuple[Any, Any]]:
    """What adding the entry changes: sources it would add, and those whose agents change (names, sorted)."""
    uris = _declared_uris(entry)
    new = [u for u in uris if u not in stored]
    fields: dict[str, tuple[Any, Any]] = {"sources": (None, len(new))} if new else {}
    moved = [u for u in uris if u in stored and agents.get(u, []) != sorted(entry.agents)]
    if moved:
        fields["agents"] = (agents[moved[0]], sorted(entry.agents))
    return fields


async def _knowledge_changes(db: Database, tenant: tenant_service.TenantInfo, spec: TenantSpec, prune: bool) -> list[Change]:
    sources = await knowledge_service.list_sources(db, tenant)
    names = {a.id: a.name for a in await agent_service.list_agents(db, tenant)}
    agents = {s.uri: sorted(names.get(a, str(a)) for a in s.agent_ids) for s in sources}
    changes = []
    for entry in spec.knowledge:
        if fields := _knowledge_fields(entry, set(agents), agents):
            changes.append(Change("create" if "sources" in fields else "change", "knowledge", spec.slug, entry.target, fields, entry))
    if prune:
        declared = {uri for entry in spec.knowledge for uri in _declared_uris(entry)}
        changes += [Change("delete", "knowledge", spec.slug, s.uri) for s in sources if s.uri not in declared]
    return changes


async def _route_changes(db: Database, tenant: tenant_service.TenantInfo, spec: TenantSpec, prune: bool) -> list[Change]:
    changes: list[Change] = []
    existing: dict[tuple[str, str], str] = {}
    for connection in await connections.list_connections(db, tenant):
        for channel, agent in await connections.list_routes(db, tenant, connection):
            existing[(connection.external_id, channel)] = agent
    for r in spec.routes:
        have = existing.get((r.connection, r.channel))
        if have != r.agent:
            changes.append(Change("create" if have is None else "change", "route", spec.slug, f"{r.connection}/{r.channel}",
                                  {"agent": (have, r.agent)}, r))  # fmt: skip
    if prune:
        declared = {(r.connection, r.channel) for r in spec.routes}
        changes += [Change("delete", "route", spec.slug, f"{c}/{ch}") for (c, ch) in sorted(existing) if (c, ch) not in declared]
    return changes


Made = tuple[Any, invitations.InvitationInfo, str]  # (tenant id, invitation, token)
Queued = tuple[tenant_service.TenantInfo, knowledge_service.JobInfo]  # a knowledge job written, to queue


async def _apply_knowledge(db: Database, change: Change, actor: str, jobs: list[Queued]) -> None:
    tenant = await tenant_service.get_tenant(db, change.tenant)
    if change.action == "delete":
        await knowledge_service.remove_source(db, tenant, change.name, actor=actor)
        return
    entry: KnowledgeSpec = change.spec
    ids = await knowledge_service.agent_ids(db, tenant, entry.agents)
    found = knowledge_collect.collect([entry.target], agent_ids=ids, include=entry.include, exclude=entry.exclude)
    jobs += [(tenant, job) for job in await knowledge_service.create_jobs(db, tenant, "add", found, actor=actor)]


async def apply(db: Database, settings: Settings, changes: list[Change], *, actor: str, jobs: list[Queued] | None = None) -> list[Made]:
    """Make the planned changes, in order, through the services (each audits itself). Returns the invitations
    made, with their tokens (emailing them is the caller's choice); the knowledge jobs written go into ``jobs``
    (queueing them for a worker is the caller's too). Agents are created in order (an MCP server may name them)
    and get their settings last (their tools may name an MCP server made in between)."""
    tokens: list[Made] = []
    for change in changes:
        with _blamed(change):
            if change.kind == "knowledge":
                await _apply_knowledge(db, change, actor, jobs if jobs is not None else [])
            elif change.kind == "mcp":
                tenant = await tenant_service.get_tenant(db, change.tenant)
                await declare_mcp.apply(db, settings, tenant, change.action, change.name, change.spec, actor=actor)
            else:
                await _apply_one(db, settings, change, actor, tokens)
    for change in changes:
        if change.kind == "agent" and change.action != "delete":
            with _blamed(change):
                await _agent_settings(db, change, actor)
    return tokens


@contextlib.contextmanager
def _blamed(change: Change) -> Iterator[None]:
    try:
        yield
    except KonstructError as exc:
        raise type(exc)(f"{change.action} {change.kind} {change.tenant}/{change.name}: {exc}") from None


async def _agent_settings(db: Database, change: Change, actor: str) -> None:
    a: AgentSpec = change.spec
    tenant = await tenant_service.get_tenant(db, change.tenant)
    await agent_service.update_agent(
        db, tenant, a.name, actor=actor,
        changes={"role": a.role, "persona": a.persona, "model": a.model, "tools": a.tools, "tool_policy": a.tool_policy,
                 "escalation_rules": a.escalation_rules, "fallbacks": a.fallbacks, "suggested_prompts": a.suggested_prompts},
    )  # fmt: skip


async def _apply_one(db: Database, settings: Settings, change: Change, actor: str, tokens: list[Made]) -> None:
    if change.kind == "tenant" and change.action == "delete":
        gone = await tenant_service.delete_tenant(db, change.tenant, actor=actor)
        await knowledge_dedicated.deleted_tenant(db.urls, gone.id)
        return
    if change.kind == "tenant" and change.action == "create":
        spec: TenantSpec = change.spec
        await tenant_service.create_tenant(db, name=spec.name, slug=spec.slug, actor=actor)
    tenant = await tenant_service.get_tenant(db, change.tenant)
    if change.kind == "tenant":
        spec = change.spec
        if spec.contact_email or spec.escalation_target or spec.allowed_hosts or change.action == "change":
            await tenant_service.update_settings(
                db, tenant, escalation_target=spec.escalation_target or "", allowed_hosts=spec.allowed_hosts,
                contact_email=spec.contact_email or "", actor=actor, name=spec.name,
            )  # fmt: skip
    elif change.kind == "agent":
        if change.action == "delete":
            await agent_service.delete_agent(db, tenant, change.name, actor=actor)
            return
        a: AgentSpec = change.spec
        if change.action == "create":  # its settings: _agent_settings, once the MCP servers are there
            await agent_service.create_agent(db, tenant, name=a.name, role=a.role, persona=a.persona or "", model=a.model, actor=actor)
    elif change.kind == "budget":
        if change.action == "delete":
            await budget_service.clear_budget(db, tenant, actor=actor)
            return
        b: BudgetSpec = change.spec
        await budget_service.set_budget(db, tenant, usd=b.usd, alerts=b.alerts, action=b.action, downgrade_model=b.downgrade_model,
                                        settings=settings, actor=actor)  # fmt: skip
    elif change.kind == "route":
        connection_ref, channel = change.name.split("/", 1)
        try:
            connection = await connections.get_connection(db, tenant, connection_ref)
        except NotFoundError:
            raise NotFoundError(f"no channel connection {connection_ref!r}: connect it first (`konstruct channel connect`)") from None
        if change.action == "delete":
            await connections.remove_route(db, tenant, connection, channel, actor=actor)
        else:
            await connections.set_route(db, tenant, connection, channel, change.spec.agent, actor=actor)
    elif change.kind == "invitation":
        if change.action == "delete":
            await invitations.revoke(db, tenant, change.name, actor=actor)
            return
        i: InviteSpec = change.spec
        info, token = await invitations.create(db, tenant, email=i.email, role=i.role, actor=actor)
        tokens.append((tenant.id, info, token))
