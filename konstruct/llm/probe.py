"""The model as the platform sees it: where its key comes from, and one tiny real call to see that it answers.

`konstruct init`, `konstruct doctor` and the onboarding wizard use it; the worker's heartbeat reports whether its
own environment has the key. Every failure is one line saying what failed (a variable not set, a server not
reachable, a refused key, an unknown model), never the key.
"""

from __future__ import annotations

import asyncio
import functools
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from konstruct.config import Settings, read_secret_from_environment
from konstruct.errors import ConfigError, KonstructError

# OpenAI-compatible local servers (Ollama, vLLM, llama.cpp) take any key; litellm's client insists on one.
LOCAL_SERVER_KEY = "no-key"
TEST_PROMPT = "Reply with the single word OK."
TEST_TIMEOUT = 15.0  # seconds: a test call is to learn whether the model answers, not to wait for it


@dataclass(frozen=True)
class PlatformKey:
    """The platform key for one provider: its value when it could be read, where it comes from, and why not."""

    value: str | None
    source: str | None  # "$NAME", "file PATH", "konstruct.toml" or None (no llm.api_key set)
    problem: str | None = None


@dataclass(frozen=True)
class ModelCheck:
    """What one tiny call to the model showed."""

    model: str
    ok: bool
    seconds: float
    reason: str | None = None

    def line(self) -> str:
        if self.ok and self.reason is None:
            return f"model {self.model} answered in {self.seconds:.1f} s"
        return f"model {self.model}: {self.reason}"

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "ok": self.ok, "seconds": round(self.seconds, 3), "reason": self.reason}


def provider_of(model: str) -> str:
    """The litellm provider of a model name ("openai/gpt-4o-mini" → openai)."""
    from konstruct.llm.client import load_litellm

    try:
        return str(load_litellm().get_llm_provider(model)[1])
    except Exception:
        return model.split("/", 1)[0] if "/" in model else "openai"


def key_source(settings: Settings, provider: str) -> str | None:
    """Where the platform key for this provider is configured: "$NAME" for an {"$env"} reference, "file PATH",
    "konstruct.toml" for a literal, None when no key is set. Read from the file, since the settings hold values."""
    raw: dict[str, Any] = {}
    if settings.config_path is not None:
        try:
            raw = _llm_section(settings.config_path, settings.config_path.stat().st_mtime_ns)
        except OSError:
            raw = {}
    setting = (raw.get("provider_keys") or {}).get(provider, raw.get("api_key"))
    if isinstance(setting, dict) and "$env" in setting:
        return f"${setting['$env']}"
    if isinstance(setting, dict) and "$file" in setting:
        return f"file {setting['$file']}"
    if setting is not None:
        return "konstruct.toml"
    configured = settings.llm.provider_keys.get(provider) or settings.llm.api_key
    return "the environment (KONSTRUCT_LLM__API_KEY)" if configured is not None else None


@functools.lru_cache(maxsize=8)
def _llm_section(path: Path, mtime_ns: int) -> dict[str, Any]:
    """The file's [llm] table as written (references unresolved), read once per version of the file."""
    try:
        return dict(tomllib.loads(path.read_text()).get("llm", {}))
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def platform_key(settings: Settings, provider: str, *, here: str = "this shell") -> PlatformKey:
    """The platform key for a provider as this process can read it (a reference is resolved when used);
    `here` names this process's environment in the message when it cannot."""
    secret: SecretStr | None = settings.llm.provider_keys.get(provider) or settings.llm.api_key
    source = key_source(settings, provider)
    if secret is None:
        return PlatformKey(None, None)
    try:
        value = secret.get_secret_value().strip()
    except KonstructError as exc:  # a reference whose variable or file is missing here
        return PlatformKey(None, source, missing_key(source, str(exc), here))
    if not value:
        return PlatformKey(None, source, missing_key(source, None, here))
    return PlatformKey(value, source)


def missing_key(source: str | None, detail: str | None, here: str) -> str:
    """One line for a key that cannot be read in this process."""
    if source and source.startswith("$"):
        name = source[1:]
        return f"key variable {name} not set in {here}: export {name}=… in the shell that runs `konstruct up` (then restart it)"
    return detail or f"the platform key ({source or 'llm.api_key'}) is empty"


def default_provider(settings: Settings) -> str:
    """The default model's provider; litellm (slow to import) is asked only when per-provider keys make it matter."""
    if not settings.llm.provider_keys:
        return settings.llm.model.split("/", 1)[0] if "/" in settings.llm.model else "openai"
    return provider_of(settings.llm.model)


def keyless(provider: str, api_base: str | None) -> str | None:
    """The key to send when no platform key is set: None lets litellm read the provider's usual variable (e.g.
    OPENAI_API_KEY); a server of one's own (an API base, that variable unset) gets a placeholder, as it takes any."""
    if api_base is None:
        return None
    try:
        read_secret_from_environment(f"{provider.upper()}_API_KEY", "the provider's key")
    except ConfigError:
        return LOCAL_SERVER_KEY
    return None


def platform_key_configured(settings: Settings) -> bool:
    """Whether a platform key is set for the default model's provider (llm.api_key or llm.provider_keys)."""
    return (settings.llm.provider_keys.get(default_provider(settings)) or settings.llm.api_key) is not None


def has_platform_key(settings: Settings) -> bool:
    """Whether this process can read a non-empty platform key for the default model (never the key itself)."""
    return platform_key(settings, default_provider(settings)).value is not None


def describe_failure(exc: BaseException, *, model: str, api_base: str | None, source: str | None, timeout: float) -> str | None:
    """One line for what a failed call shows (unreachable server, refused key, unknown model, timeout), or None
    when it is none of those."""
    text = " ".join(str(exc).split())
    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    where = api_base or "the provider's API"
    key = f" ({source})" if source else ""
    if "Missing credentials" in text or "api_key client option must be set" in text:
        return "no key: set llm.api_key to a reference (`konstruct init --llm-api-key-env NAME`), or --llm-api-base for a local server"
    if "Timeout" in name or status == 408:
        return f"no answer from {where} within {timeout:g} s"
    if "Connection error" in text or "APIConnectionError" in name or isinstance(exc, OSError):
        return f"server at {where} not reachable"
    if status == 401 or "AuthenticationError" in name:
        return f"401 bad key: the provider refused the key{key}"
    if status == 403 or "PermissionDenied" in name:
        return f"403: the key{key} may not use {model}"
    if status == 404 or "NotFound" in name or "LLM Provider NOT provided" in text:
        return f"unknown model {model} at {where}"
    if status == 429 or "RateLimit" in name:
        return f"429: rate limited or out of credit at {where}"
    return None


def _scrub(line: str, key: str | None) -> str:
    return line.replace(key, "****") if key and len(key) >= 6 else line


async def check_model(model: str, *, api_base: str | None, key: PlatformKey, timeout: float = TEST_TIMEOUT) -> ModelCheck:
    """One real call of a few tokens, no retries. A key that cannot be read fails before anything is sent."""
    if key.problem is not None:
        return ModelCheck(model, False, 0.0, key.problem)
    from konstruct.llm.client import load_litellm

    litellm = await asyncio.to_thread(load_litellm)
    api_key = key.value or keyless(provider_of(model), api_base)
    started = time.perf_counter()
    try:
        response = await litellm.acompletion(
            model=model, messages=[{"role": "user", "content": TEST_PROMPT}], max_tokens=5, timeout=timeout,
            num_retries=0, api_base=api_base, api_key=api_key,
        )  # fmt: skip
    except Exception as exc:
        reason = describe_failure(exc, model=model, api_base=api_base, source=key.source, timeout=timeout)
        if reason is None:
            status = getattr(exc, "status_code", None) or type(exc).__name__
            reason = f"{status}: {' '.join(str(exc).split()).split(' - ', 1)[-1][:200]}"
        return ModelCheck(model, False, time.perf_counter() - started, _scrub(reason, key.value))
    seconds = time.perf_counter() - started
    choices = getattr(response, "choices", None) or []
    if not choices or not (choices[0].message.content or getattr(choices[0].message, "tool_calls", None)):
        return ModelCheck(model, False, seconds, "the model answered with nothing")
    return ModelCheck(model, True, seconds)


async def check_platform_model(settings: Settings, timeout: float | None = None) -> ModelCheck:
    """The test call for the configured default model with the platform key, as the worker would make it."""
    model = settings.llm.model
    key = platform_key(settings, default_provider(settings))
    return await check_model(model, api_base=settings.llm.api_base, key=key, timeout=timeout or min(settings.llm.timeout, TEST_TIMEOUT))
