"""Bring-your-own LLM keys: a tenant's provider keys, Fernet-encrypted at rest, shown only by hint."""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from cryptography.fernet import InvalidToken
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from konstruct import audit
from konstruct.config import Settings, hint
from konstruct.db.engine import Database
from konstruct.db.models import ChannelConnection, LLMKey, McpServer
from konstruct.errors import ConfigError, NotFoundError, ValidationError
from konstruct.netguard import AddressError, normalise_host, private_address
from konstruct.secrets import decrypt, encrypt, fernet
from konstruct.tenancy.tenants import TenantInfo

PROVIDER_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")


@dataclass(frozen=True)
class KeyInfo:
    provider: str
    hint: str
    api_base: str | None
    added_by: str
    created_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "hint": self.hint,
            "api_base": self.api_base,
            "added_by": self.added_by,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class TenantKey:
    """A decrypted key, in memory only while calls are made with it."""

    provider: str
    key: str
    api_base: str | None
    fingerprint: str  # changes when the key does; never reveals it


def known_providers() -> frozenset[str]:
    """litellm's provider names (importing litellm takes a few seconds)."""
    from konstruct.llm.client import load_litellm

    litellm = load_litellm()
    return frozenset(str(getattr(p, "value", p)) for p in litellm.provider_list)


def check_provider(provider: str) -> str:
    provider = provider.strip().lower()
    if not PROVIDER_RE.match(provider):
        raise ValidationError(f"provider {provider!r} is not a provider name: use litellm's, e.g. openai, anthropic, azure")
    if provider not in known_providers():
        raise ValidationError(f"litellm knows no provider {provider!r}: use one of its names, e.g. openai, anthropic, azure, gemini")
    return provider


def check_key(key: str) -> str:
    key = key.strip()
    if len(key) < 8 or any(c.isspace() for c in key):
        raise ValidationError("that does not look like an API key (too short, or contains spaces)")
    return key


async def check_api_base(settings: Settings, api_base: str) -> None:
    """A tenant's endpoint must be a public address (as web_fetch's are), unless the platform allows private
    ones: a customer admin must not point the worker, with its network position, at internal services."""
    parts = urlsplit(api_base)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise ValidationError("the API base must be an http(s) URL with a host (and no user name or password)")
    if settings.agent.tenant_api_base_private:
        return
    try:
        refused = await private_address(normalise_host(parts.hostname), parts.port or (443 if parts.scheme == "https" else 80))
    except AddressError as exc:
        raise ValidationError(f"the API base cannot be used: {exc}") from None
    if refused is not None:
        raise ValidationError(
            f"the API base {parts.hostname} is a private or reserved address ({refused}): refused "
            "(a platform admin may allow it with [agent] tenant_api_base_private)"
        )


async def add_key(
    db: Database, settings: Settings, tenant: TenantInfo, *, provider: str, key: str, api_base: str | None, actor: str
) -> tuple[KeyInfo, bool]:
    """Store (or replace) the tenant's key for a provider. Returns the key's info and whether one was replaced."""
    key = check_key(key)
    if api_base is not None:
        await check_api_base(settings, api_base)
    secret = encrypt(settings, key)
    shown = hint(key)
    async with db.tenant(tenant_id=tenant.id) as session:
        replaced = await session.scalar(select(func.count()).select_from(LLMKey).where(LLMKey.provider == provider))
        row = await session.scalar(
            pg_insert(LLMKey)
            .values(tenant_id=tenant.id, provider=provider, secret=secret, hint=shown, api_base=api_base, added_by=actor)
            .on_conflict_do_update(
                index_elements=[LLMKey.tenant_id, LLMKey.provider],
                set_={"secret": secret, "hint": shown, "api_base": api_base, "added_by": actor, "created_at": func.now()},
            )
            .returning(LLMKey)
        )
        assert row is not None
        await audit.record(
            session, tenant_id=tenant.id, actor=actor, action="key.replaced" if replaced else "key.added", target=provider,
            detail={"hint": shown, "api_base": api_base},
        )  # fmt: skip
    return KeyInfo(row.provider, row.hint, row.api_base, row.added_by, row.created_at), bool(replaced)


async def list_keys(db: Database, tenant: TenantInfo) -> list[KeyInfo]:
    async with db.tenant(tenant_id=tenant.id) as session:
        rows = (await session.scalars(select(LLMKey).order_by(LLMKey.provider))).all()
    return [KeyInfo(r.provider, r.hint, r.api_base, r.added_by, r.created_at) for r in rows]


async def remove_key(db: Database, tenant: TenantInfo, *, provider: str, actor: str) -> KeyInfo:
    async with db.tenant(tenant_id=tenant.id) as session:
        row = await session.scalar(delete(LLMKey).where(LLMKey.provider == provider).returning(LLMKey))
        if row is None:
            raise NotFoundError(f"tenant {tenant.slug} has no {provider} key: see `konstruct key list --tenant {tenant.slug}`")
        await audit.record(session, tenant_id=tenant.id, actor=actor, action="key.removed", target=provider, detail={"hint": row.hint})
    return KeyInfo(row.provider, row.hint, row.api_base, row.added_by, row.created_at)


_plain: dict[bytes, str] = {}


def keys_of(settings: Settings, rows: list[tuple[Any, ...]]) -> dict[str, TenantKey]:
    """(provider, secret, api_base) rows of llm_keys as the tenant's keys by provider, decrypted."""
    keys: dict[str, TenantKey] = {}
    for provider, secret, api_base in rows:
        blob = bytes(secret)
        plain = _plain.get(blob)
        if plain is None:
            plain = _plain[blob] = decrypt(settings, blob)
        fingerprint = hashlib.sha256(blob).hexdigest()[:16]
        keys[provider] = TenantKey(provider, plain, api_base, fingerprint)
    return keys


async def rotate_secrets(db: Database, settings: Settings, tenant_ids: list[uuid.UUID]) -> int:
    """Re-encrypt every stored secret (channel credentials, LLM keys, MCP servers' headers and environment) under the
    newest master key. One transaction per tenant; returns how many secrets were rewritten."""
    multi = fernet(settings)
    count = 0
    sealed: tuple[tuple[Any, Any], ...] = (
        (ChannelConnection, ChannelConnection.credentials), (LLMKey, LLMKey.secret), (McpServer, McpServer.secrets),
    )  # fmt: skip
    for tenant_id in tenant_ids:
        async with db.tenant(tenant_id=tenant_id) as session:
            for model, column in sealed:
                rows = await session.execute(select(model.id, column).where(column.is_not(None)).with_for_update())
                for row_id, blob in rows.all():
                    try:
                        rotated = multi.rotate(bytes(blob))
                    except InvalidToken:
                        raise ConfigError(
                            f"a secret in {model.__tablename__} cannot be decrypted with any master key: add the key it was written with"
                        ) from None
                    await session.execute(update(model).where(model.id == row_id).values({column.key: rotated}))
                    count += 1
    return count
