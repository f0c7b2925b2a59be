"""The backup worker: source topics to compressed segments, with telemetry on every step.

Durability order, per partition: segment object, then the checkpoint naming
it (the commit point), then the consumer-group offset commit. Only after the
checkpoint is written is a ``SegmentStored`` event emitted, so
``kafka_backup_records_total`` counts only what a restore can read back. The
checkpoint also records how far those events were acknowledged by the
telemetry cluster when it was written, so the next worker reports again what a
killed one may have lost (and, routinely, the last segments of the run before,
acknowledged after their checkpoint), and the total catches up with the checkpoint.

One poll cycle (``poll_interval_ms``) = one ``consume()`` batch and one
``Progress`` event carrying every assigned partition: few, dense events keep
the aggregator far below its per-event cost ceiling.

A partition's buffer is cut into a segment at ``segment_max_records``, ``segment_max_bytes`` or
``flush_interval_ms``, whichever comes first, and the largest buffers earlier while all of them
together hold more than ``buffer_max_bytes`` (a catch-up fetches a slice of every partition at a time).

Sealing a segment (compress, digest, then storing the segment, its index chunks and the
checkpoint, in that order) runs in worker threads while the loop goes on fetching: compression
and storage round trips (an S3 upload) no longer stop the fetch loop. As many threads as the
storage's ``concurrency`` (``backup.storage_concurrency``: by default 8 on a filesystem, 32 on S3)
seal segments of different partitions at once (a run over many partitions ends with one segment each
to store: one after the other, 128 partitions took 384 storage writes in a row); one partition's
segments are sealed one after the other, in order, each waiting for the one before. Sealed segments
are completed on the loop's thread in the order they were cut: only then do the partition's durable
offset move, its ``SegmentStored`` go out and its group offset get committed. At most that many
segments, and ``SEALING_MAX_BYTES`` of records unless it is one, are in the threads' hands; after a
failed seal nothing more is sealed (a later segment's checkpoint would step over the lost one), and
the run fails as it did when sealing was inline.
"""

from __future__ import annotations

import logging
import operator
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import msgspec
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from kafka_backup.producers import group_offsets, layout, segments, topic_configs
from kafka_backup.producers.run import Job, JobFailed, JobInterrupted, Outcome, run_reporting
from kafka_backup.producers.segment_reports import PartitionReports, SegmentReporter
from kafka_backup.producers.storage import OpReport, Storage, StorageError
from kafka_backup.producers.telemetry import Emitter, classify_kafka_error
from kafka_backup.producers.threads import in_daemon_thread
from kafka_backup.producers.watermarks import watermarks
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.collector import collect_rarely
from kafka_backup.schemas.config import BackupConfig, ConfigError, TelemetryConfig
from kafka_backup.schemas.kafka_admin import arrived, client_config, close_admin
from kafka_backup.schemas.topics import AGGREGATOR_APP_ID, consumer_group

log = logging.getLogger("kafka_backup.backup")

CONFIRM_WAIT_S = 10.0  # at the end of a run, how long to resend lost reports and wait for acknowledgements
_KEY, _VALUE = operator.itemgetter(3), operator.itemgetter(4)  # of a buffered row (``StoredRecord``'s fields)
SEALING_MAX_BYTES = 32 * 1024 * 1024  # records handed to them and not completed yet, unless one segment: memory
GROUPS_READING_WAIT_S = 20.0  # at the end: how long a reading of consumer groups under way may finish


class BackupFailed(JobFailed):
    """A backup run failed (already reported as an error event)."""


class SealingStopped(Exception):
    """A segment not sealed because an earlier one failed (that failure is the run's)."""


class BackupInterrupted(BackupFailed, JobInterrupted):
    """Stopped by SIGTERM/SIGINT before the run's work was done (status ``interrupted``, exit status 1).

    What was flushed is checkpointed: the next run resumes from there.
    """


@dataclass
class Sealed:
    """What sealing a segment did, to complete on the loop's thread: its storage calls, to report,
    then either the segment and the checkpoint naming it, stored, or the error that stopped it."""

    work: PartitionWork
    covers_from: int
    nbytes: int = 0  # key + value bytes of its records
    ops: list[OpReport] = field(default_factory=list)
    info: layout.SegmentInfo | None = None
    head: layout.Checkpoint | None = None
    error: BaseException | None = None


@dataclass
class PartitionWork:
    topic: str
    partition: int
    next_offset: int  # durable: first offset not yet in a checkpointed segment
    checkpoint: layout.Checkpoint
    reports: PartitionReports
    target: int | None = None  # one-shot: stop once fetched up to here
    high_watermark: int = -1
    position: int = -1  # fetch position: last fetched offset + 1
    buffer: segments.SegmentBuffer = field(default_factory=segments.SegmentBuffer)  # encoded as fetched
    buffer_bytes: int = 0  # key + value bytes in it
    buffer_since: float = 0.0
    newest_stored_ts: int | None = None
    newest_available_ts: int | None = None
    # the sealing thread's own: the checkpoint naming the last segment it stored, and where the next
    # segment's coverage starts (the loop's ``checkpoint``/``next_offset`` follow once each completes)
    sealed_checkpoint: layout.Checkpoint = field(init=False)
    sealed_next: int = field(init=False)
    sealing: Future[Sealed] | None = None  # the loop's: its last segment handed to the sealing threads
    stored: bool = False  # the loop's: a segment of this run completed (its checkpoint carries the reported mark)

    def __post_init__(self) -> None:
        self.sealed_checkpoint, self.sealed_next = self.checkpoint, self.next_offset

    @property
    def tp(self) -> str:
        return f"{self.topic}/{self.partition}"

    def done(self) -> bool:
        if self.target is None:
            return False
        return not self.buffer.records and max(self.next_offset, self.position) >= self.target


class BackupWorker(Job):
    failed = BackupFailed
    operation = "fetch"

    def __init__(self, bootstrap_servers: str, bcfg: BackupConfig, storage: Storage, emitter: Emitter) -> None:
        self.bootstrap = bootstrap_servers
        self.cfg = bcfg
        self.storage = storage
        self.emitter = emitter
        self.reporter = SegmentReporter(emitter, lambda: [w.reports for w in self.parts.values()])
        self.id = bcfg.backup_id
        self.parts: dict[str, PartitionWork] = {}
        self.stopping = False
        self.fetches = 0
        self.consumed: dict[str, list[int]] = {}
        self.manifest: layout.Manifest | None = None
        self.run_record: layout.Run | None = None
        self._admin: AdminClient | None = None
        self.groups_due = 0.0  # continuous: when the consumer groups' offsets are read next (monotonic)
        # continuous: a reading of them under way in a thread, off the fetch loop
        self._groups_reading: Future[tuple[dict[str, layout.GroupSnapshot], list[str]]] | None = None
        self._sealer = ThreadPoolExecutor(max_workers=storage.concurrency, thread_name_prefix="seal")
        self._sealing_bytes = 0  # key + value bytes of the segments in self._sealing
        self._buffered_bytes = 0  # key + value bytes in the partitions' buffers (bcfg.buffer_max_bytes)
        self._over_budget_logged = False  # said once a run
        self._sealing: deque[Future[Sealed]] = deque()
        self._uncommitted: dict[str, PartitionWork] = {}  # segments completed, offset not committed yet
        self._commit_due = 0.0  # monotonic: the next commit request while the loop runs (one a poll interval)
        self._seal_failed = threading.Event()
        self._sealing_now = threading.local()  # .sealed: a sealing thread's current segment (its storage calls)
        storage.listener = self._on_storage_op
        self.consumer = Consumer(client_config(
            bootstrap_servers,
            **{
                "group.id": consumer_group(self.id),
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": not bcfg.continuous,
                "error_cb": self._on_kafka_error,
                **({"group.instance.id": bcfg.instance_id or f"{self.id}@{socket.gethostname()}"}
                   if bcfg.continuous else {}),
            },
        ))

    # -- telemetry hooks -------------------------------------------------

    def _on_storage_op(self, r: OpReport) -> None:
        sealed = getattr(self._sealing_now, "sealed", None)
        if sealed is not None:
            sealed.ops.append(r)  # reported on completion, on the loop's thread, in the order cut
            return
        self.emitter.storage_op(self.storage.name, r)

    def _on_kafka_error(self, err: KafkaError) -> None:
        self.emitter.kafka_error(err, "fetch")

    # -- run -------------------------------------------------------------

    def begin(self) -> None:
        self.emitter.emit(ev.JobStarted, mode="continuous" if self.cfg.continuous else "one-shot",
                          topics=list(self.cfg.topics), backend=self.storage.name, compression=self.cfg.compression,
                          expected_interval_s=None if self.cfg.continuous else self.cfg.expected_interval_s,
                          recovery_point_objective_s=self.cfg.recovery_point_objective_s)

    def work(self) -> None:
        self._start()
        # Modules, configuration and clients out of the collector's sight (a full collection walked them
        # again: 0.1-0.2 s per 300,000 records), and young objects collected rarely
        collect_rarely()
        self._loop()
        self._stop_fetching()
        self._flush_all()
        self._record_groups()
        log.info("stopping with %s", self._summary())
        unfinished = [w for w in self.parts.values() if not w.done()]
        if self.stopping and not self.cfg.continuous and unfinished:
            # a one-shot run cut short (a CronJob's deadline, a node drain) is not a success
            left = sum(max(0, (w.target or 0) - max(w.next_offset, w.position, 0)) for w in unfinished)
            raise BackupInterrupted(
                f"stopped before the end: {len(unfinished)} partition(s) short of the end offsets seen at "
                f"start, about {left} records not backed up; what was flushed is checkpointed and the next "
                "run resumes there")

    def before_end(self, outcome: Outcome) -> None:
        self._progress()
        self._finish_manifest(outcome.status)

    def after_end(self, outcome: Outcome) -> None:
        # a failed run may leave segments queued: the failure stops their sealing (nothing is stored
        # past a lost segment); one being stored finishes, atomically, and is read back by the next run
        self._seal_failed.set()
        self._sealer.shutdown(wait=True, cancel_futures=True)
        self._sealing.clear()  # a success completed them all; a failure's leftovers are the next run's
        if outcome.status in ("success", "interrupted"):
            self._save_confirmations()
        try:
            self.consumer.close()
        except Exception:  # closing must not mask the run's outcome
            pass
        reading = self._groups_reading
        if reading is not None:  # continuous: a reading under way uses the client; it has its own timeouts
            wait((reading,), timeout=GROUPS_READING_WAIT_S)
        close_admin(self._admin)
        self._admin = None

    def stop(self, *_args: object) -> None:
        self.stopping = True

    def _start(self) -> None:
        # kept for the consumer groups' offsets read later: one connection fewer to set up (a TLS and
        # SASL handshake on a secured cluster; up to 50 ms each on the dev broker, which accepts
        # connections slowly while others are open), closed in after_end
        admin = self._admin = AdminClient(client_config(self.bootstrap))
        metadata = admin.list_topics(timeout=15)
        counts = {}
        for topic in self.cfg.topics:
            md = metadata.topics.get(topic)
            if md is None or md.error is not None:
                self.emitter.emit(ev.ErrorRaised, error_type="offset_invalid", transient=False,
                                  operation="fetch", message=f"topic {topic} does not exist")
                raise ConfigError(f"backup.topics: topic {topic!r} does not exist on {self.bootstrap}")
            counts[topic] = len(md.partitions)
        self._start_manifest(counts, self._topic_configs(admin, counts))
        if self.cfg.continuous:
            self.consumer.subscribe(list(self.cfg.topics), on_assign=self._on_assign, on_revoke=self._on_revoke)
            return
        assignment = []
        partitions = [(topic, p) for topic, n in counts.items() for p in range(n)]
        checkpoints = self._read_checkpoints(partitions)
        marks = watermarks(admin, partitions)
        for work in self._load_partitions(checkpoints):
            low, high = marks[work.topic, work.partition]
            work.target = work.high_watermark = high
            # An explicit offset, not OFFSET_BEGINNING: resolving "beginning" raced with
            # fresh data on the dev broker and could land at the end, skipping records.
            resume = self._resume_offset(work, low)
            work.position = resume
            assignment.append(TopicPartition(work.topic, work.partition, resume))
        self.consumer.assign(assignment)

    def _read_checkpoints(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], layout.Checkpoint | None]:
        """The partitions' checkpoints, the storage's ``concurrency`` reads at a time (``Storage.at_once``).
        A read that fails raises here, the first in partition order."""
        reads = self.storage.at_once(layout.read_checkpoint, [(self.storage, self.id, *tp) for tp in partitions],
                                     "checkpoints")
        return {tp: read.result() for tp, read in zip(partitions, reads, strict=True)}

    def _load_partitions(self, checkpoints: dict[tuple[str, int], layout.Checkpoint | None]) -> list[PartitionWork]:
        """Each partition's work from its checkpoint as read from storage (None: it never had a record),
        its unacknowledged reports sent again."""
        loaded, again = [], 0
        for (topic, partition), cp in checkpoints.items():
            cp = cp or layout.Checkpoint(topic, partition, 0)
            work = PartitionWork(topic, partition, cp.next_offset, cp,
                                 PartitionReports(topic, partition, cp.reported_offset))
            work.newest_stored_ts = cp.max_ts
            self.parts[work.tp] = work
            again += self.reporter.report_unconfirmed(work.reports, cp, self._read_index, self.id)
            loaded.append(work)
        if again:
            log.info("reporting %d stored segment(s) again, acknowledged after their checkpoint was written or "
                     "never (a run's last segments, or a killed worker's)", again)
        return loaded

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        checkpoints = self._read_checkpoints([(tp.topic, tp.partition) for tp in partitions])
        assert self._admin is not None  # made in _start, before the subscription
        marks = watermarks(self._admin, [(tp.topic, tp.partition) for tp in partitions])
        for tp, work in zip(partitions, self._load_partitions(checkpoints), strict=True):
            tp.offset = self._resume_offset(work, marks[tp.topic, tp.partition][0])
        consumer.assign(partitions)
        self.emitter.emit(ev.Rebalance, assigned=[f"{tp.topic}/{tp.partition}" for tp in partitions])

    def _resume_offset(self, work: PartitionWork, low: int) -> int:
        """Where to start: the checkpoint, unless retention deleted records it never reached.

        Those records are gone from the source: the backup cannot have them. Say so loudly (an
        ``offset_invalid`` error, counted and logged) and go on from the oldest record left; the
        hole shows as a gap in the offset ranges of the audit report.
        """
        if not work.checkpoint.segment_count:
            return low
        if work.next_offset < low:
            message = (f"{work.tp}: offsets {work.next_offset}..{low - 1} were deleted by retention "
                       f"before they were backed up")
            log.error("%s; continuing at %d", message, low)
            self.emitter.emit(ev.ErrorRaised, error_type="offset_invalid", transient=False, operation="fetch",
                              message=message)
            return low
        return work.next_offset

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Segments being sealed are completed first (stored, checkpointed, committed: the next owner
        # resumes after them); unflushed records are simply dropped: it re-reads them from the checkpoint.
        self._complete_sealed(wait=True)
        for tp in partitions:
            work = self.parts.pop(f"{tp.topic}/{tp.partition}", None)  # its reports with it: the next owner resends
            if work is not None:
                self._buffered_bytes -= work.buffer_bytes
        if partitions:  # an empty revocation is no news; the assignment that follows counts the rebalance
            self.emitter.emit(ev.Rebalance, revoked=[f"{tp.topic}/{tp.partition}" for tp in partitions])

    def _loop(self) -> None:
        log.info("backing up %s", {w.tp: (w.next_offset, w.target) for w in self.parts.values()})
        poll_s = self.cfg.poll_interval_ms / 1000
        next_progress = time.monotonic() + poll_s
        while not self.stopping:
            if not self.cfg.continuous and all(w.done() for w in self.parts.values()):
                break
            timeout = max(0.0, min(poll_s, next_progress - time.monotonic()))
            batch = arrived(self.consumer, 1000, timeout)
            self.fetches += 1
            self._take(batch)
            self._flush_largest()
            self._flush_due()
            self._complete_sealed()
            if time.monotonic() >= next_progress:
                self._progress()
                next_progress = time.monotonic() + poll_s
            self.emitter.poll()  # after the cycle's last event: with telemetry.batch_events, one record per cycle
            if self.cfg.continuous:
                self._poll_groups()

    def _stop_fetching(self) -> None:
        """Nothing more is read: stop fetching while the run flushes, saves and waits for its
        telemetry to be acknowledged (an assigned consumer keeps fetching, and the dev broker
        answers an idle fetch at once, so that wait cost CPU)."""
        try:
            self.consumer.pause(self.consumer.assignment())
        except KafkaException as err:  # the run's outcome does not depend on it
            log.debug("could not pause fetching: %s", err)

    def _take(self, batch: list) -> None:
        """Buffer a fetched batch, a run of one partition's records at a time.

        Per record only what differs: its fields as a tuple, encoded into the segment buffer at once
        exactly as a ``StoredRecord`` (headers as the client's list of tuples, none as ``()``: msgpack
        writes a list and a tuple alike, so no copy is made), its payload size computed once; the
        partition lookup, the consumed counts and the newest timestamp are per run of records, not
        per record.
        """
        n, i = len(batch), 0
        while i < n:
            msg = batch[i]
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._reached_end(msg)
                else:
                    self._on_kafka_error(err)
                i += 1
                continue
            topic, partition = msg.topic(), msg.partition()
            j = i + 1  # the run: this partition's records up to another partition's, or an error
            while j < n and (m := batch[j]).partition() == partition and m.error() is None and m.topic() == topic:
                j += 1
            run, i = batch[i:j], j
            work = self.parts.get(f"{topic}/{partition}")
            if work is None:  # not this worker's partition (any more): the run is skipped, nothing buffered
                continue
            target = work.target
            beyond = target is not None and run[-1].offset() >= target
            if beyond:  # one-shot: records past the watermark seen at start are not backed up
                run = [m for m in run if m.offset() < target]
            if run:
                self._buffer(work, [(m.offset(), (t := m.timestamp())[1], t[0], m.key(), m.value(),
                                     m.headers() or ())
                                    for m in run])
            if beyond and target is not None:
                work.position = max(work.position, target)

    def _buffer(self, work: PartitionWork, rows: list[tuple]) -> None:
        """Append a run of one partition's records (``StoredRecord`` tuples, in offset order) to its
        buffer, cutting a segment wherever it reaches ``segment_max_records`` or ``_max_bytes``."""
        # the run's key + value bytes at C speed (no key or value: None, dropped by the filter), 75 ns a
        # record against 124 for a Python expression per record; each record's own only to cut the run
        size = sum(map(len, filter(None, map(_KEY, rows)))) + sum(map(len, filter(None, map(_VALUE, rows))))
        self._buffered_bytes += size  # before any cut below takes its share out again
        max_records, max_bytes = self.cfg.segment_max_records, self.cfg.segment_max_bytes
        if work.buffer.records + len(rows) < max_records and work.buffer_bytes + size < max_bytes:
            newest = self._append(work, rows)  # the usual case: no segment ends inside this run
            work.buffer_bytes += size
        else:  # the run is cut where each segment reaches a limit
            start, newest = 0, 0
            count, nbytes = work.buffer.records, work.buffer_bytes
            for i, rec_size in enumerate([len(r[3] or b"") + len(r[4] or b"") for r in rows]):
                count += 1
                nbytes += rec_size
                if count >= max_records or nbytes >= max_bytes:
                    newest = max(newest, self._append(work, rows[start:i + 1]))
                    work.buffer_bytes = nbytes
                    work.position = rows[i][0] + 1
                    self._flush(work)
                    start, count, nbytes = i + 1, 0, 0
            if start < len(rows):
                newest = max(newest, self._append(work, rows[start:]))
                work.buffer_bytes = nbytes
        work.position = rows[-1][0] + 1
        work.newest_available_ts = max(work.newest_available_ts or 0, newest)
        counts = self.consumed.setdefault(work.topic, [0, 0])
        counts[0] += len(rows)
        counts[1] += size

    @staticmethod
    def _append(work: PartitionWork, rows: list[tuple]) -> int:
        """Add records to the partition's buffer, whose age counts from its first; their newest timestamp."""
        if not work.buffer.records:
            work.buffer_since = time.monotonic()
        return work.buffer.add(rows)

    def _reached_end(self, msg: Message) -> None:
        """All records up to the end were delivered: the position steps over transaction markers too.
        An end without an offset says nothing about where the end is: the position stays."""
        work = self.parts.get(f"{msg.topic()}/{msg.partition()}")
        end = msg.offset()
        if work is not None and work.target is not None and end is not None:
            work.position = max(work.position, min(end, work.target))

    def _flush_largest(self) -> None:
        """Cut the largest buffers into segments while the partitions' buffers hold more than
        ``buffer_max_bytes`` together. A catch-up reads a slice of every partition per fetch: without it
        every buffer grew until the flush interval (or the record limit), at the fetch rate times the
        interval, 1.4 GB for 128 partitions of 222-byte records; now segments are cut smaller instead."""
        while self._buffered_bytes > self.cfg.buffer_max_bytes:
            largest = max(self.parts.values(), key=lambda w: w.buffer_bytes)
            if not largest.buffer.records:
                return
            if not self._over_budget_logged:
                self._over_budget_logged = True
                log.info("more than %d bytes buffered across %d partitions (backup.buffer_max_bytes): cutting the "
                         "largest buffers into segments early", self.cfg.buffer_max_bytes, len(self.parts))
            self._flush(largest)

    def _flush_due(self) -> None:
        now = time.monotonic()
        flush_s = self.cfg.flush_interval_ms / 1000
        for work in list(self.parts.values()):
            if not work.buffer.records:
                continue
            if (now - work.buffer_since >= flush_s
                    or (work.target is not None and work.position >= work.target)):
                self._flush(work)

    def _summary(self) -> str:
        return ", ".join(f"{w.tp} at {w.next_offset}" for w in self.parts.values())

    def _flush_all(self) -> None:
        for work in list(self.parts.values()):
            if work.buffer.records:
                self._flush(work)
        self._complete_sealed(wait=True)

    def _flush(self, work: PartitionWork) -> None:
        """Cut the partition's buffer into a segment and hand it to the sealing thread."""
        records, nbytes, work.buffer, work.buffer_bytes = work.buffer, work.buffer_bytes, segments.SegmentBuffer(), 0
        self._buffered_bytes -= nbytes
        covers_from, work.sealed_next = work.sealed_next, records.last_offset + 1
        most = self.storage.concurrency
        while self._sealing and (len(self._sealing) >= most or self._sealing_bytes + nbytes > SEALING_MAX_BYTES):
            self._complete_sealed(wait=True, most=1)
        work.sealing = self._sealer.submit(self._seal, work, records, nbytes, covers_from, work.sealing)
        self._sealing.append(work.sealing)
        self._sealing_bytes += nbytes

    def _seal(self, work: PartitionWork, records: segments.SegmentBuffer, nbytes: int, covers_from: int,
              previous: Future[Sealed] | None) -> Sealed:
        """A sealing thread: compress and store a segment, then the checkpoint naming it, once the
        partition's previous segment (``previous``) is sealed: it names that one's checkpoint."""
        if previous is not None:
            wait((previous,))  # submitted before this one, so started before it: never a thread short
        sealed = Sealed(work, covers_from, nbytes)
        if self._seal_failed.is_set() or (previous is not None and previous.cancelled()):
            sealed.error = SealingStopped(f"{work.tp}: not sealed, an earlier segment failed")
            return sealed
        self._sealing_now.sealed = sealed
        try:
            alg = self.cfg.compression
            data, raw_size = records.seal(work.topic, work.partition, alg)
            start, end = records.first_offset, records.last_offset + 1
            info = layout.SegmentInfo(
                key=layout.segment_key(self.id, work.topic, work.partition, start, alg),
                start_offset=start, end_offset=end, records=records.records, bytes=nbytes,
                uncompressed_bytes=raw_size, stored_bytes=len(data), algorithm=alg,
                min_ts=records.min_ts, max_ts=records.max_ts, sha256=layout.digest(data),
                covers_from=covers_from,
            )
            self.storage.put(info.key, data, "segment")
            head, chunks = layout.append(self.id, work.sealed_checkpoint, info, work.reports.reported_offset)
            for key, chunk in chunks:  # sealed index chunks first: the head names them
                self.storage.put(key, chunk, "index")
            self._store_checkpoint(work, head)
            work.sealed_checkpoint, sealed.info, sealed.head = head, info, head
        except BaseException as err:  # handed to the loop's thread, which raises it as it would have itself
            self._seal_failed.set()
            sealed.error = err
        finally:
            self._sealing_now.sealed = None
        return sealed

    def _complete_sealed(self, wait: bool = False, most: int | None = None) -> None:
        """On the loop's thread, in the order they were cut: each sealed segment's storage calls are
        reported, then the partition's durable offset moves and its ``SegmentStored`` goes out; a
        failed one raises its error. ``wait``: for the oldest ``most`` (all) still being sealed too.
        Then (unless only ``most`` were waited for, to make room, and none failed) the completed
        partitions' offsets are committed, in one request: at once when waiting for all (the end of
        a run, a revocation) or after a failure, else at most once a poll interval (each request is
        a round trip on the fetch loop; partitions completing one after the other made one a pass)."""
        done = 0
        try:
            while self._sealing and (wait or self._sealing[0].done()) and (most is None or done < most):
                sealed = self._sealing.popleft().result()
                self._sealing_bytes -= sealed.nbytes
                for op in sealed.ops:
                    self.emitter.storage_op(self.storage.name, op)
                if sealed.error is not None:
                    raise sealed.error
                work, info = sealed.work, sealed.info
                assert info is not None and sealed.head is not None
                work.checkpoint, work.next_offset, work.stored = sealed.head, info.end_offset, True
                work.newest_stored_ts = max(work.newest_stored_ts or 0, info.max_ts or 0)
                self.reporter.report(work.reports, info, sealed.covers_from)
                self._uncommitted[work.tp] = work
                done += 1
        except BaseException:
            self._commit()  # what completed before a failure is stored: its offsets still go out
            raise
        if most is None and (wait or time.monotonic() >= self._commit_due):
            self._commit()

    def _save_confirmations(self) -> None:
        """At the end of a run, wait for the reports to be acknowledged, then record how far they were
        in the checkpoints of the partitions that stored nothing in this run.

        A partition that stored a segment in this run keeps its checkpoint as sealed: its reported
        mark trails by the segments whose acknowledgement came after their checkpoint (normally the
        last), and its next run reports those again (the aggregator counts an offset range once) and
        moves the mark with its first segment. Rewriting every checkpoint at the end of every run
        cost two fsyncs and a new file a partition, or a PUT each on S3, for what the next run
        carries anyway. A partition that stored nothing has no later segment to carry the mark: its
        checkpoint is rewritten once the reports sent again (``report_unconfirmed``) are acknowledged,
        so a run with nothing new moves the mark, and the run after it reports nothing again.
        A failed run leaves its checkpoints as they are.
        """
        self.reporter.confirm(CONFIRM_WAIT_S)
        moved = [(work, msgspec.structs.replace(work.checkpoint, reported_offset=work.reports.reported_offset))
                 for work in self.parts.values()
                 if not work.stored and work.checkpoint.segment_count
                 and work.reports.reported_offset > work.checkpoint.reported_offset]
        if not moved:
            return
        writes = zip([work for work, _ in moved], self.storage.at_once(self._write_checkpoint, moved, "confirm"),
                     strict=True)
        for work, write in writes:
            if (err := write.exception()) is None:
                continue
            if not isinstance(err, StorageError):
                raise err
            log.warning("%s: could not record confirmed telemetry in the checkpoint (%s); "
                        "the next run reports its last segments again", work.tp, err)
            return  # once: the others most likely failed alike

    def _read_index(self, key: str) -> bytes:
        return self.storage.get(key, "index")

    def _write_checkpoint(self, work: PartitionWork, cp: layout.Checkpoint) -> None:
        """Once nothing is being sealed (the end of a run)."""
        self._store_checkpoint(work, cp)
        work.checkpoint = work.sealed_checkpoint = cp

    def _store_checkpoint(self, work: PartitionWork, cp: layout.Checkpoint) -> None:
        self.storage.put(layout.checkpoint_key(self.id, work.topic, work.partition), layout.encode(cp), "checkpoint")

    def _commit(self) -> None:
        """Commit the durable offsets of the partitions whose segments completed since the last
        commit, in one request (one a segment, 128 partitions were 128 round trips on the fetch loop);
        the next request from the loop waits a poll interval (``_complete_sealed``).

        The checkpoint in storage is the truth for resuming; the group's offsets only show lag to
        Kafka's own tools. So a failure is reported and retried twice, then left to the next commit.
        """
        works, self._uncommitted = self._uncommitted, {}
        offsets = [TopicPartition(w.topic, w.partition, w.next_offset) for w in works.values()]
        if not offsets:
            return
        self._commit_due = time.monotonic() + self.cfg.poll_interval_ms / 1000
        for attempt in range(3):
            try:
                result = self.consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as err:  # the request failed as a whole
                error: KafkaError | None = err.args[0]
                failed, result = offsets, []
            else:  # the reply says, per partition
                failed = [tp for tp in result if tp.error is not None]
                error = failed[0].error if failed else None
            if committed := [ev.TopicPartitionOffset(tp.topic, tp.partition, tp.offset)
                             for tp in result if tp.error is None]:
                self.emitter.emit(ev.OffsetsCommitted, offsets=committed)
            if error is None:
                return
            error_type, transient = classify_kafka_error(error)
            self.emitter.emit(ev.ErrorRaised, error_type=error_type, transient=transient,
                              operation="commit", message=error.str()[:500])
            offsets = [TopicPartition(tp.topic, tp.partition, tp.offset) for tp in failed]
            if attempt < 2:
                self.emitter.emit(ev.Retry, operation="commit")
                time.sleep(0.2 * (attempt + 1))
        log.warning("offset commit for %s failed 3 times; continuing from the storage checkpoint",
                    ", ".join(f"{tp.topic}/{tp.partition}" for tp in offsets))

    def _watermark(self, work: PartitionWork) -> int:
        tp = TopicPartition(work.topic, work.partition)
        try:
            _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
        except KafkaException:
            high = -1
        if high is None or high < 0:
            try:
                _low, high = self.consumer.get_watermark_offsets(tp, timeout=2)
            except KafkaException as err:
                self._on_kafka_error(err.args[0])
                return work.high_watermark
        work.high_watermark = max(work.high_watermark, high)
        return work.high_watermark

    def _progress(self) -> None:
        self.reporter.resend_lost()
        partitions = []
        for work in self.parts.values():
            hwm = self._watermark(work)
            partitions.append(ev.PartitionProgress(
                work.topic, work.partition, min(work.next_offset, hwm) if hwm >= 0 else work.next_offset, hwm,
                work.newest_stored_ts, work.newest_available_ts or work.newest_stored_ts))
        consumed = [ev.TopicConsumed(t, c[0], c[1]) for t, c in self.consumed.items() if c[0]]
        self.emitter.emit(ev.Progress, partitions=partitions, consumed=consumed, fetches=self.fetches)
        self.consumed = {}
        self.fetches = 0

    def _topic_configs(self, admin: AdminClient, counts: dict[str, int]) -> dict[str, layout.TopicSnapshot]:
        """Each topic's partitions and configs, for a restore to recreate it faithfully.

        A cluster that will not say (no DescribeConfigs permission, an old broker) does not stop
        the backup: it is reported (``ErrorRaised``) and the restore falls back to checking the
        target's own configuration.
        """
        try:
            snapshots = topic_configs.describe(admin, list(counts))
        except KafkaException as err:
            error_type, transient = classify_kafka_error(err.args[0])
            message = f"could not read the configs of {', '.join(counts)}: {err.args[0].str()}"
            log.warning("%s; a restore will not know them", message)
            self.emitter.emit(ev.ErrorRaised, error_type=error_type, transient=transient, operation="fetch",
                              message=message[:500])
            return {}
        for topic, snap in snapshots.items():
            snap.partitions = counts[topic]
        return snapshots

    def _record_groups(self) -> None:
        """Record the consumer groups' committed offsets on the backed-up topics (``groups.json``), now.

        Called at the end of a run, after its data is flushed, so a group's offset is at most a
        little ahead of what the backup holds (``offset-reset --from-backup`` then moves it to the
        end of the restored data). A reading still under way from the loop is waited for and
        superseded by this one. Never fails the backup: a failure is counted (``ErrorRaised``,
        ``error_type="consumer_groups"``) and logged in one line.
        """
        self.groups_due = time.monotonic() + self.cfg.consumer_groups_interval_s
        if self._groups_reading is not None:
            self._groups_reading.result()  # bounded: every admin call in it has a timeout
            self._groups_reading = None
        if self.cfg.consumer_groups:
            self._save_groups(*self._read_groups())

    def _poll_groups(self) -> None:
        """Continuous mode, from the fetch loop: read the groups' offsets every
        ``consumer_groups_interval_s`` in a thread and save them once read.

        A cluster's groups are read one request per group (the client's limit), so with
        ``consumer_groups: ["*"]`` and thousands of groups a reading takes seconds, longer with a
        slow coordinator (15 s a call at most); done in the loop it would stall fetching each time.
        """
        reading = self._groups_reading
        if reading is not None:
            if reading.done():
                self._groups_reading = None
                self._save_groups(*reading.result())  # storage and telemetry stay on the loop's thread
            return
        if time.monotonic() < self.groups_due:
            return
        self.groups_due = time.monotonic() + self.cfg.consumer_groups_interval_s
        if not self.cfg.consumer_groups:
            return
        # its error is raised by the loop, as it would have been reading there
        self._groups_reading = in_daemon_thread(self._read_groups, "consumer-groups")

    def _read_groups(self) -> tuple[dict[str, layout.GroupSnapshot], list[str]]:
        """Admin calls only (thread-safe): the groups' offsets on the backed-up topics, and the problems met."""
        if self._admin is None:
            self._admin = AdminClient(client_config(self.bootstrap))
        topics = set(self.manifest.topics if self.manifest else self.cfg.topics)
        return group_offsets.read(self._admin, topics, list(self.cfg.consumer_groups))

    def _save_groups(self, found: dict[str, layout.GroupSnapshot], problems: list[str]) -> None:
        try:
            if found:
                key = layout.groups_key(self.id)
                raw = self.storage.get_optional(key, "manifest")
                doc = layout.decode_groups(raw, key) if raw else layout.GroupsDocument(self.id)
                self.storage.put(key, layout.encode(group_offsets.merge(doc, found)), "manifest")
        except (StorageError, layout.MetadataError) as err:
            problems = [*problems, f"writing {layout.groups_key(self.id)}: {err}"]
        if problems:
            message = (f"consumer group offsets not recorded in full ({len(problems)} problem(s)): "
                       f"{problems[0]}")
            log.warning("%s", message)
            self.emitter.emit(ev.ErrorRaised, error_type="consumer_groups", transient=True,
                              operation="consumer_groups", message=message[:500])
        elif found:
            log.info("recorded the committed offsets of %d consumer group(s)", len(found))

    def _start_manifest(self, counts: dict[str, int],
                        configs: dict[str, layout.TopicSnapshot] | None = None) -> None:
        raw = self.storage.get_optional(layout.manifest_key(self.id), "manifest")
        now = time.time()
        key = layout.manifest_key(self.id)
        manifest = layout.decode_manifest(raw, key) if raw else layout.Manifest(self.id, created_ts=now)
        manifest.topics.update(counts)
        manifest.topic_configs.update(configs or {})
        manifest.version = layout.LAYOUT_VERSION
        manifest.compression = self.cfg.compression
        manifest.updated_ts = now
        self.run_record = layout.Run(self.emitter.worker, now, mode="continuous" if self.cfg.continuous
                                     else "one-shot")
        manifest.runs.append(self.run_record)
        self.storage.put(layout.manifest_key(self.id), layout.encode(manifest), "manifest")
        self.manifest = manifest

    def _finish_manifest(self, status: str) -> None:
        if self.manifest is None or self.run_record is None:
            return
        self.run_record.ended_ts = self.manifest.updated_ts = time.time()
        self.run_record.status = status
        try:
            self.storage.put(layout.manifest_key(self.id), layout.encode(self.manifest), "manifest")
        except StorageError as err:
            log.warning("could not record the run's end in the manifest: %s", err)


def run_backup(bootstrap: str, telemetry_bootstrap: str, bcfg: BackupConfig, tcfg: TelemetryConfig,
               storage: Storage, aggregator_group: str = AGGREGATOR_APP_ID) -> int:
    emitter = Emitter(telemetry_bootstrap or bootstrap, tcfg, "backup", bcfg.backup_id,
                      aggregator_group=aggregator_group)
    return run_reporting(BackupWorker(bootstrap, bcfg, storage, emitter), emitter)
