"""What a model call costs: prices from the maintained ``genai-prices`` library.

``prices`` in the configuration overrides or adds a model (the simulator's models, a
negotiated rate). A model neither knows is a start-up error, never a silent zero.
Rates are resolved once per model; calls over ``LINEAR_LIMIT`` input tokens go through
the library again so that long-context price tiers apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import genai_prices

from topologies.config import ConfigError, ModelPrice, Settings

MTOK = Decimal(1_000_000)
LINEAR_LIMIT = 100_000
USD_PLACES = Decimal("1e-9")  # nano-dollars: the unit spend totals are summed in


@dataclass(frozen=True)
class Rates:
    """USD per token."""

    input: Decimal
    cached_input: Decimal
    output: Decimal
    source: str  # "config" or "genai-prices"


def _rates_from_config(price: ModelPrice) -> Rates:
    cached = price.cached_input_per_mtok
    return Rates(
        input=Decimal(str(price.input_per_mtok)) / MTOK,
        cached_input=Decimal(str(cached if cached is not None else price.input_per_mtok)) / MTOK,
        output=Decimal(str(price.output_per_mtok)) / MTOK,
        source="config",
    )


def _library_price(model: str, provider: str, **usage: int) -> Decimal:
    return genai_prices.calc_price(
        genai_prices.Usage(**usage), model, provider_id=provider
    ).total_price


def _rates_from_library(model: str, provider: str) -> Rates:
    n = LINEAR_LIMIT
    return Rates(
        input=_library_price(model, provider, input_tokens=n) / n,
        cached_input=_library_price(model, provider, input_tokens=n, cache_read_tokens=n) / n,
        output=_library_price(model, provider, output_tokens=n) / n,
        source="genai-prices",
    )


class PriceBook:
    def __init__(self, settings: Settings) -> None:
        self._overrides = settings.prices
        self._windows: dict[tuple[str, str], int | None] = {}
        self._rates: dict[tuple[str, str], Rates] = {}
        for tier, choice in settings.tiers.items():
            try:
                self.rates(choice.provider, choice.model)
            except LookupError:
                raise ConfigError(
                    f"tiers.{tier.value}.model: no price known for {choice.provider} model "
                    f"'{choice.model}'; add it under prices.{choice.model}"
                ) from None

    def rates(self, provider: str, model: str) -> Rates:
        key = (provider, model)
        rates = self._rates.get(key)
        if rates is None:
            override = self._overrides.get(model)
            rates = _rates_from_config(override) if override else _rates_from_library(model, provider)
            self._rates[key] = rates
        return rates

    def cost(
        self,
        provider: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
    ) -> Decimal:
        """The call's cost in USD. ``input_tokens`` includes ``cached_input_tokens``."""
        rates = self.rates(provider, model)
        if rates.source == "genai-prices" and input_tokens > LINEAR_LIMIT:
            total = _library_price(
                model, provider, input_tokens=input_tokens,
                cache_read_tokens=cached_input_tokens, output_tokens=output_tokens,
            )
        else:
            total = (
                rates.input * (input_tokens - cached_input_tokens)
                + rates.cached_input * cached_input_tokens
                + rates.output * output_tokens
            )
        return total.quantize(USD_PLACES)

    def context_window(self, provider: str, model: str) -> int | None:
        """Tokens (input and output together) the model accepts, if known. Cached: the
        classifier asks for every request, and genai-prices computes a price to answer."""
        key = (provider, model)
        if key not in self._windows:
            self._windows[key] = self._context_window(provider, model)
        return self._windows[key]

    def _context_window(self, provider: str, model: str) -> int | None:
        override = self._overrides.get(model)
        if override is not None and override.context_window_tokens is not None:
            return override.context_window_tokens
        try:
            found = genai_prices.calc_price(genai_prices.Usage(), model, provider_id=provider)
        except LookupError:
            return None
        return found.model.context_window

    def worst_case(self, provider: str, model: str, input_tokens: int, max_output_tokens: int) -> Decimal:
        """The most a call can cost: all input uncached, every allowed output token used."""
        return self.cost(provider, model, input_tokens, max_output_tokens)
