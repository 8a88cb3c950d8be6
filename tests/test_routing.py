"""Routing: the labelled-data format, the curve figures (on data small enough to work out
by hand), the learned router's training, file and strategy, and `tierstream router`."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from schemas.codec import decode
from schemas.models import AgentRequest, Tier, TieredRequest
from streams.cli import app as cli
from streams.envelope import Source
from streams.pricing import PriceBook
from streams.roles.classifier import Classifier, ClassifierHandler
from streams.routing.curves import quality_curve
from streams.routing.data import RoutingDataError, load_routing_data, parse_lines
from streams.routing.evaluate import evaluate
from streams.routing.model import (
    DEFAULT_ROUTER_PATH,
    MAGIC,
    RouterModelError,
    _joint_outcomes,
    configured_router,
    load_router,
    train_router,
)
from topologies import ConfigError, Settings, Topology, load_settings

# --------------------------------------------------------------------------- data format


def line(**fields: object) -> bytes:
    body = {"prompt": "What is 2 + 2?", "scores": {"standard": 1, "premium": 1}, **fields}
    return orjson.dumps(body)


def test_a_valid_file_keeps_every_line_and_orders_the_tiers() -> None:
    raw = b"\n".join([
        line(source="maths", agent_type="analyst"),
        b"",  # blank lines are allowed
        orjson.dumps({"messages": [{"role": "user", "content": "Hi"}], "scores": {"premium": 0.5, "standard": 0.25}}),
    ])
    data = parse_lines(raw)
    assert len(data.examples) == 2
    assert data.tiers == (Tier.STANDARD, Tier.PREMIUM) and data.top is Tier.PREMIUM
    assert data.scores(Tier.STANDARD) == [1, 0.25]
    assert data.examples[1].text() == "Hi"


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (b"{not json", "line 2: not valid JSON"),
        (line(scores={"standard": 1, "premium": 1.5}), "line 2: scores.premium: Input should be less than or equal to 1"),
        (line(scores={"premium": 1}), "line 2: scores: Dictionary should have at least 2 items"),
        (line(scores={"standard": 1, "premium": 1, "ultra": 1}), "line 2: scores.ultra.[key]: Input should be"),
        (line(messages=[{"role": "user", "content": "x"}]), "line 2: (the object): Value error, give exactly one of 'prompt' or 'messages'"),
        (line(surprise=1), "line 2: surprise: Extra inputs are not permitted"),
        (line(scores={"nano": 1, "premium": 1}), "line 2: scores tiers ['nano', 'premium'], but earlier lines score ['premium', 'standard']"),
    ],
)
def test_a_bad_line_is_an_error_that_names_it(bad: bytes, says: str) -> None:
    with pytest.raises(RoutingDataError) as caught:
        parse_lines(line() + b"\n" + bad + b"\n" + line(), "data.jsonl")
    assert str(caught.value).startswith("data.jsonl, ")
    assert says in str(caught.value)


def test_an_empty_or_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RoutingDataError, match="no examples"):
        parse_lines(b"\n\n")
    with pytest.raises(RoutingDataError, match="cannot read routing data"):
        load_routing_data(tmp_path / "absent.jsonl")


# --------------------------------------------------------------------------- curve figures
# Four requests. Quality with the lower tier: 0, 0, 1, 1 (mean 0.5); with the top tier:
# 1, 1, 1, 0 (mean 0.75). The top tier gains 1, 1, 0, -1 on them.
LOW = [0, 0, 1, 1]
TOP = [1, 1, 1, 0]


def test_random_is_the_diagonal() -> None:
    curve = quality_curve([0, 0, 0, 0], LOW, TOP)
    assert curve.shares.tolist() == [0, 1] and curve.quality.tolist() == [0.5, 0.75]
    assert curve.apgr() == pytest.approx(0.5)
    # 95 % of 0.75 is 0.7125: (0.7125 - 0.5) / 0.25 of the way along
    assert curve.share_for_quality_ratio(0.95) == pytest.approx(0.85)
    assert curve.cpt(0.5) == pytest.approx(0.5) and curve.cpt(0.8) == pytest.approx(0.8)


def test_oracle_order_with_a_tie() -> None:
    curve = quality_curve([1, 1, 0, -1], LOW, TOP)
    # the two gains of 1 are tied: one straight segment up to share 0.5
    assert curve.shares.tolist() == [0, 0.5, 0.75, 1]
    assert curve.quality.tolist() == [0.5, 1.0, 1.0, 0.75]
    # PGR 0, 2, 2, 1: 0.5 * 1 + 0.25 * 2 + 0.25 * 1.5
    assert curve.apgr() == pytest.approx(1.375)
    assert curve.share_for_quality_ratio(0.95) == pytest.approx(0.2125)
    assert curve.cpt(0.5) == pytest.approx(0.125) and curve.cpt(0.8) == pytest.approx(0.2)


def test_worst_order() -> None:
    curve = quality_curve([-1, -1, 0, 1], LOW, TOP)
    assert curve.quality.tolist() == [0.5, 0.25, 0.25, 0.75]
    assert curve.apgr() == pytest.approx(-0.375)  # PGR 0, -1, -1, 1
    assert curve.share_for_quality_ratio(0.95) == pytest.approx(0.9625)


def test_no_gap_has_no_apgr() -> None:
    curve = quality_curve([0.3, 0.1], [1, 0], [0, 1])
    assert curve.apgr() is None and curve.cpt(0.5) is None
    assert curve.share_for_quality_ratio(0.95) == 0.0  # the lower tier already reaches it


def test_fractional_scores_are_split_over_the_joint_outcomes() -> None:
    example, outcome, weight = _joint_outcomes(np.array([[1.0, 0.0], [0.5, 0.25]]))
    by_example = {e: dict() for e in (0, 1)}
    for e, o, w in zip(example, outcome, weight, strict=True):
        by_example[int(e)][int(o)] = float(w)
    assert by_example[0] == {1: 1.0}  # bit 0 (lower tier) right, bit 1 (top) wrong
    assert by_example[1] == pytest.approx({0: 0.375, 1: 0.375, 2: 0.125, 3: 0.125})


# --------------------------------------------------------------------------- training


def synthetic_lines(count: int = 240, seed: int = 3, three_tiers: bool = False) -> bytes:
    """Maths questions only the top tier answers; small talk every tier answers; with
    three tiers, summaries that need at least the middle tier."""
    rng = random.Random(seed)
    families = ["algebra", "trivia", "geometry", "history"]
    lines = []
    for i in range(count):
        kind = rng.choice(["hard", "easy", "medium"] if three_tiers else ["hard", "easy"])
        if kind == "hard":
            prompt = (f"Solve the equation {rng.randint(2, 97)}x + {rng.randint(1, 9)} = {rng.randint(100, 999)} "
                      f"and compute the integral of x^{rng.randint(2, 6)} from 0 to {rng.randint(2, 9)}.")
            scores = {"nano": 0, "standard": 0, "premium": 1}
        elif kind == "medium":
            prompt = f"Summarise the history of trade routes in region {i} for a report."
            scores = {"nano": 0, "standard": 1, "premium": 1}
        else:
            prompt = f"Say hello to visitor number {i} politely."
            scores = {"nano": 1, "standard": 1, "premium": 1}
        if not three_tiers:
            scores.pop("nano")
        lines.append(orjson.dumps({"prompt": prompt, "source": families[min(i % 5, 3)], "scores": scores}))
    return b"\n".join(lines) + b"\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("router")
    data = folder / "train.jsonl"
    data.write_bytes(synthetic_lines())
    model = folder / "model.router"
    train_router(load_routing_data(data)).save(model)
    return data, model


def test_training_learns_which_prompts_need_the_top_tier(trained: tuple[Path, Path]) -> None:
    data_path, model_path = trained
    model = load_router(model_path)
    assert model.tiers == (Tier.STANDARD, Tier.PREMIUM)
    routed = model.route(["Solve the equation 7x + 3 = 250 and compute the integral of x^3 from 0 to 4.",
                          "Say hello to visitor number 9000 politely."], [None, None])
    assert routed == [Tier.PREMIUM, Tier.STANDARD]
    meta = model.metadata
    assert meta["format_version"] == 1 and meta["examples"] == 240 and meta["sources"] == 4
    assert meta["data_sha256"] == load_routing_data(data_path).sha256
    assert {"scikit-learn", "numpy", "python"} <= set(meta["versions"])
    assert "log_chars" in meta["features"] and meta["quality_target"] == 0.95
    assert meta["out_of_fold"]["quality_ratio"] >= 0.95


def test_a_lower_quality_target_sends_fewer_requests_to_the_top_tier(trained: tuple[Path, Path]) -> None:
    model = load_router(trained[1])
    texts = [e.text() for e in load_routing_data(trained[0]).examples]
    strict = model.with_quality_target(1.0)
    loose = model.with_quality_target(0.5)
    assert loose.threshold > strict.threshold
    top_share = {m.quality_target: np.mean([t is Tier.PREMIUM for t in m.route(texts, [None] * len(texts))])
                 for m in (strict, loose)}
    assert top_share[0.5] < top_share[1.0]
    with pytest.raises(ValueError, match="quality_target"):
        model.with_quality_target(0)


def test_three_tiers_pick_the_cheapest_tier_predicted_to_be_enough(tmp_path: Path) -> None:
    data = parse_lines(synthetic_lines(360, seed=5, three_tiers=True))
    model = train_router(data)
    assert model.tiers == (Tier.NANO, Tier.STANDARD, Tier.PREMIUM)
    routed = model.route(
        ["Say hello to visitor number 77 politely.",
         "Summarise the history of trade routes in region 77 for a report.",
         "Solve the equation 5x + 2 = 301 and compute the integral of x^4 from 0 to 3."],
        [None, None, None],
    )
    assert routed == [Tier.NANO, Tier.STANDARD, Tier.PREMIUM]


def test_evaluation_with_a_model_and_cross_validated(trained: tuple[Path, Path]) -> None:
    settings = load_settings(environ={})
    data = load_routing_data(trained[0])
    report = evaluate(data, settings, load_router(trained[1])).report()
    assert set(report["strategies"]) == {"random", "rules", "length", "learned", "oracle"}
    assert report["strategies"]["random"]["apgr"] == pytest.approx(0.5)
    learned, oracle = report["strategies"]["learned"], report["strategies"]["oracle"]
    # Maths first is the best order there is: PGR climbs to 1 at the maths share h and
    # stays there, an area of 1 - h / 2.
    maths = np.mean([1 - e.scores[Tier.STANDARD] for e in data.examples])
    assert oracle["apgr"] == pytest.approx(1 - maths / 2)
    assert learned["apgr"] >= 0.95 * oracle["apgr"] and learned["premium_share_for_95pct_quality"] < 0.6
    point = learned["operating_point"]
    assert point["quality_ratio"] >= 0.95 and point["premium_share"] < 0.7
    crossed = evaluate(data, settings, cross_validate=True).report()
    assert crossed["strategies"]["random"]["apgr"] == pytest.approx(0.5)  # folds of unequal size
    assert crossed["data"]["folds"] == 4  # one per source family
    assert len(crossed["strategies"]["learned"]["folds"]) == 4
    assert crossed["strategies"]["learned"]["apgr"] >= 0.9 * oracle["apgr"]


# --------------------------------------------------------------------------- the file


def rewrite_header(source: Path, target: Path, change: dict) -> None:
    raw = source.read_bytes()[len(MAGIC):]
    (length,) = struct.unpack(">Q", raw[:8])
    header = orjson.loads(raw[8 : 8 + length])
    for key, value in change.items():
        if key == "scikit-learn":
            header["metadata"]["versions"]["scikit-learn"] = value
        else:
            header[key] = value
    body = orjson.dumps(header)
    target.write_bytes(MAGIC + struct.pack(">Q", len(body)) + body + raw[8 + length :])


def test_unusable_files_say_why(trained: tuple[Path, Path], tmp_path: Path) -> None:
    good = trained[1]
    with pytest.raises(RouterModelError, match="cannot read router file"):
        load_router(tmp_path / "absent.router")
    (tmp_path / "text.router").write_text("hello")
    with pytest.raises(RouterModelError, match="is not a tierstream router file"):
        load_router(tmp_path / "text.router")
    damaged = bytearray(good.read_bytes())
    damaged[-100] ^= 0xFF
    (tmp_path / "damaged.router").write_bytes(bytes(damaged))
    with pytest.raises(RouterModelError, match="is corrupt: its contents do not match their checksum"):
        load_router(tmp_path / "damaged.router")
    rewrite_header(good, tmp_path / "future.router", {"format_version": 99})
    with pytest.raises(RouterModelError, match="has router format version 99; this tierstream reads version 1"):
        load_router(tmp_path / "future.router")
    rewrite_header(good, tmp_path / "old.router", {"scikit-learn": "0.24.2"})
    with pytest.raises(RouterModelError, match="written with scikit-learn 0.24.2"):
        load_router(tmp_path / "old.router")


def test_an_unusable_configured_model_is_a_start_up_error_naming_the_field(tmp_path: Path) -> None:
    settings = load_settings(environ={
        "TIERSTREAM__CLASSIFIER__STRATEGY": "learned",
        "TIERSTREAM__CLASSIFIER__LEARNED__MODEL": str(tmp_path / "absent.router"),
    })
    with pytest.raises(ConfigError, match=r"^classifier.learned.model: cannot read router file"):
        Classifier(settings, None)
    with pytest.raises(ConfigError, match=r"classifier.learned.quality_target"):
        load_settings(environ={"TIERSTREAM__CLASSIFIER__LEARNED__QUALITY_TARGET": "1.5"})


def test_the_packaged_default_router_loads() -> None:
    router = configured_router(None, None)
    assert router.tiers == (Tier.STANDARD, Tier.PREMIUM)
    assert router.metadata["examples"] == 5874 and router.metadata["sources"] == 29
    assert configured_router(DEFAULT_ROUTER_PATH, 0.8).threshold > router.threshold


# --------------------------------------------------------------------------- the strategy


def learned_settings(model: Path, **overrides: str) -> Settings:
    return load_settings(environ={
        "TIERSTREAM__CLASSIFIER__STRATEGY": "learned",
        "TIERSTREAM__CLASSIFIER__LEARNED__MODEL": str(model),
        **overrides,
    })


async def test_learned_strategy_keeps_hints_and_floors(trained: tuple[Path, Path]) -> None:
    settings = learned_settings(trained[1], TIERSTREAM__AGENT_TYPES__PLANNER__MIN_TIER="premium")
    classifier = Classifier(settings, None)
    decisions = await classifier.classify_batch([
        request("Say hello to visitor number 4 politely.", "router"),
        request("Solve the equation 3x + 1 = 700 and compute the integral of x^2 from 0 to 5.", "router"),
        request("Solve the equation 3x + 1 = 700 and compute the integral of x^2 from 0 to 5.", "router", Tier.NANO),
        request("Say hello to visitor number 4 politely.", "planner"),  # its floor: premium
    ])
    assert [(d.tier, d.routed_by) for d in decisions] == [
        (Tier.STANDARD, "learned"), (Tier.PREMIUM, "learned"), (Tier.NANO, "hint"), (Tier.PREMIUM, "learned"),
    ]


def request(task: str, agent_type: str, hint: Tier | None = None) -> AgentRequest:
    return AgentRequest(request_id=f"r-{abs(hash((task, agent_type, hint)))}", workflow_id="wf-1",
                        agent_type=agent_type, task=task, tier_hint=hint)


async def test_a_batch_keeps_its_order_and_dead_letters_bad_messages(trained: tuple[Path, Path]) -> None:
    settings = learned_settings(trained[1])
    topology = Topology(settings)
    handler = ClassifierHandler(settings, topology, Classifier(settings, None), PriceBook(settings))
    bodies = [
        orjson.dumps({"request_id": "a", "workflow_id": "wf", "agent_type": "writer", "task": "Say hello to visitor 1 politely."}),
        b"{broken",
        orjson.dumps({"request_id": "b", "workflow_id": "wf", "agent_type": "writer",
                      "task": "Solve the equation 9x + 2 = 500 and compute the integral of x^5 from 0 to 2."}),
    ]
    sources = [Source(topology.requests.name, 0, i, b"wf", body) for i, body in enumerate(bodies)]
    [first], [second], [third] = await handler.handle_batch(sources)
    assert first.topic == topology.tiers[Tier.STANDARD].name
    assert second.topic == topology.dead_letters.name and orjson.loads(second.value)["source_offset"] == 1
    assert third.topic == topology.tiers[Tier.PREMIUM].name
    tiered = decode(third.value, TieredRequest)
    assert (tiered.request_id, tiered.routed_by) == ("b", "learned")


# --------------------------------------------------------------------------- the commands


def test_router_commands(trained: tuple[Path, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    data, _ = trained
    out = tmp_path / "cli.router"
    trained_run = runner.invoke(cli, ["router", "train", "--data", str(data), "--out", str(out), "--quality-target", "0.9"])
    assert trained_run.exit_code == 0, trained_run.output
    assert load_router(out).quality_target == 0.9
    evaluated = runner.invoke(cli, ["router", "eval", "--data", str(data), "--model", str(out), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    report = orjson.loads(evaluated.stdout)  # exactly one JSON object
    for name in ("random", "rules", "length", "learned", "oracle"):
        figures = report["strategies"][name]
        assert {"premium_share_for_95pct_quality", "apgr", "cpt50", "cpt80"} <= set(figures)
        assert {"premium_share", "quality_ratio", "cost_ratio"} <= set(figures["operating_point"])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(line() + b"\n" + line(scores={"standard": 2, "premium": 1}) + b"\n")
    refused = runner.invoke(cli, ["router", "eval", "--data", str(bad)])
    assert refused.exit_code == 2
    assert "bad.jsonl, line 2: scores.standard: Input should be" in " ".join(refused.output.split())
