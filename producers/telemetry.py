"""The telemetry emitter: events out to Kafka without ever blocking the backup.

``produce()`` only enqueues into librdkafka's bounded queue and returns; when
the queue is full (telemetry cluster down for long) the event is dropped, the
drop counted, and the count itself reported as a :class:`TelemetryDropped`
event as soon as delivery works again, so loss is visible in the metrics
(``kafka_backup_telemetry_dropped_events_total``) and in the worker's log.

Idempotence is on (no duplicates from producer retries, order kept per
partition), and every event of a job carries the same key, so one job's events
stay in order in one partition.

With ``telemetry.batch_events`` (``auto``, the default: while every aggregator reads them,
``producers.batch_readers``), the events of one poll cycle go out as one batch record
(``events.Batch``): the aggregator pays Faust's per-record cost once per batch instead of once per
event. Events wait in the batch until the worker's next :meth:`Emitter.poll` (its loop calls it
once per cycle, after the cycle's last event), a :meth:`Emitter.flush` or :meth:`Emitter.close`,
or an emit finding the batch ``BATCH_LINGER_S`` old or full; everything else is as for single
events (order, per-event delivery callbacks, drops counted per event, spool, signature over the
record).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from kafka_backup.producers.batch_readers import BatchReaders
from kafka_backup.producers.spool import Spool
from kafka_backup.producers.storage import OpReport, StorageError
from kafka_backup.schemas import events as ev
from kafka_backup.schemas import logs, signing
from kafka_backup.schemas.config import TelemetryConfig
from kafka_backup.schemas.kafka_admin import client_config, connect_producer, ensure_telemetry_topic

log = logging.getLogger("kafka_backup.telemetry")

DROP_REPORT_INTERVAL_S = 5.0
BATCH_LINGER_S = 0.05  # the producer's own linger.ms: an older batch is sent by the next emit

# This process's own events (key, payload), kept only when the command line asks for the run's
# metrics at its end (``--metrics-output``: cli/metrics_output.py folds them); None: not kept.
RUN_EVENTS: list[tuple[bytes, bytes]] | None = None


def keep_run_events() -> list[tuple[bytes, bytes]]:
    """From now on, keep every event this process's emitters emit (delivered or not)."""
    global RUN_EVENTS
    RUN_EVENTS = []
    return RUN_EVENTS


def classify_kafka_error(err: KafkaError) -> tuple[str, bool]:
    """PRD error type and whether it is transient."""
    code = err.code()
    if code in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE,
                KafkaError.NETWORK_EXCEPTION, KafkaError.BROKER_NOT_AVAILABLE):
        return "broker_connection", True
    if code in (KafkaError._TIMED_OUT, KafkaError.REQUEST_TIMED_OUT, KafkaError._MSG_TIMED_OUT):
        return "consumer_timeout", True
    if code in (KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._AUTO_OFFSET_RESET):
        return "offset_invalid", False
    # INVALID_MSG is the broker's CORRUPT_MESSAGE (code 2, a CRC mismatch); librdkafka has no CORRUPT_MESSAGE name
    if code in (KafkaError._BAD_MSG, KafkaError.INVALID_MSG, KafkaError._VALUE_DESERIALIZATION,
                KafkaError._KEY_DESERIALIZATION):
        return "deserialization", False
    return "broker_connection" if err.retriable() else "consumer_error", bool(err.retriable())


def events_in(payload: bytes) -> int:
    """How many events a record's value carries (a spooled batch counts its events when lost)."""
    try:
        return len(ev.unpack(payload))
    except ev.InvalidEvent:
        return 1


def new_worker_id() -> str:
    """Unique per process start: sequence numbers restart at 0 with each instance."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Emitter:
    def __init__(self, bootstrap_servers: str, tcfg: TelemetryConfig, kind: ev.JobKind, job: str,
                 worker: str | None = None, producer: Any = None,
                 aggregator_group: str | None = None) -> None:
        """``producer``: a confluent-kafka ``Producer`` to send through instead of one made here
        (tests hand in a fake one; nothing then touches a cluster). ``aggregator_group``: whose
        members must all read batch records before ``telemetry.batch_events: auto`` sends them;
        None (the short jobs: verify, offset reset) keeps ``auto`` on single-event records."""
        self.topic = tcfg.topic
        self.kind = kind
        self.job = job
        self.key = ev.event_key(kind, job).encode()
        self.worker = worker or new_worker_id()
        logs.set_context(job=job, instance=self.worker)  # on JSON log lines: the key `instance` stays (log shippers parse it)
        self.seq = 0
        self.dropped = 0
        self.delivered_at = self.lost_at = 0.0
        self.queue_limit = tcfg.buffer_max_events
        # auto: single-event records until BatchReaders says every aggregator reads batch records
        self.batch_events = tcfg.batch_events is True
        self._readers: BatchReaders | None = None
        # Emits may come from several threads (the backup's checkpoint readers report their storage
        # calls): a sequence number is taken and its record handed to the producer under one lock, so
        # records reach the topic in sequence order (the aggregator drops a lower one after a higher
        # as a duplicate). Re-entrant: delivery callbacks run inside the producer calls made under it.
        self._lock = threading.RLock()
        self._batch: list[tuple[bytes, Callable[[bool], None] | None]] = []  # emitted, not yet sent
        self._batch_bytes = 0
        self._batch_since = 0.0
        self._signing_key = signing.load_key(tcfg.signing_key_file)
        self._reported_dropped = 0
        self._last_drop_report = 0.0
        self._spool = (Spool(os.path.join(tcfg.spool_dir, f"{kind}-{job}.spool"), tcfg.spool_max_bytes)
                       if tcfg.spool_dir else None)
        if self._spool and self._spool.pending:
            log.warning("telemetry: %d events spooled by an earlier run will be sent first", self._spool.pending)
        if producer is not None:
            self._producer = producer
            return
        try:
            ensure_telemetry_topic(bootstrap_servers, tcfg)
        except Exception as err:  # the backup must not depend on the telemetry cluster being up
            log.warning("telemetry: could not check topic %s on %s (%s); events stay buffered",
                        tcfg.topic, bootstrap_servers, err)
        self._producer = Producer(client_config(
            bootstrap_servers,
            **{
                "enable.idempotence": True,
                "queue.buffering.max.messages": tcfg.buffer_max_events,
                "message.timeout.ms": tcfg.delivery_timeout_ms,
                "linger.ms": 50,
                "compression.type": "lz4",
                "error_cb": self._on_error,
            },
        ))
        # its producer id there by its first send (kafka_admin.connect_producer: else a short run spent 0.5-1.0 s
        # at its end waiting for its events to be delivered); in a thread of its own, so that a telemetry
        # cluster that does not answer delays nothing
        threading.Thread(target=connect_producer, args=(self._producer, self.topic), name="telemetry-connect",
                         daemon=True).start()
        if tcfg.batch_events == "auto" and aggregator_group:
            self._readers = BatchReaders(bootstrap_servers, aggregator_group, self._set_batching)
            self._readers.start()

    def emit(self, event_type: type[ev.Event], on_delivered: Callable[[bool], None] | None = None,
             **fields: Any) -> None:
        """Queue one event. ``on_delivered(True)`` once it is safe: acknowledged by the telemetry
        cluster, or appended to the spool (which outlives the process); ``on_delivered(False)``
        once it is lost (dropped, counted). A worker killed before either leaves it unsaid.
        """
        with self._lock:
            self.seq += 1
            event = event_type(worker=self.worker, seq=self.seq, ts=time.time(), kind=self.kind, job=self.job,
                               **fields)
            payload = ev.encode(event)
            if RUN_EVENTS is not None:
                RUN_EVENTS.append((self.key, payload))
            if not self.batch_events:
                if self._batch:  # batching was just turned off: what it holds goes first
                    self.send_batch()
                self._send(payload, on_delivered)
                return
            if self._batch and (len(self._batch) >= ev.MAX_BATCH_EVENTS
                                or self._batch_bytes + len(payload) > ev.MAX_BATCH_BYTES):
                self.send_batch()
            if not self._batch:
                self._batch_since = time.monotonic()
            self._batch.append((payload, on_delivered))
            self._batch_bytes += len(payload)
            if time.monotonic() - self._batch_since >= BATCH_LINGER_S:
                self.send_batch()

    def _set_batching(self, on: bool) -> None:
        """From ``BatchReaders``' thread: the next emit batches or not (a batch held is sent first)."""
        self.batch_events = on

    def send_batch(self) -> None:
        """Send the events waiting in the batch now: one record (a lone event as a single-event record)."""
        with self._lock:
            self._send_batch()

    def _send_batch(self) -> None:
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if len(batch) <= 1:
            if batch:
                self._send(*batch[0])
            return
        callbacks = [then for _, then in batch if then is not None]

        def each(safe: bool) -> None:
            for then in callbacks:
                then(safe)

        self._send(ev.encode_batch([payload for payload, _ in batch]), each if callbacks else None, len(batch))

    def storage_op(self, backend: str, r: OpReport) -> None:
        """A timed storage call (the Storage listener of every worker)."""
        outcome = "success" if r.error is None else r.error.error_type
        self.emit(ev.StorageOp, backend=backend, operation=r.operation, direction=r.direction,
                  latency_s=r.latency_s, bytes=r.nbytes, outcome=outcome)
        if r.error is None:
            return
        self.emit(ev.ErrorRaised, error_type="storage_io", transient=r.error.transient, operation=r.operation,
                  backend=backend, storage_error=r.error.error_type, message=str(r.error)[:500])
        if r.retrying:
            self.emit(ev.Retry, operation=r.direction)

    def kafka_error(self, err: KafkaError, operation: str) -> None:
        """A client error, classified (the error_cb of every worker's Kafka clients)."""
        error_type, transient = classify_kafka_error(err)
        log.warning("kafka: %s", err.str())
        self.emit(ev.ErrorRaised, error_type=error_type, transient=transient, operation=operation,
                  message=err.str()[:500])

    def run_failure(self, err: StorageError | KafkaException, operation: str) -> str:
        """The one-line reason a run ends with on a storage or Kafka failure (JobEnded's ``reason``).

        A storage failure was already reported by the storage listener; a Kafka one is reported here.
        """
        if isinstance(err, KafkaException):
            kerr = err.args[0]
            self.kafka_error(kerr, operation)
            return f"kafka: {kerr.str()}"
        return f"storage {err.error_type}: {err}"

    def _send(self, payload: bytes, on_delivered: Callable[[bool], None] | None = None, n: int = 1) -> None:
        """Produce one record carrying ``n`` events (a batch record when ``n`` > 1)."""
        self._drain_spool()
        if self._spool is not None and self._spool.pending:
            self._settle(on_delivered, self._to_spool(payload, n))  # keep order: nothing overtakes the spool
        else:
            callback: Callable[[KafkaError | None, Message], None] = self._on_delivery  # one event, no one waiting
            if on_delivered is not None or n != 1:
                def callback(err: KafkaError | None, msg: Message, then: Callable[[bool], None] | None = on_delivered,
                             n: int = n) -> None:
                    self._on_delivery(err, msg, n)
                    if then is not None:
                        then(err is None)
            try:
                self._producer.produce(self.topic, payload, self.key, headers=self._headers(payload),
                                       on_delivery=callback)
            except BufferError:
                if self._spool is not None:
                    self._settle(on_delivered, self._to_spool(payload, n))
                else:
                    self._drop(n, "buffer full")
                    self._settle(on_delivered, False)
            except KafkaException as err:  # refused by the client (too large, ...): a loss, counted
                self._drop(n, str(err))
                self._settle(on_delivered, False)
        self._producer.poll(0)
        self._maybe_report_drops()

    def _headers(self, payload: bytes) -> signing.ProducedHeaders | None:
        return signing.headers(self._signing_key, self.key, payload)

    @staticmethod
    def _settle(on_delivered: Callable[[bool], None] | None, safe: bool) -> None:
        if on_delivered is not None:
            on_delivered(safe)

    def _to_spool(self, payload: bytes, n: int = 1) -> bool:
        assert self._spool is not None
        if not self._spool.pending:
            log.warning("telemetry: queue full; spooling events to %s until the cluster answers", self._spool.path)
        if not self._spool.append(payload):
            self._drop(n, "spool full")
            return False
        return True

    def room(self) -> int:
        """How many events may be sent again now: none until the telemetry cluster acknowledged
        something since the last loss, then up to half the queue."""
        if self.delivered_at < self.lost_at or (self._spool and self._spool.pending):
            return 0
        return max(0, self.queue_limit // 2 - len(self._producer))

    def _drain_spool(self) -> None:
        """Move spooled events back into the producer queue while it has room."""
        spool = self._spool
        while spool is not None and (payload := spool.peek()) is not None:  # None: nothing pending
            def callback(err: KafkaError | None, msg: Message, payload: bytes = payload) -> None:
                # how many events a lost record held is only needed when it is lost (a batch decodes)
                self._on_delivery(err, msg, events_in(payload) if err is not None else 1)
            try:
                self._producer.produce(self.topic, payload, self.key, headers=self._headers(payload),
                                       on_delivery=callback)
            except BufferError:
                return
            spool.pop()

    def _on_delivery(self, err: KafkaError | None, msg: Message, n: int = 1) -> None:
        if err is None:
            self.delivered_at = time.monotonic()
        else:
            with self._lock:  # from whichever thread serves the callback (a flush outside the lock)
                self._drop(n, err.str())

    def _on_error(self, err: KafkaError) -> None:
        log.debug("telemetry producer: %s", err.str())

    def _drop(self, n: int, why: str) -> None:
        self.lost_at = time.monotonic()
        if self.dropped == self._reported_dropped:
            log.warning("telemetry: dropping events (%s); the count is reported in "
                        "kafka_backup_telemetry_dropped_events_total", why)
        self.dropped += n

    def _maybe_report_drops(self, force: bool = False) -> None:
        if self.dropped == self._reported_dropped:
            return
        now = time.monotonic()
        if not force and now - self._last_drop_report < DROP_REPORT_INTERVAL_S:
            return
        if len(self._producer) > 0 and not force:
            return  # still backed up: the report would only join the queue; try again later
        self.send_batch()  # events emitted before it go first: sequence numbers arrive in order
        if self.dropped == self._reported_dropped:
            return
        self._last_drop_report = now
        total = self.dropped
        self.seq += 1
        event = ev.TelemetryDropped(worker=self.worker, seq=self.seq, ts=time.time(), kind=self.kind,
                                    job=self.job, total=total)
        try:
            payload = ev.encode(event)
            self._producer.produce(self.topic, payload, self.key, headers=self._headers(payload),
                                   on_delivery=self._on_delivery)
            if RUN_EVENTS is not None:
                RUN_EVENTS.append((self.key, payload))
            self._reported_dropped = total
            log.warning("telemetry: %d events dropped so far by worker %s", total, self.worker)
        except BufferError:
            pass

    def poll(self) -> None:
        """Send the batch, serve delivery callbacks and feed the spool back; called from the worker's
        loop (once per cycle, after its events), never blocks."""
        with self._lock:
            self.send_batch()
            self._producer.poll(0)
            self._drain_spool()
            self._maybe_report_drops()

    def flush(self, timeout: float) -> None:
        """Wait (bounded) until the telemetry cluster acknowledged what is queued; runs delivery callbacks."""
        with self._lock:
            self.send_batch()
            self._drain_spool()
        self._producer.flush(timeout)  # not under the lock: other threads' emits do not wait on it

    def close(self, timeout: float = 30.0) -> int:
        """Deliver what is buffered (bounded wait); return the number of events lost.

        With a spool, what cannot be delivered in time stays on disk for the
        next run instead of being lost.
        """
        deadline = time.monotonic() + timeout
        if self._readers is not None:
            self._readers.stop()
        self.send_batch()
        while self._spool is not None and self._spool.pending and time.monotonic() < deadline:
            with self._lock:
                self._drain_spool()
            self._producer.flush(min(1.0, max(0.0, deadline - time.monotonic())))
        self._producer.flush(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._maybe_report_drops(force=True)
        remaining = self._producer.flush(min(timeout, 5.0))
        if remaining:
            log.warning("telemetry: %d events still undelivered at exit; they are lost", remaining)
        if self._spool is not None:
            if self._spool.pending:
                log.warning("telemetry: %d events stay spooled in %s for the next run",
                            self._spool.pending, self._spool.path)
            self._spool.close()
        return self.dropped + remaining
