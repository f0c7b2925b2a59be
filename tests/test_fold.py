"""The aggregation itself, without Kafka: exact under duplicates, replays and any instance mix."""

from __future__ import annotations

import itertools
import random

import pytest

from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.state import MAX_HOLES, Histogram, Hole, JobState, decode_state, encode_state
from kafka_backup.streams import fold

T0 = 1_790_000_000.0


class Worker:
    def __init__(self, job="b1", worker="w1"):
        self.job, self.worker, self.seq = job, worker, 0

    def __call__(self, cls, **fields):
        self.seq += 1
        return cls(worker=self.worker, seq=self.seq, ts=T0 + self.seq, job=self.job, **fields)


def segment(w, start, end, records=None, nbytes=10, covers_from=-1):
    return w(ev.SegmentStored, topic="t", partition=0, start_offset=start, end_offset=end,
             records=records if records is not None else end - start, bytes=nbytes, uncompressed_bytes=20,
             stored_bytes=5, algorithm="zstd", covers_from=covers_from)


def hist_of(values, buckets):
    h = Histogram.empty(buckets)
    for v in values:
        h.observe(v, buckets)
    return h


def fold_all(events):
    state = None
    for e in events:
        state = fold.apply(state, e) or state
    return state


def test_duplicates_and_reordered_replays_change_nothing():
    w = Worker()
    events = [w(ev.JobStarted, mode="one-shot"), segment(w, 0, 100), segment(w, 100, 150),
              w(ev.StorageOp, backend="s3", operation="segment", direction="write", latency_s=0.03, bytes=5),
              w(ev.ErrorRaised, error_type="storage_io", transient=True, backend="s3", storage_error="timeout"),
              w(ev.JobEnded, status="success", duration_s=12.0)]
    once = fold_all(events)
    assert (once.records, once.bytes, once.runs) == (150, 20, 1)
    rng = random.Random(7)
    noisy = list(events)
    for _ in range(20):  # duplicates inserted after their first delivery, as retries and replays do
        i = rng.randrange(len(events))
        noisy.insert(rng.randrange(noisy.index(events[i]) + 1, len(noisy) + 1), events[i])
    twice = fold_all(noisy + events)
    assert encode_state(twice) == encode_state(once)
    assert (twice.records, twice.bytes, twice.runs) == (150, 20, 1)
    assert twice.durations["success"].count == 1
    assert twice.storage_errors_by() == [("s3", "timeout", 1)]
    assert [(c.direction, c.backend, c.operation, c.outcome, c.latency.count) for c in twice.storage_calls] == [
        ("write", "s3", "segment", "success", 1)]


def test_same_range_reported_by_a_second_instance_counts_once():
    a, b = Worker(worker="a"), Worker(worker="b")
    state = fold_all([segment(a, 0, 100), segment(b, 0, 100), segment(b, 100, 130)])
    assert state.records == 130
    assert state.partitions["t/0"].stored_next_offset == 130


def test_a_lost_report_is_a_hole_that_the_next_run_fills_once():
    killed, next_run = Worker(worker="killed"), Worker(worker="next")
    # the killed worker's report of 100..150 died in its queue; one of 150..200 got out
    state = fold_all([segment(killed, 0, 100, covers_from=0), segment(killed, 150, 200, covers_from=150)])
    p = state.partitions["t/0"]
    assert (state.records, p.stored_next_offset, p.stored_holes) == (150, 200, [Hole(100, 150)])
    # the next run reports again every segment the checkpoint has as unconfirmed
    for _ in range(2):
        state = fold.apply(state, segment(next_run, 100, 150, covers_from=100)) or state
        state = fold.apply(state, segment(next_run, 150, 200, covers_from=150)) or state
    assert (state.records, p.stored_next_offset, p.stored_holes) == (200, 200, [])


def test_offsets_without_records_between_segments_are_not_holes():
    w = Worker()
    # a transaction marker at 100: the next segment starts at 101 but covers from 100
    state = fold_all([segment(w, 0, 100, covers_from=0), segment(w, 101, 150, 49, covers_from=100)])
    assert (state.records, state.partitions["t/0"].stored_holes) == (149, [])


def test_any_order_of_reports_with_duplicates_counts_each_range_once():
    rng = random.Random(11)
    bounds = sorted(rng.sample(range(1, 5000), 40))
    spans = list(zip([0, *bounds], bounds, strict=False))
    workers = [Worker(worker=f"w{i}") for i in range(3)]
    reports = spans + rng.sample(spans, 15)
    rng.shuffle(reports)  # arrival order across instances; each instance's own events stay in sequence
    state = fold_all([segment(rng.choice(workers), a, b, covers_from=a) for a, b in reports])
    assert state.records == bounds[-1]
    assert state.partitions["t/0"].stored_holes == []


def test_holes_are_bounded_and_a_forgotten_one_is_not_counted():
    w = Worker()
    state = fold_all([segment(w, 2 * i, 2 * i + 1, covers_from=2 * i) for i in range(MAX_HOLES + 3)])
    p = state.partitions["t/0"]
    assert len(p.stored_holes) == MAX_HOLES and p.stored_holes[0] == Hole(5, 6)
    before = state.records
    state = fold.apply(state, segment(w, 1, 2, covers_from=1)) or state  # forgotten: not counted
    state = fold.apply(state, segment(w, 5, 6, covers_from=5)) or state  # remembered: counted
    assert state.records == before + 1


def test_a_restarted_worker_counts_from_its_new_instance():
    first, second = Worker(worker="run1"), Worker(worker="run2")
    state = fold_all([first(ev.JobStarted), segment(first, 0, 10), first(ev.JobEnded, status="failure",
                      duration_s=1.0), second(ev.JobStarted), segment(second, 10, 25),
                      second(ev.JobEnded, status="success", duration_s=2.0)])
    assert state.records == 25 and state.runs == 2
    assert state.durations["failure"].count == 1 and state.durations["success"].count == 1


def test_histogram_buckets_follow_the_catalogue():
    w = Worker()
    durations = (0.5, 1.0, 4.0, 3600.0, 5000.0, 3 * 86400.0, 40 * 86400.0)
    state = fold_all([w(ev.JobEnded, status="success", duration_s=d) for d in durations])
    # buckets 1,5,15,...,3600, 7200, ..., 172800, 604800, 2592000, then +Inf; le is inclusive
    assert state.durations["success"].counts == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 1]
    assert state.durations["success"].sum == pytest.approx(sum(durations))


def test_a_histogram_of_the_former_buckets_moves_over_exactly_when_next_observed():
    """State written before the buckets grew: every le that existed keeps its cumulative count."""
    old_buckets = cat.LEGACY_DURATION_BUCKETS[0]
    old = Histogram.empty(old_buckets)
    for d in (0.5, 30.0, 3600.0, 5000.0, 90000.0):
        old.observe(d, old_buckets)
    state = JobState(kind="backup", job="b", durations={"success": old})
    w = Worker()
    fold.apply(state, w(ev.JobEnded, status="success", duration_s=10000.0))
    h = state.durations["success"]
    assert len(h.counts) == len(cat.BACKUP_DURATION.buckets) + 1
    cum = dict(zip([*cat.BACKUP_DURATION.buckets, float("inf")], itertools.accumulate(h.counts), strict=True))
    assert [cum[b] for b in (1.0, 30.0, 3600.0)] == [1, 2, 3]  # as before
    assert cum[14400.0] == 4  # the new 10000 s run; the old >3600 s ones stay in +Inf: their size is unknown
    assert cum[float("inf")] == 6 and h.count == 6
    assert h.sum == pytest.approx(0.5 + 30 + 3600 + 5000 + 90000 + 10000)


def test_failed_storage_calls_are_timed_by_outcome_and_permanent_errors_counted():
    w = Worker()
    state = fold_all([
        w(ev.StorageOp, backend="s3", operation="segment", direction="write", latency_s=0.03, bytes=5),
        w(ev.StorageOp, backend="s3", operation="segment", direction="write", latency_s=45.0, bytes=0,
          outcome="timeout"),
        w(ev.ErrorRaised, error_type="storage_io", transient=True, backend="s3", storage_error="timeout"),
        w(ev.ErrorRaised, error_type="storage_io", transient=False, backend="s3", storage_error="auth"),
        w(ev.ErrorRaised, error_type="offset_invalid", transient=False),
    ])
    calls = {c.outcome: c.latency for c in state.storage_calls}
    assert sorted(calls) == ["success", "timeout"]
    assert calls["timeout"].count == 1 and calls["timeout"].sum == 45.0
    assert state.errors == {"storage_io": 2, "offset_invalid": 1}
    assert state.permanent_errors == {"storage_io": 1, "offset_invalid": 1}


def test_legacy_joined_storage_keys_move_to_structured_calls_once():
    old = hist_of([0.2], cat.LEGACY_STORAGE_LATENCY_BUCKETS[0])
    state = JobState(kind="backup", job="b", storage_latency={"write|s3|segment": old})
    fold.apply(state, Worker()(ev.StorageOp, backend="s3", operation="segment", direction="write",
                               latency_s=0.3, bytes=1))
    assert state.storage_latency == {}
    (calls,) = state.storage_calls
    assert (calls.direction, calls.backend, calls.operation, calls.outcome, calls.latency.count) == (
        "write", "s3", "segment", "success", 2)
    assert len(calls.latency.counts) == len(cat.STORAGE_WRITE_LATENCY.buckets) + 1


def test_one_rebalance_counts_once():
    w = Worker()
    state = fold_all([w(ev.Rebalance, assigned=["t/0", "t/1"]),  # first assignment
                      w(ev.Rebalance, revoked=["t/0", "t/1"]), w(ev.Rebalance, assigned=["t/1"]),  # a rebalance
                      w(ev.Rebalance)])  # an assignment that gave this worker nothing is a rebalance too
    assert state.rebalances == 3


def test_last_success_and_objectives_follow_the_runs():
    w = Worker()
    state = fold_all([w(ev.JobStarted, expected_interval_s=3600.0, recovery_point_objective_s=7200.0),
                      w(ev.JobEnded, status="success", duration_s=1.0)])
    ok_ts = state.ended_ts
    assert state.last_success_ts == ok_ts
    assert (state.expected_interval_s, state.recovery_point_objective_s) == (3600.0, 7200.0)
    state = fold.apply(state, w(ev.JobStarted))
    state = fold.apply(state, w(ev.JobEnded, status="failure", duration_s=1.0))
    assert state.last_success_ts == ok_ts and state.ended_ts > ok_ts


def test_dedup_marks_are_bounded():
    state = None
    for i in range(fold.MAX_INSTANCES_PER_JOB + 10):
        state = fold.apply(state, Worker(worker=f"i{i}")(ev.Retry, operation="commit"))
    assert len(state.seen) == fold.MAX_INSTANCES_PER_JOB
    assert state.retries == {"commit": fold.MAX_INSTANCES_PER_JOB + 10}


def seg(**fields):
    base = dict(worker="i", seq=1, ts=T0, job="j", topic="t", partition=0, start_offset=0, end_offset=10,
                records=10, bytes=0, uncompressed_bytes=0, stored_bytes=0, algorithm="none")
    return ev.SegmentStored(**{**base, **fields})


def op(**fields):
    base = dict(worker="i", seq=1, ts=T0, job="j", backend="s3", operation="segment", direction="write",
                latency_s=0.1, bytes=1)
    return ev.StorageOp(**{**base, **fields})


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("event,reason", [
    (ev.Progress(worker="i", seq=1, ts=T0, job="j",
                 partitions=[ev.PartitionProgress("t", 0, committed=10, high_watermark=5)]), "bad_value"),
    (seg(records=-1), "bad_value"),
    (seg(bytes=-5), "bad_value"),
    (op(latency_s=NAN), "bad_value"),
    (op(latency_s=INF), "bad_value"),
    (op(latency_s=-INF), "bad_value"),
    (ev.JobEnded(worker="i", seq=1, ts=T0, job="j", status="success", duration_s=NAN), "bad_value"),
    (ev.Retry(worker="i", seq=1, ts=NAN, job="j", operation="x"), "bad_value"),
    (seg(end_offset=2**63), "bad_value"),  # above a signed 64-bit offset
    (seg(start_offset=20, end_offset=10, records=0), "bad_value"),  # inverted range
    (seg(start_offset=5, covers_from=7, records=5), "bad_value"),  # covers from above its start
    (seg(records=11), "bad_value"),  # more records than offsets
    (op(backend="s3|write"), "bad_value"),  # a `|` would have shifted labels
    (op(operation="x" * 65), "bad_value"),
    (ev.Retry(worker="i", seq=1, ts=T0, job="j/../x", operation="x"), "bad_value"),  # not a safe job id
    (ev.ErrorRaised(worker="i", seq=1, ts=T0, job="j", error_type="e\nINJECTED", transient=True), "bad_value"),
    (ev.TelemetryDropped(worker="i", seq=1, ts=T0, job="j", total=2**64 - 1), "bad_value"),
    (ev.Retry(worker="i", seq=1, ts=T0 + 301, job="j", operation="x"), "bad_timestamp"),  # 5 min ahead
    (ev.Retry(worker="i", seq=1, ts=T0 + 3 * 365 * 86400, job="j", operation="x"), "bad_timestamp"),
    (ev.Retry(worker="i", seq=1, ts=1000.0, job="j", operation="x"), "bad_timestamp"),
])
def test_absurd_values_are_refused_with_a_reason(event, reason):
    with pytest.raises(ev.InvalidEvent) as err:
        fold.check(ev.decode(ev.encode(event)), record_ts=T0)
    assert err.value.reason == reason


def test_event_time_is_bounded_by_the_clock_when_the_record_has_no_timestamp():
    ahead = ev.decode(ev.encode(ev.Retry(worker="i", seq=1, ts=T0 + 3600, job="j", operation="x")))
    fold.check(ahead, record_ts=None)  # nothing to compare with (a replay without timestamps)
    with pytest.raises(ev.InvalidEvent, match="bad_timestamp"):
        fold.check(ahead, record_ts=None, now=T0)
    fold.check(ahead, record_ts=None, now=T0, settings=fold.Settings(max_future_s=7200))
    within = ev.decode(ev.encode(ev.Retry(worker="i", seq=1, ts=T0 + 299, job="j", operation="x")))
    fold.check(within, record_ts=T0, now=T0)


def restore_run(instance):
    w = Worker(job="rs1", worker=instance)
    return lambda cls, **f: w(cls, kind="restore", **f)


def test_a_restore_counts_its_checkpoints_totals_not_a_sum_of_batches():
    killed, resumed = restore_run("killed"), restore_run("resumed")
    events = [
        killed(ev.JobStarted, backup_id="b1", total_records=1000, restored_total=0, restored_bytes=0),
        killed(ev.RestoreProgress, records=200, restored_total=200, bytes=2000, restored_bytes=2000),
        # the 200..500 batch was acknowledged and checkpointed; its event died with the worker (kill -9)
        resumed(ev.JobStarted, backup_id="b1", total_records=1000, restored_total=500, restored_bytes=5000),
    ]
    state = fold_all(events)
    assert (state.records, state.bytes, state.restored_total) == (500, 5000, 500)
    # the killed worker had also written 500..600 unreported and unchecked: adopted, reported once more
    state = fold_all([*events, resumed(ev.RestoreProgress, records=100, restored_total=600, bytes=1000,
                                       restored_bytes=6000),
                      resumed(ev.RestoreProgress, records=400, restored_total=1000, bytes=4000, restored_bytes=10000)])
    assert (state.records, state.bytes, state.restored_total) == (1000, 10000, 1000)


def test_an_older_restore_worker_without_cumulative_bytes_still_adds_its_batches():
    w = restore_run("old")
    state = fold_all([w(ev.JobStarted, backup_id="b1", total_records=30, restored_total=0),
                      w(ev.RestoreProgress, records=10, restored_total=10, bytes=100),
                      w(ev.RestoreProgress, records=20, restored_total=30, bytes=200)])
    assert (state.records, state.bytes) == (30, 300)


def test_a_flood_of_new_keys_is_refused_beyond_the_cap_and_changes_nothing():
    settings = fold.Settings(max_keys_per_map=8)
    w = Worker()
    raw, refused = None, 0
    for i in range(20):
        new, reason = fold.apply_bytes(raw, w(ev.ErrorRaised, error_type=f"type{i}", transient=True), settings)
        if reason is not None:
            assert reason == "too_many_keys" and new is None
            refused += 1
        else:
            raw = new
    state = decode_state(raw)
    assert refused == 12 and len(state.errors) == 8
    assert fold.apply_bytes(raw, w(ev.ErrorRaised, error_type="type0", transient=True), settings)[1] is None


def test_a_state_beyond_the_size_cap_is_refused():
    settings = fold.Settings(max_state_bytes=4096)
    w = Worker()
    raw, reason = None, None
    for i in range(200):
        event = w(ev.Progress, partitions=[ev.PartitionProgress(f"topic-{i}", 0, committed=1, high_watermark=2)])
        new, reason = fold.apply_bytes(raw, event, settings)
        if reason:
            break
        raw = new
    assert reason == "state_too_large"
    assert len(raw) <= 4096


def test_counters_saturate_instead_of_outgrowing_msgpack():
    w = Worker()
    big = ev.MAX_INT
    other = w(ev.SegmentStored, topic="t", partition=1, start_offset=0, end_offset=big, records=big, bytes=big,
              uncompressed_bytes=big, stored_bytes=big, algorithm="zstd")
    state = fold_all([segment(w, 0, big, records=big, nbytes=big), other])  # two partitions: 2 * (2^63 - 1)
    assert state.records == state.bytes == ev.MAX_INT
    assert decode_state(encode_state(state)).records == ev.MAX_INT


def test_sums_over_partitions_saturate_too():
    """Found by the property tests: offsets near 2**63 on three partitions summed past 2**64 in the
    status window, and the state could no longer be encoded."""
    w = Worker()
    big = ev.MAX_INT - 5
    started = w(ev.JobStarted, mode="continuous")
    state = fold_all([started, w(ev.Progress, partitions=[ev.PartitionProgress("t", p, big, big) for p in range(3)])])
    assert state.window[-1].committed == ev.MAX_INT
    assert decode_state(encode_state(state)).window[-1].committed == ev.MAX_INT
