"""konstruct key …: tenants' own LLM provider keys (bring your own key)."""

from __future__ import annotations

import typer

from konstruct.cli.common import (
    JsonOption,
    TenantOption,
    YesOption,
    actor,
    confirm_deletion,
    out,
    print_json,
    print_table,
    secret_input,
    settings,
    with_tenant,
)
from konstruct.errors import ValidationError
from konstruct.llm import keys as service

app = typer.Typer(help="Tenants' own LLM provider keys (bring your own key).", no_args_is_help=True)


@app.command("add")
def add(
    ctx: typer.Context,
    tenant: str = TenantOption,
    provider: str = typer.Option(..., "--provider", "-p", help="litellm's provider name: openai, anthropic, azure, gemini, …"),
    key_env: str | None = typer.Option(None, "--key-env", help="Environment variable holding the key (else it is asked for, hidden)."),
    api_base: str | None = typer.Option(None, "--api-base", help="The provider endpoint for this key (Azure, a proxy)."),
    as_json: bool = JsonOption,
) -> None:
    """Store a tenant's own API key for a provider (encrypted; replaces its earlier one)."""
    key = secret_input(key_env, f"{provider} API key", "API key", "--key-env")
    if api_base is not None and not api_base.startswith(("https://", "http://")):
        raise ValidationError("--api-base must be an http(s) URL")
    cfg = settings(ctx)
    name = service.check_provider(provider)
    info, replaced = with_tenant(
        ctx, tenant, "key.write", lambda db, t: service.add_key(db, cfg, t, provider=name, key=key, api_base=api_base, actor=actor())
    )
    if as_json:
        print_json({**info.as_json(), "replaced": replaced})
    else:
        out.print(f"[green]{'replaced' if replaced else 'added'}[/green] {name} key {info.hint} for {tenant}")


@app.command("list")
def list_(ctx: typer.Context, tenant: str = TenantOption, as_json: bool = JsonOption) -> None:
    """A tenant's keys: provider, hint (last four characters), who added it and when."""
    rows = with_tenant(ctx, tenant, "key.read", service.list_keys)
    if as_json:
        print_json([k.as_json() for k in rows])
    elif not rows:
        out.print(f"{tenant} has no keys of its own: its agents use the platform's ([llm] in konstruct.toml)")
    else:
        print_table(
            None,
            ["provider", "key", "api base", "added by", "added"],
            [(k.provider, k.hint, k.api_base or "", k.added_by, k.created_at.strftime("%Y-%m-%d %H:%M")) for k in rows],
        )


@app.command("remove")
def remove(
    ctx: typer.Context,
    tenant: str = TenantOption,
    provider: str = typer.Option(..., "--provider", "-p", help="The provider whose key goes."),
    yes: bool = YesOption,
    as_json: bool = JsonOption,
) -> None:
    """Delete a tenant's key; its agents fall back to the platform key."""
    confirm_deletion(yes, f"{tenant}'s {provider} key", "the key (calls use the platform key from then on)")
    info = with_tenant(ctx, tenant, "key.write", lambda db, t: service.remove_key(db, t, provider=provider.strip().lower(), actor=actor()))
    if as_json:
        print_json(info.as_json())
    else:
        out.print(f"[green]removed[/green] {info.provider} key {info.hint} of {tenant}")
