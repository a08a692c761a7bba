"""One Settings object: konstruct.toml, overridden by KONSTRUCT_* environment variables.

Only this module reads the environment. Values in the file may be references, ``{"$env" = "NAME"}`` or
``{"$file" = "path"}``. A secret setting's reference is read each time the secret is used, so a command that never
needs it runs without it; any other setting's reference is read when the settings are loaded.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pydantic
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from konstruct.errors import ConfigError

CONFIG_FILENAME = "konstruct.toml"
ENV_PREFIX = "KONSTRUCT_"
CONFIG_ENV = "KONSTRUCT_CONFIG"
DATABASE_URL_ENV = "KONSTRUCT_DATABASE__URL"  # `up` hands its children the embedded server's URL through it
SECRET_KEY_ENV = "KONSTRUCT_SECRET_KEY"


class SecretReference(SecretStr):
    """A secret setting written as {"$env" = "NAME"} or {"$file" = "path"}: read each time it is used, so only
    what needs the secret fails when it cannot be read, with one line naming the setting and the variable or file."""

    def __init__(self, kind: str, target: str, *, setting: str, base: Path) -> None:
        super().__init__("")
        self.kind, self.target, self.setting, self.base = kind, target, setting, base

    def get_secret_value(self) -> str:
        if self.kind == "$env":
            value = os.environ.get(self.target)
            if value is None:
                raise ConfigError(
                    f"{self.setting}: environment variable {self.target} is not set; "
                    "export it in this shell and in the one that runs `konstruct up`, or change the setting"
                )
            return value
        try:
            return self.path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{self.setting}: cannot read {self.path}: {exc.strerror}") from None

    @property
    def path(self) -> Path:
        """The file a $file reference names, relative to the config file's folder."""
        file = Path(self.target).expanduser()
        return file if file.is_absolute() else self.base / file

    @property
    def available(self) -> bool:
        """Whether the variable is set or the file readable (without reading the value anywhere it shows)."""
        return self.target in os.environ if self.kind == "$env" else os.access(self.path, os.R_OK) and self.path.is_file()

    def shown(self) -> dict[str, str]:
        """The reference as config show prints it: where the value comes from and whether it is there."""
        return {self.kind: self.target, "status": "set" if self.available else "missing"}

    def __bool__(self) -> bool:
        return True  # a reference is a given setting, even before its value can be read

    def __len__(self) -> int:
        return len(self.get_secret_value())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretReference) and (self.kind, self.target, self.path) == (other.kind, other.target, other.path)

    def __hash__(self) -> int:
        return hash((self.kind, self.target))

    def _display(self) -> str:
        return f'{{"{self.kind}" = "{self.target}"}}'


def secret_given(secret: SecretStr | None) -> bool:
    """Whether a secret setting is set: a reference counts without being read (using it says what is missing),
    a literal when it is not empty."""
    if secret is None:
        return False
    if isinstance(secret, SecretReference) and not secret.available:
        return True
    return bool(secret.get_secret_value())


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSettings(_Section):
    dir: Path = Field(Path(".konstruct"), description="Data directory (embedded database, queue, keys); relative to the config file.")


class DatabaseSettings(_Section):
    url: SecretStr | None = Field(
        None, description="PostgreSQL URL of the owner role (runs migrations). Empty: an embedded PostgreSQL under the data directory."
    )
    app_password: SecretStr | None = Field(
        None, description="Password of the konstruct_app role. Empty: generated once and kept in the data directory."
    )
    pool_size: int = Field(
        10, ge=1, le=200, description="Most connections one process holds as the app role: opened as needed, then kept (more wait)."
    )
    connect_timeout: float = Field(
        5.0, gt=0, le=120, description="Seconds to wait for a new database connection before the database counts as down."
    )


class QueueSettings(_Section):
    url: str | None = Field(
        None,
        description="Task queue: empty for huey's Postgres storage in Konstruct's own database, 'sqlite:///path' or 'redis://host:6379/0'.",
    )
    name: str = Field("konstruct", description="Queue name (lets several installations share one Redis).")


class GatewaySettings(_Section):
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8080, ge=1, le=65535, description="Port the gateway listens on.")
    public_url: str = Field(
        "", description="URL at which Slack, Meta and people reach the gateway. Empty: http://HOST:PORT from host and port above."
    )
    workers: int = Field(1, ge=1, le=64, description="Gateway processes sharing the port (each one event loop).")
    max_header_bytes: int = Field(
        65536, ge=4096, le=1_048_576, description="Largest request line plus headers accepted (bigger: 431, connection closed)."
    )
    read_timeout: float = Field(
        15.0, gt=0, le=600, description="Seconds a client has to send a request's headers, and at most between two pieces of a body (408)."
    )
    keep_alive: int = Field(5, ge=1, le=600, description="Seconds an idle keep-alive connection stays open.")
    max_connections: int = Field(
        2048, ge=16, le=1_000_000, description="Connections and requests one gateway process holds at once (beyond: 503 at once)."
    )
    cache_ttl: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Seconds a gateway trusts a cached connection look-up (team or number → tenant, app secrets): how soon it sees a disconnect.",
    )

    @model_validator(mode="after")
    def _public_url_follows_the_address(self) -> GatewaySettings:
        # Unless set, links point at the address the gateway really listens on (a changed port included).
        if not self.public_url.strip():
            self.public_url = f"http://{_link_host(self.host)}:{self.port}"
        return self


def _link_host(host: str) -> str:
    """The host part of a link to a server listening on host: a wildcard address becomes loopback."""
    host = host.strip().strip("[]") or "127.0.0.1"
    if host in ("0.0.0.0", "*"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class LLMSettings(_Section):
    model: str = Field("openai/gpt-4o-mini", description="Default model, in litellm's provider/model form.")
    api_base: str | None = Field(None, description="Base URL of the provider's API (an OpenAI-compatible server, a proxy).")
    api_key: SecretStr | None = Field(None, description='Platform API key used when a tenant brings none; use a {"$env" = ...} reference.')
    timeout: float = Field(60.0, gt=0, le=600, description="Seconds one LLM call may take.")
    retries: int = Field(2, ge=0, le=10, description="Retries of a failed LLM call before the message is marked failed.")
    max_tokens: int = Field(1024, ge=16, le=200_000, description="Most tokens one answer may have (also bounds the budget estimate).")
    fallbacks: list[str] = Field(
        default_factory=list, description="Models tried in order when the model fails (an agent's own list, if set, wins)."
    )
    provider_keys: dict[str, SecretStr] = Field(
        default_factory=dict,
        description='Platform keys per provider, used when a tenant brings none: { "anthropic" = { "$env" = "ANTHROPIC_API_KEY" } }.',
    )
    cooldown: float = Field(0.0, ge=0, le=3600, description="Seconds a failing model is skipped after failures (0: always try it).")


class SlackSettings(_Section):
    client_id: str | None = Field(None, description="Client id of your distributed Slack app (multi-workspace OAuth install).")
    client_secret: SecretStr | None = Field(None, description='Client secret of that app; use a {"$env" = ...} reference.')
    signing_secret: SecretStr | None = Field(None, description="Signing secret of that app; single-workspace connections bring their own.")
    scopes: str | None = Field(
        None, description="Bot scopes requested on install (default: the ones the code uses, as `konstruct channel slack-manifest` lists)."
    )
    api_url: str = Field("https://slack.com/api/", description="Slack Web API base URL (a test fake points elsewhere).")
    authorize_url: str = Field("https://slack.com/oauth/v2/authorize", description="Slack's OAuth v2 authorize page.")
    install_link_ttl: float = Field(86400.0, gt=0, description="Seconds an install link stays valid.")
    placeholder: str = Field("_thinking…_", description="Posted at once while the agent works, then replaced by the answer.")
    stream: bool = Field(
        True, description="Stream answers into Slack threads (DMs and channel mentions, chat.startStream) as the model writes them."
    )
    stream_interval: float = Field(
        0.4, ge=0.05, le=10, description="Seconds between two appends to a streamed answer: text is buffered in between."
    )
    max_image_bytes: int = Field(10_000_000, gt=0, description="Larger image attachments are described to the model, not sent.")


class WhatsAppSettings(_Section):
    graph_url: str = Field("https://graph.facebook.com", description="Meta Graph API origin (a test fake points elsewhere).")
    api_version: str = Field("v23.0", pattern=r"^v\d+\.\d+$", description="Graph API version in request paths.")
    verify_token: SecretStr | None = Field(
        None, description="Webhook verify token for the handshake; each connected number may also bring its own."
    )
    template_name: str | None = Field(
        None,
        description="Approved template sent when a reply falls outside the 24-hour window. Empty: such replies are recorded as failed.",
    )
    template_language: str = Field("en_US", description="Language code of that template.")
    template_text: str | None = Field(
        None,
        description="What that template says (its approved body), recorded in the conversation as what was sent. Empty: its name.",
    )
    max_media_bytes: int = Field(16_000_000, gt=0, description="Larger media are not downloaded; the model is told they could not be read.")
    number_rate: float = Field(80.0, gt=0, description="Messages per second sent from one business number (Meta's default is 80).")
    recipient_interval: float = Field(6.0, ge=0, description="Seconds between two messages to the same person (Meta's pair rate limit).")
    send_retries: int = Field(
        4, ge=0, le=20, description="Retries of a send that failed for a reason retrying helps (rate limits, outages)."
    )
    retry_backoff: float = Field(2.0, gt=0, description="Seconds before the first retry; doubled on each further one.")
    timeout: float = Field(20.0, gt=0, description="Seconds allowed for one Graph API request.")


class AgentSettings(_Section):
    tool_steps: int = Field(5, ge=1, le=50, description="Model turns with tool calls allowed for one answer.")
    tool_seconds: float = Field(60.0, gt=0, le=600, description="Time allowed for all tool calls of one answer.")
    web_fetch_private: bool = Field(False, description="Let web_fetch reach private, loopback and link-local addresses (tests, labs).")
    web_fetch_private_networks: list[str] = Field(
        default_factory=list,
        description='Private networks web_fetch may reach with web_fetch_private off (e.g. ["10.20.0.0/24"]); every other stays refused.',
    )
    web_fetch_seconds: float = Field(10.0, gt=0, le=300, description="Time allowed for one web_fetch, its redirects included.")
    web_fetch_ca_file: str | None = Field(
        None, description="A PEM file of extra certificate authorities web_fetch trusts (an internal CA); the usual ones stay trusted."
    )

    @pydantic.field_validator("web_fetch_private_networks")
    @classmethod
    def _private_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return value

    tenant_api_base_private: bool = Field(
        False, description="Let a tenant's own LLM key name an api_base on a private, loopback or link-local address (tests, labs)."
    )
    handoff: str = Field(
        "I'm handing this conversation to a human colleague, who will take over from here.",
        description="Said to the person when the conversation is escalated to a human.",
    )
    history_messages: int = Field(20, ge=1, le=500, description="At most this many recent messages of a conversation go into the prompt.")
    history_tokens: int = Field(
        3000,
        ge=100,
        le=200_000,
        description="Token budget for those messages; older turns are summarised by the model and the summary kept.",
    )
    apology: str = Field(
        "Sorry, I couldn't answer just now. Please try again in a moment.",
        description="Sent to the person when the agent cannot answer.",
    )


class EscalationSettings(_Section):
    answer_within: float = Field(
        15.0,
        gt=0,
        le=10080,
        description="Minutes a human has to take or answer an escalated conversation before the person is told and the desk reminded.",
    )
    waiting_message: str = Field(
        "Thanks for waiting: a colleague will answer you here as soon as they can, usually within a few hours.",
        description="Sent to the person when nobody took or answered their escalated conversation within answer_within.",
    )
    check_interval: float = Field(
        15.0,
        gt=0,
        le=3600,
        description="Seconds between a worker's checks for overdue escalations and new delivery statuses to show the desk.",
    )
    last_turns: int = Field(8, ge=0, le=50, description="Turns of the conversation so far quoted in a new desk thread.")


class ApprovalSettings(_Section):
    expire_after: float = Field(
        60.0, gt=0, le=43_200, description="Minutes a tool call waits for approval; then it is denied and the model is told."
    )
    check_interval: float = Field(15.0, gt=0, le=3600, description="Seconds between the worker's looks for approvals past their expiry.")


class MemorySettings(_Section):
    enabled: bool = Field(True, description="Long-term memory: remember what people say, recall it in later conversations.")
    recall: int = Field(5, ge=1, le=50, description="Memories of the person recalled into the prompt before each answer.")
    min_words: int = Field(3, ge=1, le=100, description="Shorter messages (and questions) are not worth remembering.")


class KnowledgeSettings(_Section):
    enabled: bool = Field(True, description="Retrieve from the tenant's documents (`konstruct knowledge add`) before each answer.")
    passages: int = Field(5, ge=1, le=20, description="Passages put into the prompt before each answer (and knowledge_search's default).")
    candidates: int = Field(40, ge=5, le=500, description="Candidates each side (vector, full text) gives the fusion of the two rankings.")
    exact_below: int = Field(
        2_000,
        ge=0,
        description="An agent seeing fewer chunks than this is searched exactly; more, through the HNSW index (bench/knowledge.py).",
    )
    ef_search: int = Field(200, ge=10, le=1000, description="HNSW candidate list size for large scopes (higher: better recall, slower).")
    max_scan_tuples: int = Field(
        20_000, ge=1000, description="How far an HNSW iterative scan goes for a scope's rows before the exact scan takes over."
    )
    footer: bool = Field(True, description="Answers that used the documents end with a short 'Sources:' line naming them.")


class BudgetSettings(_Section):
    downgrade_model: str | None = Field(None, description="The cheaper model used by budgets with action 'downgrade' that name none.")
    unavailable: str = Field(
        "I'm not available right now. Someone from the team will get back to you.",
        description="Told to people when their organisation's monthly budget is used up (action 'block').",
    )


class SMTPSettings(_Section):
    host: str | None = Field(None, description="SMTP server for notification and invitation emails; empty: no email is sent.")
    port: int = Field(587, ge=1, le=65535, description="SMTP port.")
    username: str | None = Field(None, description="SMTP login, if the server needs one.")
    password: SecretStr | None = Field(None, description='SMTP password; use a {"$env" = ...} reference.')
    sender: str = Field("konstruct@localhost", description="From address of the emails.")
    security: str = Field("starttls", pattern="^(starttls|tls|none)$", description="starttls, tls (implicit, port 465) or none.")
    timeout: float = Field(20.0, gt=0, le=300, description="Seconds allowed for one SMTP conversation.")


class Plan(_Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,40}$", description="Plan name used on the command line.")
    price_id: str = Field(min_length=1, description="The Stripe price id (price_...).")
    budget_usd: float = Field(0.0, ge=0, description="LLM spending included per month (0: no limit from the plan).")


class BillingSettings(_Section):
    stripe_api_key: SecretStr | None = Field(None, description='Stripe secret key; empty: billing is off. Use a {"$env" = ...} reference.')
    webhook_secret: SecretStr | None = Field(None, description="Signing secret of the Stripe webhook endpoint (whsec_...).")
    api_base: str | None = Field(None, description="Stripe API origin (a test fake points elsewhere); empty: Stripe's own.")
    plans: list[Plan] = Field(default_factory=list, description="Plans: [[billing.plans]] tables with name, price_id, budget_usd.")
    grace_days: float = Field(7.0, ge=0, le=90, description="Days a past_due subscription keeps the agents running.")
    paused: str = Field(
        "This assistant is paused at the moment. Please contact the team another way.",
        description="Told to people when their organisation has no active subscription.",
    )
    tolerance: int = Field(300, ge=1, le=86400, description="Seconds a Stripe webhook signature stays valid.")

    @property
    def enabled(self) -> bool:
        return secret_given(self.stripe_api_key)

    def plan(self, name: str) -> Plan | None:
        return next((plan for plan in self.plans if plan.name == name), None)

    def plan_for_price(self, price_id: str | None) -> Plan | None:
        return next((plan for plan in self.plans if plan.price_id == price_id), None)


class WebSettings(_Section):
    session_hours: float = Field(12.0, gt=0, le=24 * 30, description="Hours a status page sign-in lasts.")
    login_attempts: int = Field(
        5, ge=1, le=100, description="Failed sign-ins for one email from one address before each further try waits (1 s, 2 s, 4 s…)."
    )
    address_attempts: int = Field(
        50, ge=1, le=100_000, description="Failed sign-ins from one address (any emails) within login_window before it is refused."
    )
    login_window: float = Field(15.0, gt=0, le=1440, description="Minutes over which failed sign-ins are counted.")
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description='Addresses or networks of reverse proxies whose X-Forwarded-For is believed (e.g. ["127.0.0.1"]); empty: none.',
    )

    @pydantic.field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return value

    impersonation_minutes: float = Field(30.0, gt=0, le=480, description="Minutes a platform admin's view as a tenant lasts.")
    metrics_token: SecretStr | None = Field(
        None, description='Bearer token for GET /metrics (Prometheus); empty: /metrics is off. Use a {"$env" = ...} reference.'
    )


class McpSettings(_Section):
    allow_private: bool = Field(
        False, description="Let an MCP server's URL be on a private, loopback or link-local address (tests, labs, an internal server)."
    )
    connect_seconds: float = Field(10.0, gt=0, le=300, description="Time allowed to connect to an MCP server and list its tools.")
    call_seconds: float = Field(
        30.0, gt=0, le=600, description="Default time allowed for one MCP tool call (`mcp add --timeout` per server)."
    )
    idle_seconds: float = Field(
        300.0, gt=0, le=86400, description="A worker closes a connection (or stops a stdio server) unused this long."
    )
    max_result_chars: int = Field(8000, ge=100, le=8000, description="An MCP tool's result is cut to this many characters for the model.")
    max_response_bytes: int = Field(
        4_000_000, ge=10_000, le=100_000_000, description="An MCP server's HTTP response larger than this is refused (bytes)."
    )


class WorkerSettings(_Section):
    concurrency: int = Field(64, ge=1, le=1000, description="Messages one worker process handles at once.")
    heartbeat_interval: float = Field(5.0, gt=0, le=300, description="Seconds between worker heartbeats.")
    stale_after: float = Field(30.0, gt=0, le=3600, description="A message claimed by a worker silent this long is re-queued.")
    max_attempts: int = Field(5, ge=1, le=100, description="A message whose processing died this many times is marked failed.")
    received_grace: float = Field(30.0, gt=0, le=3600, description="A stored message not claimed after this long is re-queued.")


class UpSettings(_Section):
    standby: bool = Field(True, description="`up` keeps a warm spare worker (imports done) that takes over at once when the worker dies.")
    stable_after: float = Field(
        10.0, gt=0, le=3600, description="A part that ran this many seconds before it died restarts at once; quicker deaths back off."
    )
    max_backoff: float = Field(30.0, gt=0, le=3600, description="Longest wait, in seconds, before restarting a part that keeps dying.")
    check_interval: float = Field(
        0.5, gt=0, le=60, description="Seconds between `up`'s checks that each part (the embedded database too) is alive."
    )


class Settings(BaseSettings):
    """The effective configuration of one Konstruct installation."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    data: DataSettings = DataSettings()
    database: DatabaseSettings = DatabaseSettings()
    queue: QueueSettings = QueueSettings()
    gateway: GatewaySettings = GatewaySettings()
    llm: LLMSettings = LLMSettings()
    agent: AgentSettings = AgentSettings()
    escalation: EscalationSettings = EscalationSettings()
    approvals: ApprovalSettings = ApprovalSettings()
    slack: SlackSettings = SlackSettings()
    whatsapp: WhatsAppSettings = WhatsAppSettings()
    memory: MemorySettings = MemorySettings()
    knowledge: KnowledgeSettings = KnowledgeSettings()
    budget: BudgetSettings = BudgetSettings()
    smtp: SMTPSettings = SMTPSettings()
    billing: BillingSettings = BillingSettings()
    web: WebSettings = WebSettings()
    mcp: McpSettings = McpSettings()
    tenants: list[dict[str, Any]] = Field(
        default_factory=list, description="Declared tenants ([[tenants]]), applied with `konstruct apply` (see examples/tenants.toml)."
    )
    worker: WorkerSettings = WorkerSettings()
    up: UpSettings = UpSettings()
    secret_key: SecretStr | None = Field(
        None,
        description="Master key(s) for secrets at rest, comma-separated, newest first. Empty: the 0600 file secret.key in the data directory.",
    )

    # Where the file was found; relative paths are taken from its folder. Not a setting.
    config_path: Path | None = Field(None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values come in as init kwargs; the environment overrides them.
        return env_settings, init_settings

    @property
    def base_dir(self) -> Path:
        return self.config_path.parent if self.config_path else Path.cwd()

    @property
    def data_dir(self) -> Path:
        path = self.data.dir.expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def embedded_database(self) -> bool:
        return not secret_given(self.database.url)

    def masked(self) -> dict[str, Any]:
        """The settings as a dict: a secret shown only by its last four characters, a reference as the reference
        and whether it can be read (never its value), a URL without its password."""
        out: dict[str, Any] = {"config_path": str(self.config_path) if self.config_path else None}
        for name in type(self).model_fields:
            if name == "config_path":
                continue
            section = getattr(self, name)
            if not isinstance(section, BaseModel):
                out[name] = _shown(section, name)
                continue
            out[name] = {key: _shown(getattr(section, key), key) for key in type(section).model_fields}
        out["data"]["resolved_dir"] = str(self.data_dir)
        return out

    def unreadable_references(self) -> list[str]:
        """What is wrong with each secret reference that cannot be read now (for `up` and doctor to say at once)."""
        problems = []
        for reference in self._references():
            try:
                reference.get_secret_value()
            except ConfigError as exc:
                problems.append(str(exc))
        return problems

    def _references(self) -> list[SecretReference]:
        found: list[SecretReference] = []
        for name in type(self).model_fields:
            section = getattr(self, name)
            values = [getattr(section, key) for key in type(section).model_fields] if isinstance(section, BaseModel) else [section]
            for value in values:
                found += [v for v in (value.values() if isinstance(value, dict) else [value]) if isinstance(v, SecretReference)]
        return found

    def masked_toml(self) -> str:
        """masked() as TOML (what `config show` prints)."""
        return render_effective(self.masked())


def _shown(value: Any, key: str) -> Any:
    """One setting's value as config show prints it."""
    if isinstance(value, SecretReference):
        return value.shown()
    if isinstance(value, SecretStr):
        raw = value.get_secret_value()
        return mask_url(raw) if key == "url" else _masked(raw)
    if isinstance(value, dict):
        return {k: _shown(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [item.model_dump() if isinstance(item, BaseModel) else item for item in value]
    if isinstance(value, str) and key == "url":
        return mask_url(value)
    if isinstance(value, Path):
        return str(value)
    return value


def hint(secret: str) -> str:
    """The only part of a secret ever shown, everywhere (config show, keys, channels): "…" and its last four
    characters, or "…" alone when it is too short to show any."""
    return "…" + secret[-4:] if len(secret) > 8 else "…"


def _masked(value: str | None) -> str | None:
    return hint(value) if value else value


def mask_url(url: str | None) -> str | None:
    """Hide the password in a URL, keep everything else."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:****@{parts.hostname or ''}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def find_config(path: str | Path | None = None) -> Path | None:
    """The config file: an explicit path, $KONSTRUCT_CONFIG, or ./konstruct.toml."""
    if path:
        return Path(path).expanduser().resolve()
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser().resolve()
    local = Path.cwd() / CONFIG_FILENAME
    return local.resolve() if local.exists() else None


def load_settings(path: str | Path | None = None, *, require_file: bool = True) -> Settings:
    """Read, resolve and validate the configuration; raise ConfigError with a one-line reason."""
    config_path = find_config(path)
    raw: dict[str, Any] = {}
    if config_path is None:
        if require_file:
            raise ConfigError(f"no {CONFIG_FILENAME} found: run `konstruct init`, or pass --config PATH or set {CONFIG_ENV}")
    elif not config_path.is_file():
        raise ConfigError(f"config file {config_path} does not exist: run `konstruct init` or fix --config / {CONFIG_ENV}")
    else:
        try:
            raw = tomllib.loads(config_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {config_path}: {exc.strerror}") from None
        raw = _resolve_references(raw, config_path.parent, ())
    _check_environment_sections()
    try:
        return Settings(**raw, config_path=config_path)
    except pydantic.ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, config_path)) from None


def _resolve_references(value: Any, base: Path, where: tuple[str, ...]) -> Any:
    """References in secret settings become SecretReference (read when used); any other is read now."""
    if isinstance(value, dict):
        if set(value) in ({"$env"}, {"$file"}):
            ((kind, target),) = value.items()
            reference = SecretReference(kind, str(target), setting=".".join(where), base=base)
            return reference if _is_secret_setting(where) else reference.get_secret_value()
        if any(key.startswith("$") for key in value):
            raise ConfigError(f'{".".join(where)}: a reference is written {{"$env" = "NAME"}} or {{"$file" = "path"}}')
        return {key: _resolve_references(item, base, (*where, key)) for key, item in value.items()}
    return value


def _is_secret_setting(where: tuple[str, ...]) -> bool:
    """Whether the setting at this path holds a secret (SecretStr), e.g. llm.api_key or llm.provider_keys.anthropic."""
    annotation: Any = Settings
    for key in where:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(key)
            if field is None:
                return False
            annotation = field.annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            return False
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


def _describe_validation_error(exc: pydantic.ValidationError, path: Path | None) -> str:
    """The first error as one line, blaming the environment variable or the file the value came from."""
    errors = exc.errors()
    # A mistyped key also makes the key meant "missing": the typo is the one to tell.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(str(part) for part in first["loc"])
    key = ".".join(loc) or "(top level)"
    variable = _environment_variable_for(loc)
    where = f"environment variable {variable}: " if variable else (f"{path}: " if path else "")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"{where}{_unknown_setting(loc, environment=variable is not None)}{more}"
    message = first["msg"]
    if "input" in first and not isinstance(first["input"], dict) and "secret" not in key and "key" not in key:
        message += f" (got {first['input']!r})"
    return f"{where}{key}: {message}{more}"


def _unknown_setting(loc: tuple[str, ...], *, environment: bool) -> str:
    """ "unknown setting gateway.prot — did you mean gateway.port?", in the spelling of where it came from."""
    known = _known_keys(loc[:-1])
    match = did_you_mean(loc[-1], known) if known else None
    name = ".".join(loc)
    if environment:
        name = env_name(loc)
        suggestion = env_name((*loc[:-1], match)) if match else None
    else:
        suggestion = ".".join((*loc[:-1], match)) if match else None
    if suggestion:
        return f"unknown setting {name} — did you mean {suggestion}?"
    return f"unknown setting {name} (see examples/konstruct.toml for the valid ones)"


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str | None:
    """The choice closest to a mistyped word (case aside), if one is close enough to be what was meant."""
    by_folded = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), list(by_folded), n=1, cutoff=0.6)
    if not close:
        folded = word.lower()
        close = [c for c in by_folded if min(len(c), len(folded)) >= 3 and (c.startswith(folded) or folded.startswith(c))][:1]
    return by_folded[close[0]] if close else None


def env_name(loc: tuple[str, ...]) -> str:
    """The environment variable that sets the setting at loc: gateway.port is KONSTRUCT_GATEWAY__PORT."""
    return ENV_PREFIX + "__".join(loc).upper()


def _known_keys(parent: tuple[str, ...]) -> list[str]:
    """The setting names valid under parent (the sections at the top)."""
    model: Any = Settings
    for key in parent:
        if key.isdigit() and typing.get_origin(model) is list:
            model = typing.get_args(model)[0]
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or key not in model.model_fields:
            return []
        model = model.model_fields[key].annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [name for name in model.model_fields if name != "config_path"]
    return []


def _environment_variable_for(loc: tuple[str, ...]) -> str | None:
    """The KONSTRUCT_… variable in the environment that gave the setting at loc, if one did (names are case-blind)."""
    wanted = env_name(loc)
    return next((name for name in os.environ if name.upper() == wanted), None)


def _check_environment_sections() -> None:
    """A KONSTRUCT_SECTION__KEY variable whose section does not exist is a typo, not silently nothing."""
    sections = [name for name, field in Settings.model_fields.items() if name != "config_path"]
    for name in os.environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or "__" not in upper:
            continue
        section, _, rest = upper[len(ENV_PREFIX) :].partition("__")
        if section.lower() in sections:
            continue
        match = did_you_mean(section, sections)
        hint_text = f" — did you mean {ENV_PREFIX}{match.upper()}__{rest}?" if match else f" (the sections are {', '.join(sections)})"
        raise ConfigError(f"environment variable {name}: unknown setting {section.lower()}.{rest.lower()}{hint_text}")


def secret_key_in_environment() -> bool:
    """Whether the master key comes from KONSTRUCT_SECRET_KEY (then no key file is made)."""
    return bool(os.environ.get(SECRET_KEY_ENV, "").strip())


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # JSON's escapes are TOML's (\\, \", \n, \uXXXX…); TOML also wants DEL escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    """One value in TOML (None has no TOML spelling: in a table or list it is left out)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else "nan" if math.isnan(value) else repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value if item is not None) + "]"
    if isinstance(value, dict):
        items = [f'"{k}" = {_toml_value(v)}' for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    return _toml_string(str(value))


def _toml_setting(key: str, value: Any) -> str:
    """One line of config show: a reference with whether it is there, an unset setting as a comment."""
    if value is None:
        return f"# {key} =   (not set)"
    if isinstance(value, dict) and "status" in value and len(value) == 2 and ({"$env", "$file"} & set(value)):
        ((kind, target),) = [(k, v) for k, v in value.items() if k != "status"]
        return f"{_toml_key(key)} = {_toml_value({kind: target})}  # {value['status']}"
    return f"{_toml_key(key)} = {_toml_value(value)}"


def render_effective(shown: dict[str, Any]) -> str:
    """The masked settings (Settings.masked()) as TOML that tomllib reads back: top-level values first, then
    one table per section, declared tenants last."""
    shown = dict(shown)
    lines = [f"# effective configuration from {shown.pop('config_path') or '(no file: defaults and environment)'}"]
    tenants = shown.pop("tenants", [])
    sections = {name: values for name, values in shown.items() if isinstance(values, dict)}
    lines += [_toml_setting(name, value) for name, value in shown.items() if name not in sections]
    for name, values in sections.items():
        values = dict(values)
        resolved = values.pop("resolved_dir", None)
        lines += ["", f"[{_toml_key(name)}]"]
        lines += [_toml_setting(key, value) for key, value in values.items()]
        if resolved is not None:
            lines.append(f"# resolved: {resolved}")
    for tenant in tenants:
        lines += ["", "[[tenants]]", *(_toml_setting(key, value) for key, value in tenant.items())]
    return "\n".join(lines) + "\n"


def render_config(values: dict[str, dict[str, Any]] | None = None) -> str:
    """A konstruct.toml documenting every setting: given values set, the rest commented with their defaults."""
    values = values or {}
    lines = [
        "# Konstruct configuration. Every setting can be overridden by the environment:",
        "# [llm] api_base is KONSTRUCT_LLM__API_BASE. Secrets may be references instead of literals:",
        '# api_key = { "$env" = "OPENAI_API_KEY" }  or  { "$file" = "/run/secrets/openai" }.',
        "# Master key for secrets at rest: KONSTRUCT_SECRET_KEY, else the 0600 file secret.key in the data directory.",
    ]
    for name, field in Settings.model_fields.items():
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        lines += ["", f"[{name}]"]
        given = values.get(name, {})
        for key, sub in model.model_fields.items():
            lines.append(f"# {sub.description}")
            if key in given:
                lines.append(f"{key} = {_toml_value(given[key])}")
            elif sub.default_factory is not None:
                lines.append(f"# {key} = {_toml_value(sub.default_factory())}")  # type: ignore[call-arg]
            elif sub.default is None:
                lines.append(f"# {key} =")
            else:
                default = sub.default.get_secret_value() if isinstance(sub.default, SecretStr) else sub.default
                lines.append(f"# {key} = {_toml_value(default)}")
    lines += ["", f"# {Settings.model_fields['tenants'].description}", "# [[tenants]]", '# slug = "acme"', '# name = "Acme Inc"']
    return "\n".join(lines) + "\n"


def read_secret_from_environment(name: str, what: str) -> str:
    """A secret the operator named by environment variable (so it never lands in shell history)."""
    value = os.environ.get(name, "").strip()
    if not value:
        raise ConfigError(f"{what}: environment variable {name} is not set or empty")
    return value
