"""A sent WhatsApp message's delivery status: recorded from both ends under one lock per wamid.

The worker records the wamid Meta gave for a reply; Meta's status webhook (sent → delivered → read, or
failed) may arrive before that transaction commits. Both sides take the same advisory lock per wamid and
keep the furthest status, so every order of arrival ends in the same state.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

RANK = {"sent": 1, "delivered": 2, "read": 3, "failed": 4}

_LOCK = text(
    "SELECT pg_advisory_xact_lock(h) FROM (SELECT hashtext('delivery:' || x) AS h FROM unnest(CAST(:ids AS text[])) x ORDER BY 1) s"
)
# The reply starts from whatever the channel already reported for its wamid.
_SENT = text("""
UPDATE messages m SET external_id = CAST(:external_id AS text), status = coalesce(d.status, 'sent'),
                      status_at = coalesce(d.status_at, now()), error = d.error
FROM (SELECT 1) AS one LEFT JOIN LATERAL (
    SELECT status, status_at, error FROM delivery_statuses WHERE external_id = CAST(:external_id AS text)
    ORDER BY konstruct_delivery_rank(status) DESC LIMIT 1
) AS d ON true
WHERE m.id = :id
""")
# Record each status unless the message already went further (statuses arrive out of order), and move
# the outgoing message forward the same way.
_STATUSES = text("""
WITH input AS (
    SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:statuses AS text[]), CAST(:ats AS timestamptz[]), CAST(:errors AS text[]))
        AS t(external_id, status, status_at, error)
), recorded AS (
    INSERT INTO delivery_statuses (tenant_id, channel, external_id, status, status_at, error)
    SELECT CAST(:tenant AS uuid), 'whatsapp', external_id, status, status_at, error FROM input
    ON CONFLICT (tenant_id, channel, external_id) DO UPDATE
        SET status = excluded.status, status_at = excluded.status_at, error = excluded.error, updated_at = now()
        WHERE konstruct_delivery_rank(delivery_statuses.status) < konstruct_delivery_rank(excluded.status)
    RETURNING external_id, status, status_at, error
)
UPDATE messages m SET status = r.status, status_at = r.status_at, error = coalesce(r.error, m.error)
FROM recorded r
WHERE m.external_id = r.external_id AND m.direction = 'out'
  AND konstruct_delivery_rank(m.status) < konstruct_delivery_rank(r.status)
""")


async def record_sent(session: AsyncSession, message_id: uuid.UUID, wamid: str) -> None:
    """The worker's side: the reply went out as `wamid`."""
    await session.execute(_LOCK, {"ids": [wamid]})
    await session.execute(_SENT, {"id": message_id, "external_id": wamid})


async def record_statuses(
    session: AsyncSession, tenant_id: uuid.UUID, statuses: Sequence[tuple[str, str, datetime | None, str | None]]
) -> None:
    """The webhook's side: (wamid, status, when, error) reports, at most one per wamid."""
    ids = sorted(wamid for wamid, *_ in statuses)
    by_id = {s[0]: s for s in statuses}
    await session.execute(_LOCK, {"ids": ids})
    await session.execute(
        _STATUSES,
        {
            "tenant": str(tenant_id),
            "ids": ids,
            "statuses": [by_id[i][1] for i in ids],
            "ats": [by_id[i][2] for i in ids],
            "errors": [by_id[i][3] for i in ids],
        },
    )
