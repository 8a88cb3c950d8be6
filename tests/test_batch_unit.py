"""The batch path without a broker: which requests the classifier sends to the batch role,
the job records' rules, the open-batches book, and the batch price.

The batch role itself, with the providers' batch APIs and a real broker, is tested in
tests/test_batch_e2e.py; the simulator's batch APIs in tests/test_simulator_batches.py.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
from pydantic import ValidationError

from schemas.models import AgentRequest, BatchJob, Tier, TieredRequest
from streams.batches.clients import custom_id, item_index
from streams.batches.jobs import JobBook, open_batches
from streams.costing import cost_event
from streams.envelope import Source
from streams.pricing import PriceBook
from streams.providers import Completion
from streams.roles.classifier import Classifier, ClassifierHandler
from topologies import Settings, Topology, load_settings


def _settings(**env: str) -> Settings:
    return load_settings(environ={"TIERSTREAM__BATCH__COMPLETION_WINDOW_SECONDS": "3600",
                                  "TIERSTREAM__BATCH__DEADLINE_MARGIN_SECONDS": "60", **env})


async def _route(settings: Settings, **fields: object) -> str:
    handler = ClassifierHandler(settings, Topology(settings), Classifier(settings, None), PriceBook(settings))
    raw = orjson.dumps({"request_id": "r-1", "workflow_id": "wf-1", "agent_type": "writer",
                        "task": "Summarise.", "tier_hint": "standard", **fields}, default=str)
    [out] = await handler.handle(Source("agent.requests", 0, 1, b"wf-1", raw))
    return out.topic


def _in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


@pytest.mark.parametrize(
    ("fields", "topic"),
    [
        ({}, "agent.requests.standard"),  # the agent type's default: interactive
        ({"latency_class": "batch"}, "agent.requests.batch"),
        ({"latency_class": "interactive"}, "agent.requests.standard"),
        # the window (1 h here) plus the margin (1 min) must fit before the deadline
        ({"latency_class": "batch", "complete_by": _in(2 * 3600)}, "agent.requests.batch"),
        ({"latency_class": "batch", "complete_by": _in(3600)}, "agent.requests.standard"),
        ({"latency_class": "batch", "complete_by": _in(-10)}, "agent.requests.standard"),
    ],
)
async def test_the_classifier_sends_batch_requests_whose_deadline_allows_to_the_batch_topic(
    fields: dict[str, object], topic: str
) -> None:
    assert await _route(_settings(), **fields) == topic


async def test_an_agent_types_default_and_the_switch() -> None:
    batch_writers = _settings(TIERSTREAM__AGENT_TYPES__WRITER__LATENCY_CLASS="batch")
    assert await _route(batch_writers) == "agent.requests.batch"
    assert await _route(batch_writers, latency_class="interactive") == "agent.requests.standard"
    off = _settings(TIERSTREAM__AGENT_TYPES__WRITER__LATENCY_CLASS="batch", TIERSTREAM__BATCH__ENABLED="false")
    assert await _route(off) == "agent.requests.standard"


def test_batch_settings_are_validated_with_the_field_named() -> None:
    from topologies.config import ConfigError

    with pytest.raises(ConfigError, match="batch.max_bytes"):
        load_settings(environ={"TIERSTREAM__BATCH__MAX_BYTES": "2000000"})
    with pytest.raises(ConfigError, match="batch.on_item_failure"):
        load_settings(environ={"TIERSTREAM__BATCH__ON_ITEM_FAILURE": "drop"})


def _tiered(n: int, max_tokens: int = 100) -> TieredRequest:
    return TieredRequest(request_id=f"r-{n}", workflow_id="wf-1", agent_type="writer", task="x" * 40,
                         max_output_tokens=max_tokens, tier=Tier.STANDARD, routed_by="hint")


def _job(key: str, state: str, n: int, provider: str = "openai", model: str = "gpt-4o") -> BatchJob:
    return BatchJob(job_key=key, state=state, provider=provider, model=model, source_partition=0,  # type: ignore[arg-type]
                    items=[_tiered(i) for i in range(n)] if state != "answered" else [])


def test_a_job_carries_requests_until_it_is_answered() -> None:
    with pytest.raises(ValidationError, match="carries at least one request"):
        BatchJob(job_key="abc", state="submitting", provider="openai", model="m", source_partition=0)
    assert BatchJob(job_key="abc", state="answered", provider="openai", model="m", source_partition=0).items == []
    with pytest.raises(ValidationError):
        _job("Not-Lower", "submitting", 1)


def test_the_book_follows_each_job_to_its_last_record() -> None:
    book = JobBook(load_settings(environ={}))
    book.apply(_job("a", "submitting", 3))
    book.apply(_job("b", "submitted", 2, provider="anthropic", model="claude"))
    assert book.carries("r-2") and not book.carries("r-9")
    queued = book.enqueued("openai", "gpt-4o")
    assert queued.requests == 3 and queued.tokens >= 3 * 100
    assert book.enqueued("anthropic", "claude").requests == 2
    book.apply(_job("a", "answering", 3))  # answered items no longer count in the queue
    assert book.enqueued("openai", "gpt-4o").requests == 0 and book.carries("r-0")
    book.apply(_job("a", "submitted", 3))  # an earlier step, read late from the topic
    assert book.jobs["a"].state == "answering"
    book.apply(_job("a", "answered", 0))
    assert not book.carries("r-0") and set(book.jobs) == {"b"}
    book.apply(_job("a", "answering", 3))  # nor does anything after the job was answered
    assert "a" not in book.jobs and not book.carries("r-0")
    assert [j.job_key for j in book.owned([0])] == ["b"] and book.owned([1]) == []
    [row] = open_batches(book, datetime.now(UTC).timestamp())
    assert (row["job"], row["provider"], row["items"], row["state"]) == ("b", "anthropic", 2, "submitted")


def test_custom_ids_map_back_to_the_job_and_item() -> None:
    assert item_index("abc", custom_id("abc", 12)) == 12
    assert item_index("abc", custom_id("abd", 12)) is None
    assert item_index("abc", "abc-x") is None and item_index("abc", None) is None


def test_the_batch_price_is_the_configured_share_of_the_online_price() -> None:
    settings = load_settings(environ={})
    prices = PriceBook(settings)
    request = AgentRequest(request_id="r", workflow_id="w", agent_type="writer", task="t")
    completion = Completion(text="a", finish_reason="stop", model="gpt-4o", input_tokens=1000, output_tokens=500)
    online = cost_event(prices, request, Tier.STANDARD, "openai", "gpt-4o", completion, 1)
    batch = cost_event(prices, request, Tier.STANDARD, "openai", "gpt-4o", completion, 1, 0.5)
    assert online.cost_usd > 0
    assert Decimal(str(batch.cost_usd)) == Decimal(str(online.cost_usd)) / 2


# ---------------------------------------------------------------- the batch clients


@pytest.fixture
async def batch_sim():
    from streams.simulator import ProviderSimulator, SimulatorConfig

    async with ProviderSimulator(SimulatorConfig(port=0, latency_ms_median=0, batch_delay_seconds=0.2)) as sim:
        yield sim


def _clients(sim) -> dict[str, object]:
    from streams.batches.clients import AnthropicBatches, OpenAIBatches

    return {"openai": OpenAIBatches("sk-sim", sim.openai_base_url, 10, 0),
            "anthropic": AnthropicBatches("sk-sim", sim.anthropic_base_url, 10, 0)}


async def _ended(client, batch_id: str):
    from tests.support import wait_until

    return await wait_until(lambda: client.status(batch_id), 10, "the batch to end", accept=lambda s: s.ended, interval=0.05)


@pytest.mark.parametrize(("provider", "model"), [("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4-6")])
async def test_a_batch_through_the_official_sdk_gives_each_item_its_answer_or_its_failure(
    batch_sim, provider: str, model: str
) -> None:
    from schemas.models import ChatMessage
    from streams.batches.clients import BatchItem, NotThisJob

    client = _clients(batch_sim)[provider]
    items = [BatchItem([ChatMessage(role="user", content=f"Say {n}.")], 16) for n in range(5)]
    items[3] = BatchItem([ChatMessage(role="user", content="Say 3. #sim:batch-error")], 16)
    items[4] = BatchItem([ChatMessage(role="user", content="Say 4. #sim:batch-expire")], 16)
    since = datetime.now(UTC)
    batch_id = await client.submit("abc123", model, items)
    status = await _ended(client, batch_id)
    assert status.rejected is None
    outcomes = await client.results(batch_id, "abc123", len(items))
    for outcome in outcomes[:3]:
        assert outcome.completion is not None and outcome.completion.output_tokens > 0 and outcome.failure is None
        assert outcome.completion.input_tokens > 0
    assert outcomes[3].completion is None and outcomes[3].failure
    assert outcomes[4].completion is None and "expire" in (outcomes[4].failure or "")
    # an unrecorded submission is found again, and only by its own job
    assert batch_id in await client.find("abc123", len(items), since, set())
    assert await client.find("abc123", len(items), since, {batch_id}) == []
    with pytest.raises(NotThisJob):
        await client.results(batch_id, "other1", len(items))
    await client.close()


async def test_a_batch_refused_whole_says_why() -> None:
    """Over the provider's batch size: Anthropic refuses it at creation, OpenAI fails it
    in validation; either way the client says why."""
    from schemas.models import ChatMessage
    from streams.batches.clients import BatchItem, BatchRejected
    from streams.simulator import ProviderSimulator, SimulatorConfig

    items = [BatchItem([ChatMessage(role="user", content=f"Hi {n}.")], 16) for n in range(3)]
    config = SimulatorConfig(port=0, latency_ms_median=0, batch_delay_seconds=0.1, batch_max_requests=2)
    async with ProviderSimulator(config) as sim:
        clients = _clients(sim)
        with pytest.raises(BatchRejected, match="400"):
            await clients["anthropic"].submit("abc", "claude-sonnet-4-6", items)
        batch_id = await clients["openai"].submit("abc", "gpt-4o-mini", items)
        status = await _ended(clients["openai"], batch_id)
        assert status.status == "failed" and status.rejected
        assert (await clients["openai"].status(await clients["openai"].submit("abc", "gpt-4o-mini", items[:2]))).rejected is None
        for client in clients.values():
            await client.close()


# ---------------------------------------------------------------- the role's steps, no broker


class _Partitions:
    def __init__(self, topic: str) -> None:
        self.topic = topic

    def generation(self) -> int:
        return 1

    def assigned(self) -> set[tuple[str, int]]:
        return {(self.topic, 0)}

    def owns(self, topic: str, partition: int) -> bool:
        return (topic, partition) == (self.topic, 0)


class _Written:
    """Nothing written before: the role's first answer to every job."""

    async def ends(self, topics: object) -> dict[str, int]:
        return {}

    async def request_ids(self, since: object) -> dict[str, set[str]]:
        return {}

    async def stop(self) -> None:
        pass


class _Worker:
    """What the batch role asks of its worker; records are kept, not sent."""

    def __init__(self, settings: Settings) -> None:
        from topologies.topics import topology_of

        self.settings = settings
        self.topology = topology_of(settings)
        self.role = "batch"
        self.partitions = _Partitions(self.topology.batch.name)
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []

    def sender(self, spec):
        async def send(key: bytes | None, value: bytes | None) -> tuple[int, int]:
            self.sent.append((spec.name, key, value))
            return 0, len(self.sent)

        return send

    def on(self, topic: str) -> list[dict]:
        return [orjson.loads(v) for t, _k, v in self.sent if t == topic and v is not None]


def _role(sim, **env: str):
    from streams.processes import simulator_env
    from streams.roles.batch import BatchRole

    worker = _Worker(load_settings(environ={**simulator_env(sim.port), **env}))
    role = BatchRole(worker)
    role.written = _Written()  # type: ignore[assignment]
    role.budget.patience = 0.01  # no cost role grants here: a job taken over goes unreserved at once
    return worker, role


async def _until_no_open_jobs(role) -> None:
    from tests.support import wait_until

    async def step() -> int:
        await role.poll()
        await asyncio.gather(*role._tasks)
        return len(role.book.jobs)

    role.book.ready.set()
    role.answered.ready.set()
    await wait_until(step, 20, "every job answered", accept=lambda n: n == 0, interval=0.05)


def _request(n: int, tier: Tier, text: str = "") -> TieredRequest:
    return TieredRequest(request_id=f"r-{n}", workflow_id="wf-1", agent_type="writer",
                         task=f"Say {n}. {text}".strip(), max_output_tokens=16, tier=tier, routed_by="hint",
                         latency_class="batch")


async def test_a_batch_refused_whole_is_split_and_the_requests_refused_alone_are_dead_lettered() -> None:
    """Anthropic refuses a batch over its size at creation: halves are sent as new jobs.
    OpenAI fails a batch over its enqueued-token limit in validation: halved until single
    requests, which are dead-lettered with the provider's reason, never dropped."""
    from streams.simulator import ProviderSimulator, SimulatorConfig

    config = SimulatorConfig(port=0, latency_ms_median=0, batch_delay_seconds=0.05, batch_max_requests=2)
    async with ProviderSimulator(config) as sim:
        worker, role = _role(sim)
        topology = worker.topology
        refused = await role._open(0, "anthropic", "claude-sonnet-4-6", [_request(n, Tier.STANDARD) for n in range(3)])
        assert refused == []
        jobs = worker.on(topology.batch_jobs.name)
        sizes = [(j["state"], len(j["items"])) for j in jobs]
        assert sizes[0] == ("submitting", 3) and ("answered", 0) in sizes
        assert sorted(n for state, n in sizes if state == "submitted") == [1, 2]
        await _until_no_open_jobs(role)  # the Anthropic halves end and are answered
        assert sorted(r["request_id"] for r in worker.on(topology.results.name)) == ["r-0", "r-1", "r-2"]
        await role.stop()

    config = SimulatorConfig(port=0, latency_ms_median=0, batch_delay_seconds=0.05, batch_max_enqueued_tokens=10)
    async with ProviderSimulator(config) as sim:
        worker, role = _role(sim)
        await role._open(0, "openai", "gpt-4o-mini", [_request(n, Tier.NANO) for n in range(3, 5)])
        await _until_no_open_jobs(role)
        letters = worker.on(topology.dead_letters.name)
        assert sorted(d["request_id"] for d in letters) == ["r-3", "r-4"]
        assert {d["code"] for d in letters} == {"batch_failed"} and all("token" in d["reason"] for d in letters)
        await role.stop()


async def test_a_batch_too_large_for_an_empty_anthropic_queue_is_split_not_retried_forever() -> None:
    """Anthropic answers 429 to a batch over its enqueued-token limit; with nothing else of
    the cluster queued for the model, waiting cannot help: the batch is halved."""
    from streams.batches.jobs import enqueued_tokens
    from streams.simulator import ProviderSimulator, SimulatorConfig

    requests = [_request(n, Tier.STANDARD) for n in range(2)]
    one = enqueued_tokens(_job("x", "submitting", 1).model_copy(update={"items": requests[:1]}))
    config = SimulatorConfig(port=0, latency_ms_median=0, batch_delay_seconds=0.05, batch_max_enqueued_tokens=one + 1)
    async with ProviderSimulator(config) as sim:
        worker, role = _role(sim)
        assert await role._open(0, "anthropic", "claude-sonnet-4-6", requests) == []
        sizes = [(j["state"], len(j["items"])) for j in worker.on(worker.topology.batch_jobs.name)]
        assert sizes[0] == ("submitting", 2) and ("submitted", 2) not in sizes
        assert [n for state, n in sizes if state == "submitting"] == [2, 1, 1]
        await _until_no_open_jobs(role)
        assert sorted(r["request_id"] for r in worker.on(worker.topology.results.name)) == ["r-0", "r-1"]
        await role.stop()


@pytest.mark.parametrize("policy", ["online", "dead_letter"])
async def test_items_the_provider_failed_follow_the_configured_policy(policy: str) -> None:
    from streams.simulator import ProviderSimulator, SimulatorConfig

    async with ProviderSimulator(SimulatorConfig(port=0, latency_ms_median=0, batch_delay_seconds=0.05)) as sim:
        worker, role = _role(sim, TIERSTREAM__BATCH__ON_ITEM_FAILURE=policy)
        topology = worker.topology
        requests = [_request(0, Tier.NANO), _request(1, Tier.NANO, "#sim:batch-error"),
                    _request(2, Tier.NANO, "#sim:batch-expire")]
        await role._open(0, "openai", "gpt-4o-mini", requests)
        await _until_no_open_jobs(role)
        [result] = worker.on(topology.results.name)
        assert (result["request_id"], result["answered_by"]) == ("r-0", "batch") and result["batch_id"]
        [cost] = worker.on(topology.costs.name)
        assert cost["request_id"] == "r-0" and cost["cost_usd"] == result["cost_usd"] > 0
        online = worker.on(topology.tiers[Tier.NANO].name)
        letters = worker.on(topology.dead_letters.name)
        if policy == "online":
            assert sorted(r["request_id"] for r in online) == ["r-1", "r-2"] and letters == []
            assert {r["latency_class"] for r in online} == {"interactive"}
        else:
            assert online == [] and sorted(d["request_id"] for d in letters) == ["r-1", "r-2"]
            assert all(d["code"] == "batch_failed" and d["reason"] for d in letters)
        states = [j["state"] for j in worker.on(topology.batch_jobs.name)]
        assert states == ["submitting", "submitted", "answering", "answered"]
        assert worker.sent[-1][2] is None  # then a tombstone
        await role.stop()


async def test_a_batch_waits_for_room_in_the_providers_queue_and_gives_way_to_a_rebalance() -> None:
    from streams.roles.batch import Rebalanced
    from streams.simulator import ProviderSimulator, SimulatorConfig

    async with ProviderSimulator(SimulatorConfig(port=0, latency_ms_median=0)) as sim:
        worker, role = _role(sim, TIERSTREAM__BATCH__MAX_ENQUEUED_REQUESTS="3")
        role.book.apply(_job("open", "submitted", 2, model="gpt-4o-mini"))
        two = [_request(n, Tier.NANO) for n in range(2)]
        waiting = asyncio.create_task(role._wait_for_queue_room("openai", "gpt-4o-mini", two, generation=1))
        await asyncio.sleep(0)
        assert not waiting.done()  # 2 enqueued + 2 > 3
        await role._wait_for_queue_room("anthropic", "claude-sonnet-4-6", two, generation=1)  # another model: room
        role.book.apply(_job("open", "answered", 0, model="gpt-4o-mini"))
        await asyncio.wait_for(waiting, 5)
        role.book.apply(_job("again", "submitted", 2, model="gpt-4o-mini"))
        with pytest.raises(Rebalanced):  # the consumer's generation moved on: read the requests again
            await asyncio.wait_for(role._wait_for_queue_room("openai", "gpt-4o-mini", two, generation=0), 5)
        await role.stop()
