"""A small run of benchmarks.sdk_calls: every way of calling the SDKs is measured and the
report adds up (no timing is asserted)."""

from __future__ import annotations

import orjson
import pytest

from benchmarks import sdk_calls


def test_every_way_is_measured_and_the_ratios_follow(capsys: pytest.CaptureFixture[str]) -> None:
    assert sdk_calls.main(["--calls", "40", "--in-flight", "4", "--rounds", "2"]) == 0
    report = orjson.loads(capsys.readouterr().out)
    per_call = report["cpu_ms_per_call"]
    assert set(per_call) == {"openai-typed", "openai-raw", "anthropic-typed", "anthropic-raw", "aiohttp"}
    assert all(value > 0 for value in per_call.values())
    assert all(len(rounds) == 2 for rounds in report["every_round"].values())
    for provider in ("openai", "anthropic"):
        assert report["raw_over_typed"][provider] == round(per_call[f"{provider}-raw"] / per_call[f"{provider}-typed"], 3)
