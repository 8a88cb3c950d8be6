"""Spend is summed in integer nano-dollars, so totals are exact however many events."""

from __future__ import annotations

from decimal import Decimal

NANOS_PER_USD = 1_000_000_000
HOUR_SECONDS = 3600


# Below this a float's product with 1e9 is within far less than half a nano of the exact
# decimal product (53-bit mantissa), so rounding it gives the same integer; every call's
# cost takes this path, and Decimal arithmetic costs ten times as much.
_FLOAT_EXACT_BELOW_USD = 1_000_000.0


def usd_to_nanos(usd: float | Decimal) -> int:
    # Prices are quantized to 1e-9 USD, so rounding only removes float representation error.
    if isinstance(usd, float) and -_FLOAT_EXACT_BELOW_USD < usd < _FLOAT_EXACT_BELOW_USD:
        return round(usd * NANOS_PER_USD)
    return round(Decimal(str(usd)) * NANOS_PER_USD)


def nanos_to_usd(nanos: int) -> float:
    return nanos / NANOS_PER_USD


def hour_window(timestamp: float) -> int:
    """The start (epoch seconds) of the tumbling hour that holds ``timestamp``."""
    return int(timestamp // HOUR_SECONDS) * HOUR_SECONDS
