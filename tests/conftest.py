"""Session fixtures: a real Apache Kafka broker and the provider simulator.

The broker is, in this order: ``$KAFKA_BOOTSTRAP_SERVERS``; a testcontainers Kafka if a
Docker engine answers; else a local KRaft broker started from the Maven Central jars by
``deploy/local/kafka.sh`` on free ports, for this test session only.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from streams import processes
from streams.broker import LocalBroker, free_ports
from streams.simulator import ProviderSimulator, SimulatorConfig
from tests.support import Pipeline, new_pipeline


def _docker_engine_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    if _docker_engine_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    broker = LocalBroker.on_free_ports(data_dir=tmp_path_factory.mktemp("kafka"))
    bootstrap = broker.start(timeout=120)
    try:
        yield bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def simulator_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A provider simulator shared by the session (no rate limits, 5 ms latency)."""
    (port,) = free_ports(1)
    log = tmp_path_factory.mktemp("simulator") / "simulator.log"
    proc = processes.spawn(["provider-sim", "--port", str(port), "--latency-ms", "5"], log_path=log)
    try:
        processes.wait_http_ok(f"http://127.0.0.1:{port}/health", 30, proc)
        yield port
    finally:
        processes.stop(proc)


@pytest.fixture
async def simulator() -> AsyncIterator[ProviderSimulator]:
    """An in-process provider simulator for one test: zero latency, no rate limits."""
    async with ProviderSimulator(SimulatorConfig(port=0, latency_ms_median=0)) as sim:
        yield sim


@pytest.fixture
def pipeline_factory(
    kafka_bootstrap: str, simulator_port: int, tmp_path: Path
) -> Iterator[object]:
    """Make isolated pipelines; their workers are stopped (and logs shown on failure)."""
    made: list[Pipeline] = []

    def make(**overrides: str) -> Pipeline:
        log_dir = tmp_path / f"pipeline-{len(made)}"
        log_dir.mkdir()
        pipeline = new_pipeline(kafka_bootstrap, simulator_port, log_dir, **overrides)
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.stop_workers()
