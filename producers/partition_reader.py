"""Reading one partition from an offset, outside any consumer group.

Two commands look at what a topic holds without consuming it as a group would: a restore reads the
records acknowledged after its last checkpoint (to adopt them), and ``offset-reset --from-backup``
probes a restored topic for the first record carrying an original offset. Both want the same
consumer: made when first needed, assigned one partition at a time (so it never joins its group and
never commits), told where each partition ends (``enable.partition.eof``), and closed without
masking the command's outcome.
"""

from __future__ import annotations

import time
from collections.abc import Generator

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
