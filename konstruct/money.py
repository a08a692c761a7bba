"""Money as people read it: one formatter for every amount the CLI, the status page and notices show."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

CENT = Decimal("0.01")


def usd(amount: Decimal | float | int | None) -> str:
    """US dollars: two decimals from a cent up ($12.35, $1,234.50), two significant digits below a cent so a small
    amount is never shown as nothing ($0.0005, $0.0012), $0.00 for zero."""
    value = Decimal(str(amount)) if isinstance(amount, float) else Decimal(amount or 0)
    if value.is_nan() or value.is_infinite():
        return f"${value}"
    sign, size = ("-" if value < 0 else ""), abs(value)
    if size == 0 or size >= CENT:
        return f"{sign}${size.quantize(CENT, ROUND_HALF_UP):,.2f}"
    digits = size.quantize(Decimal(1).scaleb(size.adjusted() - 1), ROUND_HALF_UP)
    return f"{sign}${digits.normalize():f}"
