"""The restore worker: a backup's segments back into Kafka, per partition in order, each record once.

Scope. A restore covers every topic of the backup (renamed by ``topic_map``),
limited to records whose timestamp lies in ``[from_time, to_time)``. Its
scope is fixed by the first run and kept in the restore checkpoint: per source
partition, the offsets backed up at that moment and how many of their records
fall in the window. Segments whose ``[min_ts, max_ts]`` lie inside the window
are counted from the checkpoint without reading them; segments outside are
never read; a segment straddling a window edge is read and its records counted
one by one, so ``total_records`` is exact. Such a segment is kept decoded (up
to ``restore_reader.PARTIAL_CACHE_BYTES``) so it is read from storage once per run.

Original offsets. Offsets are not preserved (the target assigns its own), so
each restored record carries its source offset in a last header
``kafka-backup.offset`` (decimal ASCII), unless ``restore.offset_header`` is
off when the restore begins (the choice is kept in the restore checkpoint).
``offset-reset --from-backup`` follows it to move consumer groups
(``producers/offset_follow.py``).

Commit point: batches are produced with the idempotent producer without
waiting for each other (up to ``restore_writer.MAX_IN_FLIGHT`` records unacknowledged); the
acknowledged prefix of a partition's batches is then written to the restore
checkpoint (``{backup_id}/restores/{restore_id}/checkpoint.json``) every
``CHECKPOINT_EVERY_S`` or ``CHECKPOINT_EVERY_BYTES`` (every batch with a rate
limit: its batches are small and paced, and progress should move with them), at
the end of a partition and before stopping, followed by one ``RestoreProgress``. So
``kafka_restore_records_total`` only counts acknowledged, checkpointed records,
and the checkpoint never claims a record the target does not hold (a corrupt
segment stops the restore before its records are claimed).

The duplicate window, and how it is closed. A crash after the target
acknowledged batches but before the checkpoint naming them was written leaves
records in the target that the checkpoint does not know; a plain resume would
write them again. The checkpoint therefore also keeps each target partition's
expected end offset (``target_next``: its end when the restore began, then the
offset after our last acknowledged record). On resume a target ending beyond
it holds exactly a prefix of the records we would produce next: the
idempotent producer writes each partition in order, without gaps and without
retry duplicates. The worker reads that surplus back, checks it against the
next records of the backup (key, value, headers), adopts it (advances the
checkpoint, reports it once in ``RestoreProgress``) and goes on after it. If
the surplus does not match, something else wrote to the target partition and
the restore stops rather than guess. This rests on one assumption, stated in
the runbook: nothing else writes to the target partitions while a restore is
unfinished.

Why not a transactional producer (``transactional.id`` = restore id): the
commit point is the checkpoint in storage, not in Kafka, so a crash between
the transaction commit and the checkpoint write would leave the same window
and need the same check; transaction markers also take offsets, which breaks
the end-offset arithmetic, and every reader of the restored topics would need
``isolation.level=read_committed``.

The parts: ``restore_scope`` (window, topic map, errors), ``restore_reader``
(segments read once and cut to the window), ``restore_targets`` (target topics,
their limits, the resume check), ``restore_writer`` (pacing, producing,
claiming, checkpointing), ``restore_plan`` (``--dry-run``). This module runs them.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

from confluent_kafka import KafkaError

from kafka_backup.producers import layout
from kafka_backup.producers.restore_reader import SegmentReader
from kafka_backup.producers.restore_scope import (
    RestoreFailed,
    RestoreInterrupted,
    Window,
    parse_topic_map,
    resolve_topic_map,
)
from kafka_backup.producers.restore_targets import TargetLimits, Targets
from kafka_backup.producers.restore_writer import Pacer, Writer, record_headers
from kafka_backup.producers.run import Job, Outcome, Reporter, run_reporting
from kafka_backup.producers.storage import OpReport, Storage
from kafka_backup.producers.telemetry import Emitter
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.collector import collect_rarely
from kafka_backup.schemas.config import ConfigError, RestoreConfig, TelemetryConfig
from kafka_backup.schemas.topics import AGGREGATOR_APP_ID

log = logging.getLogger("kafka_backup.restore")


class RestoreWorker(Job):
    failed = RestoreFailed
    operation = "produce"

    def __init__(self, bootstrap_servers: str, rcfg: RestoreConfig, storage: Storage, emitter: Reporter,
                 progress_file: TextIO | None = None) -> None:
        self.bootstrap = bootstrap_servers
        self.cfg = rcfg
        self.id = rcfg.restore_id
        self.backup_id = rcfg.backup_id
        self.storage = storage
        self.emitter = emitter
        self.window = Window(rcfg.from_time, rcfg.to_time)
        self.requested_map = parse_topic_map(rcfg.topic_map)
        self.stopping = threading.Event()
        self.checkpoint: layout.RestoreCheckpoint | None = None
        self.reader = SegmentReader(storage, self.backup_id, self.window, emitter)
        self.targets = Targets(bootstrap_servers, rcfg, emitter)
        self.writer: Writer | None = None
        self.started_emitted = False
        self.progress_file = progress_file if progress_file is not None else sys.stderr
        storage.listener = self._on_storage_op

    # -- telemetry hooks -------------------------------------------------

    def _on_storage_op(self, r: OpReport) -> None:
        self.emitter.storage_op(self.storage.name, r)

    def _on_kafka_error(self, err: KafkaError) -> None:
        self.emitter.kafka_error(err, "produce")

    # -- run -------------------------------------------------------------

    def work(self) -> None:
        self._prepare()
        collect_rarely()  # the records decoded by the segment are walked no more (schemas/collector.py)
        self._restore_all()
        self._complete()

    def before_end(self, outcome: Outcome) -> None:
        if not self.started_emitted:
            self._emit_started()
        if self.reader.checked:
            self.emitter.emit(ev.SegmentsChecked, backup_id=self.backup_id, segments=self.reader.checked,
                              unverified=self.reader.unverified)
        if self.writer is not None:
            self.writer.close_bar()

    def after_end(self, outcome: Outcome) -> None:
        if self.writer is not None:
            self.writer.flush()
        self.targets.close()

    def stop(self, *_args: object) -> None:
        """Signal handler: finish the batch in flight (acknowledged and checkpointed), then stop."""
        self.stopping.set()

    def _emit_started(self) -> None:
        cp = self.checkpoint
        self.emitter.emit(ev.JobStarted, topics=sorted(cp.topic_map) if cp else [], backend=self.storage.name,
                          backup_id=self.backup_id, total_records=cp.total_records if cp else None,
                          restored_total=cp.restored_total if cp else 0,
                          restored_bytes=cp.restored_bytes if cp else 0)
        self.started_emitted = True

    # -- preparation: manifest, scope, targets, resume check -----------------

    def _prepare(self) -> None:
        manifest = self.read_manifest()
        key = layout.restore_checkpoint_key(self.backup_id, self.id)
        raw = self.storage.get_optional(key, "checkpoint", report=True)
        adopted = adopted_bytes = 0
        if raw is not None:
            # the scope is the checkpoint's: topics a continuous backup added since are not part of it
            cp = layout.decode_restore_checkpoint(raw, key)
            mapping = resolve_topic_map(self.requested_map, dict.fromkeys(cp.topic_map, 0), self.backup_id)
            self.check_same_restore(cp, mapping)
            if cp.offset_header != self.cfg.offset_header:
                log.warning("restore %s was started with offset_header %s: resuming with it (a restore's "
                            "records are all alike)", self.id, cp.offset_header)
            counts: dict[str, int] = {}
            for cur in cp.partitions:
                counts[cur.topic] = max(counts.get(cur.topic, 0), cur.partition + 1)
            missing = self.targets.check(mapping, counts)
            self.targets.create(missing, mapping, manifest)
            self.checkpoint = cp
            # a finished partition gets no more of our records: whatever follows them is not ours to check
            unfinished = [cur for cur in cp.partitions if cur.restored < cur.records]
            ends = self.targets.high_watermarks([(cur.target_topic, cur.partition) for cur in unfinished])
            for group in self.reader.cursors_in_groups(unfinished):
                for cur in group:
                    found = self.targets.reconcile(cur, self.reader.records(cur, cur.next_offset),
                                                   lambda r: record_headers(r, cp.offset_header),
                                                   ends[cur.target_topic, cur.partition])
                    found_bytes = sum(r.size for r in found)
                    cp.restored_total += len(found)
                    cp.restored_bytes += found_bytes
                    adopted += len(found)
                    adopted_bytes += found_bytes
            if adopted:
                self._write_checkpoint()
            log.info("resuming restore %s at %d of %d records", self.id, cp.restored_total, cp.total_records)
        else:
            mapping = resolve_topic_map(self.requested_map, manifest.topics, self.backup_id)
            counts = {t: manifest.topics[t] for t in mapping}
            missing = self.targets.check(mapping, counts)
            limits = self.targets.limits(mapping, missing, manifest)
            cp = self.scope(mapping, counts, limits)
            self.targets.check_limits(cp, limits)
            self.targets.create(missing, mapping, manifest)
            ends = self.targets.high_watermarks([(cur.target_topic, cur.partition) for cur in cp.partitions])
            for cur in cp.partitions:
                cur.target_base = cur.target_next = ends[cur.target_topic, cur.partition]
            self.checkpoint = cp
            self._write_checkpoint()  # before the first record: a crash from here on is resumable exactly
        self._emit_started()
        if adopted:
            # produced and acknowledged by the run that crashed, which never reported them
            self.emitter.emit(ev.RestoreProgress, records=adopted, restored_total=cp.restored_total,
                              bytes=adopted_bytes, restored_bytes=cp.restored_bytes)
        self.writer = Writer(self.bootstrap, self.cfg, cp, self.emitter, Pacer(self.cfg.rate_limit, self.stopping),
                             self._write_checkpoint, self._on_kafka_error, self.progress_file)

    def read_manifest(self) -> layout.Manifest:
        """The backup's manifest, which must name a topic."""
        manifest = layout.read_manifest(self.storage, self.backup_id, "restore", self.cfg.storage)
        if not manifest.topics:
            raise ConfigError(f"restore.backup_id: backup {self.backup_id!r} holds no topics yet; "
                              "run a backup first")
        return manifest

    def check_same_restore(self, cp: layout.RestoreCheckpoint, mapping: dict[str, str]) -> None:
        """A resume must restore the same scope, or the checkpoint's offsets would mean something else."""
        for name, was, now in (("from_time", cp.from_time, self.window.from_time),
                               ("to_time", cp.to_time, self.window.to_time),
                               ("topic_map", cp.topic_map, mapping)):
            if was != now:
                raise ConfigError(f"restore.{name}: restore {self.id!r} was started with {name} {was!r}, "
                                  f"not {now!r}; resume with the same flags or use a new --restore-id")

    def scope(self, mapping: dict[str, str], counts: dict[str, int],
              limits: dict[str, TargetLimits] | None = None) -> layout.RestoreCheckpoint:
        """Records in scope per partition, exactly; with ``limits``, also how many of them each target
        would delete or refuse, and the oldest one's timestamp (``TargetLimits``)."""
        now = time.time()
        cp = layout.RestoreCheckpoint(self.id, self.backup_id, mapping, 0, self.window.from_time,
                                      self.window.to_time, created_ts=now, updated_ts=now,
                                      offset_header=self.cfg.offset_header)
        for group in self.reader.in_groups([(topic, p) for topic in mapping for p in range(counts[topic])]):
            for topic, p in group:
                lim = (limits or {}).get(topic)
                cutoffs = [lim.deletes[0] if lim and lim.deletes else None,
                           lim.refuses[0] if lim and lim.refuses else None]
                bcp = self.reader.backup_checkpoint(topic, p)
                records = 0
                for seg in self.reader.segments_of[(topic, p)]:
                    n, older, oldest = self.reader.count(seg, cutoffs)
                    records += n
                    if lim is not None:
                        lim.deleted += older[0]
                        lim.refused += older[1]
                        if oldest is not None:
                            lim.oldest = oldest if lim.oldest is None else min(lim.oldest, oldest)
                cp.partitions.append(layout.RestoreCursor(topic, p, mapping[topic], bcp.next_offset, records))
                cp.total_records += records
        log.info("restore %s: %d records in scope", self.id, cp.total_records)
        return cp

    # -- producing and checkpointing ---------------------------------------

    def _restore_all(self) -> None:
        cp, writer = self.checkpoint, self.writer
        assert cp is not None and writer is not None
        try:
            self.reader.producing = True
            for group in self.reader.cursors_in_groups([cur for cur in cp.partitions if cur.restored < cur.records]):
                self.reader.plan((cur, cur.next_offset) for cur in group)  # their segments, read ahead in order
                for cur in group:
                    writer.restore_partition(cur, self.reader.records(cur, cur.next_offset))
            writer.finish()  # every partition acknowledged, then checkpointed
        except RestoreInterrupted:
            raise RestoreInterrupted(f"stopped at {cp.restored_total} of {cp.total_records} records; run "
                                     f"again with --restore-id {self.id} to resume") from None

    def _write_checkpoint(self) -> None:
        cp = self.checkpoint
        assert cp is not None
        cp.updated_ts = time.time()
        self.storage.put(layout.restore_checkpoint_key(self.backup_id, self.id), layout.encode(cp), "checkpoint")

    def _complete(self) -> None:
        cp = self.checkpoint
        assert cp is not None
        if cp.completed_ts is None:
            cp.completed_ts = time.time()
            self._write_checkpoint()
        log.info("restore %s complete: %d records", self.id, cp.restored_total)


def run_restore(bootstrap: str, telemetry_bootstrap: str, rcfg: RestoreConfig, tcfg: TelemetryConfig,
                storage: Storage, dry_run: bool = False, aggregator_group: str = AGGREGATOR_APP_ID) -> int:
    Window(rcfg.from_time, rcfg.to_time)  # user mistakes fail before anything is emitted
    parse_topic_map(rcfg.topic_map)
    if dry_run:
        from kafka_backup.producers.restore_plan import run_dry

        return run_dry(bootstrap, rcfg, storage)
    emitter = Emitter(telemetry_bootstrap or bootstrap, tcfg, "restore", rcfg.restore_id,
                      aggregator_group=aggregator_group)
    return run_reporting(RestoreWorker(bootstrap, rcfg, storage, emitter), emitter)
