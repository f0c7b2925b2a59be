"""The aggregation itself, without Kafka: exact under duplicates, replays and any instance mix."""

from __future__ import annotations

import random

import pytest

from schemas import events as ev
from schemas.state import encode_state
from streams import fold

T0 = 1_790_000_000.0


class Worker:
    def __init__(self, job="b1", instance="w1"):
        self.job, self.instance, self.seq = job, instance, 0

    def __call__(self, cls, **fields):
        self.seq += 1
        return cls(instance=self.instance, seq=self.seq, ts=T0 + self.seq, job=self.job, **fields)


def segment(w, start, end, records=None, nbytes=10):
    return w(ev.SegmentStored, topic="t", partition=0, start_offset=start, end_offset=end,
             records=records if records is not None else end - start, bytes=nbytes, uncompressed_bytes=20,
             stored_bytes=5, algorithm="zstd")


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
    assert twice.storage_errors == {"s3|timeout": 1}
    assert twice.storage_latency["write|s3|segment"].count == 1


def test_same_range_reported_by_a_second_instance_counts_once():
    a, b = Worker(instance="a"), Worker(instance="b")
    state = fold_all([segment(a, 0, 100), segment(b, 0, 100), segment(b, 100, 130)])
    assert state.records == 130
    assert state.partitions["t/0"].stored_next_offset == 130


def test_a_restarted_worker_counts_from_its_new_instance():
    first, second = Worker(instance="run1"), Worker(instance="run2")
    state = fold_all([first(ev.JobStarted), segment(first, 0, 10), first(ev.JobEnded, status="failure",
                      duration_s=1.0), second(ev.JobStarted), segment(second, 10, 25),
                      second(ev.JobEnded, status="success", duration_s=2.0)])
    assert state.records == 25 and state.runs == 2
    assert state.durations["failure"].count == 1 and state.durations["success"].count == 1


def test_histogram_buckets_follow_the_catalogue():
    w = Worker()
    state = fold_all([w(ev.JobEnded, status="success", duration_s=d) for d in (0.5, 1.0, 4.0, 3600.0, 5000.0)])
    # buckets 1,5,15,...,3600 then +Inf; le is inclusive
    assert state.durations["success"].counts == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert state.durations["success"].sum == pytest.approx(8605.5)


def test_dedup_marks_are_bounded():
    state = None
    for i in range(fold.MAX_INSTANCES_PER_JOB + 10):
        state = fold.apply(state, Worker(instance=f"i{i}")(ev.Retry, operation="commit"))
    assert len(state.seen) == fold.MAX_INSTANCES_PER_JOB
    assert state.retries == {"commit": fold.MAX_INSTANCES_PER_JOB + 10}


@pytest.mark.parametrize("event,reason", [
    (ev.Progress(instance="i", seq=1, ts=T0, job="j",
                 partitions=[ev.PartitionProgress("t", 0, committed=10, high_watermark=5)]), "bad_value"),
    (ev.SegmentStored(instance="i", seq=1, ts=T0, job="j", topic="t", partition=0, start_offset=0, end_offset=1,
                      records=-1, bytes=0, uncompressed_bytes=0, stored_bytes=0, algorithm="none"), "bad_value"),
    (ev.Retry(instance="i", seq=1, ts=T0 + 3 * 365 * 86400, job="j", operation="x"), "bad_timestamp"),
    (ev.Retry(instance="i", seq=1, ts=1000.0, job="j", operation="x"), "bad_timestamp"),
])
def test_absurd_values_are_rejected(event, reason):
    with pytest.raises(ev.InvalidEvent) as err:
        fold.check(event, record_ts=T0)
    assert err.value.reason == reason
