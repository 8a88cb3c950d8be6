"""The batch role: requests that can wait, answered through the providers' batch APIs at
the batch price.

Consumes the batch topic in batches of up to ``batch.max_items`` requests (or what came
within ``batch.max_age_seconds``), grouped per source partition, provider and model and
cut at ``batch.max_bytes``. Each group becomes a job on the batch-jobs topic before it is
sent, and its requests are acknowledged once it is recorded: a batch can take hours, so
the source offsets do not wait for it; the job record is what the role resumes from.

A job's life, each step recorded before the next (see docs/batch.md):

1. ``submitting``: the requests it carries. Then the provider's batch is created.
2. ``submitted``: the provider's batch id. Open jobs are polled every ``poll_seconds``.
3. ``answering``: once the batch ended, where the results, costs, tier and dead-letter
   topics end. Then each item's cost and result (or, when it failed, the request again
   on its tier topic, or a dead letter), costs first.
4. ``answered``, then a tombstone.

A role that dies anywhere resumes from the last record: a ``submitting`` job is looked
for at the provider (and sent only if it is not there), an ``answering`` job writes only
what is not already written since its recorded offsets. A request read again (its offset
was not committed) is skipped if an open job carries it or it is answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial

from schemas.codec import DecodeError, decode, encode
from schemas.models import AgentResult, BatchJob, TieredRequest, Timings
from streams.batches.budget import BatchBudget, Rebalanced
from streams.batches.clients import (
    BatchClient,
    BatchItem,
    BatchRejected,
    ItemOutcome,
    NotThisJob,
    batch_client,
)
from streams.batches.jobs import JobBook, WrittenRecords
from streams.costing import cost_event
from streams.dedupe import AnsweredIndex
from streams.envelope import DeadLetters, Outgoing, Source
from streams.guardrails.budget import TICK_SECONDS, BudgetGate, exceeded_result, holder_name
from streams.guardrails.money import usd_to_nanos
from streams.guardrails.view import GuardrailView
from streams.pricing import PriceBook
from streams.providers import ProviderError
from streams.runtime.types import Handled, RoleSpec, Send, Worker
from streams.tokens import estimate_input_tokens
from topologies.config import Settings
from topologies.topics import BATCH_ROLE, Topology

log = logging.getLogger(__name__)

# For the SIGKILL tests: the process kills itself at this step ('submitted' or
# 'answering'), '<step>' or '<step>:<provider>' (docs/testing.md).
CRASH_ENV = "TIERSTREAM_TEST_BATCH_CRASH_AT"
QUEUE_RECHECK_SECONDS = 1.0


def _crash_point(step: str, provider: str) -> None:
    wanted = os.environ.get(CRASH_ENV)
    if wanted in (step, f"{step}:{provider}"):
        log.warning("%s=%s: killing this process", CRASH_ENV, wanted)
        os.kill(os.getpid(), signal.SIGKILL)


def _now() -> datetime:
    return datetime.now(UTC)


class BatchRole:
    stage = BATCH_ROLE

    def __init__(self, worker: Worker) -> None:
        settings, topology = worker.settings, worker.topology
        self.settings: Settings = settings
        self.conf = settings.batch
        self.topology: Topology = topology
        self.partitions = worker.partitions
        self.prices = PriceBook(settings)
        self.book = JobBook(settings)
        self.answered = AnsweredIndex(settings)
        self.written = WrittenRecords(settings)
        self.dead_letters = DeadLetters(topology.dead_letters.name, self.stage)
        self.view = GuardrailView(settings)
        self.gate = BudgetGate(
            self.view, worker.sender(topology.costs), holder_name(worker.role), long_reservations=True,
        )
        self.budget = BatchBudget(self.gate, self.prices, self.conf.price_factor)
        self._send: dict[str, Send] = {
            spec.name: worker.sender(spec)
            for spec in (topology.batch_jobs, topology.results, topology.costs, topology.dead_letters, *topology.tiers.values())
        }
        self._clients: dict[str, BatchClient] = {}
        self._busy: set[str] = set()  # job keys a task of this process is moving on
        self._opening: set[str] = set()  # request ids reserved, their job not recorded yet
        self._resumed: set[str] = set()  # job keys whose reservation this process took again
        self._tasks: set[asyncio.Task[None]] = set()

    def client(self, provider: str) -> BatchClient:
        found = self._clients.get(provider)
        if found is None:
            found = self._clients[provider] = batch_client(self.settings, provider)
        return found

    # ------------------------------------------------------------------ reading requests
    async def handle_batch(self, sources: Sequence[Source]) -> list[Handled]:
        await self.book.ready.wait()  # the open jobs of these partitions are known
        await self.answered.ready.wait()
        handled: list[Handled] = [[] for _ in sources]
        groups: dict[tuple[int, str, str], list[tuple[int, TieredRequest]]] = defaultdict(list)
        skipped = 0
        for i, source in enumerate(sources):
            try:
                request = decode(source.value, TieredRequest, max_bytes=self.settings.worker.max_request_bytes)
            except DecodeError as exc:
                handled[i] = [self.dead_letters.undecodable(source, exc)]
                continue
            unknown = self.dead_letters.unknown_agent_type(source, request, self.settings.agent_types)
            if unknown is not None:
                handled[i] = [unknown]
                continue
            if self.book.carries(request.request_id) or self.answered.answered(request.request_id):
                skipped += 1  # read again after a restart or a rebalance
                continue
            choice = self.settings.tiers[request.tier]
            groups[(source.partition, choice.provider, choice.model)].append((i, request))
        if skipped:
            log.info("%d request(s) read again were already in a batch or answered: skipped", skipped)
        generation = self.partitions.generation()
        for (partition, provider, model), members in groups.items():
            for chunk in self._chunks(members):
                index = {r.request_id: i for i, r in chunk}
                remaining = [r for _, r in chunk]
                while remaining:
                    try:
                        remaining, out = await self._admit_and_open(partition, provider, model, remaining, generation)
                    except Rebalanced:
                        # Not recorded: read again, by whoever owns the partition now.
                        for request in remaining:
                            handled[index[request.request_id]] = None
                        break
                    for request, outgoing in out:
                        i = index[request.request_id]
                        handled[i] = [*(handled[i] or []), outgoing(sources[i])]
        return handled

    async def _admit_and_open(
        self, partition: int, provider: str, model: str, requests: list[TieredRequest], generation: int,
    ) -> tuple[list[TieredRequest], list[tuple[TieredRequest, Callable[[Source], Outgoing]]]]:
        """Reserve the batch's worst case, then record and send what was reserved: the
        requests still waiting for budget, and the answers of those that will not be sent."""
        ids = {r.request_id for r in requests}
        self._opening |= ids
        try:
            admission = await self.budget.reserve(
                requests, provider, model, rebalanced=lambda: self.partitions.generation() != generation,
            )
            answers: list[tuple[TieredRequest, Callable[[Source], Outgoing]]] = [
                (r, partial(self._exceeded, r, provider, model)) for r in admission.exceeded
            ]
            if admission.admitted:
                try:
                    rejected = await self._open(partition, provider, model, admission.admitted, generation=generation)
                except Rebalanced:
                    self.budget.answered(dict.fromkeys((r.request_id for r in admission.admitted), 0))
                    raise
                answers += [(request, partial(self._refused, request, reason)) for request, reason in rejected]
            return admission.waiting, answers
        finally:
            self._opening -= ids

    def _exceeded(self, request: TieredRequest, provider: str, model: str, _source: Source) -> Outgoing:
        result = exceeded_result(self.gate, request, request.tier, provider, model)
        return Outgoing(self.topology.results.name, request.workflow_id.encode(), encode(result))

    def _refused(self, request: TieredRequest, reason: str, source: Source) -> Outgoing:
        return self.dead_letters.letter(source, "batch_failed", f"the provider refused it in a batch: {reason}", request, 1)

    def _chunks(self, members: list[tuple[int, TieredRequest]]) -> list[list[tuple[int, TieredRequest]]]:
        """Groups of at most max_items requests and max_bytes of encoded requests."""
        chunks: list[list[tuple[int, TieredRequest]]] = [[]]
        size = 0
        for member in members:
            length = len(encode(member[1]))
            if chunks[-1] and (len(chunks[-1]) >= self.conf.max_items or size + length > self.conf.max_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append(member)
            size += length
        return [c for c in chunks if c]

    async def _wait_for_queue_room(
        self, provider: str, model: str, requests: list[TieredRequest], generation: int | None,
    ) -> None:
        """Wait until the provider's batch queue for the model takes these requests; raise
        :class:`Rebalanced` if a rebalance begins meanwhile (it waits for this batch)."""
        conf = self.conf
        tokens = sum(estimate_input_tokens(r) + r.max_output_tokens for r in requests)
        logged = False
        while True:
            queued = self.book.enqueued(provider, model)
            fits_requests = conf.max_enqueued_requests is None or queued.requests == 0 or (
                queued.requests + len(requests) <= conf.max_enqueued_requests)
            fits_tokens = conf.max_enqueued_tokens is None or queued.tokens == 0 or (
                queued.tokens + tokens <= conf.max_enqueued_tokens)
            if fits_requests and fits_tokens:
                return
            if generation is not None and self.partitions.generation() != generation:
                raise Rebalanced
            if not logged:
                log.info("batch queue of %s/%s is full (%d requests, %d tokens enqueued): waiting",
                         provider, model, queued.requests, queued.tokens)
                logged = True
            await asyncio.sleep(QUEUE_RECHECK_SECONDS)  # a poll interval: other jobs end in their own time

    async def _open(
        self, partition: int, provider: str, model: str, requests: list[TieredRequest], resubmissions: int = 0,
        generation: int | None = None,
    ) -> list[tuple[TieredRequest, str]]:
        """Record a job for ``requests`` and send it; the requests the provider refused
        alone (a batch refused whole is split in halves and sent again)."""
        await self._wait_for_queue_room(provider, model, requests, generation)
        job = BatchJob(
            job_key=uuid.uuid4().hex[:16], state="submitting", provider=provider, model=model,
            source_partition=partition, items=requests, resubmissions=resubmissions,
        )
        self._busy.add(job.job_key)
        try:
            await self._record(job)
            return await self._submit(job)
        finally:
            self._busy.discard(job.job_key)

    async def _submit(self, job: BatchJob) -> list[tuple[TieredRequest, str]]:
        """Send a recorded job; a provider that cannot be reached leaves it ``submitting``
        for the poller to send again."""
        items = [BatchItem(r.chat(), r.max_output_tokens) for r in job.items]
        try:
            batch_id = await self.client(job.provider).submit(job.job_key, job.model, items)
        except BatchRejected as exc:
            return await self._split(job, str(exc))
        except ProviderError as exc:
            alone = self.book.enqueued(job.provider, job.model).requests == len(job.items)
            if exc.status == 429 and alone and len(job.items) > 1:
                # Nothing else of the cluster is queued for the model: the provider's queue
                # cannot take this batch by itself, however long it waits.
                return await self._split(job, f"{exc} (with nothing else queued for {job.model})")
            log.warning("batch %s not sent (%s): the poller sends it again", job.job_key, exc)
            return []
        _crash_point("submitted", job.provider)
        await self._record(job.model_copy(update={"state": "submitted", "batch_id": batch_id, "submitted_at": _now()}))
        log.info("batch %s sent to %s as %s: %d requests for %s", job.job_key, job.provider, batch_id, len(job.items), job.model)
        return []

    async def _split(self, job: BatchJob, reason: str) -> list[tuple[TieredRequest, str]]:
        """A batch the provider refused whole: its halves are sent as new jobs (recorded
        first), then this one is closed; a request refused alone is dead-lettered."""
        log.warning("%s refused batch %s (%d requests): %s", job.provider, job.job_key, len(job.items), reason)
        if len(job.items) == 1:
            rejected = [(job.items[0], reason)]
            self.budget.answered({job.items[0].request_id: 0})
        else:
            half = len(job.items) // 2
            rejected = []
            for part in (job.items[:half], job.items[half:]):
                rejected += await self._open(job.source_partition, job.provider, job.model, part, job.resubmissions + 1)
        await self._close(job)
        return rejected

    async def _record(self, job: BatchJob) -> None:
        await self._send[self.topology.batch_jobs.name](job.job_key.encode(), encode(job))
        self.book.apply(job)

    async def _close(self, job: BatchJob) -> None:
        await self._record(BatchJob(
            job_key=job.job_key, state="answered", provider=job.provider, model=job.model,
            source_partition=job.source_partition, batch_id=job.batch_id, created_at=job.created_at,
        ))
        await self._send[self.topology.batch_jobs.name](job.job_key.encode(), None)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ open jobs
    def _owns(self, job: BatchJob) -> bool:
        return self.partitions.owns(self.topology.batch.name, job.source_partition)

    def _owned_partitions(self) -> list[int]:
        topic = self.topology.batch.name
        return [p for t, p in self.partitions.assigned() if t == topic and self.partitions.owns(t, p)]

    async def poll(self) -> None:
        """Move every open job of this process's partitions on, one task per job."""
        if not self.book.ready.is_set() or not self.answered.ready.is_set():
            return
        self.budget.forget(lambda rid: rid in self._opening or self.book.carries(rid))
        self._resumed &= set(self.book.jobs)
        for job in self.book.owned(self._owned_partitions()):
            if job.job_key in self._busy:
                continue
            self._busy.add(job.job_key)
            task = asyncio.create_task(self._advance(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _advance(self, job: BatchJob) -> None:
        try:
            if job.state in ("submitting", "submitted") and job.job_key not in self._resumed:
                await self._reserve_again(job)
            if job.state == "submitting":
                await self._resume_submission(job)
            elif job.state == "submitted":
                await self._collect(job)
            elif job.state == "answering":
                await self._answer(job, resumed=True)
        except (ProviderError, NotThisJob, Rebalanced) as exc:
            log.warning("batch %s (%s): %s; tried again at the next poll", job.job_key, job.state, exc)
        except Exception:
            log.exception("batch %s (%s) failed; tried again at the next poll", job.job_key, job.state)
        finally:
            self._busy.discard(job.job_key)

    async def _reserve_again(self, job: BatchJob) -> None:
        """A job this process did not open (it took over after a restart or rebalance): its
        worst case is reserved again as far as the budgets have room (the batch is sent, so
        what does not fit is counted when answered), without waiting long for grants."""
        self._resumed.add(job.job_key)
        unheld = [r for r in job.items if not self.budget.holds(r.request_id)]
        if len(unheld) < len(job.items):
            return  # opened here
        admission = await self.budget.reserve(
            unheld, job.provider, job.model, rebalanced=lambda: not self._owns(job), give_up=self.budget.patience,
        )
        log.info("batch %s taken over: %d of %d items reserved again", job.job_key, len(admission.admitted), len(unheld))

    async def _resume_submission(self, job: BatchJob) -> None:
        """A job recorded but maybe not sent: sent only if the provider does not have it.
        A candidate that cannot be confirmed yet (an Anthropic batch still running: its
        custom_ids are seen with its results) is looked at again at the next poll."""
        client = self.client(job.provider)
        for batch_id in await client.find(job.job_key, len(job.items), job.created_at, self.book.batch_ids()):
            if client.provider != "openai":  # OpenAI's candidates match the job key in their metadata
                if not (await client.status(batch_id)).ended:
                    log.info("batch %s: %s may be it, confirmed once it ends", job.job_key, batch_id)
                    return
                try:
                    await client.results(batch_id, job.job_key, len(job.items))
                except NotThisJob:
                    continue
            log.info("batch %s was sent before a restart: found as %s", job.job_key, batch_id)
            await self._record(job.model_copy(update={"state": "submitted", "batch_id": batch_id, "submitted_at": job.created_at}))
            return
        rejected = await self._submit(job)
        if rejected:  # answered as dead letters here: the source offsets are long committed
            await self._write_now([self._rejected_letter(r, reason) for r, reason in rejected])

    async def _collect(self, job: BatchJob) -> None:
        assert job.batch_id is not None
        status = await self.client(job.provider).status(job.batch_id)
        if not status.ended:
            return
        if status.rejected is not None:
            rejected = await self._split(job, status.rejected)
            await self._write_now([self._rejected_letter(r, reason) for r, reason in rejected])
            return
        ends = await self.written.ends(self._answer_topics())
        if not self._owns(job):
            return
        answering = job.model_copy(update={"state": "answering", "written_from": ends})
        await self._record(answering)
        await self._answer(answering, resumed=False)

    def _answer_topics(self) -> list[str]:
        t = self.topology
        return [t.results.name, t.costs.name, t.dead_letters.name, *(s.name for s in t.tiers.values())]

    async def _answer(self, job: BatchJob, resumed: bool) -> None:
        """Write each item's answer once: costs, then results (or the failed items' next step)."""
        assert job.batch_id is not None
        outcomes = await self.client(job.provider).results(job.batch_id, job.job_key, len(job.items))
        if not self._owns(job):
            return  # its partition moved while the results were read: the new owner answers it
        written = await self.written.request_ids(job.written_from) if resumed else {}
        if resumed:
            log.info("batch %s: answering again after a restart; already written: %s", job.job_key,
                     {topic: len(ids) for topic, ids in written.items()} or "nothing")
        costs, answers, spent = [], [], {}
        for request, outcome in zip(job.items, outcomes, strict=True):
            cost, answer, spent[request.request_id] = self._outputs(job, request, outcome)
            if cost is not None and request.request_id not in written.get(cost.topic, ()):
                costs.append(cost)
            if request.request_id not in written.get(answer.topic, ()):
                answers.append(answer)
        await self._write_now(costs)
        self.budget.answered(spent)  # the reservations, settled
        half = len(answers) // 2
        await self._write_now(answers[:half])
        _crash_point("answering", job.provider)
        await self._write_now(answers[half:])
        await self._close(job)
        failed = sum(1 for o in outcomes if o.completion is None)
        log.info("batch %s answered: %d of %d items%s", job.job_key, len(outcomes) - failed, len(outcomes),
                 f", {failed} failed and {'sent online' if self.conf.on_item_failure == 'online' else 'dead-lettered'}"
                 if failed else "")

    def _outputs(
        self, job: BatchJob, request: TieredRequest, outcome: ItemOutcome,
    ) -> tuple[Outgoing | None, Outgoing, int]:
        """(its cost event, its answer, what it cost in nanos)."""
        key = request.workflow_id.encode()
        if outcome.completion is None:
            reason = outcome.failure or "no answer"
            if self.conf.on_item_failure == "online":
                online = request.model_copy(update={"latency_class": "interactive"})
                return None, Outgoing(self.topology.tiers[request.tier].name, key, encode(online)), 0
            return None, self._item_letter(job, request, reason), 0
        completion = outcome.completion
        cost = cost_event(
            self.prices, request, request.tier, job.provider, job.model, completion, 1, self.conf.price_factor,
        ).model_copy(update=self.budget.cost_fields(request.request_id, job.created_at))
        finished = _now()
        started = job.submitted_at or job.created_at
        result = AgentResult(
            request_id=request.request_id, workflow_id=request.workflow_id, agent_type=request.agent_type,
            status="ok", output=completion.text, finish_reason=completion.finish_reason, tier=request.tier,
            routed_by=request.routed_by, provider=job.provider, model=job.model,
            input_tokens=completion.input_tokens, output_tokens=completion.output_tokens,
            cost_usd=cost.cost_usd, attempts=1,
            timings=Timings(
                created_at=request.created_at, classified_at=request.classified_at, started_at=started,
                finished_at=finished, model_latency_ms=max((finished - started).total_seconds() * 1000, 0.0),
            ),
            metadata=request.metadata, answered_by="batch", batch_id=job.batch_id,
        )
        return (
            Outgoing(self.topology.costs.name, key, encode(cost)),
            Outgoing(self.topology.results.name, key, encode(result)),
            usd_to_nanos(cost.cost_usd),
        )

    def _item_letter(self, job: BatchJob, request: TieredRequest, reason: str) -> Outgoing:
        source = Source(self.topology.batch_jobs.name, 0, 0, job.job_key.encode(), encode(request))
        return self.dead_letters.letter(source, "batch_failed", f"batch {job.batch_id}: {reason}", request, 1)

    def _rejected_letter(self, request: TieredRequest, reason: str) -> Outgoing:
        """A request refused after its source offset was committed: the letter names the request."""
        return self._refused(request, reason, Source(self.topology.batch.name, 0, 0, request.workflow_id.encode(), encode(request)))

    async def _write_now(self, outgoing: list[Outgoing]) -> None:
        """Written and acknowledged, all at once."""
        if outgoing:
            where = await asyncio.gather(*(self._send[out.topic](out.key, out.value) for out in outgoing))
            for out, (partition, offset) in zip(outgoing, where, strict=True):
                if out.on_delivered is not None:
                    out.on_delivered(partition, offset)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.written.start()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self._clients.values():
            await client.close()
        await self.written.stop()


def build(worker: Worker) -> RoleSpec:
    topology = worker.topology
    role = BatchRole(worker)
    conf = worker.settings.batch
    return RoleSpec(
        consumes=topology.batch,
        produces=(topology.batch_jobs, topology.results, topology.costs, *topology.tiers.values(), topology.dead_letters),
        handle_batch=role.handle_batch,
        batch_size=conf.max_items,
        batch_wait_seconds=conf.max_age_seconds,
        answered=role.answered,
        view=role.view,
        timers=[(conf.poll_seconds, role.poll), (TICK_SECONDS, role.gate.tick)],
        lifecycles=[role.book, role, role.gate],
        on_assigned=[role.book.assigned],
    )


__all__ = ["CRASH_ENV", "BatchRole", "build"]
