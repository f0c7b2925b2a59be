"""Worker status, expiry and the cardinality guard, from states folded out of real events."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from kafka_backup.exporter.collector import StateCollector, backup_status
from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas import events as ev
from kafka_backup.streams import fold
from tests.conftest import parse_prometheus

T0 = 1_790_000_000.0


def progress_run(lags_and_commits, job="b1", worker="w1", every=5.0, status_end=None):
    """Fold Progress events: each (lag, committed) becomes one sample 5 s apart."""
    state = fold.apply(None, ev.JobStarted(worker=worker, seq=0, ts=T0, job=job, mode="continuous"))
    for i, (lag, committed) in enumerate(lags_and_commits, start=1):
        e = ev.Progress(worker=worker, seq=i, ts=T0 + i * every, job=job, partitions=[
            ev.PartitionProgress("t", 0, committed=committed, high_watermark=committed + lag)])
        state = fold.apply(state, e)
    if status_end:
        state = fold.apply(state, ev.JobEnded(worker=worker, seq=999, ts=T0 + 999, job=job,
                                              status=status_end, duration_s=1.0))
    return state


LAST = T0 + 10 * 5.0


@pytest.mark.parametrize("samples,now,expected", [
    ([(100, 10 * i) for i in range(10)], LAST, "OK"),  # steady lag, moving: fine
    ([(0, 10 * i) for i in range(10)], LAST, "OK"),
    ([(100 + 10 * i, 10 * i) for i in range(10)], LAST, "WARN"),  # lag grows at every step while committing
    ([(100 + 10 * i, 50) for i in range(10)], LAST, "STALL"),  # no progress while lagging
    ([(100, 50 + i) for i in range(10)], LAST + 61, "STOP"),  # silent for longer than stop_after_s
    ([(100 + 10 * i, 10 * i) if i != 4 else (0, 40) for i in range(10)], LAST, "OK"),  # caught up once
])
def test_burrow_like_status(samples, now, expected):
    state = progress_run(samples)
    assert len(state.window) == 10
    assert backup_status(state, now, stop_after_s=60) == expected


def test_failed_run_is_error_and_finished_run_is_ok():
    assert backup_status(progress_run([(5, 1)], status_end="failure"), LAST + 10_000, 60) == "ERROR"
    assert backup_status(progress_run([(5, 1)], status_end="success"), LAST + 10_000, 60) == "OK"


def render(states, now, **kwargs):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(lambda: {f"backup:{s.job}": s for s in states}, clock=lambda: now, **kwargs))
    text = generate_latest(registry).decode()
    list(text_string_to_metric_families(generate_openmetrics(registry).decode()))  # strict check
    return parse_prometheus(text)


def test_status_is_a_stateset_with_one_current_state():
    s = render([progress_run([(100 + 10 * i, 10 * i) for i in range(10)])], LAST)
    values = {state: s.get_value(cat.BACKUP_STATUS.name, backup_id="b1", kafka_backup_status=state)
              for state in ("OK", "WARN", "STALL", "STOP", "ERROR")}
    assert values == {"OK": 0, "WARN": 1, "STALL": 0, "STOP": 0, "ERROR": 0}
    assert s.get_value(cat.WORKER_LAST_SEEN.name, kind="backup", job_id="b1", worker="w1") == LAST


def test_jobs_expire_after_the_configured_time():
    old = progress_run([(1, 1)], job="old", status_end="success")
    live = progress_run([(1, 1)], job="live")
    s = render([old, live], T0 + 999 + 3600, expire_after_s=1800)
    assert s.get_value(cat.RECORDS_TOTAL.name, backup_id="old") is None
    assert s.get_value(cat.RECORDS_TOTAL.name, backup_id="live") is None  # silent for an hour too
    s = render([old, live], T0 + 999 + 600, expire_after_s=1800)
    assert s.get_value(cat.RECORDS_TOTAL.name, backup_id="old") == 0
    assert s.get_value(cat.EXPORTER_EXPIRED_JOBS.name) == 0
    s = render([old, live], T0 + 999 + 1801 - 949, expire_after_s=1800)
    assert s.get_value(cat.EXPORTER_EXPIRED_JOBS.name) == 1  # live's last event was at T0 + 50


def test_a_scheduled_backup_expires_only_after_its_next_run_was_due_plus_the_expiry():
    """Else a weekly backup whose scheduler died would vanish before "no recent success" could fire."""
    state = fold.apply(None, ev.JobStarted(worker="n1", seq=1, ts=T0, job="weekly", mode="one-shot",
                                           expected_interval_s=7 * 86400.0))
    state = fold.apply(state, ev.JobEnded(worker="n1", seq=2, ts=T0 + 60, job="weekly", status="success",
                                          duration_s=60.0))
    s = render([state], T0 + 60 + 7 * 86400 + 1800, expire_after_s=1800)
    assert s.get_value(cat.LAST_SUCCESS.name, backup_id="weekly") == T0 + 60
    assert s.get_value(cat.EXPECTED_INTERVAL.name, backup_id="weekly") == 7 * 86400
    assert s.get_value(cat.JOB_INFO.name, backup_id="weekly", mode="one-shot") == 1
    s = render([state], T0 + 60 + 7 * 86400 + 1801, expire_after_s=1800)
    assert s.get_value(cat.LAST_SUCCESS.name, backup_id="weekly") is None


def test_newest_stored_record_and_objectives_are_exported():
    state = fold.apply(None, ev.JobStarted(worker="c1", seq=1, ts=T0, job="c", mode="continuous",
                                           recovery_point_objective_s=3600.0))
    state = fold.apply(state, ev.SegmentStored(worker="c1", seq=2, ts=T0 + 5, job="c", topic="t", partition=3,
                                               start_offset=0, end_offset=10, records=10, bytes=100,
                                               uncompressed_bytes=120, stored_bytes=50, algorithm="zstd",
                                               min_ts=1_789_000_000_000, max_ts=1_789_000_123_456))
    s = render([state], T0 + 10)
    assert s.get_value(cat.NEWEST_STORED_RECORD.name, backup_id="c", topic="t", partition=3) == 1_789_000_123.456
    assert s.get_value(cat.RECOVERY_POINT_OBJECTIVE.name, backup_id="c") == 3600
    assert s.get_value(cat.EXPECTED_INTERVAL.name, backup_id="c") is None  # continuous: judged by progress
    assert s.get_value(cat.JOB_INFO.name, backup_id="c", mode="continuous") == 1
    assert s.get_value(cat.LAST_SUCCESS.name, backup_id="c") is None


def test_series_beyond_the_family_limit_are_dropped_and_counted():
    states = [progress_run([(1, 1)], job=f"j{i:02d}") for i in range(25)]
    s = render(states, LAST, max_series_per_family=10)
    kept = s.matching(cat.RECORDS_TOTAL.name)
    assert len(kept) == 10
    assert s.get_value(cat.EXPORTER_DROPPED_SERIES.name, metric=cat.RECORDS_TOTAL.name) == 15
    # the limit counts label combinations (PRD: "unique label combinations"), not a histogram's
    # buckets or a stateset's states: 10 backups keep their status, 15 do not
    assert s.get_value(cat.EXPORTER_DROPPED_SERIES.name, metric=cat.BACKUP_STATUS.name) == 15
    assert len(s.matching(cat.BACKUP_STATUS.name)) == 10 * 5


def test_throughput_of_a_new_run_ignores_the_previous_runs_samples():
    """A restart 10 s after a busy run: the new run's rate is its own, not the old records over 10 s."""
    first = dict(worker="run1", job="b1")
    second = dict(worker="run2", job="b1")
    state = fold.apply(None, ev.JobStarted(**first, seq=1, ts=T0))
    state = fold.apply(state, ev.Progress(**first, seq=2, ts=T0 + 20, consumed=[ev.TopicConsumed("t", 6000, 60_000)]))
    state = fold.apply(state, ev.JobEnded(**first, seq=3, ts=T0 + 21, status="success", duration_s=21))
    state = fold.apply(state, ev.JobStarted(**second, seq=1, ts=T0 + 30))
    state = fold.apply(state, ev.Progress(**second, seq=2, ts=T0 + 35, consumed=[ev.TopicConsumed("t", 50, 500)]))
    s = render([state], T0 + 40)
    assert s.get_value(cat.THROUGHPUT_RECORDS.name, backup_id="b1", topic="t") == 50 / 10
    assert s.get_value(cat.THROUGHPUT_BYTES.name, backup_id="b1", topic="t") == 500 / 10


def test_the_count_of_dropped_series_is_never_cut_itself():
    """More families over the limit than the limit: every one still has its dropped-series count
    (found while adding a metric: the count of drops obeyed the limit it reports on)."""
    states = [progress_run([(1, 1)], job=f"j{i:02d}") for i in range(25)]
    s = render(states, LAST, max_series_per_family=2)
    dropped = s.matching(cat.EXPORTER_DROPPED_SERIES.name)
    assert len(dropped) > 2  # more families over the limit than the limit itself
    assert s.get_value(cat.EXPORTER_DROPPED_SERIES.name, metric=cat.RECORDS_TOTAL.name) == 23
    assert s.get_value(cat.EXPORTER_DROPPED_SERIES.name, metric=cat.BACKUP_STATUS.name) == 23
