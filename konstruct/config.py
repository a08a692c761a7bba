"""One Settings object: konstruct.toml, overridden by KONSTRUCT_* environment variables.

Only this module reads the environment. Secret values in the file may be references,
``{"$env" = "NAME"}`` or ``{"$file" = "path"}``, resolved when the settings are loaded.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pydantic
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from konstruct.errors import ConfigError

CONFIG_FILENAME = "konstruct.toml"
CONFIG_ENV = "KONSTRUCT_CONFIG"
DATABASE_URL_ENV = "KONSTRUCT_DATABASE__URL"  # `up` hands its children the embedded server's URL through it
SECRET_KEY_ENV = "KONSTRUCT_SECRET_KEY"


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
    pool_size: int = Field(10, ge=1, le=200, description="Connections per process for the app role.")
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
    public_url: str = Field("http://127.0.0.1:8080", description="URL at which Slack, Meta and people reach the gateway.")
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


class MemorySettings(_Section):
    enabled: bool = Field(True, description="Long-term memory: remember what people say, recall it in later conversations.")
    recall: int = Field(5, ge=1, le=50, description="Memories of the person recalled into the prompt before each answer.")
    min_words: int = Field(3, ge=1, le=100, description="Shorter messages (and questions) are not worth remembering.")


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
        return self.stripe_api_key is not None and bool(self.stripe_api_key.get_secret_value())

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

    model_config = SettingsConfigDict(env_prefix="KONSTRUCT_", env_nested_delimiter="__", extra="forbid")

    data: DataSettings = DataSettings()
    database: DatabaseSettings = DatabaseSettings()
    queue: QueueSettings = QueueSettings()
    gateway: GatewaySettings = GatewaySettings()
    llm: LLMSettings = LLMSettings()
    agent: AgentSettings = AgentSettings()
    slack: SlackSettings = SlackSettings()
    whatsapp: WhatsAppSettings = WhatsAppSettings()
    memory: MemorySettings = MemorySettings()
    budget: BudgetSettings = BudgetSettings()
    smtp: SMTPSettings = SMTPSettings()
    billing: BillingSettings = BillingSettings()
    web: WebSettings = WebSettings()
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
        return self.database.url is None or not self.database.url.get_secret_value()

    def masked(self) -> dict[str, Any]:
        """The settings as a dict, with every secret shown only by its last four characters."""
        out: dict[str, Any] = {"config_path": str(self.config_path) if self.config_path else None}
        for name in type(self).model_fields:
            if name == "config_path":
                continue
            section = getattr(self, name)
            if not isinstance(section, BaseModel):
                out[name] = _masked(section.get_secret_value()) if isinstance(section, SecretStr) else section
                continue
            values: dict[str, Any] = {}
            for key in type(section).model_fields:
                value = getattr(section, key)
                if isinstance(value, dict):
                    value = {k: _masked(v.get_secret_value()) if isinstance(v, SecretStr) else v for k, v in value.items()}
                elif isinstance(value, list):
                    value = [item.model_dump() if isinstance(item, BaseModel) else item for item in value]
                elif isinstance(value, SecretStr):
                    raw = value.get_secret_value()
                    value = mask_url(raw) if key == "url" else _masked(raw)
                elif isinstance(value, str) and key == "url":
                    value = mask_url(value)
                elif isinstance(value, Path):
                    value = str(value)
                values[key] = value
            out[name] = values
        out["data"]["resolved_dir"] = str(self.data_dir)
        return out


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
    try:
        return Settings(**raw, config_path=config_path)
    except pydantic.ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, config_path)) from None


def _resolve_references(value: Any, base: Path, where: tuple[str, ...]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$env"}:
            name = value["$env"]
            if name not in os.environ:
                raise ConfigError(f"{'.'.join(where)}: environment variable {name} is not set: export it, or change the setting")
            return os.environ[name]
        if set(value) == {"$file"}:
            file = Path(str(value["$file"])).expanduser()
            file = file if file.is_absolute() else base / file
            try:
                return file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{'.'.join(where)}: cannot read {file}: {exc.strerror}") from None
        if any(key.startswith("$") for key in value):
            raise ConfigError(f'{".".join(where)}: a reference is written {{"$env" = "NAME"}} or {{"$file" = "path"}}')
        return {key: _resolve_references(item, base, (*where, key)) for key, item in value.items()}
    return value


def _describe_validation_error(exc: pydantic.ValidationError, path: Path | None) -> str:
    errors = exc.errors()
    first = errors[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown setting (see examples/konstruct.toml for the valid ones)"
    elif "input" in first and not isinstance(first["input"], dict) and "secret" not in key and "key" not in key:
        message += f" (got {first['input']!r})"
    where = f"{path}: " if path else ""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}{key}: {message}{more}"


def secret_key_in_environment() -> bool:
    """Whether the master key comes from KONSTRUCT_SECRET_KEY (then no key file is made)."""
    return bool(os.environ.get(SECRET_KEY_ENV, "").strip())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


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
