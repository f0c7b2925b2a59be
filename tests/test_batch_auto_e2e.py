"""``telemetry.batch_events: auto`` (the default): batch records only while every member of the
aggregator group reads them, as its Kafka client id says (producers/batch_readers.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import msgspec
import pytest
from confluent_kafka import Consumer, TopicPartition

from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.topics import TELEMETRY_PARTITIONS, consumer_group
from tests.conftest import ROOT, committed, create_topic, produce, unique, wait_for, watermarks

pytestmark = pytest.mark.e2e


def telemetry_records(bootstrap: str, topic: str, job: str) -> list[bytes]:
    """The values of every record on the telemetry topic keyed by the backup ``job``, as they stand now."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("read"), "enable.auto.commit": False})
    try:
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(TELEMETRY_PARTITIONS)}
        c.assign([TopicPartition(topic, p, 0) for p, end in ends.items() if end > 0])
        pos = dict.fromkeys(ends, 0)
        out: list[bytes] = []
        deadline = time.monotonic() + 30
        while any(pos[p] < ends[p] for p in ends) and time.monotonic() < deadline:
            for m in c.consume(500, 0.5):
                if m.error() is None:
                    pos[m.partition()] = m.offset() + 1
                    if m.key() == ev.event_key("backup", job).encode():
                        out.append(m.value())
        assert all(pos[p] >= ends[p] for p in ends), "the telemetry topic was not read to its end"
        return out
    finally:
        c.close()


def is_batch(value: bytes) -> bool:
    return msgspec.msgpack.decode(value).get("type") == ev.BATCH_TAG


def continuous_backup(broker: str, topic: str, job: str, tmp_path, telemetry: str, group: str) -> subprocess.Popen:
    log = open(tmp_path / f"{job}.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "kafka_backup.cli.main", "backup", "--bootstrap-servers", broker, "--topics", topic,
         "--backup-id", job, "--storage", f"file://{tmp_path}/store", "--continuous", "--telemetry-topic", telemetry,
         "--aggregator-app-id", group, "--backup-poll-interval-ms", "200", "--log-level", "INFO"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_with_the_aggregator_up_a_worker_on_auto_sends_batch_records_and_every_event_is_folded(
        broker, pipeline_factory, tmp_path):
    telemetry, topic, job = unique("telemetry-auto"), unique("auto"), unique("bk-auto")
    pipe = pipeline_factory(extra_aggregator_args=["--telemetry-topic", telemetry])
    create_topic(broker, topic, 2)
    first = produce(broker, topic, 2, 300)
    proc = continuous_backup(broker, topic, job, tmp_path, telemetry, pipe.app_id)
    try:
        pipe.wait_value(cat.RECORDS_TOTAL.name, first.total_records, 90, backup_id=job)
        # the worker asked the group at start: the aggregator's client id carries the mark
        wait_for(lambda: any(is_batch(v) for v in telemetry_records(broker, telemetry, job)), 60,
                 what="a batch record from the worker")
        second = produce(broker, topic, 2, 200, seed=1)
        # stopped only once it stored them all (its committed offsets at the ends): a SIGTERM before its
        # next fetch left a partition's second batch unread, and 100 records short of the total below
        ends = watermarks(broker, topic, 2)
        wait_for(lambda: committed(broker, consumer_group(job), topic, 2) == ends, 60,
                 what=f"the backup's committed offsets at the ends {ends}")
    finally:
        stop(proc)
    log = (tmp_path / f"{job}.log").read_text()
    assert f"aggregator group {pipe.app_id}: every member reads batch records (1): sending batch records" in log
    s = pipe.wait_value(cat.RECORDS_TOTAL.name, first.total_records + second.total_records, 90, backup_id=job)
    assert s.get_value(cat.BYTES_TOTAL.name, backup_id=job) == first.total_bytes + second.total_bytes
    assert s.get_value(cat.TELEMETRY_INVALID.name, reason="unknown_type") is None  # nothing refused
    values = telemetry_records(broker, telemetry, job)
    events = [e for v in values for e in ev.unpack(v)]
    # every event the worker sent was folded once: sequence numbers 1..n, none missing, none twice
    assert sorted(ev.decode(e).seq for e in events) == list(range(1, len(events) + 1))
    assert sum(map(is_batch, values)) >= 1 and len(values) < len(events)


def test_while_a_member_of_the_aggregator_group_cannot_read_batches_a_worker_on_auto_sends_single_events(
        broker, tmp_path):
    telemetry, topic, job, group = unique("telemetry-old"), unique("old"), unique("bk-old"), unique("agg-old")
    create_topic(broker, topic, 1)
    produce(broker, topic, 1, 50)
    # an aggregator older than batch records, as the broker sees it: Faust's default client id
    old = Consumer({"bootstrap.servers": broker, "group.id": group, "client.id": "faust-0.15.3",
                    "group.instance.id": f"{group}-0"})
    old.subscribe([topic])
    wait_for(lambda: old.poll(0.2) is not None or old.assignment(), 60, interval=0, what="the old member's assignment")
    proc = continuous_backup(broker, topic, job, tmp_path, telemetry, group)
    try:
        said = f"aggregator group {group}: member {group}-0 (client id 'faust-0.15.3') does not read batch records"
        wait_for(lambda: said in (tmp_path / f"{job}.log").read_text(), 60, what="the worker's verdict")
        # several poll cycles after the verdict: each would have been a batch record
        wait_for(lambda: len(telemetry_records(broker, telemetry, job)) >= 15, 60, what="15 telemetry records")
    finally:
        stop(proc)
        old.close()
    values = telemetry_records(broker, telemetry, job)
    assert not any(map(is_batch, values))
    assert [ev.decode(v).seq for v in values] == list(range(1, len(values) + 1))
