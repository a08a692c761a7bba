"""Finding a tenant's row by its id or the first 8+ characters of it, as the CLI lets people type ids."""

from __future__ import annotations

import re
import uuid

from sqlalchemy import Text, cast, select
from sqlalchemy.orm import InstrumentedAttribute

from konstruct.db.engine import Database
from konstruct.errors import NotFoundError, ValidationError


async def by_id_prefix(
    db: Database, tenant_id: uuid.UUID, slug: str, id_column: InstrumentedAttribute[uuid.UUID], ref: str, *, what: str, listing: str
) -> uuid.UUID:
    """The one id in `id_column` (under the tenant's RLS) that is `ref` or starts with it. `what` names the kind of
    row in the errors ("conversation"), `listing` the command that lists them."""
    if len(ref) < 8 or not re.fullmatch(r"[0-9a-f-]+", ref.lower()):
        raise ValidationError(f"{ref!r} is not a{'n' if what[0] in 'aeiou' else ''} {what} id: give it whole or its first 8 characters")
    async with db.tenant(tenant_id=tenant_id) as session:
        found = list(await session.scalars(select(id_column).where(cast(id_column, Text).like(f"{ref.lower()}%")).limit(2)))
    if len(found) == 1:
        return found[0]
    if found:
        raise ValidationError(f"{ref!r} matches several {what}s: give more of the id")
    raise NotFoundError(f"tenant {slug!r} has no {what} {ref!r}: see `{listing}`")
