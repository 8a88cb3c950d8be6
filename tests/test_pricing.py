"""Unit tests for streams/pricing.py: PriceBook against the genai-prices library."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import genai_prices
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.pricing import LINEAR_LIMIT, USD_PLACES, PriceBook
from topologies.config import ConfigError, Settings, load_settings

DEFAULT_MODELS = [
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-sonnet-4-5"),
    ("openai", "o3"),
]


def make_settings(**overrides: Any) -> Settings:
    return load_settings(environ={}, overrides=overrides or None)


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook(make_settings())


def library_cost(
    provider: str, model: str, input_tokens: int, output_tokens: int, cached: int = 0
) -> Decimal:
    usage = genai_prices.Usage(
        input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cached
    )
    price = genai_prices.calc_price(usage, model, provider_id=provider).total_price
    return Decimal(price).quantize(USD_PLACES)


@pytest.mark.parametrize(("provider", "model"), DEFAULT_MODELS)
@pytest.mark.parametrize(
    ("input_tokens", "output_tokens", "cached"),
    [
        (1, 0, 0),
        (0, 1, 0),
        (1_000, 500, 0),
        (1_000, 500, 200),
        (12_345, 6_789, 12_345),
        (LINEAR_LIMIT, 4_096, 50_000),
    ],
)
def test_cost_equals_the_library(
    book: PriceBook, provider: str, model: str, input_tokens: int, output_tokens: int, cached: int
) -> None:
    cost = book.cost(provider, model, input_tokens, output_tokens, cached_input_tokens=cached)
    assert isinstance(cost, Decimal)
    assert cost == library_cost(provider, model, input_tokens, output_tokens, cached)
    assert cost == cost.quantize(USD_PLACES)


def test_known_list_prices(book: PriceBook) -> None:
    # 1M input + 1M output tokens at the published per-MTok rates.
    m = 1_000_000
    assert book.cost("openai", "gpt-4o-mini", m, m) == Decimal("0.75")  # 0.15 + 0.60
    assert book.cost("openai", "o3", m // 10, m // 10) == Decimal("1.0")  # (2 + 8) / 10


def test_zero_tokens_cost_nothing(book: PriceBook) -> None:
    for provider, model in DEFAULT_MODELS:
        assert book.cost(provider, model, 0, 0) == Decimal(0)


def test_cached_input_is_cheaper(book: PriceBook) -> None:
    for provider, model in DEFAULT_MODELS:
        uncached = book.cost(provider, model, 10_000, 100)
        cached = book.cost(provider, model, 10_000, 100, cached_input_tokens=10_000)
        assert cached < uncached, model


def test_rates_come_from_the_library_and_are_cached(book: PriceBook) -> None:
    rates = book.rates("openai", "gpt-4o-mini")
    assert rates.source == "genai-prices"
    assert rates.input == Decimal("0.15") / 1_000_000
    assert rates.output == Decimal("0.6") / 1_000_000
    assert rates.cached_input == Decimal("0.075") / 1_000_000
    assert book.rates("openai", "gpt-4o-mini") is rates


# --------------------------------------------------------------------------- config prices


def test_config_price_override_wins() -> None:
    book = PriceBook(
        make_settings(prices={"gpt-4o-mini": {"input_per_mtok": 1, "output_per_mtok": 2}})
    )
    rates = book.rates("openai", "gpt-4o-mini")
    assert rates.source == "config"
    # 1000 * 1/M + 500 * 2/M; with no cached price, cached input costs the input price
    assert book.cost("openai", "gpt-4o-mini", 1_000, 500) == Decimal("0.002")
    assert book.cost("openai", "gpt-4o-mini", 1_000, 500, cached_input_tokens=400) == Decimal("0.002")
    assert book.cost("openai", "gpt-4o-mini", 1_000, 500) != library_cost(
        "openai", "gpt-4o-mini", 1_000, 500
    )
    # a model without an override still uses the library
    assert book.rates("openai", "o3").source == "genai-prices"


def test_config_cached_price_and_long_inputs_stay_linear() -> None:
    book = PriceBook(
        make_settings(
            prices={
                "claude-sonnet-4-5": {
                    "input_per_mtok": 2.5,
                    "output_per_mtok": 10,
                    "cached_input_per_mtok": 0.25,
                }
            }
        )
    )
    # 600 uncached * 2.5/M + 400 cached * 0.25/M + 100 * 10/M
    assert book.cost("anthropic", "claude-sonnet-4-5", 1_000, 100, cached_input_tokens=400) == Decimal(
        "0.0026"
    )
    # the library's long-context tier does not apply to a configured price
    assert book.cost("anthropic", "claude-sonnet-4-5", 300_000, 0) == Decimal("0.75")


def test_config_price_makes_an_unknown_model_usable() -> None:
    settings = make_settings(
        tiers={"nano": {"model": "sim-nano-1"}},
        prices={"sim-nano-1": {"input_per_mtok": 0.1, "output_per_mtok": 0.4}},
    )
    book = PriceBook(settings)
    assert book.cost("openai", "sim-nano-1", 1_000_000, 1_000_000) == Decimal("0.5")


@pytest.mark.parametrize("tier", ["nano", "standard", "premium"])
def test_unknown_model_in_a_tier_is_a_config_error(tier: str) -> None:
    settings = make_settings(tiers={tier: {"model": "no-such-model-2099"}})
    with pytest.raises(ConfigError) as info:
        PriceBook(settings)
    message = str(info.value)
    assert message.startswith(f"tiers.{tier}.model: ")
    assert "'no-such-model-2099'" in message
    assert "prices.no-such-model-2099" in message


# --------------------------------------------------------------------------- long inputs


def test_long_input_uses_the_library_tiered_price(book: PriceBook) -> None:
    provider, model = "anthropic", "claude-sonnet-4-5"
    short = book.cost(provider, model, 1_000, 0)
    long = book.cost(provider, model, 300_000, 0)
    assert long == library_cost(provider, model, 300_000, 0)
    assert long / 300_000 > short / 1_000
    # and more than the short-context rate would give
    assert long > book.rates(provider, model).input * 300_000


@pytest.mark.parametrize(
    ("input_tokens", "output_tokens", "cached"),
    [(LINEAR_LIMIT + 1, 10, 0), (250_000, 8_000, 100_000), (900_000, 1, 0)],
)
def test_long_inputs_equal_the_library(
    book: PriceBook, input_tokens: int, output_tokens: int, cached: int
) -> None:
    for provider, model in DEFAULT_MODELS:
        cost = book.cost(provider, model, input_tokens, output_tokens, cached_input_tokens=cached)
        assert cost == library_cost(provider, model, input_tokens, output_tokens, cached), model


# --------------------------------------------------------------------------- worst case


def test_worst_case_is_all_uncached_input_and_max_output(book: PriceBook) -> None:
    assert book.worst_case("openai", "o3", 1_000, 2_000) == library_cost("openai", "o3", 1_000, 2_000)


@settings(max_examples=200, deadline=None, database=None)
@given(
    model_index=st.integers(min_value=0, max_value=len(DEFAULT_MODELS) - 1),
    input_tokens=st.integers(min_value=0, max_value=400_000),
    max_output=st.integers(min_value=0, max_value=200_000),
    data=st.data(),
)
def test_worst_case_bounds_every_cost(
    book: PriceBook, model_index: int, input_tokens: int, max_output: int, data: st.DataObject
) -> None:
    provider, model = DEFAULT_MODELS[model_index]
    output = data.draw(st.integers(min_value=0, max_value=max_output), label="output")
    cached = data.draw(st.integers(min_value=0, max_value=input_tokens), label="cached")
    worst = book.worst_case(provider, model, input_tokens, max_output)
    assert worst >= book.cost(provider, model, input_tokens, output, cached_input_tokens=cached)
