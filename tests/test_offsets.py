"""The offset state machine (streams.runtime.offsets): no record is skipped, whatever
order the fetch loop sees, for the transport (fetches numbered) and the cost role (not).

The kill loop (tests/test_faults_e2e.py) exercises it against a real broker; these pin
down each case, including a record fetched before a rebalance and drained after the
consumer had sought back to the committed offset.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streams.runtime.offsets import OffsetOrder, Verdict

TPA = ("requests.tier.standard", 0)



def test_records_in_order_are_delivered() -> None:
    order: OffsetOrder[tuple[str, int]] = OffsetOrder()
    order.reset({TPA: 953})
    assert [order.admit(TPA, o, fetch=1) for o in (953, 954, 955)] == [Verdict.DELIVER] * 3
    assert order.expected(TPA) == 956


def test_a_record_ahead_of_the_position_is_a_hole_and_its_fetch_is_dropped() -> None:
    order: OffsetOrder[tuple[str, int]] = OffsetOrder()
    order.reset({TPA: 953})  # Faust's seek to the committed offset, after a rebalance
    # drained after the seek, fetched before it: the 20,000-request kill loop's case
    assert order.admit(TPA, 1059, fetch=7) is Verdict.HOLE
    order.rewind(TPA, 953, fetch=7)  # the transport seeks back
    assert order.admit(TPA, 1060, fetch=7) is Verdict.REWINDING
    assert order.expected(TPA) == 953, "the position stays at the first missing record"
    # the fetch after the seek back starts at the hole
    assert order.admit(TPA, 953, fetch=8) is Verdict.DELIVER
    assert order.admit(TPA, 954, fetch=8) is Verdict.DELIVER


def test_records_gone_for_good_are_passed_over_once_the_seek_lands_above_them() -> None:
    order: OffsetOrder[tuple[str, int]] = OffsetOrder()
    order.reset({TPA: 10})
    assert order.admit(TPA, 30, fetch=1) is Verdict.HOLE
    order.rewind(TPA, 10, fetch=1)
    # retention deleted 10-24: the seek back lands on the log start, not on 10
    assert order.admit(TPA, 25, fetch=2) is Verdict.GONE
    assert order.admit(TPA, 26, fetch=2) is Verdict.DELIVER


def test_records_below_the_position_are_replays() -> None:
    order: OffsetOrder[tuple[str, int]] = OffsetOrder()
    order.reset({TPA: 10})
    assert order.admit(TPA, 10, fetch=1) is Verdict.DELIVER
    assert order.admit(TPA, 10, fetch=2) is Verdict.REPLAY
    assert order.admit(TPA, 4, fetch=2) is Verdict.REPLAY


def test_a_partition_without_a_known_position_takes_its_first_record() -> None:
    order: OffsetOrder[tuple[str, int]] = OffsetOrder()
    assert order.admit(TPA, 42, fetch=1) is Verdict.DELIVER
    assert order.admit(TPA, 44, fetch=1) is Verdict.HOLE


def test_forgotten_partitions_start_over() -> None:
    order: OffsetOrder[tuple[str, int]] = OffsetOrder()
    order.reset({TPA: 5})
    order.admit(TPA, 9, fetch=1)
    order.rewind(TPA, 5, fetch=1)
    order.forget([TPA])
    assert order.expected(TPA) is None
    assert order.admit(TPA, 9, fetch=2) is Verdict.DELIVER


@given(
    start=st.integers(0, 50),
    fetches=st.lists(st.lists(st.integers(0, 120), max_size=12), max_size=30),
)
def test_whatever_is_fetched_nothing_is_skipped(start: int, fetches: list[list[int]]) -> None:
    """Fetches of arbitrary offsets (stale, replayed, ahead of the position): a record is
    delivered only if it is the next one, or, right after a seek back, if the ones
    before it are gone (the first record of the next fetch)."""
    order: OffsetOrder[tuple[str, int]] = OffsetOrder()
    order.reset({TPA: start})
    expected, hole_in = start, None
    for fetch, offsets in enumerate(fetches):
        for offset in sorted(offsets):  # a fetch returns a partition's records in order
            verdict = order.admit(TPA, offset, fetch)
            if verdict is Verdict.DELIVER:
                assert offset == expected
            elif verdict is Verdict.GONE:
                assert hole_in is not None and hole_in < fetch and offset > expected
            elif verdict is Verdict.HOLE:
                assert offset > expected
                order.rewind(TPA, expected, fetch)
                hole_in = fetch
            else:
                assert offset < expected or hole_in == fetch
            if verdict in (Verdict.DELIVER, Verdict.GONE):
                expected, hole_in = offset + 1, None
            assert order.expected(TPA) == expected


def test_without_fetch_numbers_records_above_the_rewind_wait_for_it() -> None:
    """The cost role cannot tell which fetch a record came in: past a rewind, records
    above its target are ignored until the target comes (or the seek is repeated);
    replays below it still count (the totals recognise the offsets they include)."""
    applied = {0: 9}
    order: OffsetOrder[int] = OffsetOrder(start=lambda p: applied.get(p, -1) + 1)
    assert order.expected(0) == 10 and order.expected(1) == 0, "from the published totals"
    assert order.admit(0, 3) is Verdict.REPLAY
    assert order.admit(0, 15) is Verdict.HOLE
    order.rewind(0, 10, now=100.0)
    assert order.admit(0, 16) is Verdict.REWINDING
    assert order.admit(0, 4) is Verdict.REPLAY and order.rewinding(0)
    assert order.overdue(5.0, now=104.0) == []
    assert order.overdue(5.0, now=105.0) == [(0, 10)], "unanswered for 5 s: seek again"
    assert order.overdue(5.0, now=106.0) == [], "its clock restarted"
    assert order.admit(0, 10) is Verdict.DELIVER and not order.rewinding(0)
    assert order.expected(0) == 11
    order.passed(0, 20)  # records up to 20 are gone
    assert order.expected(0) == 21
    order.clear()
    applied[0] = 30
    assert order.expected(0) == 31, "cleared: the published totals decide again"


def test_only_a_key_error_raised_inside_aiokafkas_fetcher_is_taken_for_its_race() -> None:
    """The fetch loop survives aiokafka's KeyError when a seek clears a partition's buffer
    mid-iteration, and nothing else: a KeyError of the loop's own code still raises."""
    from streams.runtime.transport import raised_in_aiokafka_fetcher

    def raised_in(filename: str) -> KeyError:
        namespace: dict[str, object] = {}
        exec(compile("def fetched_records(records):\n    del records['tp']\n", filename, "exec"), namespace)
        try:
            namespace["fetched_records"]({})  # type: ignore[operator]
        except KeyError as exc:
            return exc
        raise AssertionError("no KeyError")

    assert raised_in_aiokafka_fetcher(raised_in("/venv/site-packages/aiokafka/consumer/fetcher.py"))
    assert not raised_in_aiokafka_fetcher(raised_in("/work/streams/runtime/transport.py"))
    assert not raised_in_aiokafka_fetcher(KeyError("never raised"))
