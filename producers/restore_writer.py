"""The restore's writing side: batches produced in order, paced, acknowledged, claimed and checkpointed.

Batches are produced with the idempotent producer without waiting for each
other (up to ``MAX_IN_FLIGHT`` records unacknowledged); the acknowledged prefix
of a partition's batches is then written to the restore checkpoint every
``CHECKPOINT_EVERY_S`` or ``CHECKPOINT_EVERY_BYTES`` (every batch with a rate
limit), before stopping or failing, and at the end of the run, followed by one
``RestoreProgress``. The end of a partition waits neither for its
acknowledgements nor for a checkpoint: they are claimed while the next
partitions are produced (waiting drained the producer at every partition's end
while the main thread, which reads and decodes the segments, stood idle; a
checkpoint a partition made a restore of 128 partitions from S3 wait 128
storage round trips). A stop or a failure waits for what was sent, of every
partition, and checkpoints it at once; a crash before the next checkpoint is
resumed by reconciling the targets, as anywhere between two. A rate limit
(:class:`Pacer`) holds ``rate_limit`` records/s over the run.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol, TextIO

from confluent_kafka import KafkaError, Message, Producer

from kafka_backup.producers import layout, segments
from kafka_backup.producers.restore_scope import RestoreFailed, RestoreInterrupted
from kafka_backup.producers.run import Reporter
from kafka_backup.producers.storage import StorageError
from kafka_backup.producers.telemetry import classify_kafka_error
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.config import RestoreConfig
from kafka_backup.schemas.kafka_admin import client_config, connect_producer
from kafka_backup.schemas.signing import ProducedHeaders

CHECKPOINT_EVERY_S = 1.0  # acknowledged batches are checkpointed at least this often ...
CHECKPOINT_EVERY_BYTES = 32 * 1024 * 1024  # ... or after this many key+value bytes
MAX_IN_FLIGHT = 50_000  # records produced but not yet acknowledged
RATE_SLICE_S = 0.25  # with a rate limit, a batch holds at most this many seconds' worth of records


def record_headers(r: segments.StoredRecord, offset_header: bool) -> ProducedHeaders:
    """The record's headers, and (unless ``restore.offset_header`` was off when the restore began)
    ``kafka-backup.offset``: its source offset, appended last, for ``offset-reset --from-backup``."""
    if not offset_header:
        return list(r.headers)
    return [*r.headers, (layout.OFFSET_HEADER, str(r.offset).encode())]


class Pacer:
    """Holds ``rate_limit`` records/s over the run (none: no limit); a stop request ends the wait."""

    def __init__(self, rate_limit: int, stopping: threading.Event) -> None:
        self.rate_limit = rate_limit
        self.stopping = stopping
        self.paced = 0
        self.start: float | None = None

    def pace(self, n: int) -> None:
        """A batch of ``n`` records waits until its records are due."""
        if self.stopping.is_set():
            raise RestoreInterrupted("stop requested")
        if not self.rate_limit:
            return
        now = time.monotonic()
        if self.start is None:
            self.start = now
        delay = self.start + (self.paced + n) / self.rate_limit - now
        if delay > 0 and self.stopping.wait(delay):
            raise RestoreInterrupted("stop requested")
        self.paced += n


class Flight:
    """One produced batch and its delivery reports."""

    __slots__ = ("batch", "offsets", "failures", "unplaced")

    def __init__(self, batch: list[segments.StoredRecord]) -> None:
        self.batch = batch
        self.offsets: list[int] = []
        self.failures: list[KafkaError] = []
        self.unplaced = 0  # acknowledged without an offset: where they landed is unknown, so not claimed

    def delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.failures.append(err)
        elif (offset := msg.offset()) is not None:
            self.offsets.append(offset)
        else:
            self.unplaced += 1

    @property
    def done(self) -> bool:
        return len(self.offsets) + len(self.failures) + self.unplaced >= len(self.batch)



class Writer:
    """Restores partitions into the target, claiming each acknowledged batch in ``checkpoint``.

    ``save`` writes the checkpoint to storage (the commit point); a progress bar shows on a terminal.
    """

    def __init__(self, bootstrap: str, cfg: RestoreConfig, checkpoint: layout.RestoreCheckpoint, emitter: Reporter,
                 pacer: Pacer, save: Callable[[], None], on_kafka_error: Callable[[KafkaError], None],
                 progress_file: TextIO) -> None:
        self.bootstrap = bootstrap
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.emitter = emitter
        self.pacer = pacer
        self.save = save
        self.on_kafka_error = on_kafka_error
        self.batch_size = cfg.batch_records
        if cfg.rate_limit:
            self.batch_size = max(1, min(cfg.batch_records, int(cfg.rate_limit * RATE_SLICE_S)))
        self.in_flight = 0  # records produced, not yet acknowledged
        # the partitions with batches not claimed yet, oldest first, each with its batches in order
        self.open: list[tuple[layout.RestoreCursor, deque[Flight]]] = []
        self.sending: deque[Flight] | None = None  # the batches of the partition being produced
        self.unreported = [0, 0]  # records and bytes claimed since the last checkpoint
        self.checkpointed_at = time.monotonic()
        self._producer: Producer | None = None
        self.bar = _open_bar(checkpoint, cfg.restore_id, progress_file)

    @property
    def producer(self) -> Producer:
        """Made on first use: nothing connects to the target before there is a record to restore."""
        if self._producer is None:
            self._producer = Producer(client_config(self.bootstrap, **{
                "enable.idempotence": True,  # in order, no gaps, no retry duplicates: what resume relies on
                "linger.ms": 5,
                "message.timeout.ms": 120_000,
                "error_cb": self.on_kafka_error,
            }))
        return self._producer

    def headers(self, r: segments.StoredRecord) -> ProducedHeaders:
        return record_headers(r, self.checkpoint.offset_header)

    def restore_partition(self, cur: layout.RestoreCursor, records: Iterator[segments.StoredRecord]) -> None:
        """Produce the partition's records in batches; return once they are sent, not acknowledged (see
        :meth:`finish`). A stop or a failure returns once what was sent, of every partition, is
        acknowledged and checkpointed."""
        flights: deque[Flight] = deque()
        self.open.append((cur, flights))
        self.sending = flights
        batch: list[segments.StoredRecord] = []
        done = False
        try:
            while True:
                try:
                    rec = next(records)
                except StopIteration:
                    break
                except (RestoreFailed, StorageError):
                    if batch:  # what precedes an unreadable segment is good: restore and claim it first
                        self._send(cur, batch, flights)
                    raise
                batch.append(rec)
                if len(batch) >= self.batch_size:
                    self._send(cur, batch, flights)
                    batch = []
            if batch:
                self._send(cur, batch, flights)
            done = True
        finally:  # done: what is acknowledged is claimed, checkpointed on the cadence; stopping or failing:
            self.sending = None  # what was sent is acknowledged, claimed and checkpointed at once
            if done:
                self._settle_open(wait=False)
                self._checkpoint_if_due()
            else:
                self._settle_open(wait=True)
                self.checkpoint_progress()

    def finish(self) -> None:
        """The run's end: every partition's batches acknowledged and claimed, then checkpointed."""
        self._settle_open(wait=True)
        self.checkpoint_progress()

    def _settle_open(self, wait: bool) -> None:
        """Claim each open partition's acknowledged batches, in order (with ``wait``, all of them)."""
        for cur, flights in list(self.open):
            self._settle(cur, flights, wait)
        # a partition leaves once all its batches are claimed and no more are to come
        self.open = [(cur, flights) for cur, flights in self.open if flights or flights is self.sending]

    def _send(self, cur: layout.RestoreCursor, batch: list[segments.StoredRecord], flights: deque[Flight]) -> None:
        """Produce a batch without waiting for it; settle the batches before it that are acknowledged."""
        self.pacer.pace(len(batch))
        flight = Flight(batch)
        flights.append(flight)
        self.in_flight += len(batch)
        if self._producer is None:  # the first batch: the producer made, and connected before it sends
            connect_producer(self.producer, cur.target_topic)
        produce, delivered = self.producer.produce, flight.delivered
        topic, partition = cur.target_topic, cur.partition
        for r in batch:
            while True:
                try:
                    produce(topic, value=r.value, key=r.key, partition=partition,
                            timestamp=r.timestamp if r.timestamp > 0 else 0,
                            headers=self.headers(r) or None, on_delivery=delivered)
                    break
                except BufferError:  # local queue full: serve deliveries, then retry this record
                    self.producer.poll(0.1)
        self.producer.poll(0)
        # paced (rate limit): each batch is acknowledged and claimed before the next is due, as progress
        # should move with the pace; unpaced: batches stay in flight
        self._settle_open(wait=bool(self.cfg.rate_limit))
        while self.in_flight > MAX_IN_FLIGHT:
            self.producer.poll(0.1)
            self.emitter.poll()
            self._settle_open(wait=False)

    def _settle(self, cur: layout.RestoreCursor, flights: deque[Flight], wait: bool) -> None:
        """Claim the acknowledged batches at the front, in order (with ``wait``, all of them)."""
        while flights:
            flight = flights[0]
            if not flight.done:
                if not wait:
                    return
                self.producer.flush(1.0)
                self.emitter.poll()
                continue
            flights.popleft()
            self.in_flight -= len(flight.batch)
            if flight.failures or len(flight.offsets) != len(flight.batch):
                self.in_flight -= sum(len(f.batch) for f in flights)
                flights.clear()
                self.checkpoint_progress()  # the batches before this one are good
                err = flight.failures[0] if flight.failures else None
                error_type, transient = classify_kafka_error(err) if err else ("broker_connection", True)
                text = (err.str() if err else f"{flight.unplaced} records acknowledged without an offset"
                        if flight.unplaced else "records not acknowledged")
                self.emitter.emit(ev.ErrorRaised, error_type=error_type, transient=transient, operation="produce",
                                  message=text[:500])
                raise RestoreFailed(f"target {cur.target_topic}/{cur.partition}: {text}; the checkpoint holds the "
                                    f"last acknowledged batch, run again with --restore-id {self.cfg.restore_id} "
                                    "to resume")
            batch = flight.batch
            cur.next_offset = batch[-1].offset + 1
            cur.restored += len(batch)
            cur.target_next = max(flight.offsets) + 1
            cp = self.checkpoint
            batch_bytes = sum(r.size for r in batch)
            cp.restored_total += len(batch)
            cp.restored_bytes += batch_bytes
            self.unreported[0] += len(batch)
            self.unreported[1] += batch_bytes
            self.bar.update(len(batch))
            self._checkpoint_if_due()

    def _checkpoint_if_due(self) -> None:
        if (self.unreported[1] >= CHECKPOINT_EVERY_BYTES or self.cfg.rate_limit
                or time.monotonic() - self.checkpointed_at >= CHECKPOINT_EVERY_S):
            self.checkpoint_progress()

    def checkpoint_progress(self) -> None:
        """Write the checkpoint with every claimed batch, then report them in one ``RestoreProgress``."""
        self.checkpointed_at = time.monotonic()
        records, nbytes = self.unreported
        if not records:
            return
        cp = self.checkpoint
        self.save()
        self.unreported = [0, 0]
        self.emitter.emit(ev.RestoreProgress, records=records, restored_total=cp.restored_total,
                          bytes=nbytes, restored_bytes=cp.restored_bytes)
        self.emitter.poll()

    def close_bar(self) -> None:
        self.bar.close()

    def flush(self) -> None:
        """At the end of the run: deliver what is still queued (bounded wait)."""
        if self._producer is not None:
            self._producer.flush(10)


class Bar(Protocol):
    """What the writer asks of a progress bar (tqdm's, or none)."""

    def update(self, n: int) -> object: ...

    def close(self) -> None: ...


class NoBar:
    """No bar (stderr is a file or a pipe): tqdm is not even imported, 15-20 ms of every start."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _open_bar(cp: layout.RestoreCheckpoint, restore_id: str, progress_file: TextIO) -> Bar:
    """tqdm's bar (records, rate, ETA) on a terminal; nothing when stderr is a file or a pipe."""
    if not (hasattr(progress_file, "isatty") and progress_file.isatty()):
        return NoBar()
    from tqdm import tqdm

    return tqdm(total=cp.total_records, initial=cp.restored_total, unit="rec", unit_scale=True,
                desc=f"restore {restore_id}", file=progress_file, dynamic_ncols=True)
