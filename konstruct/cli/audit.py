"""konstruct audit …: verify the hash chain, read and export the log."""

from __future__ import annotations

import csv
import json
import sys

import typer

from konstruct import audit as service
from konstruct.cli.common import (
    EveryTenantOption,
    JsonOption,
    TenantOption,
    out,
    print_json,
    print_table,
    tenants_for,
    with_database,
    with_tenant,
)
from konstruct.db.engine import Database
from konstruct.errors import KonstructError
from konstruct.tenancy.tenants import TenantInfo

app = typer.Typer(help="The append-only, hash-chained audit log.", no_args_is_help=True)


class ChainBroken(KonstructError):
    exit_code = 1


@app.command("verify")
def verify(
    ctx: typer.Context,
    tenant: str | None = EveryTenantOption,
    as_json: bool = JsonOption,
) -> None:
    """Check every tenant's chain: an edited, deleted or reordered event is reported (exit code 1)."""

    async def go(db: Database) -> list[tuple[TenantInfo, service.ChainReport]]:
        return [(t, await service.verify(db, t.id)) for t in await tenants_for(db, "audit.read", tenant)]

    reports = with_database(ctx, go)
    if as_json:
        print_json([{"tenant": t.slug, "events": r.events, "intact": r.intact, "problems": r.problems} for t, r in reports])
    else:
        for info, report in reports:
            mark = "[green]intact[/green]" if report.intact else "[red]BROKEN[/red]"
            out.print(f"{info.slug}: {report.events} events, {mark}")
            for problem in report.problems:
                out.print(f"  - {problem}")
    broken = [t.slug for t, r in reports if not r.intact]
    if broken:
        raise ChainBroken(f"the audit chain of {', '.join(broken)} does not verify")


@app.command("checkpoint")
def checkpoint(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Print each tenant's checkpointed chain head (sequence number and hash), to keep somewhere else."""

    async def go(db: Database) -> list[tuple[str, int, str]]:
        heads = service.read_checkpoints(db)
        tenants = await tenants_for(db, "audit.read")
        return [(t.slug, int(heads[str(t.id)]["seq"]), str(heads[str(t.id)]["hash"])) for t in tenants if str(t.id) in heads]

    rows = with_database(ctx, go)
    if as_json:
        print_json([{"tenant": slug, "seq": seq, "hash": digest} for slug, seq, digest in rows])
    else:
        print_table(None, ["tenant", "seq", "hash"], rows)


@app.command("tail")
def tail(
    ctx: typer.Context,
    tenant: str = TenantOption,
    lines: int = typer.Option(20, "--lines", "-n", min=1, max=10_000, help="How many of the newest events."),
    as_json: bool = JsonOption,
) -> None:
    """The newest events of a tenant, oldest first."""
    rows = with_tenant(ctx, tenant, "audit.read", lambda db, t: service.events(db, t.id, limit=lines))
    if as_json:
        print_json([service.as_json(e) for e in rows])
        return
    print_table(
        None,
        ["#", "at", "actor", "action", "target", "detail"],
        [(e.seq, e.created_at.strftime("%Y-%m-%d %H:%M:%S"), e.actor, e.action, e.target, json.dumps(e.detail)[:80]) for e in rows],
    )


@app.command("export")
def export(
    ctx: typer.Context,
    tenant: str = TenantOption,
    # Not the shared JsonOption: the export is CSV or JSON Lines, never a table.
    as_json: bool = typer.Option(False, "--json", help="JSON Lines (one event per line, with hashes) instead of CSV."),
) -> None:
    """Every event of a tenant, in chain order, to standard output (CSV, or JSON Lines with --json)."""
    rows = with_tenant(ctx, tenant, "audit.read", lambda db, t: service.events(db, t.id))
    if as_json:
        for event in rows:
            sys.stdout.write(json.dumps(service.as_json(event), ensure_ascii=False, default=str) + "\n")
        return
    writer = csv.writer(sys.stdout)
    writer.writerow(["seq", "id", "at", "actor", "action", "target", "detail", "prev_hash", "hash"])
    for event in rows:
        data = service.as_json(event)
        writer.writerow([data["seq"], data["id"], data["at"], data["actor"], data["action"], data["target"],
                         json.dumps(data["detail"], ensure_ascii=False), data["prev_hash"] or "", data["hash"]])  # fmt: skip
