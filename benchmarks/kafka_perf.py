"""The broker's ceiling on this machine: Kafka's own producer and consumer perf tools.

``kafka-producer-perf-test`` and ``kafka-consumer-perf-test`` are the classes
``org.apache.kafka.tools.ProducerPerformance`` and ``ConsumerPerformance`` in the
``kafka-tools`` jar that ``kafka.sh fetch`` already puts in ``<cache>/kafka-<version>/libs``
(``streams.broker.cache_dir()``); they are run with ``java -cp '<libs>/*'``. Records are
the size of an average encoded request of the benchmark's workload, produced with the
settings tierstream's producers use (acks=all, linger 5 ms), on a topic with as many
partitions as the requests topic.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from pathlib import Path

from schemas.codec import encode
from streams.broker import cache_dir
from streams.workload import sample_requests

_PRODUCER_LINE = re.compile(
    r"(?P<records>\d+) records sent, (?P<rps>[\d.]+) records/sec \((?P<mbps>[\d.]+) MB/sec\), "
    r"(?P<avg>[\d.]+) ms avg latency, (?P<max>[\d.]+) ms max latency, (?P<p50>\d+) ms 50th, "
    r"(?P<p95>\d+) ms 95th, (?P<p99>\d+) ms 99th"
)


def kafka_libs(version: str) -> Path:
    return cache_dir() / f"kafka-{version}" / "libs"


def mean_request_bytes(samples: int = 500) -> int:
    sizes = [len(encode(r)) for r in sample_requests(samples, run_id="size")]
    return round(sum(sizes) / len(sizes))


def _java(libs: Path, main: str, args: list[str], timeout: float) -> str:
    cmd = ["java", "-Xmx512m", "-cp", f"{libs}/*", main, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{main} exited {proc.returncode}: {proc.stderr[-800:]}")
    return proc.stdout


def parse_producer(stdout: str) -> dict[str, float]:
    lines = list(_PRODUCER_LINE.finditer(stdout))
    match = lines[-1] if lines else None  # the last line is the summary
    if match is None:
        raise ValueError(f"no summary line in the producer perf output: {stdout[-400:]}")
    return {
        "records": int(match["records"]),
        "records_per_s": float(match["rps"]),
        "mb_per_s": float(match["mbps"]),
        "latency_avg_ms": float(match["avg"]),
        "latency_max_ms": float(match["max"]),
        "latency_p50_ms": float(match["p50"]),
        "latency_p95_ms": float(match["p95"]),
        "latency_p99_ms": float(match["p99"]),
    }


def parse_consumer(stdout: str) -> dict[str, float]:
    lines = [ln for ln in stdout.splitlines() if ln.count(",") >= 5]
    if len(lines) < 2:
        raise ValueError(f"no CSV summary in the consumer perf output: {stdout[-400:]}")
    header = [h.strip() for h in lines[0].split(",")]
    values = [v.strip() for v in lines[-1].split(",")]
    row = dict(zip(header, values, strict=False))
    return {
        "records": int(float(row["data.consumed.in.nMsg"])),
        "records_per_s": float(row["nMsg.sec"]),
        "mb_per_s": float(row["MB.sec"]),
        "fetch_records_per_s": float(row["fetch.nMsg.sec"]),
    }


def broker_ceiling(bootstrap: str, version: str, records: int, partitions: int) -> dict[str, object]:
    """Run both tools once against ``bootstrap``; a dict saying why when they cannot run."""
    libs = kafka_libs(version)
    if shutil.which("java") is None:
        return {"skipped": "java is not on PATH"}
    if not any(libs.glob("kafka-tools-*.jar")):
        return {"skipped": f"no kafka-tools jar in {libs} (run `make kafka`)"}
    size = mean_request_bytes()
    topic = f"bench-perf-{uuid.uuid4().hex[:8]}"
    timeout = 120 + records / 1000
    _java(libs, "org.apache.kafka.tools.TopicCommand", [
        "--bootstrap-server", bootstrap, "--create", "--topic", topic, "--partitions", str(partitions),
        "--replication-factor", "1",
    ], 60)
    produced = parse_producer(_java(libs, "org.apache.kafka.tools.ProducerPerformance", [
        "--topic", topic, "--num-records", str(records), "--record-size", str(size), "--throughput", "-1",
        "--producer-props", f"bootstrap.servers={bootstrap}", "acks=all", "linger.ms=5",
    ], timeout))
    consumed = parse_consumer(_java(libs, "org.apache.kafka.tools.ConsumerPerformance", [
        "--bootstrap-server", bootstrap, "--topic", topic, "--num-records", str(records),
        "--timeout", "60000",
    ], timeout))
    return {
        "tools": "org.apache.kafka.tools.ProducerPerformance / ConsumerPerformance "
                 f"(kafka-tools {version}), one run each",
        "topic_partitions": partitions,
        "record_bytes": size,
        "producer": produced,
        "consumer": consumed,
    }
