"""The exporter says how far the aggregator is behind: exact records, from the broker's own offsets."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas import events as ev
from tests.conftest import committed, create_topic, unique, wait_for, watermarks

pytestmark = pytest.mark.e2e

PARTITIONS = 2


def lags(pipe) -> dict[int, tuple[float | None, float | None]]:
    s = pipe.scrape()
    return {p: (s.get_value(cat.TELEMETRY_LAG_RECORDS.name, partition=p),
                s.get_value(cat.TELEMETRY_LAG_SECONDS.name, partition=p)) for p in range(PARTITIONS)}


def no_lag(pipe) -> bool:
    """True once every partition shows no lag; else raises with the lags now (wait_for's message)."""
    now = lags(pipe)
    if now != {p: (0, 0) for p in range(PARTITIONS)}:
        raise ValueError(f"lags now (records, seconds) per partition: {now}")
    return True


def test_lag_is_what_a_stopped_aggregator_has_not_folded_and_clears_when_it_returns(broker, pipeline_factory):
    telemetry = unique("tlag")
    create_topic(broker, telemetry, PARTITIONS)
    topic_args = ["--telemetry-topic", telemetry]
    pipe = pipeline_factory(extra_aggregator_args=[*topic_args, "--telemetry-partitions", str(PARTITIONS)],
                            extra_exporter_args=topic_args)
    pipe.caught_up(topic=telemetry)
    wait_for(lambda: no_lag(pipe), 60, what="no lag once folded")

    pipe.aggregator.stop()
    folded = committed(broker, pipe.app_id, telemetry, PARTITIONS)  # final: the group has no member now
    before = time.time()
    p = Producer({"bootstrap.servers": broker})
    for partition, n in ((0, 5), (1, 3)):
        job = unique(f"lag-{partition}")
        for seq in range(1, n + 1):
            event = ev.Retry(worker=job, seq=seq, ts=time.time(), job=job, operation="lag")
            p.produce(telemetry, ev.encode(event), ev.event_key("backup", job).encode(), partition=partition)
    assert p.flush(15) == 0
    ends = watermarks(broker, telemetry, PARTITIONS)
    assert {q: ends[q] - folded[q] for q in range(PARTITIONS)} == {0: 5, 1: 3}, "ground truth, from the broker"

    def waiting() -> dict | None:
        now = lags(pipe)
        return now if all(now[q][0] == ends[q] - folded[q] and now[q][1] > 0 for q in range(PARTITIONS)) else None

    seen = wait_for(waiting, 30, 0.2, what="the exporter to report the records the aggregator has not folded")
    elapsed = time.time() - before
    for q in range(PARTITIONS):
        assert seen[q][1] <= elapsed, f"partition {q}: waited {seen[q][1]} s, more than the {elapsed:.2f} s since"

    pipe.aggregator.start()
    # a worker Faust leaves stalled after a restart is restarted by its delivery watchdog within ~60 s
    wait_for(lambda: no_lag(pipe), 120, what="the lag to clear")
