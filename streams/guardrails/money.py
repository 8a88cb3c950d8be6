"""Spend is summed in integer nano-dollars, so totals are exact however many events."""

from __future__ import annotations

from decimal import Decimal

NANOS_PER_USD = 1_000_000_000
HOUR_SECONDS = 3600


def usd_to_nanos(usd: float | Decimal) -> int:
    # Prices are quantized to 1e-9 USD, so rounding only removes float representation error.
    return round(Decimal(str(usd)) * NANOS_PER_USD)


def nanos_to_usd(nanos: int) -> float:
    return nanos / NANOS_PER_USD


def hour_window(timestamp: float) -> int:
    """The start (epoch seconds) of the tumbling hour that holds ``timestamp``."""
    return int(timestamp // HOUR_SECONDS) * HOUR_SECONDS
