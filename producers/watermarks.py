"""Partitions' oldest offsets and ends, in one request a broker (the backup's targets, the restore's).

``Consumer.get_watermark_offsets`` makes a round trip a partition, one after the other: 128 partitions
were 128 round trips at every backup's start and assignment, and at every restore's start and resume.
"""

from __future__ import annotations

from concurrent.futures import Future

from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec


def _offsets(admin: AdminClient, partitions: list[tuple[str, int]], spec: OffsetSpec,
             timeout: float) -> dict[TopicPartition, Future]:
    return admin.list_offsets({TopicPartition(t, p): spec for t, p in partitions}, request_timeout=timeout)


def watermarks(admin: AdminClient, partitions: list[tuple[str, int]],
               timeout: float = 10) -> dict[tuple[str, int], tuple[int, int]]:
    """Each partition's oldest offset and high watermark, in two requests a broker (earliest and latest,
    at once). A failure raises the partition's ``KafkaException``, as ``get_watermark_offsets`` did."""
    if not partitions:
        return {}
    earliest, latest = (_offsets(admin, partitions, OffsetSpec.earliest(), timeout),
                        _offsets(admin, partitions, OffsetSpec.latest(), timeout))
    low = {(tp.topic, tp.partition): f.result().offset for tp, f in earliest.items()}
    return {(tp.topic, tp.partition): (low[tp.topic, tp.partition], f.result().offset) for tp, f in latest.items()}


def high_watermarks(admin: AdminClient, partitions: list[tuple[str, int]],
                    timeout: float = 10) -> dict[tuple[str, int], int]:
    """Each partition's high watermark, in one request a broker (see :func:`watermarks`)."""
    if not partitions:
        return {}
    return {(tp.topic, tp.partition): f.result().offset
            for tp, f in _offsets(admin, partitions, OffsetSpec.latest(), timeout).items()}
