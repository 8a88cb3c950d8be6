"""The benchmark harness's pure parts: scenario presets, figures, ratios, comparison with a
saved run, and the parsers of Kafka's perf tools' output."""

from __future__ import annotations

import pytest

from benchmarks.harness import FIGURES, compare, parse_args, ratios
from benchmarks.kafka_perf import parse_consumer, parse_producer
from benchmarks.measure import cdf, peak_overlap


def test_scenarios_set_defaults_and_explicit_options_win() -> None:
    two = parse_args(["--scenario", "2"])
    assert (two.requests, two.workers, two.latency_ms, two.max_in_flight) == (4000, [1], 2000.0, 4000)
    assert two.sdk_alone == 4000, "scenario 2 measures the SDK calls alone too"
    assert parse_args(["--scenario", "2", "--sdk-alone", "0"]).sdk_alone == 0
    assert two.pipelines == ["tierstream", "raw-sdk"]
    three = parse_args(["--scenario", "3", "--requests", "300"])
    assert (three.requests, three.workers) == (300, [1, 2, 4])
    assert parse_args(["--scenario", "4"]).pipelines == ["tierstream", "tierstream-guarded"]
    plain = parse_args([])
    assert (plain.requests, plain.workers, plain.max_in_flight) == (20000, [1], None)
    assert (plain.warmup, plain.repeats) == (20000, 1), "the warm-up is as large as the burst"
    assert plain.sdk_alone == 0
    assert parse_args(["--scenario", "1", "--warmup", "0"]).warmup == 0
    with pytest.raises(SystemExit):
        parse_args(["--workers", "1,x"])
    with pytest.raises(SystemExit):
        parse_args(["--pipelines", "tierstream,nope"])


def test_peak_overlap_counts_calls_open_at_once() -> None:
    assert peak_overlap([]) == 0
    assert peak_overlap([(0, 1), (1, 2), (2, 3)]) == 1  # touching intervals do not overlap
    assert peak_overlap([(0, 10), (1, 2), (1.5, 3), (5, 6)]) == 3


def test_cdf_is_101_ordered_percentiles() -> None:
    assert cdf(list(range(100, -1, -1))) == list(range(101))
    points = cdf([float(v) for v in range(7)])
    assert len(points) == 101 and points == sorted(points)
    assert (points[0], points[100]) == (0.0, 6.0)
    assert cdf([]) == []


def _pipeline(rps: float) -> dict:
    """A pipeline's figures with every FIGURES path set to ``rps`` (enough for ratios)."""
    figures: dict = {}
    for _, path in FIGURES:
        node = figures
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = rps
    return figures


def test_ratios_cover_every_figure_of_every_pair_present() -> None:
    out = ratios({"tierstream": _pipeline(50.0), "raw-sdk": _pipeline(100.0)})
    assert set(out) == {"tierstream/raw-sdk"}
    assert out["tierstream/raw-sdk"] == {name: 0.5 for name, _ in FIGURES}


def test_compare_matches_runs_by_worker_count_and_reads_first_harness_reports() -> None:
    now = {"runs": [{"workers": 1, "pipelines": {"raw-fake": _pipeline(300.0)}},
                    {"workers": 2, "pipelines": {"raw-fake": _pipeline(500.0)}}]}
    old_schema = {"config": {"workers": 1}, "pipelines": {"raw-fake": _pipeline(200.0)}}
    rows = compare(now, old_schema)
    assert {r["workers"] for r in rows} == {1}
    assert len(rows) == len(FIGURES)
    assert all(r["ratio"] == 1.5 for r in rows)


PRODUCER_OUT = """\
50000 records sent, 17940.0 records/sec (5.36 MB/sec), 301.2 ms avg latency, 612.0 ms max latency.
50000 records sent, 17940.3 records/sec (5.36 MB/sec), 290.55 ms avg latency, 700.00 ms max latency, 280 ms 50th, 500 ms 95th, 525 ms 99th, 690 ms 99.9th.
"""
CONSUMER_OUT = """\
start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec, rebalance.time.ms, fetch.time.ms, fetch.MB.sec, fetch.nMsg.sec
2026-11-27 23:20:15:001, 2026-11-27 23:20:17:100, 14.9269, 7.1114, 50000, 23820.8671, 300, 1799, 8.2973, 27793.2184
"""


def test_perf_tool_output_is_parsed() -> None:
    producer = parse_producer(PRODUCER_OUT)
    assert producer["records"] == 50000 and producer["records_per_s"] == 17940.3
    assert (producer["latency_p50_ms"], producer["latency_p99_ms"]) == (280, 525)
    consumer = parse_consumer(CONSUMER_OUT)
    assert consumer == {"records": 50000, "records_per_s": 23820.8671, "mb_per_s": 7.1114,
                        "fetch_records_per_s": 27793.2184}
    with pytest.raises(ValueError):
        parse_producer("nothing useful")


def test_a_variant_is_tierstream_with_its_environment_compared_with_tierstream() -> None:
    from benchmarks.harness import PIPELINE_ENV

    args = parse_args(["--pipelines", "tierstream", "--variant", "b16k:TIERSTREAM_PRODUCER_MAX_BATCH_BYTES=16384,X=1"])
    assert args.pipelines == ["tierstream", "tierstream-b16k"]
    assert PIPELINE_ENV["tierstream-b16k"] == {"TIERSTREAM_PRODUCER_MAX_BATCH_BYTES": "16384", "X": "1"}
    out = ratios({"tierstream": _pipeline(100.0), "tierstream-b16k": _pipeline(80.0)})
    assert out["tierstream-b16k/tierstream"]["results_per_s"] == 0.8
    with pytest.raises(SystemExit):
        parse_args(["--variant", "no-assignments"])
    # a comma inside a value stays in it: only ",NAME=" starts the next assignment
    parse_args(["--variant", "gc:TIERSTREAM__WORKER__X=[700,10,10],Y=2"])
    assert PIPELINE_ENV["tierstream-gc"] == {"TIERSTREAM__WORKER__X": "[700,10,10]", "Y": "2"}


def test_repeats_report_the_median_round_and_list_every_round() -> None:
    from benchmarks.harness import median_run

    def round_(rps: float, lost: int = 0) -> dict:
        return {**_pipeline(rps), "counts": {"lost": lost, "duplicates": 0}}

    assert median_run([round_(7.0)]) == round_(7.0), "one round: reported as it is"
    chosen = median_run([round_(600.0), round_(350.0, lost=1), round_(500.0)])
    assert chosen["throughput"]["results_per_s"] == 500.0
    assert [r["results_per_s"] for r in chosen["repeats"]] == [600.0, 350.0, 500.0]
    assert [r["counts"]["lost"] for r in chosen["repeats"]] == [0, 1, 0], "every round's counts kept"
    assert [r["overhead_p99_ms"] for r in chosen["repeats"]] == [600.0, 350.0, 500.0], "and its latency"
    assert median_run([round_(2.0), round_(1.0)])["throughput"]["results_per_s"] == 1.0, "lower middle"


def test_a_run_at_a_rate_is_reported_by_its_median_overhead_p99() -> None:
    """At ``--rate`` every round delivers about the offered rate: ranked by results/s the
    reported round would be any of them, whatever its latency."""
    from benchmarks.harness import median_run

    def round_(rps: float, p99: float) -> dict:
        figures = {**_pipeline(rps), "counts": {"lost": 0, "duplicates": 0}}
        figures["latency_ms"] = {**figures["latency_ms"], "overhead": {**figures["latency_ms"]["overhead"], "p99": p99}}
        return figures

    rounds = [round_(150.2, 40.0), round_(149.8, 900.0), round_(150.0, 60.0)]
    assert median_run(rounds)["latency_ms"]["overhead"]["p99"] == 60.0
    assert median_run(rounds, "overhead_p99_ms")["latency_ms"]["overhead"]["p99"] == 60.0
    rounds = [round_(149.8, 40.0), round_(150.0, 900.0), round_(150.2, 60.0)]
    assert median_run(rounds)["latency_ms"]["overhead"]["p99"] == 900.0, "by results/s: the slowest round"
    assert median_run(rounds, "overhead_p99_ms")["latency_ms"]["overhead"]["p99"] == 60.0


def test_scenario_4_guarded_pipeline_has_rate_limits_that_the_others_do_not() -> None:
    from benchmarks.harness import pipeline_env
    from topologies.config import load_settings

    def limits(kind: str) -> dict:
        env = pipeline_env(kind, "run", "127.0.0.1:9092", 8700, None)
        return load_settings(environ=env).rate_limits

    guarded = limits("tierstream-guarded")
    assert set(guarded) == {"researcher", "analyst", "writer"}
    assert all(limit.burst >= 100_000 for limit in guarded.values())  # never binds on a run
    assert limits("tierstream") == {}


async def test_lag_is_never_negative_while_the_group_commits_between_the_reads() -> None:
    """A group that keeps up with a growing log: every read of either offset finds 10 more
    messages produced, consumed and committed. Reading the end offset before the committed
    offset would give -10."""
    from aiokafka import TopicPartition
    from aiokafka.structs import OffsetAndMetadata

    from benchmarks.lag import committed_lag

    tps = [TopicPartition("t", 0), TopicPartition("t", 1)]
    log_end = dict.fromkeys(tps, 0)

    def traffic() -> None:
        for tp in tps:
            log_end[tp] += 10

    class Admin:
        async def list_consumer_group_offsets(self, group, partitions):
            traffic()
            return {tp: OffsetAndMetadata(log_end[tp], "") for tp in partitions if tp.partition == 0}

    class Consumer:
        async def end_offsets(self, partitions):
            traffic()
            return {tp: log_end[tp] for tp in partitions}

    lag = await committed_lag(Admin(), Consumer(), "g", tps)
    assert lag == {tps[0]: 10, tps[1]: 20}  # partition 1 has nothing committed: all of it is lag


@pytest.mark.parametrize(
    ("command", "module"),
    [("bench", "benchmarks.harness"), ("bench-guardrails", "benchmarks.guardrails"),
     ("bench-ratelimit", "benchmarks.ratelimit")],
)
def test_bench_commands_hand_every_argument_to_the_module_parser(
    command: str, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tierstream bench*` defines no options of its own: none can fall behind the module's."""
    import importlib

    from typer.testing import CliRunner

    from streams.cli import app

    seen: list[list[str]] = []
    monkeypatch.setattr(importlib.import_module(module), "main", lambda argv: seen.append(argv) or 0)
    argv = ["--repeats", "3", "--output", "x.json", "--help"]
    result = CliRunner().invoke(app, [command, *argv])
    assert result.exit_code == 0, result.output
    assert seen == [argv]


def test_bench_help_lists_the_harness_options() -> None:
    from typer.testing import CliRunner

    from streams.cli import app

    result = CliRunner().invoke(app, ["bench", "--help"])
    assert result.exit_code == 0
    for option in ("--repeats", "--warmup", "--rate", "--sdk-alone", "--variant"):
        assert option in result.output, option
