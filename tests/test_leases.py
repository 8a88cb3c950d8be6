"""Budget leases, without a broker: the costs topic, the cost role and the spend topic in
memory, several holders (tier workers) admitting calls concurrently through their
:class:`BudgetGate`. The e2e tests run the same on Kafka with real processes."""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import Awaitable, Callable

import pytest

from benchmarks.baseline import HourWindows, Workflows
from schemas.codec import decode_cost_record, encode
from schemas.models import BudgetRecord, CostEvent, Tier
from streams.envelope import Source
from streams.guardrails.budget import BudgetExceeded, BudgetGate, Reservation
from streams.guardrails.ledger import OPENINGS_SCOPE, Lease, Total, apply_budget, grant_size, openings_held
from streams.guardrails.money import hour_window, usd_to_nanos
from streams.guardrails.view import GuardrailView
from streams.roles.cost import CostAccountant
from topologies.config import Settings, load_settings
from topologies.topics import Topology, partition_of

NOW = 1_700_000_000.0 + 600.0  # ten minutes into an hour
USD = 1_000_000_000


def settings_with(
    hour_usd: float = 100.0, workflow_usd: float = 100.0, lease_seconds: float = 10.0, opening_share: float = 0.02,
    overdraft: bool = True,
) -> Settings:
    return load_settings(environ={}, overrides={"cost_guardrails": {
        "max_cost_per_hour_usd": hour_usd, "max_cost_per_workflow_usd": workflow_usd,
        "alert_threshold_usd": hour_usd, "lease_seconds": lease_seconds, "opening_share": opening_share,
        "overdraft": overdraft,
    }})


class Cluster:
    """Holders write to partitions of an in-memory costs topic; :meth:`pump` is the cost
    role: it counts what is new, in order, and publishes its snapshots to every view."""

    def __init__(self, settings: Settings, holders: int, partitions: int = 4) -> None:
        self.settings = settings
        self.topology = Topology(settings)
        self.now = NOW
        self.partitions = partitions
        self.log: dict[int, list[tuple[bytes, bytes, float]]] = {p: [] for p in range(partitions)}
        self.counted = dict.fromkeys(range(partitions), 0)
        self.cost_view = GuardrailView(settings)
        self.accountant = CostAccountant(settings, self.topology, HourWindows(), Workflows(), self.cost_view)
        self.views = [GuardrailView(settings) for _ in range(holders)]
        self.gates = [
            BudgetGate(view, self.send, f"h{i}", clock=lambda: self.now,
                       partitioner=(partitions, self.partition_of))
            for i, view in enumerate(self.views)
        ]
        for view in (*self.views, self.cost_view):
            view.caught_up.set()
        self.cost_role_up = True

    def partition_of(self, key: bytes) -> int:
        return zlib.crc32(key) % self.partitions

    async def send(self, key: bytes, value: bytes) -> tuple[int, int]:
        await asyncio.sleep(0)  # written later than asked, as on a broker
        p = self.partition_of(key)
        self.log[p].append((key, value, self.now))
        return p, len(self.log[p]) - 1

    def pump(self) -> None:
        if not self.cost_role_up:
            return
        for p, records in self.log.items():
            for offset in range(self.counted[p], len(records)):
                key, value, at = records[offset]
                source = Source(self.topology.costs.name, p, offset, key, value, at)
                self.accountant.batch.add(self.accountant.apply(source, at))
            self.counted[p] = len(records)
        self.accountant.tables.write()
        spend = self.topology.spend.name
        for out in self.accountant.batch.take():
            if out.topic == spend:
                for view in (*self.views, self.cost_view):
                    view.apply(spend, out.value)
        for view in (*self.views, self.cost_view):
            for listener in view.listeners:
                listener()

    async def call(self, gate: BudgetGate, workflow_id: str, worst: int, actual: int) -> int | None:
        """One model call under ``gate``: admitted, settled and its cost event written, as
        the tier role does (the hour's spend goes with the gate's next tick). The call's
        cost, or None if the workflow's budget was exceeded."""
        try:
            reservation = await gate.admit(workflow_id, worst)
        except BudgetExceeded:
            return None
        await asyncio.sleep(0)  # the model call
        await self.settle(gate, reservation, actual)
        return actual

    async def settle(self, gate: BudgetGate, reservation: Reservation, actual: int) -> None:
        gate.settle(reservation, actual)
        event = CostEvent(
            request_id=f"r{random.random()}", workflow_id=reservation.workflow_id, agent_type="researcher",
            tier=Tier.STANDARD, provider="openai", model="gpt-5-mini", attempt=1, input_tokens=1,
            output_tokens=1, cost_usd=actual / USD, lease_id=reservation.workflow_lease.lease_id,
        )
        where = await self.send(reservation.workflow_id.encode(), encode(event))
        gate.delivered(reservation, *where)

    async def run(self, work: Awaitable[object], step: float = 0.05, limit_seconds: float = 600) -> None:
        """Run ``work`` while the cost role counts and time passes (``step`` a turn)."""
        task = asyncio.ensure_future(work)
        start = self.now
        while not task.done():
            assert self.now - start < limit_seconds, "the work did not finish"
            self.pump()
            for gate in self.gates:
                await gate.tick()
            for _ in range(5):
                await asyncio.sleep(0)
            self.now += step
        await task

    def spent(self, scope: Callable[[CostEvent], bool] = lambda _e: True) -> int:
        """The cost events written, summed: what the calls really cost."""
        total = 0
        for records in self.log.values():
            for _key, value, _at in records:
                record = decode_cost_record(value)
                if isinstance(record, CostEvent) and scope(record):
                    total += usd_to_nanos(record.cost_usd)
        return total


# ------------------------------------------------------------------- the ledger's rules
def test_grants_are_half_the_room_at_most_and_never_less_than_asked_minimum() -> None:
    assert grant_size(want=100, least=10, room=1_000) == 100
    assert grant_size(want=800, least=10, room=1_000) == 500, "half the room: other holders share it"
    assert grant_size(want=800, least=300, room=400) == 300, "the least that is useful, when it fits"
    assert grant_size(want=800, least=300, room=299) == 0
    assert grant_size(want=800, least=0, room=1_000) == 0, "a request must say what one call needs"


def test_a_lease_is_granted_spent_returned_and_replays_change_nothing() -> None:
    rules = {"limit": 1_000, "lease_seconds": 10.0}
    total = apply_budget(Total(), "request", "a#1", 0, NOW, want=400, least=100, **rules)
    assert total is not None and total.leases == {"a#1": Lease(400, 0, NOW)} and total.room(1_000) == 600
    assert apply_budget(total, "request", "a#1", 0, NOW, want=400, least=100, **rules) is None, "a replay"
    total = total.add(150, 1, NOW, "a#1")
    assert total is not None and total.nanos == 150 and total.leases["a#1"].spent == 150
    assert total.room(1_000) == 1_000 - 150 - 250
    total = apply_budget(total, "return", "a#1", 2, NOW, **rules)
    assert total is not None and total.leases == {} and total.room(1_000) == 850, "what was not spent is free"
    assert Total.from_list(total.to_list()) == total


def test_an_unrenewed_lease_expires_with_what_it_spent_kept() -> None:
    rules = {"limit": 1_000, "lease_seconds": 10.0}
    total = apply_budget(Total(), "request", "dead#1", 0, NOW, want=500, least=100, **rules)
    total = apply_budget(total, "spend", "dead#1", 1, NOW + 1, spent=200, **rules)  # type: ignore[arg-type]
    assert total is not None and total.room(1_000) == 500
    # Another holder asks within the lease's life: only the room is granted (half of it).
    early = apply_budget(total, "request", "b#1", 2, NOW + 9, want=1_000, least=100, **rules)
    assert early is not None and early.leases["b#1"].granted == 250
    # After it: the dead holder's lease is gone, its spend is kept, the rest is free.
    late = apply_budget(total, "request", "b#1", 2, NOW + 11.5, want=1_000, least=100, **rules)
    assert late is not None and "dead#1" not in late.leases and late.nanos == 200
    assert late.leases["b#1"].granted == 400
    renewed = apply_budget(total, "renew", "dead#1", 2, NOW + 9, **rules)
    assert renewed is not None and renewed.leases["dead#1"].renewed == NOW + 9


def test_spend_after_a_lease_expired_still_counts() -> None:
    rules = {"limit": 1_000, "lease_seconds": 10.0}
    total = apply_budget(Total(), "request", "slow#1", 0, NOW, want=500, least=100, **rules)
    total = apply_budget(total, "spend", "slow#1", 1, NOW + 30, spent=300, **rules)  # type: ignore[arg-type]
    assert total is not None and total.leases == {} and total.nanos == 300


# ---------------------------------------------------------- holders sharing one budget
@pytest.mark.parametrize("overdraft", [False, True])
async def test_three_holders_never_overspend_a_workflow_and_use_it_up(overdraft: bool) -> None:
    """Three processes (a workflow served by three tiers), 40 calls in flight each, real
    costs below their worst case: the workflow's spend never passes its budget and is
    within a worst-case call of it; with overdraft, it is all spent and passed by less
    than one worst-case call."""
    budget = usd_to_nanos(0.05)
    cluster = Cluster(settings_with(workflow_usd=0.05, overdraft=overdraft), holders=3)
    rng = random.Random(7)
    worst = usd_to_nanos(0.0012)

    async def holder(gate: BudgetGate) -> list[int | None]:
        async def one() -> int | None:
            return await cluster.call(gate, "wf-runaway", worst, rng.randint(worst // 3, worst))
        return await asyncio.gather(*(one() for _ in range(40)))

    await cluster.run(asyncio.gather(*(holder(g) for g in cluster.gates)))
    spent = cluster.spent()
    least, most = (budget, budget + worst) if overdraft else (budget - worst, budget)
    assert spent <= most, f"overspent: {spent} > {most}"
    assert spent >= least, f"left unused: {budget - spent} nanos"
    assert {g.view.workflow_spend("wf-runaway").nanos for g in cluster.gates} == {spent}  # type: ignore[union-attr]


@pytest.mark.parametrize("overdraft", [False, True])
async def test_the_hour_holds_across_holders_and_one_busy_holder_can_use_it_all(overdraft: bool) -> None:
    hour = usd_to_nanos(0.20)
    cluster = Cluster(settings_with(hour_usd=0.20, overdraft=overdraft), holders=4)
    worst = usd_to_nanos(0.002)
    busy = cluster.gates[0]
    # The three idle holders each made one call, then nothing: their leases go back.
    for gate in cluster.gates[1:]:
        await cluster.run(cluster.call(gate, f"wf-{id(gate)}", worst, worst // 2))

    async def burst() -> list[int | None]:
        return await asyncio.gather(*(
            cluster.call(busy, f"wf-{n % 50}", worst, worst) for n in range(120)
        ))

    task = asyncio.ensure_future(burst())
    await cluster.run(asyncio.wait_for(_until(lambda: busy.waiting > 0 and cluster.spent() > hour * 0.9), 600))
    least, most = (hour, hour + worst) if overdraft else (hour - worst, hour)
    await cluster.run(_until(lambda: cluster.spent() >= least or task.done()), limit_seconds=60)
    spent = cluster.spent()
    assert least <= spent <= most, (spent, hour)
    task.cancel()


async def test_a_steady_flow_of_long_calls_never_waits_for_its_next_lease() -> None:
    """Calls that last two seconds keep a used-up lease in hand until they end: the next
    lease is still asked for when what is held runs low, so no call waits for a grant."""
    cluster = Cluster(settings_with(workflow_usd=1.0, hour_usd=10.0), holders=1)
    gate = cluster.gates[0]
    worst = usd_to_nanos(0.004)
    waits: list[float] = []

    async def call() -> None:
        asked = cluster.now
        reservation = await gate.admit("wf", worst)
        waits.append(cluster.now - asked)
        until = cluster.now + 2.0  # the model call
        await _until(lambda: cluster.now >= until)
        await cluster.settle(gate, reservation, worst // 2)

    async def flow() -> None:
        calls = []
        for _ in range(400):  # 20 calls a second for 20 s
            calls.append(asyncio.ensure_future(call()))
            await _until(lambda start=cluster.now: cluster.now > start)  # the next step
        await asyncio.gather(*calls)

    await cluster.run(flow())
    assert gate.granted >= 3, "several leases of the workflow and the hour, one after another"
    late = [w for w in waits[40:] if w > 0]  # after the first two seconds
    assert late == [], f"{len(late)} calls waited for a grant, up to {max(late):.2f} s"


async def test_a_workflows_first_calls_do_not_wait_for_its_lease_when_calls_vary_in_size() -> None:
    """A workflow's first calls go under the lease its opening made, which holds a few
    calls. The next lease is asked for as soon as two of the largest calls seen lately
    would not fit, not only once half of it is used: else a large call after small ones
    waits for the grant."""
    cluster = Cluster(settings_with(workflow_usd=1.0, hour_usd=10.0), holders=1)
    gate = cluster.gates[0]
    small, large = usd_to_nanos(0.001), usd_to_nanos(0.004)
    waits: dict[str, list[float]] = {}
    started: dict[str, float] = {}
    large_admitted: list[float] = []

    async def call(workflow: str, worst: int) -> None:
        started.setdefault(workflow, cluster.now)
        asked = cluster.now
        reservation = await gate.admit(workflow, worst)
        waits.setdefault(workflow, []).append(cluster.now - asked)
        if worst == large:
            large_admitted.append(cluster.now)
        until = cluster.now + 2.0  # the model call
        await _until(lambda: cluster.now >= until)
        await cluster.settle(gate, reservation, worst // 2)

    async def flow() -> None:
        await _until(lambda: bool(gate.granted))  # the openings and the hour's lease, at start
        calls = []
        for step in range(12):  # a new workflow every step: a small call, a small one, a large one
            for n, worst in enumerate((small, small, large)):
                if 0 <= step - n < 10:
                    calls.append(asyncio.ensure_future(call(f"wf-{step - n}", worst)))
            await _until(lambda start=cluster.now: cluster.now > start)
        await asyncio.gather(*calls)

    await cluster.run(flow())
    assert gate.opened == 10, "each workflow's first call went under an opening"
    assert waits["wf-0"][2] > 0, "the first large call waits: the opening's lease holds less"
    known = [wf for wf, at in started.items() if at > min(large_admitted)]  # once a large call was seen
    assert len(known) >= 6
    late = {wf: waits[wf] for wf in known if max(waits[wf]) > 0}
    assert late == {}, f"calls waited for a grant: {late}"


async def test_the_next_lease_is_kept_while_the_one_before_it_is_used() -> None:
    """Calls go under the oldest lease with room, so the next one, asked for ahead, stays
    unused while the one before it lasts: it is not given back as idle meanwhile."""
    cluster = Cluster(settings_with(workflow_usd=1.0, hour_usd=10.0, lease_seconds=10.0), holders=1)
    gate = cluster.gates[0]
    worst = usd_to_nanos(0.002)  # the lease an opening makes holds two and a half
    waits: list[float] = []

    async def flow() -> None:
        await _until(lambda: bool(gate.granted))
        for _ in range(4):  # a call every three seconds: more than half of lease_seconds for two
            asked = cluster.now
            assert await cluster.call(gate, "wf", worst, worst) == worst
            waits.append(cluster.now - asked)
            await _until(lambda start=asked: cluster.now >= start + 3.0)

    await cluster.run(flow())
    assert gate.opened == 1 and gate.granted >= 2, "the first call under an opening, then the workflow's lease"
    assert waits == [0.0] * 4


async def test_a_dead_holders_lease_comes_back_after_lease_seconds() -> None:
    cluster = Cluster(settings_with(workflow_usd=0.01, lease_seconds=4.0), holders=2)
    dead, alive = cluster.gates
    worst = usd_to_nanos(0.001)
    await cluster.run(cluster.call(dead, "wf", worst, worst))
    held_by_dead = cluster.cost_view.workflow_spend("wf").leases  # type: ignore[union-attr]
    assert held_by_dead, "the dead holder still holds a lease of the workflow"
    dead.tick = _never  # type: ignore[method-assign]  # SIGKILLed: no renewal, no return
    started = cluster.now
    calls = asyncio.ensure_future(asyncio.gather(*(cluster.call(alive, "wf", worst, worst) for _ in range(9))))
    await cluster.run(calls)
    results = calls.result()
    assert None not in results and cluster.spent() == usd_to_nanos(0.01)
    assert cluster.now - started <= 4.0 + 2.0, "the budget came back by expiry"


async def test_no_cost_role_means_no_grants_and_calls_resume_when_it_returns() -> None:
    cluster = Cluster(settings_with(), holders=1)
    gate = cluster.gates[0]
    cluster.cost_role_up = False
    task = asyncio.ensure_future(cluster.call(gate, "wf", 1_000, 1_000))
    await cluster.run(asyncio.wait_for(_until(lambda: cluster.now > NOW + 6), 60))
    assert not task.done() and gate.summary()["grants_stalled"] is True
    waiting = gate.view.summary()["lease_requests_waiting"]
    assert waiting == 2 + cluster.partitions, "the workflow's, the hour's and an opening per partition, on /ready"
    cluster.cost_role_up = True
    await cluster.run(task)
    assert task.result() == 1_000 and gate.summary()["grants_stalled"] is False


async def test_a_workflow_out_of_budget_ends_as_exceeded_not_waiting() -> None:
    cluster = Cluster(settings_with(workflow_usd=0.003), holders=1)
    gate = cluster.gates[0]
    worst = usd_to_nanos(0.001)
    results = [await _run(cluster, cluster.call(gate, "wf", worst, worst)) for _ in range(4)]
    assert results == [worst, worst, worst, None]


async def test_a_workflow_idle_past_its_expiry_starts_a_new_budget() -> None:
    settings = load_settings(environ={}, overrides={"cost_guardrails": {
        "max_cost_per_workflow_usd": 0.002, "workflow_idle_expiry_seconds": 60,
    }})
    cluster = Cluster(settings, holders=1)
    gate = cluster.gates[0]
    worst = usd_to_nanos(0.001)
    spent = [await _run(cluster, cluster.call(gate, "wf", worst, worst)) for _ in range(3)]
    assert spent == [worst, worst, None]
    cluster.now += 120  # idle for twice the expiry
    assert await _run(cluster, cluster.call(gate, "wf", worst, worst)) == worst


# ------------------------------------------------------------------------- openings
def openings_granted(view: GuardrailView, partition: int) -> int:
    openings = view.openings.get(partition)
    return sum(lease.granted for lease in openings.leases.values()) if openings else 0


async def held_openings(cluster: Cluster, gate: BudgetGate, worst: int) -> None:
    """``gate``'s first call (of a workflow of its own), after which it holds an opening
    of every partition."""
    assert await _run(cluster, cluster.call(gate, f"wf-first-{gate.holder}", worst, worst)) == worst
    await cluster.run(_until(lambda: all(
        any(lease_id.startswith(f"{gate.holder}#") for lease_id in gate.view.openings[p].leases)
        for p in range(cluster.partitions) if p in gate.view.openings
    ) and len(gate.view.openings) == cluster.partitions), limit_seconds=10)


def test_an_opening_holds_its_share_of_every_workflow_until_it_is_opened_there() -> None:
    openings = {"h#1": Lease(300, 0, NOW), "g#4": Lease(200, 0, NOW - 8)}
    wf = Total(100, 5, NOW)
    assert openings_held(openings, wf.opened, NOW, 10.0) == 500
    opened = wf.open("h#1/wf", "h#1", 300, 6, NOW)
    assert opened is not None and opened.leases == {"h#1/wf": Lease(300, 0, NOW)}
    assert openings_held(openings, opened.opened, NOW, 10.0) == 200, "h#1's share is now its lease"
    assert opened.room(1_000) - openings_held(openings, opened.opened, NOW, 10.0) == 1_000 - 100 - 500
    again = opened.open("h#1/wf", "h#1", 300, 7, NOW)
    assert again is not None and again.leases == opened.leases, "an opening is turned into a lease once"
    assert opened.open("h#1/wf", "h#1", 300, 6, NOW) is None, "a record read again changes nothing"
    assert openings_held(openings, frozenset(), NOW + 3, 10.0) == 300, "an expired opening holds nothing"
    assert Total.from_list(opened.to_list()) == opened


def test_a_workflows_partition_is_found_as_the_producer_finds_it() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    partitions = list(range(6))
    for n in range(300):
        key = f"wf-{n}".encode()
        assert partition_of(key, 6) == DefaultPartitioner()(key, partitions, partitions)


async def test_a_new_workflows_first_call_is_admitted_under_an_opening_without_a_grant() -> None:
    cluster = Cluster(settings_with(workflow_usd=1.0), holders=1)
    gate = cluster.gates[0]
    worst = usd_to_nanos(0.001)
    await held_openings(cluster, gate, worst)
    cluster.cost_role_up = False  # nothing is granted from here on
    calls = [cluster.call(gate, f"wf-new-{n}", worst, worst // 2) for n in range(12)]
    assert await asyncio.wait_for(asyncio.gather(*calls), 5) == [worst // 2] * 12
    assert gate.opened == 12
    cluster.cost_role_up = True
    cluster.pump()
    for n in range(12):
        total = cluster.cost_view.workflow_spend(f"wf-new-{n}")
        assert total is not None and total.nanos == worst // 2
        (lease_id, lease), = total.leases.items()
        assert lease_id.endswith(f"/wf-new-{n}") and lease.spent == worst // 2
        assert lease_id.rpartition("/")[0] in total.opened, "the opening holds nothing more of it"


async def test_an_opening_is_granted_only_out_of_the_least_room_of_its_partition() -> None:
    budget, worst = usd_to_nanos(0.01), usd_to_nanos(0.001)
    cluster = Cluster(settings_with(workflow_usd=0.01, opening_share=0.5), holders=1)
    spender = cluster.gates[0]
    low = cluster.partition_of(b"wf-spent")
    spent = [await _run(cluster, cluster.call(spender, "wf-spent", worst, worst)) for _ in range(6)]
    assert spent == [worst] * 6
    total = cluster.cost_view.workflow_spend("wf-spent")
    assert total is not None
    held = openings_held(cluster.cost_view.openings[low].leases, total.opened, cluster.now, 10.0)
    least_room = Total(total.nanos, leases=total.leases).room(budget) - held
    asked = {}
    for p in range(cluster.partitions):  # another process asks for an opening of every partition
        key = next(k for k in (f"k{n}".encode() for n in range(1000)) if cluster.partition_of(k) == p)
        record = BudgetRecord(budget="request", lease_id=f"late#{p}", scope=OPENINGS_SCOPE,
                              want_nanos=budget, least_nanos=1)
        asked[p] = await cluster.send(key, encode(record))
    cluster.pump()
    granted = {p: cluster.cost_view.openings[p].leases[f"late#{p}"].granted for p in range(cluster.partitions)}
    assert 0 < granted[low] <= least_room, "no workflow's room is overdrawn"
    assert all(granted[p] > least_room for p in granted if p != low)


async def test_openings_let_no_workflow_pass_its_budget_across_six_holders() -> None:
    """Six processes that hold openings, twelve new workflows each called by all six,
    with openings half the budget: every workflow stops within its budget."""
    budget, worst = usd_to_nanos(0.02), usd_to_nanos(0.0012)
    cluster = Cluster(settings_with(workflow_usd=0.02, opening_share=0.5), holders=6)
    for gate in cluster.gates:  # each holder's first call asks for openings: halving, they go round four
        assert await _run(cluster, cluster.call(gate, f"wf-first-{gate.holder}", worst, worst)) == worst
    settled = cluster.now + 1
    await cluster.run(_until(lambda: cluster.now > settled))
    rng = random.Random(11)
    workflows = [f"wf-runaway-{n}" for n in range(12)]

    async def slow_call(gate: BudgetGate, wf: str) -> None:
        try:
            reservation = await gate.admit(wf, worst)
        except BudgetExceeded:
            return
        done = cluster.now + 2.0  # the model call: its reservation is not spend yet
        await _until(lambda: cluster.now >= done)
        await cluster.settle(gate, reservation, worst)  # every call costs its worst case

    async def holder(gate: BudgetGate, delay: float) -> None:
        # The first two holders' calls take two seconds: their leases are granted and
        # nothing is spent yet when the others join, whose first calls use their openings.
        start = cluster.now + delay
        await _until(lambda: cluster.now >= start)
        order = workflows[:]
        rng.shuffle(order)
        await asyncio.gather(*(slow_call(gate, wf) for wf in order for _ in range(16)))

    await cluster.run(asyncio.gather(*(holder(g, 0.0 if n < 2 else 1.0) for n, g in enumerate(cluster.gates))))
    assert sum(g.opened for g in cluster.gates[2:]) >= 12, "the late holders' first calls went through openings"
    for wf in workflows:
        spent = cluster.spent(lambda e, wf=wf: e.workflow_id == wf)  # type: ignore[misc]
        assert budget - 2 * worst <= spent <= budget, (wf, spent)


async def _run(cluster: Cluster, work: Awaitable[int | None]) -> int | None:
    task = asyncio.ensure_future(work)
    await cluster.run(task)
    return task.result()


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0)


async def _never() -> None:
    return None


@pytest.mark.parametrize("op", ["renew", "return"])
def test_records_of_a_lease_never_granted_change_nothing(op: str) -> None:
    total = apply_budget(Total(5, 3, NOW), op, "x#1", 4, NOW, limit=100, lease_seconds=10.0)
    assert total == Total(5, 4, NOW)


def test_budget_records_and_cost_events_share_the_costs_topic() -> None:
    record = BudgetRecord(budget="return", lease_id="h#1", scope="wf")
    assert isinstance(decode_cost_record(encode(record)), BudgetRecord)
    assert hour_window(NOW) <= NOW
