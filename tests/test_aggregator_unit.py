"""The aggregator process around the fold: its recovery and delivery watchdogs."""

from __future__ import annotations

import pytest


def test_delivery_stall_is_judged_from_when_records_wait_and_none_is_delivered():
    """Times are given: records first seen waiting at 100; restarted once they waited 60 s with no
    delivery; a delivery, or nothing waiting, starts the clock again; an idle worker is not judged
    by how long it was idle."""
    from kafka_backup.streams.app import DeliveryStall

    stall = DeliveryStall(60)
    idle_since = 0.0  # the last delivery, long ago: the worker was idle
    assert stall.check(100.0, idle_since, {0: (5, 5), 1: (7, 7)}) is None  # nothing waits
    assert stall.check(101.0, idle_since, {0: (5, 8), 1: (7, 7)}) is None  # 3 records arrive: the clock starts
    assert stall.check(160.0, idle_since, {0: (5, 8), 1: (7, 7)}) is None  # 59 s
    assert stall.check(161.0, idle_since, {0: (5, 9), 1: (7, 7)}) == (
        "no telemetry record delivered for 60 s while telemetry partition 0 has 4 waiting (a Faust fetch stall)")

    stall = DeliveryStall(60)
    assert stall.check(101.0, idle_since, {0: (5, 8)}) is None
    assert stall.check(150.0, 149.0, {0: (6, 9)}) is None  # delivered at 149: the clock starts again at 150
    assert stall.check(209.0, 149.0, {0: (6, 9)}) is None
    assert stall.check(210.0, 149.0, {0: (6, 9)}) is not None
    stall.pause()  # a rebalance: no judgement, and the clock starts again after it
    assert stall.check(211.0, 149.0, {0: (6, 9)}) is None
    assert stall.check(270.0, 149.0, {0: (6, 9)}) is None
    assert stall.check(271.0, 149.0, {0: (6, 9)}) is not None
    assert stall.check(272.0, 149.0, {0: (9, 9)}) is None  # caught up: nothing waits
    assert stall.since is None


def test_delivery_watchdog_asks_the_broker_for_this_worker_s_partitions_and_restarts_a_stalled_one():
    """The thread around DeliveryStall: only the telemetry partitions assigned to this worker count,
    from where the guard will fold next (else the committed offset) to the end; a worker whose
    records keep arriving is left alone."""
    import threading
    import time
    from types import SimpleNamespace

    from confluent_kafka import TopicPartition

    from kafka_backup.streams.app import delivery_watchdog

    def worker(next_offsets: dict[int, int]):
        app = SimpleNamespace(in_recovery=False, rebalancing=False, consumer=SimpleNamespace(
            assignment=lambda: {TopicPartition("telemetry", 0), TopicPartition("telemetry", 1),
                                TopicPartition("other", 0)}))
        folder = SimpleNamespace(guard=SimpleNamespace(next=next_offsets), delivered_at=time.monotonic())
        return app, folder

    ends = {0: 10, 1: 4, 2: 99}  # partition 2 is another worker's: its backlog is not this one's
    offsets = SimpleNamespace(topic="telemetry", start=lambda p: 4, end=ends.__getitem__,
                              first_record=lambda p, start, before: start)  # every offset holds a record
    reasons: list[str] = []
    restarted = threading.Event()

    app, folder = worker({0: 7})  # partition 0: 3 records waiting past the guard; partition 1: at its end
    delivery_watchdog(app, folder, offsets, stall_s=0.3, restart=lambda why: (reasons.append(why), restarted.set()),
                      interval_s=0.05)
    assert restarted.wait(3)
    assert reasons[0].endswith("while telemetry partition 0 has 3 waiting (a Faust fetch stall)")

    app, folder = worker({0: 7})
    moving = threading.Event()
    delivery_watchdog(app, folder, offsets, stall_s=0.3, restart=lambda why: moving.set(), interval_s=0.05)
    for _ in range(20):  # records keep reaching the agent
        folder.delivered_at = time.monotonic()
        time.sleep(0.05)  # not synchronisation: deliveries over time, what the watchdog watches
    folder.guard.next[0] = 10  # caught up
    assert not moving.wait(0.5)


def test_offsets_at_the_end_that_hold_no_record_are_not_records_waiting(caplog):
    """A transaction's marker at the end of a partition: the guard waits at it until a record comes past
    it. The watchdog asks the broker once per range, and records wait from the first that holds one."""
    import logging
    from types import SimpleNamespace

    from kafka_backup.streams.app import DeliveryStall, EmptyTails

    empty = {7, 8, 9, 12}
    asked: list[tuple[int, int, int]] = []

    def first_record(p: int, start: int, before: int) -> int | None:
        asked.append((p, start, before))
        return next((o for o in range(start, before) if o not in empty), None)

    tails = EmptyTails(SimpleNamespace(first_record=first_record))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="kafka_backup.aggregator"):
        assert tails.past(0, 7, 10) == 10
        assert tails.past(0, 7, 10) == 10
        assert tails.past(0, 10, 10) == 10  # nothing past the guard: not asked
        assert tails.past(0, 7, 13) == 10  # 10 and 11 hold records: waiting from 10, past the markers
        assert tails.past(0, 7, 14) == 10  # a record waits at 10: not asked again while it does
    assert asked == [(0, 7, 10), (0, 10, 13)]  # only the offsets past those found empty
    assert [r.getMessage() for r in caplog.records] == [
        "telemetry partition 0: offsets 7..9 hold no record (transaction markers); not a stall"]
    stall = DeliveryStall(0)
    for now in (1.0, 2.0, 3.0):
        assert stall.check(now, 0.0, {0: (tails.past(0, 7, 10), 10)}) is None


def test_recovery_watchdog_restarts_only_a_stalled_recovery():
    import threading
    import time
    from collections import Counter
    from types import SimpleNamespace

    from kafka_backup.streams.app import recovery_watchdog

    def fake_app(offsets):
        return SimpleNamespace(in_recovery=True, tables=SimpleNamespace(recovery=SimpleNamespace(
            active_offsets=offsets, standby_offsets=Counter())))

    stalled, restarted = fake_app(Counter({"tp0": 5})), threading.Event()
    recovery_watchdog(stalled, stall_s=0.3, restart=lambda why: restarted.set(), interval_s=0.05)
    assert restarted.wait(3)

    moving, restarted_too = fake_app(Counter({"tp0": 0})), threading.Event()
    recovery_watchdog(moving, stall_s=0.3, restart=lambda why: restarted_too.set(), interval_s=0.05)
    for i in range(20):  # a long recovery that keeps reading the changelog
        moving.tables.recovery.active_offsets["tp0"] = i
        time.sleep(0.05)  # not synchronisation: the recovery's progress over time, what the watchdog watches
    moving.in_recovery = False
    assert not restarted_too.wait(0.5)


def test_commit_waits_for_every_table_write_even_when_fausts_flush_gives_up():
    """Faust's buffer flush returns while writes are still queued; the barrier's flush does not."""
    import asyncio
    from types import SimpleNamespace

    from faust.transport.producer import ProducerBuffer

    from kafka_backup.streams.guards import ChangelogBarrier

    async def scenario():
        buffer = ProducerBuffer()
        buffer.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))

        async def slow_send(fut):  # a send stuck on metadata or a starved loop
            await asyncio.sleep(0.3)  # not synchronisation: the slow send itself
            fut.set_result("acked")

        buffer._send_pending = slow_send
        await buffer.start()
        barrier = ChangelogBarrier(timeout_s=10)

        def send_changelog(n):
            fut = asyncio.get_running_loop().create_future()
            buffer.put(fut)
            return fut

        send = barrier.track(send_changelog)
        writes = [send(n) for n in range(3)]
        await buffer.flush()
        upstream_left_behind = sum(not w.done() for w in writes)
        producer = SimpleNamespace(flush=buffer.flush)
        barrier.guard_flush(producer, on_failure=lambda err: None)
        await producer.flush()
        await buffer.stop()
        return upstream_left_behind, [w.result() for w in writes], barrier.pending

    left_behind, results, pending = asyncio.run(scenario())
    assert left_behind == 3  # Faust alone would have committed past three unsent writes
    assert results == ["acked"] * 3 and not pending


def test_barrier_refuses_to_commit_past_a_failed_write_and_holds_for_a_slow_one():
    import asyncio
    from types import SimpleNamespace

    import pytest

    from kafka_backup.streams.guards import ChangelogBarrier, ChangelogWriteFailed

    restarts = []

    async def failed():
        barrier = ChangelogBarrier(timeout_s=5)
        fut = asyncio.get_running_loop().create_future()
        barrier.track(lambda: fut)()
        fut.set_exception(OSError("broker gone"))

        async def flush():
            pass

        producer = SimpleNamespace(flush=flush)
        barrier.guard_flush(producer, on_failure=restarts.append)
        await producer.flush()  # Faust's last step before a commit: the commit must not happen

    async def slow():
        barrier = ChangelogBarrier(timeout_s=0.05)
        fut = asyncio.get_running_loop().create_future()
        barrier.track(lambda: fut)()
        waiter = asyncio.ensure_future(barrier.wait())
        await asyncio.sleep(0.3)  # not synchronisation: several timeouts pass; still holding, not crashing
        held = not waiter.done()
        fut.set_result("acked")
        await waiter
        return held

    with pytest.raises(ChangelogWriteFailed, match="broker gone"):
        asyncio.run(failed())
    assert len(restarts) == 1  # the worker restarts in place and reads those events again
    assert asyncio.run(slow())


def test_offset_guard_folds_in_order_skips_redeliveries_and_spots_holes():
    from kafka_backup.streams.guards import OffsetGuard

    guard = OffsetGuard("telemetry")
    guard.start(0, 40)
    guard.start(1, 0)
    assert guard.admit(0, 39) == "duplicate"  # below the committed offset: folded by an earlier worker
    assert guard.admit(0, 40) == "fold"
    guard.folded(0, 40)
    assert guard.admit(0, 41) == "fold"
    guard.folded(0, 41)
    assert guard.admit(0, 41) == "duplicate"
    assert guard.admit(0, 43) == "gap"  # offset 42 was never delivered
    assert guard.admit(1, 5) == "gap"  # started past the beginning with nothing committed: the restart case
    guard.forget({0})  # revoked: where to start is asked again on its return
    with pytest.raises(KeyError):
        guard.admit(0, 7)
    guard.start(0, 7)
    assert guard.admit(0, 7) == "fold"


def test_offset_guard_holds_commits_back_to_what_was_folded():
    import asyncio
    from collections import defaultdict
    from types import SimpleNamespace

    from faust.types import TP

    from kafka_backup.streams.guards import OffsetGuard

    guard = OffsetGuard("telemetry")
    guard.start(0, 0)
    sent = []

    async def commit_offsets(offsets, start_new_transaction=True):
        sent.append(dict(offsets))
        return True

    consumer = SimpleNamespace(_commit_offsets=commit_offsets, _committed_offset=defaultdict(lambda: None),
                               _acked=defaultdict(list), _acked_index=defaultdict(set))
    guard.guard_commits(consumer)
    guard.admit(0, 0)
    guard.folded(0, 99)  # offsets 0..99 folded on partition 0; nothing yet on partition 1
    other = TP("agg-__assignor-__leader", 0)
    asyncio.run(consumer._commit_offsets({TP("telemetry", 0): 130, TP("telemetry", 1): 12, other: 3}))
    assert sent == [{TP("telemetry", 0): 100, other: 3}]


def test_a_commit_held_back_by_the_guard_goes_through_once_released_in_faust_s_own_bookkeeping():
    """Faust strikes the offsets it hands to a commit from its acked list, and refuses to commit a
    partition whose oldest acked offset is more than one past its committed offset: a commit held
    back by the guard stopped that partition's commits for good (seen with ``kafka-backup up``: the
    group's offset stuck while folding went on). Driven through Faust 0.15.3's own ``_new_offset``,
    ``ack`` and ``_commit_offsets``."""
    import asyncio
    from collections import defaultdict
    from types import SimpleNamespace

    from faust.transport.consumer import Consumer as FaustConsumer
    from faust.types import TP

    from kafka_backup.streams.guards import OffsetGuard

    tp = TP("telemetry", 0)
    sent: list[int] = []

    async def commit(offsets) -> bool:  # the broker's side of Consumer._commit
        sent.append(offsets[tp])
        return True

    async def flush() -> None:
        pass

    app = SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: True), producer=SimpleNamespace(
        flush=flush), tables=SimpleNamespace(on_commit=lambda offsets: None), monitor=SimpleNamespace(
        on_tp_commit=lambda offsets: None))
    consumer = SimpleNamespace(
        app=app, _acked=defaultdict(list), _acked_index=defaultdict(set), _gap=defaultdict(lambda: None),
        _committed_offset=defaultdict(lambda: None), _unacked_messages=set(), _n_acked=0, _waiting_for_ack=None,
        in_transaction=False, log=SimpleNamespace(dev=lambda *a: None, info=lambda *a: None),
        assignment=lambda: {tp}, _commit=commit)
    consumer._commit_offsets = lambda offsets, start_new_transaction=True: FaustConsumer._commit_offsets(
        consumer, offsets, start_new_transaction)
    guard = OffsetGuard("telemetry")
    guard.guard_commits(consumer)
    guard.start(0, 0)

    class Message:  # what Consumer.ack reads of one
        def __init__(self, offset: int) -> None:
            self.acked, self.tp, self.offset, self.topic = False, tp, offset, "telemetry"

    def fold_and_ack(first: int, last: int) -> None:
        for offset in range(first, last + 1):
            guard.folded(0, offset)
            FaustConsumer.ack(consumer, Message(offset))

    async def faust_commits() -> None:  # what Consumer.commit does with what _new_offset gives
        offset = FaustConsumer._new_offset(consumer, tp)
        if offset is not None:
            await consumer._commit_offsets({tp: offset})

    async def scenario() -> None:
        fold_and_ack(0, 26)
        guard.hold(0, 14)  # offsets 14.. folded into the working set, not flushed yet
        await faust_commits()
        assert sent == [14]
        guard.release(0)  # flushed
        fold_and_ack(27, 40)
        await faust_commits()
        assert sent == [14, 41]  # before: _new_offset gave None from here on, for good
        fold_and_ack(41, 45)
        await faust_commits()
        assert sent == [14, 41, 46]

    asyncio.run(scenario())


def test_skipped_records_hold_the_commit_until_their_count_is_written():
    from faust.types import TP

    from kafka_backup.streams.guards import OffsetGuard

    guard = OffsetGuard("telemetry")
    guard.start(0, 0)
    guard.admit(0, 0)
    guard.folded(0, 9)
    guard.hold(0, 10)  # offset 10 was skipped; its count is still in memory
    guard.folded(0, 49)
    assert guard.allowed({TP("telemetry", 0): 50}) == {TP("telemetry", 0): 10}
    guard.release(0)  # the count is in the table
    assert guard.allowed({TP("telemetry", 0): 50}) == {TP("telemetry", 0): 50}


def test_skip_counts_flush_in_batches_and_log_a_bounded_escaped_line(caplog, monkeypatch):
    import logging

    from kafka_backup.streams import folder

    clock = [1000.0]
    monkeypatch.setattr(folder.time, "monotonic", lambda: clock[0])
    skips = folder.SkipCounts(batch=500, max_age_s=0.2, log_every_s=10.0)
    with caplog.at_level(logging.WARNING, logger="kafka_backup.aggregator"):
        for i in range(499):
            skips.add(0, "bad_value", 1)
            skips.log(0, "bad_value", f"evil\nline {i} " + "x" * 500)
            assert not skips.due(0, after_good=False)
        skips.add(0, "bad_value", 1)
        assert skips.due(0, after_good=False)  # 500 pending: one write
    assert skips.take(0) == {"bad_value": 500}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0] and "evil\\nline 0" in lines[0] and len(lines[0]) < 400
    skips.add(1, "malformed", 1)
    assert not skips.due(1, after_good=False)
    clock[0] += 0.2
    assert skips.due(1, after_good=False)  # old enough
    skips.add(2, "malformed", 1)
    assert skips.due(2, after_good=True)  # a good record on the partition writes what is pending


def test_an_unexpected_error_logs_its_traceback_once_per_kind(caplog):
    """Keyed by type and where it was raised, not by message (which holds per-record data)."""
    import logging

    from kafka_backup.schemas.logs import FirstOfEach

    first = FirstOfEach(logging.getLogger("kafka_backup.test"))

    def fail_here(i):
        raise KeyError(f"record {i}")

    def fail_there(i):
        return {}[f"other {i}"]

    logged = []
    with caplog.at_level(logging.ERROR, logger="kafka_backup.test"):
        for i, f in enumerate([fail_here, fail_here, fail_there, fail_here, fail_there]):
            try:
                f(i)
            except KeyError as err:
                logged.append(first.exception(err, "offset %d: unexpected failure", i))
    assert logged == [True, False, True, False, False]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["offset 0", "offset 2"]
    assert all(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


def test_an_empty_fetch_answered_at_once_pauses_the_next_and_nothing_else_does(monkeypatch):
    """aiokafka's fetch task, wrapped by ``pace_empty_fetches``: an empty answer quicker than the pause
    waits out the rest; an answer with records, an empty one the broker held long enough (Kafka's fetch
    wait), and a fetcher closing never wait. Wrapping again (or with 0) replaces, never stacks."""
    import asyncio
    from types import SimpleNamespace

    from aiokafka.consumer.fetcher import Fetcher

    from kafka_backup.streams import guards

    clock = [100.0]
    slept: list[float] = []

    async def fake_sleep(s: float) -> None:
        slept.append(round(s, 6))
        clock[0] += s

    async def fetch(self, assignment, node_id, request):  # stands for aiokafka's: the broker took `request` s
        clock[0] += request
        return assignment

    monkeypatch.setattr(guards.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(guards.asyncio, "sleep", fake_sleep)
    monkeypatch.setattr(Fetcher, "_proc_fetch_request", fetch)
    open_, closed = SimpleNamespace(_closed=False), SimpleNamespace(_closed=True)

    def run(fetcher, has_data: bool, took_s: float) -> bool:
        return asyncio.run(Fetcher._proc_fetch_request(fetcher, has_data, 1, took_s))

    guards.pace_empty_fetches(0.05)
    guards.pace_empty_fetches(0.05)  # once more: still one pause, not two
    assert run(open_, False, 0.01) is False and slept == [0.04]  # the dev broker's at-once empty answer
    assert run(open_, True, 0.01) is True and slept == [0.04]  # records: fetch again at once
    assert run(open_, False, 1.5) is False and slept == [0.04]  # a Kafka broker held it: no pause
    assert run(closed, False, 0.0) is False and slept == [0.04]  # closing: end now

    async def cancelled_sleep(s: float) -> None:
        raise asyncio.CancelledError

    monkeypatch.setattr(guards.asyncio, "sleep", cancelled_sleep)
    assert run(open_, False, 0.0) is False  # cancelled in its pause (unassigned): ends as aiokafka's own task does

    guards.pace_empty_fetches(0)
    assert Fetcher._proc_fetch_request is fetch  # 0: aiokafka's own, unwrapped


def test_the_aggregator_refuses_a_faust_or_aiokafka_its_guards_were_not_written_for(monkeypatch):
    """One line naming the package, the version found and the pip command; the pinned pair passes."""
    import aiokafka
    import faust

    from kafka_backup.schemas.config import ConfigError
    from kafka_backup.streams import guards

    guards.check_faust_version()  # what pyproject.toml pins
    monkeypatch.setattr(aiokafka, "__version__", "0.15.0")
    with pytest.raises(ConfigError, match=r"^aiokafka 0\.15\.0 is installed; .* pip install aiokafka==0\.14\.0$"):
        guards.check_faust_version()
    monkeypatch.setattr(faust, "__version__", "0.16.0")
    with pytest.raises(ConfigError, match=r"^faust-streaming 0\.16\.0 is installed; .*==0\.15\.3$"):
        guards.check_faust_version()


def test_changelog_writer_sends_a_partition_s_flushes_in_order_and_holds_the_commit_for_their_acks():
    """A partition's second flush starts handing its states over only when the first has handed over
    all of its own (the first blocked on a full batch here), so a job's states reach the changelog in
    the order written; another partition does not wait for it. The commit barrier holds until every
    state is acknowledged, and a refused one makes the commit fail."""
    import asyncio
    from types import SimpleNamespace

    from kafka_backup.streams.guards import ChangelogBarrier, ChangelogWriteFailed, ChangelogWriter

    async def scenario():
        loop = asyncio.get_running_loop()
        sent: list[tuple[int, bytes, bytes]] = []
        acks: list[asyncio.Future] = []
        full = asyncio.Event()  # partition 0's batch is full until set

        async def send(topic, value, key, partition):
            assert topic == "app-jobs-changelog"
            if partition == 0 and value == b"a1":
                await full.wait()
            sent.append((partition, key, value))
            acks.append(loop.create_future())
            return acks[-1]

        producer = SimpleNamespace(send=send)
        app = SimpleNamespace(producer=SimpleNamespace(_ensure_producer=lambda: producer))
        table = SimpleNamespace(data={}, changelog_topic=SimpleNamespace(get_topic_name=lambda: "app-jobs-changelog"))
        barrier = ChangelogBarrier(timeout_s=10)
        writer = ChangelogWriter(app, table, barrier)

        writer.write(0, [(b"j", b"a0"), (b"k", b"a1")])  # blocks at its second state
        writer.write(0, [(b"k", b"b1")])  # the next flush of k: must not overtake a1
        writer.write(1, [(b"m", b"c0")])
        writer.write(1, [])  # nothing changed: no task
        for _ in range(5):
            await asyncio.sleep(0)
        before_unblocked = list(sent)
        full.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert table.data == {b"j": b"a0", b"k": b"b1", b"m": b"c0"}  # the local store at once
        pending_before_acks = len(barrier.pending)
        for fut in acks:
            fut.set_result("acked")
        await barrier.wait()
        after_acks = len(barrier.pending)

        writer.write(1, [(b"m", b"c1")])
        for _ in range(5):
            await asyncio.sleep(0)
        acks[-1].set_exception(RuntimeError("NOT_LEADER_FOR_PARTITION"))
        try:
            await barrier.wait()
            refused = None
        except ChangelogWriteFailed as err:
            refused = str(err)
        return before_unblocked, sent, pending_before_acks, after_acks, refused

    before, sent, pending, after, refused = asyncio.run(scenario())
    assert before == [(0, b"j", b"a0"), (1, b"m", b"c0")]  # partition 1 did not wait for partition 0
    assert [s for s in sent if s[0] == 0] == [(0, b"j", b"a0"), (0, b"k", b"a1"), (0, b"k", b"b1")]
    assert pending == 3 and after == 0
    assert refused is not None and "NOT_LEADER_FOR_PARTITION" in refused


def test_the_aggregator_runs_faust_with_start_up_frozen_and_young_objects_collected_rarely(monkeypatch):
    """schemas/collector.py: single-event telemetry folded at 14,239 events/s against 11,713 with
    the collector's default threshold (bench/aggregator.py). Faust's worker starts with it in place."""
    import gc

    from kafka_backup.schemas import collector
    from kafka_backup.schemas.config import load
    from kafka_backup.streams import app as app_module

    seen: list[tuple[int, int]] = []

    class Worker:
        def __init__(self, app, **kwargs) -> None:
            self.spinner = object()

        def execute_from_commandline(self) -> None:
            seen.append((gc.get_threshold()[0], gc.get_freeze_count()))

    for name in ("check_faust_version", "faust_credentials", "ensure_telemetry_topic", "settle_partitions",
                 "recovery_watchdog", "create_app", "security_for"):
        monkeypatch.setattr(app_module, name, lambda *a, **k: None)
    monkeypatch.setattr(app_module.faust, "Worker", Worker)
    gc.set_threshold(700, 10, 10)
    gc.unfreeze()
    app_module.run(load(None, {}, environ={}))
    assert len(seen) == 1 and seen[0][0] == collector.GC_THRESHOLD and seen[0][1] > 0
