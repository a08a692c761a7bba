"""konstruct usage: LLM calls, tokens, cost and latency, grouped, with a daily cost chart."""

from __future__ import annotations

import csv
import sys
from datetime import date
from decimal import Decimal

import typer
from rich.table import Table

from konstruct import feedback
from konstruct.cli.common import EveryTenantOption, JsonOption, out, print_json, tenants_for, with_database
from konstruct.db.engine import Database
from konstruct.errors import ValidationError
from konstruct.llm import usage as service
from konstruct.money import usd


def register(app: typer.Typer) -> None:
    app.command("usage")(usage)


def usage(
    ctx: typer.Context,
    tenant: str | None = EveryTenantOption,
    since: str = typer.Option("30d", "--since", help="How far back: 30d, 12h, 2w, or a date 2026-11-01."),
    by: str = typer.Option("model", "--by", help="Group by model, agent, day or tenant."),
    as_json: bool = JsonOption,
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV (one row per group) instead of a table."),
) -> None:
    """LLM calls, tokens, cost and latency, grouped; with a daily cost chart."""
    start = service.parse_since(since)
    if by not in service.GROUPS:
        raise ValidationError(f"--by must be one of {', '.join(service.GROUPS)}")
    if as_json and as_csv:
        raise ValidationError("pick one of --json and --csv")

    async def go(db: Database) -> tuple[service.UsageReport, feedback.FeedbackCounts]:
        tenants = await tenants_for(db, "usage.read", tenant)
        return await service.report(db, tenants, since=start, by=by), await feedback.counts(db, tenants, since=start)

    report, votes = with_database(ctx, go)
    if as_json:
        print_json({**report.as_json(), "feedback": votes.as_json()})
        return
    rows = [*report.rows, report.total]
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([by, "calls", "failed", "prompt_tokens", "completion_tokens", "cost_usd", "avg_latency_ms"])
        for row in rows:
            writer.writerow(
                [row.key, row.calls, row.failed, row.prompt_tokens, row.completion_tokens, f"{row.cost_usd:.8f}", row.avg_latency_ms]
            )
        return
    scope = f"tenant {tenant}" if tenant else "all tenants"
    _usage_table(f"LLM usage of {scope} since {start:%Y-%m-%d %H:%M} UTC, by {by}", by, rows)
    _bar_chart(report.daily)
    _feedback(votes)


def _usage_table(title: str, by: str, rows: list[service.UsageRow]) -> None:
    """The groups as a table that fits the terminal: a long model or agent name folds onto more lines, never cut."""
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column(by, overflow="fold", ratio=1)  # takes what the numbers leave, and folds within it
    for column in ("calls", "failed", "prompt tok", "completion tok", "cost", "avg latency"):
        table.add_column(column, justify="right", overflow="fold")
    for r in rows:
        table.add_row(r.key, str(r.calls), str(r.failed), str(r.prompt_tokens), str(r.completion_tokens), usd(r.cost_usd),
                      f"{r.avg_latency_ms} ms")  # fmt: skip
    out.print(table)


def _bar_chart(daily: dict[date, Decimal], width: int = 40) -> None:
    """One line per day that cost something; a run of days without any is one line, not a column of zeros."""
    top = max(daily.values(), default=Decimal(0))
    out.print("[bold]cost per day[/bold]")
    if not top:
        out.print(f"no LLM cost in these {len(daily)} days" if daily else "no days in this period")
        return
    idle: list[date] = []
    for day, cost in [*daily.items(), (None, None)]:
        if day is not None and not cost:
            idle.append(day)
            continue
        if idle:
            span = f"{idle[0]:%m-%d}" if len(idle) == 1 else f"{idle[0]:%m-%d}…{idle[-1]:%m-%d}"
            out.print(f"{span}  no cost" + (f" ({len(idle)} days)" if len(idle) > 1 else ""), markup=False)
            idle = []
        if day is not None and cost is not None:
            bar = "█" * int(cost / top * width) or "▏"
            out.print(f"{day:%m-%d}  {bar.ljust(width)}  {usd(cost)}", markup=False)


def _feedback(votes: feedback.FeedbackCounts) -> None:
    share = f" ({votes.positive_percent:.0f}% positive)" if votes.positive_percent is not None else ""
    out.print(f"[bold]feedback on replies[/bold]  👍 {votes.up}  👎 {votes.down}{share}")
