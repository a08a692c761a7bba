"""konstruct feedback: the thumbs up and down people gave the agents' replies, with the exchange each one rates."""

from __future__ import annotations

import typer
from rich.markup import escape

from konstruct import feedback as service
from konstruct.cli.common import JsonOption, TenantOption, out, print_json, print_table, with_tenant
from konstruct.db.engine import Database
from konstruct.errors import ValidationError
from konstruct.llm.usage import parse_since
from konstruct.tenancy.tenants import TenantInfo

WIDTH = 60  # characters of each side of the exchange in the table


def register(app: typer.Typer) -> None:
    app.command("feedback")(feedback)


def feedback(
    ctx: typer.Context,
    tenant: str = TenantOption,
    since: str = typer.Option("30d", "--since", help="How far back: 30d, 12h, 2w, or a date 2026-11-01."),
    limit: int = typer.Option(100, "--limit", "-n", help="At most this many votes, newest first."),
    as_json: bool = JsonOption,
) -> None:
    """Votes on replies (👍/👎), newest first, with the person's message and the reply they rated."""
    start = parse_since(since)
    if not 0 < limit <= 10_000:
        raise ValidationError("--limit must be between 1 and 10000")

    async def go(db: Database, info: TenantInfo) -> tuple[list[service.FeedbackEntry], service.FeedbackCounts]:
        return await service.entries(db, info, since=start, limit=limit), await service.counts(db, [info], since=start)

    rows, counts = with_tenant(ctx, tenant, "conversation.read", go)
    if as_json:
        print_json({"since": start.isoformat(), "counts": counts.as_json(), "votes": [row.as_json() for row in rows]})
        return
    if not rows:
        out.print(f"no feedback since {start:%Y-%m-%d %H:%M} UTC")
        return
    print_table(
        f"Feedback on replies of tenant {tenant} since {start:%Y-%m-%d %H:%M} UTC: 👍 {counts.up}  👎 {counts.down}",
        ["when", "vote", "who", "agent", "message", "reply"],
        [
            (
                row.at.strftime("%Y-%m-%d %H:%M"),
                "👍" if row.value == service.UP else "👎",
                f"{row.channel}:{row.voter}",
                escape(row.agent),
                escape(service.excerpt(row.question, WIDTH)),
                escape(service.excerpt(row.answer, WIDTH)),
            )
            for row in rows
        ],
    )
