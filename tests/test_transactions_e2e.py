"""Telemetry written in transactions: offsets that hold no record must not stop, restart or page.

A transactional producer (MirrorMaker 2 with exactly-once, a replay tool, a Kafka Streams app
pointed at the telemetry topic) leaves offsets no consumer is handed: each transaction's commit or
abort marker on a real cluster, and on the dev broker every aborted record. The aggregator's offset
guard sees the next record arrive past an offset it never folded, its delivery watchdog sees
offsets waiting that never come, and the exporter sees the group's commit stop one short of the
end: before the fix, a restart in place at every such hole (a restart loop once events kept
coming), and ``kafka_backup_telemetry_lag_seconds`` growing until ``KafkaBackupAggregatorBehind``
paged.

Ground truth: the events the test committed, and the broker's offsets.
"""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas import events as ev
from tests.conftest import committed, create_topic, unique, wait_for, watermarks

pytestmark = pytest.mark.e2e

PARTITIONS = 2
RESTARTED = "restarting this worker in place"


def test_transaction_markers_and_aborted_records_neither_restart_the_aggregator_nor_page(broker, pipeline_factory):
    telemetry = unique("telemetry-txn")
    create_topic(broker, telemetry, PARTITIONS)
    topic_args = ["--telemetry-topic", telemetry]
    pipe = pipeline_factory(extra_aggregator_args=[*topic_args, "--telemetry-partitions", str(PARTITIONS),
                                                   "--aggregator-delivery-stall-s", "3"],
                            extra_exporter_args=topic_args)
    pipe.caught_up(topic=telemetry)

    job = unique("txn")
    key = ev.event_key("backup", job).encode()
    seq = 0

    def retry(operation: str) -> bytes:
        nonlocal seq
        seq += 1
        return ev.encode(ev.Retry(worker=job, seq=seq, ts=time.time(), job=job, operation=operation))

    p = Producer({"bootstrap.servers": broker, "transactional.id": unique("txn-producer")})
    p.init_transactions(15)

    def transaction(operations: list[str], commit: bool) -> None:
        p.begin_transaction()
        for operation in operations:
            p.produce(telemetry, retry(operation), key, partition=0)
        (p.commit_transaction if commit else p.abort_transaction)(15)

    transaction(["committed"] * 3, commit=True)
    transaction(["aborted"], commit=False)  # a hole in the middle: the next record arrives past it
    transaction(["committed"] * 2, commit=True)
    transaction(["aborted"] * 2, commit=False)  # a hole at the end: nothing arrives past it
    end = watermarks(broker, telemetry, PARTITIONS)[0]

    # every committed event folded once; an aborted one never (the dev broker hands no aborted
    # record out; a real cluster read uncommitted would, and its seq makes the committed copy a duplicate)
    pipe.wait_value(cat.RETRIES_TOTAL.name, 5, 60, backup_id=job, operation="committed")
    assert pipe.scrape().get_value(cat.RETRIES_TOTAL.name, backup_id=job, operation="aborted") is None

    # the watchdog looked at the offsets left at the end, found no record there, and let it be
    wait_for(lambda: "hold no record" in open(pipe.aggregator.log_path).read(), 30,
             what="the delivery watchdog to look at the offsets with no record at the end")
    # the exporter serves no lag for offsets that hold no record (the group's commit stays one short)
    assert committed(broker, pipe.app_id, telemetry, PARTITIONS)[0] < end

    def no_lag() -> bool:
        s = pipe.scrape()
        now = {q: (s.get_value(cat.TELEMETRY_LAG_RECORDS.name, partition=q),
                   s.get_value(cat.TELEMETRY_LAG_SECONDS.name, partition=q)) for q in range(PARTITIONS)}
        if now != {q: (0, 0) for q in range(PARTITIONS)}:
            raise ValueError(f"lags now (records, seconds) per partition: {now}")
        return True

    wait_for(no_lag, 30, 0.5, what="no telemetry lag over offsets that hold no record")

    # and the next event, past the hole at the end, is folded without a restart
    transaction(["committed"], commit=True)
    pipe.wait_value(cat.RETRIES_TOTAL.name, 6, 60, backup_id=job, operation="committed")
    log = open(pipe.aggregator.log_path).read()
    assert RESTARTED not in log, pipe.aggregator.log()
