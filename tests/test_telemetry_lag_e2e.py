"""The exporter says how far the aggregator is behind: exact records, from the broker's own offsets."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas import events as ev
from tests.conftest import AFTER_RESTART_S, committed, create_topic, unique, wait_for, watermarks

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
    # a worker Faust leaves stalled after a restart is restarted by its delivery watchdog within ~30 s
    wait_for(lambda: no_lag(pipe), AFTER_RESTART_S, what="the lag to clear")


def test_the_aggregator_group_s_commits_keep_up_with_a_steady_stream(broker, pipeline_factory):
    """A commit the offset guard held back once must not stop that partition's commits for good
    (Faust strikes the offsets it hands to a commit from its acked list; streams.guards._ack_again).
    Before that fix, a steady stream froze the group's committed offset within a minute while folding
    went on, so the exporter's lag grew until KafkaBackupAggregatorBehind paged."""
    telemetry = unique("tcommit")
    create_topic(broker, telemetry, PARTITIONS)
    pipe = pipeline_factory(extra_aggregator_args=["--telemetry-topic", telemetry,
                                                   "--telemetry-partitions", str(PARTITIONS)])
    p = Producer({"bootstrap.servers": broker, "linger.ms": 5})
    jobs = [unique(f"steady-{j}") for j in range(8)]
    seqs = dict.fromkeys(jobs, 0)
    commits: list[dict[int, int]] = []
    started = time.monotonic()
    next_check = started
    while time.monotonic() - started < 40:  # 40 s of ~160 events/s, the commit checked every 2 s
        for job in jobs:
            seqs[job] += 1
            event = ev.Retry(worker=job, seq=seqs[job], ts=time.time(), job=job, operation="steady")
            p.produce(telemetry, ev.encode(event), ev.event_key("backup", job).encode())
        p.poll(0)
        if time.monotonic() >= next_check:
            commits.append(committed(broker, pipe.app_id, telemetry, PARTITIONS))
            next_check += 2
        time.sleep(0.05)
    assert p.flush(15) == 0
    ends = watermarks(broker, telemetry, PARTITIONS)
    # once the stream stops, the group's commit reaches the end of every partition (Faust commits
    # every few seconds): a frozen partition never does
    wait_for(lambda: committed(broker, pipe.app_id, telemetry, PARTITIONS) == ends or None, 60,
             what=f"the aggregator group's commits to reach the ends {ends} (commits every 2 s: {commits})")
    for q in range(PARTITIONS):  # and they moved all along, not only at the end
        assert len({c[q] for c in commits[len(commits) // 2:]}) > 3, f"partition {q}: commits {commits}"
    s = pipe.wait_value(cat.RETRIES_TOTAL.name, seqs[jobs[0]], 30, backup_id=jobs[0], operation="steady")
    assert all(s.get_value(cat.RETRIES_TOTAL.name, backup_id=job, operation="steady") == seqs[job] for job in jobs)
