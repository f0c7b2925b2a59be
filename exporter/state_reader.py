"""Keeping a local copy of the state topic: the latest value of every job key.

The state topic is a compacted changelog, so reading it from the beginning and
keeping the last value per key rebuilds the aggregator's table exactly. Partitions
are assigned, not subscribed: a consumer group would split the topic between
exporter replicas (each would see some jobs only) and its commits would mean
nothing, since every start must re-read everything anyway.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import msgspec
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from kafka_backup.exporter.background import Background
from kafka_backup.schemas.kafka_admin import arrived, client_config
from kafka_backup.schemas.state import PIPELINE_PREFIX, NewerStateError, decode_pipeline, decode_state
from kafka_backup.schemas.topics import state_topic

log = logging.getLogger("kafka_backup.exporter")
rdkafka_log = logging.getLogger("kafka_backup.exporter.rdkafka")

RETRY_S = 1.0
POLL_S = 0.5  # the longest wait for a record when there is none (to notice a stop, and to prove currency)
BATCH = 500
METADATA_TIMEOUT_S = 5.0
END_CHECK_S = 2.0  # how often a caught-up reader asks the broker for the ends, to prove it is still current


class RepeatFilter(logging.Filter):
    """librdkafka logs a failed connect many times a second while the broker is down; once a minute is plenty."""

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self._every = every_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        text = record.getMessage()
        if now - self._last.get(text, -self._every) < self._every:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[text] = now
        return True


rdkafka_log.addFilter(RepeatFilter())


class CatchUp:
    """Which partitions are still behind the end they had when reading started.

    "Ready" means the copy is at least as new as the table was at start-up, so
    the first scrapes do not show half-restored counters. A partition is done
    when its next offset reaches that end or the broker reports end-of-partition
    (which also covers ends made of transaction markers or compacted-away records).
    """

    def __init__(self, ends: dict[int, int], positions: dict[int, int]) -> None:
        self._pending = {p: end for p, end in ends.items() if end > positions.get(p, 0)}

    def advance(self, partition: int, next_offset: int) -> None:
        end = self._pending.get(partition)
        if end is not None and next_offset >= end:
            del self._pending[partition]

    def eof(self, partition: int) -> None:
        self._pending.pop(partition, None)

    @property
    def done(self) -> bool:
        return not self._pending


class StateReader(Background):
    """A background thread mirroring the state topic into a dict; call :meth:`start` once."""

    thread_name = "state-reader"

    def __init__(self, bootstrap_servers: str, app_id: str) -> None:
        super().__init__()
        self.topic = state_topic(app_id)
        self.ready = threading.Event()
        self._undecodable: dict[str, int] = {}  # reason -> records (kafka_backup_exporter_undecodable_...)
        self._logged: set[tuple[str, object]] = set()
        self.current_at: float | None = None  # wall time the copy was last proven to hold the whole topic
        self._values: dict[str, Any] = {}
        self._changes = 0  # records applied: the copy may differ from a snapshot taken at another count
        self._positions: dict[int, int] = {}  # partition -> next offset to read, kept across reconnects
        self._rewinds: dict[int, int] = {}  # partition -> position when it was last found read again (logged once)
        self._lock = threading.Lock()
        self._conf = client_config(bootstrap_servers, **{
            "group.id": f"kafka-backup-exporter-{uuid.uuid4().hex}",  # required by librdkafka; never committed
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "logger": rdkafka_log,
        })

    def state_age(self, now: float | None = None) -> float | None:
        """Seconds since the copy was last proven complete (every partition read to its end), None before.

        Not the age of the newest record: a fleet at rest writes no state for hours, and that is not
        staleness. This grows only when the exporter cannot prove it is current: broker unreachable,
        reader behind, state topic gone.
        """
        at = self.current_at
        if at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - at)

    def snapshot(self) -> dict[str, Any]:
        """Shallow copy: values are replaced, never mutated, so sharing them is safe."""
        with self._lock:
            return dict(self._values)

    def changes(self) -> int:
        """Records applied so far: while it stays the same, so does :meth:`snapshot`."""
        return self._changes

    @property
    def undecodable(self) -> int:
        with self._lock:
            return sum(self._undecodable.values())

    def undecodable_counts(self) -> dict[str, int]:
        """Records not read, by reason: ``newer_version``, ``malformed``, ``no_key``."""
        with self._lock:
            return dict(self._undecodable)

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """Fold one changelog record into the copy; a bad record is counted, never fatal.

        The key keeps the last value that could be read. Each reason is logged once (per
        version, for a newer writer): a state topic of thousands of such values logs a line,
        the counter has the rest.
        """
        with self._lock:
            self._changes += 1
            if key is None:
                self._refuse("no_key", None, "skipping a state topic record without a key")
                return
            name = key.decode("utf-8", "replace")
            if value is None:
                self._values.pop(name, None)
                return
            try:
                self._values[name] = decode_pipeline(value) if name.startswith(PIPELINE_PREFIX) else (
                    decode_state(value))
            except NewerStateError as err:
                self._refuse("newer_version", err.version,
                             f"state value {name!r} has {err}: a newer aggregator wrote it; upgrade the exporter "
                             "(until then this and every later value of that version are skipped)")
            except msgspec.DecodeError as err:
                self._refuse("malformed", None, f"skipping undecodable state values (the first: {name!r}: {err})")

    def _refuse(self, reason: str, detail: object, line: str) -> None:
        self._undecodable[reason] = self._undecodable.get(reason, 0) + 1
        if (reason, detail) not in self._logged:
            self._logged.add((reason, detail))
            log.warning("%s; counted in kafka_backup_exporter_undecodable_state_values_total{reason=\"%s\"}",
                        line, reason)

    # ---- consumer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        consumer = Consumer(self._conf)
        try:
            while not self._stop.is_set():
                try:
                    self._session(consumer)
                except KafkaException as err:
                    log.warning("state topic %s: %s; retrying", self.topic, err)
                    self._stop.wait(RETRY_S)
                except Exception:
                    log.exception("state topic %s: unexpected failure; retrying", self.topic)
                    self._stop.wait(RETRY_S)
        finally:
            consumer.close()

    def _session(self, consumer: Consumer) -> None:
        """Assign every partition (resuming where a failed session stopped) and read until stopped."""
        partitions = self._wait_for_topic(consumer)
        if partitions is None:
            return
        catch_up = CatchUp(self._ends(consumer, partitions), self._positions)
        consumer.assign(
            [TopicPartition(self.topic, p, self._positions.get(p, OFFSET_BEGINNING)) for p in partitions]
        )
        checked = float("-inf")
        while not self._stop.is_set():
            if catch_up.done and not self.ready.is_set():
                self.current_at = time.time()
                self.ready.set()
            if catch_up.done and time.monotonic() - checked >= END_CHECK_S:
                checked = time.monotonic()
                if not self._check_current(consumer, partitions):
                    return  # started over: the next session assigns every partition from its start
            for msg in arrived(consumer, BATCH, POLL_S):
                self._handle(msg, catch_up)

    def _read_again(self, partition: int, offset: int) -> None:
        """A record the copy holds already (the consumer went back: librdkafka resets a position the broker
        calls out of range to the partition's start). Applying it again would serve a job's older state
        until the newer one is read again: every counter of it would fall, which Prometheus reads as a
        reset. It is skipped; the first of each such run is logged with where it went back to."""
        read = self._positions[partition]
        if self._rewinds.get(partition) != read:
            self._rewinds[partition] = read
            log.warning("state topic %s: partition %d read again from offset %d, behind the %d records the copy "
                        "holds; skipping what it holds (a consumer position reset)", self.topic, partition, offset,
                        read)

    def _check_current(self, consumer: Consumer, partitions: list[int]) -> bool:
        """Ask the broker for every partition's end; when the copy has read them all, it is current now.

        False when a partition now ends before what the copy has read (the state topic was deleted and
        made again, or truncated): the copy is dropped and read again from the start (:meth:`_start_over`).
        """
        asked = time.time()
        try:
            ends = self._ends(consumer, partitions)
        except KafkaException as err:
            log.debug("state topic %s: cannot read the ends (%s); the state's age keeps growing", self.topic, err)
            return True
        shorter = sorted(p for p, end in ends.items() if self._positions.get(p, 0) > end)
        if shorter:
            p = shorter[0]
            self._start_over(f"partition {p} ends at offset {ends[p]}, before the {self._positions[p]} records read "
                             "from it (the topic was deleted and made again, or truncated)")
            return False
        if all(self._positions.get(p, 0) >= end for p, end in ends.items()):
            self.current_at = asked
        return True

    def _start_over(self, why: str) -> None:
        """Drop the copy and read the topic again from its start; /metrics answers 503 until caught up."""
        log.warning("state topic %s: %s; reading it again from the start", self.topic, why)
        with self._lock:
            self._values.clear()
            self._changes += 1
        self._positions.clear()
        self._rewinds.clear()
        self.ready.clear()
        self.current_at = None

    def _wait_for_topic(self, consumer: Consumer) -> list[int] | None:
        """The aggregator creates the topic on its first write; until then there is nothing to read."""
        while not self._stop.is_set():
            metadata = consumer.list_topics(self.topic, timeout=METADATA_TIMEOUT_S)
            meta = metadata.topics.get(self.topic)
            if meta is not None and meta.error is None and meta.partitions:
                return sorted(meta.partitions)
            self._stop.wait(RETRY_S)
        return None

    def _ends(self, consumer: Consumer, partitions: list[int]) -> dict[int, int]:
        ends = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(self.topic, p), timeout=METADATA_TIMEOUT_S, cached=False)
            ends[p] = high if high > low else 0
        return ends

    def _handle(self, msg: Any, catch_up: CatchUp) -> None:
        err = msg.error()
        if err is None:
            partition, offset = msg.partition(), msg.offset()
            if offset < self._positions.get(partition, 0):
                self._read_again(partition, offset)
                return
            self.apply(msg.key(), msg.value())
            self._positions[partition] = offset + 1
            catch_up.advance(partition, offset + 1)
        elif err.code() == KafkaError._PARTITION_EOF:
            catch_up.eof(msg.partition())
            # the end may be a transaction marker or compacted away: remember it as read
            if msg.offset() is not None and msg.offset() > self._positions.get(msg.partition(), 0):
                self._positions[msg.partition()] = msg.offset()
        elif err.fatal():
            raise KafkaException(err)
        else:
            log.warning("state topic %s: %s", self.topic, err)
