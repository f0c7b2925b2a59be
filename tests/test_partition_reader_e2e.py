"""Reading one partition from an offset outside any group (restore adoption, offset-reset probes)."""

from __future__ import annotations

import uuid
from contextlib import closing

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from kafka_backup.schemas.partition_reader import PartitionReader

pytestmark = pytest.mark.e2e


def test_reads_from_the_offset_to_the_end_and_unassigns_when_left_early(broker):
    topic = "reader-" + uuid.uuid4().hex[:6]
    admin = AdminClient({"bootstrap.servers": broker})
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(15)
    producer = Producer({"bootstrap.servers": broker})
    for i in range(10):
        producer.produce(topic, value=b"%d" % i, partition=1, headers=[("n", b"%d" % i)])
    producer.produce(topic, value=b"other", partition=0)
    assert producer.flush(15) == 0
    reader = PartitionReader(broker, "kafka-backup-test-reader")
    try:
        got = [(m.offset(), m.value()) for m in reader.read(topic, 1, 4, timeout_s=30, batch=3)]
        assert got == [(o, b"%d" % o) for o in range(4, 10)]  # to the end, in order, nothing of partition 0
        with closing(reader.read(topic, 1, 0, timeout_s=30)) as records:
            first = next(records)
        assert (first.offset(), first.headers()) == (0, [("n", b"0")])
        assert reader.consumer.assignment() == []  # left early: unassigned
        assert list(reader.read(topic, 1, 10, timeout_s=30)) == []  # at the end: nothing, at once
        group = [ConsumerGroupTopicPartitions("kafka-backup-test-reader")]
        answer = admin.list_consumer_group_offsets(group)["kafka-backup-test-reader"]  # never committed
        assert [tp for tp in answer.result(15).topic_partitions or [] if tp.offset >= 0] == []
    finally:
        reader.close()
