"""End to end on a real Kafka broker: producer -> classifier -> tier workers -> results.

Requests are written by a plain aiokafka producer as JSON built by hand (not with the
project's models), the way a producer in another language would.
"""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

import genai_prices
import orjson
import pytest

from tests.support import collect, is_cost, produce_raw, read_topic

pytestmark = pytest.mark.e2e

# (agent_type, task, tier_hint, expected tier) under the packaged default configuration.
CASES = (
    ("router", "Classify ticket {n} as billing or shipping.", None, "nano"),
    ("writer", "Write a short product update about widget {n}.", None, "standard"),
    ("planner", "Propose the architecture of service {n}.", None, "premium"),
    # a NANO keyword, but researchers are configured with min_tier standard
    ("researcher", "Extract the date from memo {n}.", None, "standard"),
    # an explicit hint wins over the rules and over the agent type's floor
    ("analyst", "Find the root cause of outage {n}.", "nano", "nano"),
)
EXPECTED_MODELS = {
    "nano": ("openai", "gpt-4o-mini"),
    "standard": ("anthropic", "claude-sonnet-4-6"),
    "premium": ("openai", "o3"),
}


def build_requests(count: int, prefix: str) -> dict[str, tuple[bytes, str, int]]:
    """request_id -> (JSON bytes, expected tier, max_output_tokens)."""
    out = {}
    for n in range(count):
        agent_type, task, hint, tier = CASES[n % len(CASES)]
        request_id = f"{prefix}-{n:05d}"
        body = {
            "request_id": request_id,
            "workflow_id": f"wf-{n % 37}",
            "agent_type": agent_type,
            "task": task.format(n=n),
            "max_output_tokens": 32 + n % 200,
        }
        if hint:
            body["tier_hint"] = hint
        out[request_id] = (orjson.dumps(body), tier, body["max_output_tokens"])
    return out


def check_results(requests: dict[str, tuple[bytes, str, int]], results: list[dict]) -> None:
    ids = [r["request_id"] for r in results]
    assert len(ids) == len(set(ids)), "a request_id appeared twice on the results topic"
    assert set(ids) == set(requests), (
        f"lost {len(set(requests) - set(ids))}, unexpected {len(set(ids) - set(requests))}"
    )
    for result in results:
        _, tier, max_tokens = requests[result["request_id"]]
        provider, model = EXPECTED_MODELS[tier]
        assert result["status"] == "ok", result
        assert (result["tier"], result["provider"], result["model"]) == (tier, provider, model)
        assert result["input_tokens"] > 0
        assert 1 <= result["output_tokens"] <= max_tokens
        assert result["output"]
        assert result["attempts"] == 1
        expected_cost = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=result["input_tokens"], output_tokens=result["output_tokens"]),
            model,
            provider_id=provider,
        ).total_price
        assert abs(Decimal(str(result["cost_usd"])) - expected_cost) < Decimal("1e-9"), result


async def test_thousand_requests_come_back_once_each(pipeline_factory) -> None:
    pipeline = pipeline_factory()
    await pipeline.start_workers("all")
    requests = build_requests(1000, "r")
    await produce_raw(
        pipeline.settings.kafka.bootstrap_servers,
        pipeline.topology.requests.name,
        ((orjson.loads(body)["workflow_id"].encode(), body) for body, _, _ in requests.values()),
    )
    collected = await collect(pipeline, expected=1000, timeout=240)
    print(f"results={len(collected.results)} dead_letters={len(collected.dead_letters)}")
    assert collected.dead_letters == []
    check_results(requests, collected.results)


async def test_roles_in_separate_processes(pipeline_factory) -> None:
    pipeline = pipeline_factory()
    await pipeline.start_workers("classifier", "tier:nano", "tier:standard,tier:premium,cost")
    requests = build_requests(300, "split")
    await produce_raw(
        pipeline.settings.kafka.bootstrap_servers,
        pipeline.topology.requests.name,
        ((None, body) for body, _, _ in requests.values()),
    )
    collected = await collect(pipeline, expected=300, timeout=240)
    assert collected.dead_letters == []
    check_results(requests, collected.results)


async def test_llm_meta_routing_end_to_end(pipeline_factory) -> None:
    """strategy=llm: the classifier asks the NANO model (here scripted through the
    simulator's #sim:reply directive) and both calls of each request are costed."""
    pipeline = pipeline_factory(TIERSTREAM__CLASSIFIER__STRATEGY="llm")
    await pipeline.start_workers("all")
    answers = ["NANO", "STANDARD", "PREMIUM", "no idea"]
    expected_tier = {"NANO": "nano", "STANDARD": "standard", "PREMIUM": "premium", "no idea": "standard"}
    bodies = {}
    for n in range(60):
        answer = answers[n % len(answers)]
        bodies[f"llm-{n}"] = (
            orjson.dumps({"request_id": f"llm-{n}", "workflow_id": f"wf-{n % 5}", "agent_type": "writer",
                          "task": f"Handle case {n}. #sim:reply={answer}", "max_output_tokens": 16}),
            answer,
        )
    await produce_raw(
        pipeline.settings.kafka.bootstrap_servers, pipeline.topology.requests.name,
        ((None, body) for body, _ in bodies.values()),
    )
    collected = await collect(pipeline, expected=60, timeout=180)
    assert collected.dead_letters == []
    assert sorted(collected.result_ids()) == sorted(bodies) and max(collected.result_ids().values()) == 1
    for result in collected.results:
        answer = bodies[result["request_id"]][1]
        assert result["tier"] == expected_tier[answer]
        assert result["routed_by"] == ("llm_fallback" if answer == "no idea" else "llm")

    costs = await read_topic(pipeline, pipeline.topology.costs.name, expected=120, timeout=60, keep=is_cost)
    per_request = Counter(c["request_id"] for c in costs)
    assert per_request == Counter({rid: 2 for rid in bodies}), "one routing call + one answer each"
    # every routing call is a NANO call; requests routed to NANO add their answer's call
    routed_to_nano = sum(1 for _, answer in bodies.values() if answer == "NANO")
    assert sum(1 for c in costs if c["tier"] == "nano") == len(bodies) + routed_to_nano
    assert all(c["cost_usd"] > 0 for c in costs)


async def test_learned_routing_end_to_end(pipeline_factory, tmp_path) -> None:
    """strategy=learned with a router trained here: each request is routed by the model
    (hints still win), and a workflow's requests reach each tier topic in the order they
    were produced, though the classifier takes them in batches."""
    from streams.routing.data import parse_lines
    from streams.routing.model import train_router
    from tests.test_routing import synthetic_lines

    model = tmp_path / "e2e.router"
    train_router(parse_lines(synthetic_lines())).save(model)
    pipeline = pipeline_factory(
        TIERSTREAM__CLASSIFIER__STRATEGY="learned", TIERSTREAM__CLASSIFIER__LEARNED__MODEL=str(model)
    )
    await pipeline.start_workers("all")
    expected = {}
    bodies = []
    for n in range(40):
        maths = n % 2 == 0
        task = (f"Solve the equation {n + 3}x + 1 = {400 + n} and compute the integral of x^3 from 0 to {n % 7 + 2}."
                if maths else f"Say hello to visitor number {n} politely.")
        body = {"request_id": f"lr-{n:03d}", "workflow_id": "wf-learned", "agent_type": "writer", "task": task,
                "max_output_tokens": 16}
        if n % 10 == 9:
            body["tier_hint"] = "nano"
        expected[body["request_id"]] = ("nano", "hint") if "tier_hint" in body else (
            ("premium" if maths else "standard"), "learned")
        bodies.append(orjson.dumps(body))
    await produce_raw(pipeline.settings.kafka.bootstrap_servers, pipeline.topology.requests.name,
                      ((b"wf-learned", body) for body in bodies))
    collected = await collect(pipeline, expected=40, timeout=180)
    assert collected.dead_letters == []
    assert {r["request_id"]: (r["tier"], r["routed_by"]) for r in collected.results} == expected
    for tier, spec in pipeline.topology.tiers.items():
        count = sum(1 for t, _ in expected.values() if t == tier.value)
        on_topic = [m["request_id"] for m in await read_topic(pipeline, spec.name, expected=count, timeout=30)]
        assert len(on_topic) == count and on_topic == sorted(on_topic), f"{tier.value}: {on_topic}"
