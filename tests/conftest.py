"""Session fixtures: a real Apache Kafka broker and the provider simulator.

The broker is, in this order: ``$KAFKA_BOOTSTRAP_SERVERS``; a testcontainers Kafka if a
Docker engine answers; else a local KRaft broker started from the Maven Central jars by
``streams/broker_files/kafka.sh`` on free ports, for this test session only.

Every test that needs a broker carries the ``e2e`` marker, so that ``-m "not e2e"`` runs
without one. Two checks keep it so: collection fails for a test that uses a broker fixture
unmarked, and a test that starts a :class:`LocalBroker` of its own unmarked fails.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from streams import processes
from streams.broker import LocalBroker, free_ports
from streams.simulator import ProviderSimulator, SimulatorConfig
from tests.support import Pipeline, new_pipeline

# The fixtures that provide a broker (``pipeline_factory`` and any other fixture that uses
# one of them count too): the session's, and test_kafka_security.py's SASL broker.
BROKER_FIXTURES = frozenset({"kafka_bootstrap", "sasl_broker"})
_E2E_HINT = "add the e2e marker (`pytestmark = pytest.mark.e2e` for a module of such tests, else @pytest.mark.e2e)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        f"{item.nodeid} (uses {', '.join(sorted(BROKER_FIXTURES.intersection(item.fixturenames)))})"
        for item in items
        if BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ())) and item.get_closest_marker("e2e") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests need a Kafka broker but are not marked e2e, so `-m \"not e2e\"` would run them: "
            + "; ".join(unmarked) + f". To fix: {_E2E_HINT}"
        )


_running: list[pytest.Item] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


@pytest.fixture(scope="session", autouse=True)
def _broker_starts_only_in_e2e_tests() -> Iterator[None]:
    """A test (or a fixture it uses) that starts a :class:`LocalBroker` of its own must be
    marked e2e too: the collection check sees fixtures only."""
    start = LocalBroker.start

    def checked_start(self: LocalBroker, *args: object, **kwargs: object) -> str:
        item = _running[-1] if _running else None
        if item is not None and item.get_closest_marker("e2e") is None:
            pytest.fail(f"{item.nodeid} starts a Kafka broker but is not marked e2e. To fix: {_E2E_HINT}", pytrace=False)
        return start(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LocalBroker, "start", checked_start)
        yield


def _docker_engine_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means no usable Docker engine
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
