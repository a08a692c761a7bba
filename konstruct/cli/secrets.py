"""konstruct secrets …: the master key that encrypts every stored secret."""

from __future__ import annotations

import typer

from konstruct import secrets as master
from konstruct.cli.common import JsonOption, out, platform, print_json, settings, with_database
from konstruct.config import secret_key_in_environment
from konstruct.db.engine import Database
from konstruct.errors import ConfigError
from konstruct.llm import keys as llm_keys
from konstruct.tenancy.tenants import directory

app = typer.Typer(help="The master key that encrypts every stored secret.", no_args_is_help=True)


def _reencrypt(ctx: typer.Context) -> int:
    cfg = settings(ctx)

    async def go(db: Database) -> int:
        await platform(db, "secrets.rotate")
        return await llm_keys.rotate_secrets(db, cfg, [t.id for t in await directory(db)])

    return with_database(ctx, go)


@app.command("rotate")
def rotate(
    ctx: typer.Context,
    drop_old: bool = typer.Option(
        False, "--drop-old", help="Then remove the older keys from the key file (once every process has picked up the new one)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Make a new master key and re-encrypt every stored secret under it, without downtime.

    Running gateways and workers read the key file again when they meet a secret they cannot decrypt.
    The older keys stay in the file (newest first) until --drop-old, which re-encrypts once more
    (anything written meanwhile under an old key) and then keeps only the newest."""
    cfg = settings(ctx)
    if secret_key_in_environment():
        raise ConfigError(
            "the master key comes from KONSTRUCT_SECRET_KEY: set it to 'NEW,OLD' (make NEW with "
            "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`), "
            "restart, then run `konstruct secrets reencrypt`"
        )
    added = 0
    if not drop_old:
        added = master.add_master_key(cfg)
    rewritten = _reencrypt(ctx)
    dropped = master.drop_old_master_keys(cfg) if drop_old else 0
    result = {"keys_in_file": 1 if drop_old else added, "secrets_reencrypted": rewritten, "old_keys_dropped": dropped}
    if as_json:
        print_json(result)
    elif drop_old:
        out.print(f"[green]re-encrypted[/green] {rewritten} secrets; dropped {dropped} old master key(s)")
    else:
        out.print(
            f"[green]rotated[/green]: a new master key, {rewritten} secrets re-encrypted under it. The old key stays in "
            "the file for processes not yet restarted; remove it with `konstruct secrets rotate --drop-old`."
        )


@app.command("reencrypt")
def reencrypt(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Re-encrypt every stored secret under the first master key (after changing KONSTRUCT_SECRET_KEY to 'NEW,OLD')."""
    rewritten = _reencrypt(ctx)
    if as_json:
        print_json({"secrets_reencrypted": rewritten})
    else:
        out.print(f"[green]re-encrypted[/green] {rewritten} secrets under the newest master key")
