"""Reading one partition from an offset, outside any consumer group.

Several readers look at what a topic holds without consuming it as a group would: a restore reads
the records acknowledged after its last checkpoint (to adopt them), ``offset-reset --from-backup``
probes a restored topic for the first record carrying an original offset, and the aggregator and
the exporter ask whether offsets of the telemetry topic hold a record at all (:func:`first_record`).
All want the same consumer: made when first needed, assigned one partition at a time (so it never
joins its group and never commits), told where each partition ends (``enable.partition.eof``), and
closed without masking the command's outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from contextlib import closing

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from kafka_backup.schemas.kafka_admin import client_config


class ReadTimedOut(Exception):
    """The partition's end was not reached within the time given."""


class PartitionReader:
    def __init__(self, bootstrap: str, group: str, **extra: object) -> None:
        """``group``: a name for the broker's logs and ACLs only (the consumer never joins it);
        ``extra``: librdkafka settings of the caller's (e.g. ``auto.offset.reset``)."""
        self._conf = client_config(bootstrap, **{"group.id": group, "enable.auto.commit": False,
                                                 "enable.partition.eof": True, **extra})
        self._consumer: Consumer | None = None

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(self._conf)
        return self._consumer

    def read(self, topic: str, partition: int, start: int, timeout_s: float, batch: int = 1000
             ) -> Generator[Message, None, None]:
        """The partition's records from ``start`` to its end, in order. Stop early by closing the
        iterator (``contextlib.closing``, or leaving a ``for`` loop and dropping it): the partition is
        unassigned either way. A Kafka error raises ``KafkaException``; an end not reached within
        ``timeout_s``, :class:`ReadTimedOut`."""
        c = self.consumer
        c.assign([TopicPartition(topic, partition, start)])
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                for msg in c.consume(num_messages=batch, timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                    err = msg.error()
                    if err is None:
                        yield msg
                    elif err.code() == KafkaError._PARTITION_EOF:
                        return
                    else:
                        raise KafkaException(err)
        finally:
            c.unassign()
        raise ReadTimedOut(f"reading {topic}/{partition} from offset {start} did not reach its end in {timeout_s:.0f} s")

    def close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception:  # closing must not mask the command's outcome
                pass
            self._consumer = None


def first_record(bootstrap: str, group: str, topic: str, partition: int, start: int, before: int,
                 timeout_s: float = 10.0) -> int | None:
    """The offset of the first record a consumer is handed at or after ``start`` and below ``before``;
    None when there is none (nothing but transaction markers, or aborted records a broker does not hand
    out, lies in between). Offsets are not contiguous: a reader that expects the next record at the
    next offset must ask this before it calls a hole a loss. Reads uncommitted, as Faust (at least
    once) does, with the caller's ``group`` (one its principal may use). Raises ``KafkaException``
    when the broker does not say within ``timeout_s``.
    """
    if start >= before:
        return None
    reader = PartitionReader(bootstrap, group, **{
        "isolation.level": "read_uncommitted",
        "fetch.max.bytes": 1 << 20, "max.partition.fetch.bytes": 1 << 16, "queued.max.messages.kbytes": 1024})
    try:
        with closing(reader.read(topic, partition, start, timeout_s, batch=1)) as records:
            for msg in records:
                offset = msg.offset()
                if offset is not None:
                    return offset if offset < before else None
        return None
    except ReadTimedOut as err:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, str(err))) from None
    finally:
        reader.close()


class FirstRecords:
    """Per partition, the first offset from a position that holds a record, asked of the broker once
    per range (``probe``: :func:`first_record` for one topic). A record found is remembered while the
    position stays (it waits there until read); offsets found empty are remembered too, and only the
    offsets past them are asked about when the end grows."""

    def __init__(self, probe: Callable[[int, int, int], int | None]) -> None:
        self._probe = probe
        self._known: dict[int, tuple[int, int, bool]] = {}  # partition -> (position, offset, a record there?)

    def first(self, partition: int, at: int, end: int, ask: bool = True) -> int:
        """The first offset in [at, end) that holds a record, else ``end``; with ``ask`` false, only as
        far as already known (the offsets not asked about count as holding records)."""
        known = self._known.get(partition)
        if known is None or known[0] != at:
            known = (at, at, False)
        if known[2] or known[1] >= end or not ask:
            return known[1]
        found = self._probe(partition, known[1], end)
        self._known[partition] = (at, end, False) if found is None else (at, found, True)
        return end if found is None else found
