"""The restore worker: a backup's segments back into Kafka, per partition in order, each record once.

Scope. A restore covers every topic of the backup (renamed by ``topic_map``),
limited to records whose timestamp lies in ``[from_time, to_time)``. Its
scope is fixed by the first run and kept in the restore checkpoint: per source
partition, the offsets backed up at that moment and how many of their records
fall in the window. Segments whose ``[min_ts, max_ts]`` lie inside the window
are counted from the checkpoint without reading them; segments outside are
never read; a segment straddling a window edge is read and its records counted
one by one, so ``total_records`` is exact. Such a segment is kept decoded (up
to ``PARTIAL_CACHE_BYTES``) so it is read from storage once per run.

Original offsets. Offsets are not preserved (the target assigns its own), so
each restored record carries its source offset in a last header
``kafka-backup.offset`` (decimal ASCII), unless ``restore.offset_header`` is
off when the restore begins (the choice is kept in the restore checkpoint).
``offset-reset --from-backup`` follows it to move consumer groups
(``producers/offset_follow.py``).

Commit point: batches are produced with the idempotent producer without
waiting for each other (up to ``MAX_IN_FLIGHT`` records unacknowledged); the
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
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from itertools import islice

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from kafka_backup.producers import layout, segments, topic_configs
from kafka_backup.producers.backup import BackupFailed, BackupInterrupted, metadata_failure
from kafka_backup.producers.storage import FileBackend, OpReport, Storage, StorageError
from kafka_backup.producers.telemetry import Emitter, classify_kafka_error, run_reporting
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.config import ConfigError, RestoreConfig, TelemetryConfig
from kafka_backup.schemas.kafka_admin import client_config

log = logging.getLogger("kafka_backup.restore")

CHECKPOINT_EVERY_S = 1.0  # acknowledged batches are checkpointed at least this often ...
CHECKPOINT_EVERY_BYTES = 32 * 1024 * 1024  # ... or after this many key+value bytes
MAX_IN_FLIGHT = 50_000  # records produced but not yet acknowledged, per partition
RATE_SLICE_S = 0.25  # with a rate limit, a batch holds at most this many seconds' worth of records
PARTIAL_CACHE_BYTES = 64 * 1024 * 1024  # decoded straddling segments kept between scoping and producing
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class RestoreFailed(BackupFailed):
    """A failure that ends the restore (already reported as an error event): exit status 1.

    A subclass of ``BackupFailed`` so the CLI's one handler for failed runs covers restores.
    """


class RestoreInterrupted(RestoreFailed, BackupInterrupted):
    """Stopped by SIGTERM/SIGINT between batches: nothing is lost, a run with the same id resumes."""


# ---- pure parts: window and topic map ---------------------------------------------------------


class Window:
    """Record timestamps (epoch ms) in ``[from_time, to_time)``; ``None`` leaves a side open."""

    def __init__(self, from_time: int | None, to_time: int | None) -> None:
        if from_time is not None and to_time is not None and from_time >= to_time:
            raise ConfigError(f"restore.from_time: {from_time} is not before restore.to_time {to_time}; "
                              "the window is [--from-time, --to-time) in epoch milliseconds")
        self.from_time = from_time
        self.to_time = to_time

    def contains(self, ts: int) -> bool:
        return (self.from_time is None or ts >= self.from_time) and (self.to_time is None or ts < self.to_time)

    def covers(self, seg: layout.SegmentInfo) -> bool:
        """Every record of the segment is inside: count it from the checkpoint, unread."""
        if self.from_time is None and self.to_time is None:
            return True
        return seg.min_ts is not None and seg.max_ts is not None and self.contains(seg.min_ts) and self.contains(
            seg.max_ts)

    def misses(self, seg: layout.SegmentInfo) -> bool:
        """No record of the segment is inside: never read it."""
        if seg.min_ts is None or seg.max_ts is None:
            return False
        return ((self.to_time is not None and seg.min_ts >= self.to_time)
                or (self.from_time is not None and seg.max_ts < self.from_time))


def parse_topic_map(entries: list[str]) -> dict[str, str]:
    """``["a:b", ...]`` -> ``{"a": "b"}``; syntax only (the backup's topics are checked later)."""
    mapping: dict[str, str] = {}
    for entry in entries:
        source, sep, target = entry.partition(":")
        source, target = source.strip(), target.strip()
        if not sep or not source or not target:
            raise ConfigError(f"restore.topic_map: {entry!r} is not source:target; write --topic-map a:b,c:d")
        if not TOPIC_NAME.match(target):
            raise ConfigError(f"restore.topic_map: {target!r} is not a valid topic name "
                              "(1-249 letters, digits, '.', '_' or '-')")
        if source in mapping:
            raise ConfigError(f"restore.topic_map: {source!r} is mapped twice; give each source topic once")
        mapping[source] = target
    return mapping


def resolve_topic_map(mapping: dict[str, str], backup_topics: dict[str, int], backup_id: str) -> dict[str, str]:
    """Every topic of the backup to its target; unmapped topics keep their name.

    Two sources into one target would interleave two partitions' records in one
    target partition, which breaks ordering and the resume check: refused.
    """
    unknown = sorted(set(mapping) - set(backup_topics))
    if unknown:
        raise ConfigError(f"restore.topic_map: {unknown[0]!r} is not in backup {backup_id!r} "
                          f"(its topics: {', '.join(sorted(backup_topics))})")
    resolved = {t: mapping.get(t, t) for t in sorted(backup_topics)}
    seen: dict[str, str] = {}
    for source, target in resolved.items():
        if target in seen:
            raise ConfigError(f"restore.topic_map: {seen[target]!r} and {source!r} would both restore into "
                              f"{target!r}; map them to different topics")
        seen[target] = source
    return resolved


class TargetLimits:
    """One target topic's age limits and, once scoped, how many records in scope they would hit."""

    def __init__(self, target: str, created: bool, deletes: tuple[int, str] | None,
                 refuses: tuple[int, str] | None) -> None:
        self.target = target
        self.created = created  # created by this restore, with the source's recorded configuration
        self.deletes = deletes  # (cutoff ms, setting): retention deletes records older than the cutoff
        self.refuses = refuses  # (cutoff ms, setting): the broker rejects records older than the cutoff
        self.deleted = 0
        self.refused = 0
        self.oldest: int | None = None


# ---- the worker --------------------------------------------------------------------------------


class RestoreWorker:
    def __init__(self, bootstrap_servers: str, rcfg: RestoreConfig, storage: Storage, emitter: Emitter,
                 progress_file=None) -> None:
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
        self.segments_of: dict[tuple[str, int], list[layout.SegmentInfo]] = {}
        self.owner_of: dict[str, tuple[str, int]] = {}  # segment key -> the partition whose index names it
        self.cache: dict[str, list[segments.StoredRecord]] = {}
        self.cache_bytes = 0
        self.checked: set[str] = set()  # segments read and checked this run
        self.unverified: set[str] = set()  # of those, without a digest (layout 1)
        self.started_emitted = False
        self._adopted_bytes = 0  # key+value bytes of records adopted on resume, for their RestoreProgress
        self.paced = 0
        self.pace_start: float | None = None
        self.in_flight = 0  # records produced, not yet acknowledged
        self.unreported = [0, 0]  # records and bytes claimed since the last checkpoint
        self.checkpointed_at = time.monotonic()
        self.batch_size = rcfg.batch_records
        if rcfg.rate_limit:
            self.batch_size = max(1, min(rcfg.batch_records, int(rcfg.rate_limit * RATE_SLICE_S)))
        self.progress_file = progress_file if progress_file is not None else sys.stderr
        self.bar = None
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        storage.listener = self._on_storage_op

    # -- telemetry hooks -------------------------------------------------

    def _on_storage_op(self, r: OpReport) -> None:
        self.emitter.storage_op(self.storage.name, r)

    def _on_kafka_error(self, err: KafkaError) -> None:
        self.emitter.kafka_error(err, "produce")

    def _error(self, error_type: str, message: str, operation: str = "produce") -> None:
        self.emitter.emit(ev.ErrorRaised, error_type=error_type, transient=False, operation=operation,
                          backend=self.storage.name if operation == "read" else "", message=message[:500])

    # -- run -------------------------------------------------------------

    def run(self) -> int:
        started = time.monotonic()
        status, reason = "failure", ""
        try:
            self._prepare()
            self._restore_all()
            self._complete()
            status = "success"
        except RestoreInterrupted as err:
            status, reason = "interrupted", str(err)
            raise
        except (RestoreFailed, ConfigError) as err:
            reason = str(err)
            raise
        except layout.MetadataError as err:
            reason = metadata_failure(self.emitter, err)
            raise RestoreFailed(reason) from None
        except (StorageError, KafkaException) as err:
            reason = self.emitter.run_failure(err, "produce")
            raise RestoreFailed(reason) from None
        finally:
            if not self.started_emitted:
                self._emit_started()
            if self.checked:
                self.emitter.emit(ev.SegmentsChecked, backup_id=self.backup_id, segments=len(self.checked),
                                  unverified=len(self.unverified))
            if self.bar is not None:
                self.bar.close()
            self.emitter.emit(ev.JobEnded, status=status, duration_s=time.monotonic() - started,
                              reason=reason[:500])
            if self._producer is not None:
                self._producer.flush(10)
            if self._consumer is not None:
                try:
                    self._consumer.close()
                except Exception:  # closing must not mask the run's outcome
                    pass
        return 0

    def stop(self, *_args) -> None:
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
        manifest = self._read_manifest()
        if not manifest.topics:
            raise ConfigError(f"restore.backup_id: backup {self.backup_id!r} holds no topics yet; "
                              "run a backup first")
        key = layout.restore_checkpoint_key(self.backup_id, self.id)
        raw = self.storage.get_optional(key, "checkpoint", report=True)
        if raw is not None:
            # the scope is the checkpoint's: topics a continuous backup added since are not part of it
            cp = layout.decode_restore_checkpoint(raw, key)
            mapping = resolve_topic_map(self.requested_map, dict.fromkeys(cp.topic_map, 0), self.backup_id)
            self._check_same_restore(cp, mapping)
            if cp.offset_header != self.cfg.offset_header:
                log.warning("restore %s was started with offset_header %s: resuming with it (a restore's "
                            "records are all alike)", self.id, cp.offset_header)
            counts: dict[str, int] = {}
            for cur in cp.partitions:
                counts[cur.topic] = max(counts.get(cur.topic, 0), cur.partition + 1)
            missing = self._check_targets(mapping, counts)
            self._create_topics(missing, mapping, manifest)
            self.checkpoint = cp
            # a finished partition gets no more of our records: whatever follows them is not ours to check
            adopted = sum(self._reconcile(cur) for cur in cp.partitions if cur.restored < cur.records)
            if adopted:
                self._write_checkpoint()
            log.info("resuming restore %s at %d of %d records", self.id, cp.restored_total, cp.total_records)
        else:
            mapping = resolve_topic_map(self.requested_map, manifest.topics, self.backup_id)
            counts = {t: manifest.topics[t] for t in mapping}
            missing = self._check_targets(mapping, counts)
            limits = self._target_limits(mapping, missing, manifest)
            cp = self._scope(mapping, counts, limits)
            self._check_limits(cp, limits)
            self._create_topics(missing, mapping, manifest)
            for cur in cp.partitions:
                cur.target_base = cur.target_next = self._high_watermark(cur.target_topic, cur.partition)
            self.checkpoint = cp
            self._write_checkpoint()  # before the first record: a crash from here on is resumable exactly
            adopted = 0
        self._emit_started()
        if adopted:
            # produced and acknowledged by the run that crashed, which never reported them
            self.emitter.emit(ev.RestoreProgress, records=adopted, restored_total=cp.restored_total,
                              bytes=self._adopted_bytes, restored_bytes=cp.restored_bytes)
        self._open_bar()

    def _read_manifest(self) -> layout.Manifest:
        try:
            raw = self.storage.get(layout.manifest_key(self.backup_id), "manifest")
        except StorageError as err:
            if err.error_type != "not_found":
                raise
            backend = self.storage.backend
            if isinstance(backend, FileBackend) and not os.path.isdir(backend.root):
                raise ConfigError(f"restore.storage: {backend.root} does not exist; give the --storage the "
                                  "backup wrote to") from None
            if "NoSuchBucket" in str(err):
                raise ConfigError(f"restore.storage: bucket of {self.cfg.storage!r} does not exist; give the "
                                  "--storage the backup wrote to") from None
            raise ConfigError(f"restore.backup_id: no backup {self.backup_id!r} in {self.cfg.storage} "
                              f"(no {layout.manifest_key(self.backup_id)}); check --backup-id and --storage"
                              ) from None
        return layout.decode_manifest(raw, layout.manifest_key(self.backup_id))

    def _check_same_restore(self, cp: layout.RestoreCheckpoint, mapping: dict[str, str]) -> None:
        """A resume must restore the same scope, or the checkpoint's offsets would mean something else."""
        for name, was, now in (("from_time", cp.from_time, self.window.from_time),
                               ("to_time", cp.to_time, self.window.to_time),
                               ("topic_map", cp.topic_map, mapping)):
            if was != now:
                raise ConfigError(f"restore.{name}: restore {self.id!r} was started with {name} {was!r}, "
                                  f"not {now!r}; resume with the same flags or use a new --restore-id")

    def _check_targets(self, mapping: dict[str, str], counts: dict[str, int]) -> dict[str, int]:
        """Refuse a target with fewer partitions (source partition p goes to target partition p).

        Returns the missing targets with the partition count to create them with.
        """
        md = AdminClient(client_config(self.bootstrap)).list_topics(timeout=15)
        missing: dict[str, int] = {}
        for source, target in mapping.items():
            topic = md.topics.get(target)
            if topic is None or topic.error is not None:
                if not self.cfg.create_topics:
                    self._error("offset_invalid", f"target topic {target} does not exist")
                    raise ConfigError(f"restore.create_topics: target topic {target!r} does not exist and "
                                      "creating topics is off; create it or set restore.create_topics: true")
                missing[target] = counts[source]
                continue
            have, need = len(topic.partitions), counts[source]
            if have < need:
                self._error("offset_invalid", f"target topic {target} has {have} partitions, source {source} "
                                              f"has {need}")
                raise ConfigError(
                    f"restore.topic_map: target topic {target!r} has {have} partitions, fewer than the {need} "
                    f"of {source!r} in the backup; map it to a new topic (--topic-map {source}:NEW_NAME) or "
                    f"add partitions to {target!r}")
        return missing

    def _target_limits(self, mapping: dict[str, str], missing: dict[str, int],
                       manifest: layout.Manifest, create: bool = True) -> dict[str, TargetLimits]:
        """Per source topic: its target, and below which record timestamp the target deletes or refuses.

        An existing target's configuration is read from the cluster; a missing one will be created
        with the source's recorded configuration, which is what counts. A backup too old to have
        recorded it (layout 1) gets its missing targets created now, with the broker's defaults,
        and those are read back and checked like any existing topic.
        """
        now_ms = int(time.time() * 1000)
        unknown = {t: missing.pop(t) for s, t in mapping.items() if t in missing and s not in manifest.topic_configs}
        if create:
            self._create_topics(unknown, mapping, manifest)
        else:  # a dry run: the broker's defaults are unknown until the topic exists
            missing.update(unknown)
        existing = [t for t in mapping.values() if t not in missing]
        try:
            described = topic_configs.describe(AdminClient(client_config(self.bootstrap)), existing)
        except KafkaException as err:
            message = f"cannot read the configuration of target topics {', '.join(existing)}: {err.args[0].str()}"
            self._error("retention", message)
            if not self.cfg.allow_retention_loss:
                raise ConfigError(f"restore.allow_retention_loss: {message}, so records the targets would delete "
                                  "cannot be counted; grant DescribeConfigs on them or pass "
                                  "--allow-retention-loss") from None
            log.warning("%s; going on without the retention check (--allow-retention-loss)", message)
            described = {t: layout.TopicSnapshot(0) for t in existing}
        limits = {}
        for source, target in mapping.items():
            snap = described.get(target) or manifest.topic_configs.get(source) or layout.TopicSnapshot(0)
            limits[source] = TargetLimits(target, target in missing,
                                          topic_configs.deletes_before(snap.configs, now_ms),
                                          topic_configs.refuses_before(snap.configs, now_ms))
        return limits

    def _check_limits(self, cp: layout.RestoreCheckpoint, limits: dict[str, TargetLimits]) -> None:
        """Refuse, in one line, a restore whose target would delete (or reject) records in scope."""
        for source, lim in limits.items():
            scope = sum(c.records for c in cp.partitions if c.topic == source)
            how = "will be created with" if lim.created else "has"
            when = (f"the oldest is {topic_configs.iso(lim.oldest)}" if lim.oldest is not None else "")
            if lim.refused:
                assert lim.refuses is not None
                message = (f"target topic {lim.target!r} {how} {lim.refuses[1]}: {lim.refused} of {scope} records "
                           f"in scope are older ({when}) and the broker would reject them")
                self._error("retention", message)
                raise ConfigError(f"restore.topic_map: {message}; raise that setting on the target (create it "
                                  "yourself first) or map it to a topic without the limit")
            if lim.deleted:
                assert lim.deletes is not None
                message = (f"target topic {lim.target!r} {how} {lim.deletes[1]}: {lim.deleted} of {scope} records "
                           f"in scope are older ({when}) and the broker would delete them soon after the restore")
                self._error("retention", message)
                if not self.cfg.allow_retention_loss:
                    raise ConfigError(f"restore.allow_retention_loss: {message}; raise the target's retention.ms "
                                      "(-1 keeps records forever; create the topic yourself first if it does not "
                                      "exist) or pass --allow-retention-loss to accept the loss")
                log.warning("%s; going on: --allow-retention-loss", message)

    def _create_topics(self, missing: dict[str, int], mapping: dict[str, str] | None = None,
                       manifest: layout.Manifest | None = None) -> None:
        """Missing targets get the source's partition count and recorded configuration (retention, cleanup
        policy, compaction, message size, timestamp type ...), and the broker's default replication.
        A backup too old to have recorded the configuration gives the broker's defaults."""
        if not missing:
            return
        source_of = {t: s for s, t in (mapping or {}).items()}
        recorded = manifest.topic_configs if manifest is not None else {}

        def new_topic(target: str, partitions: int) -> NewTopic:
            snap = recorded.get(source_of.get(target, ""))
            return NewTopic(target, partitions, config=dict(snap.configs) if snap else {})

        admin = AdminClient(client_config(self.bootstrap))
        futures = admin.create_topics([new_topic(t, n) for t, n in missing.items()], operation_timeout=15)
        for name, fut in futures.items():
            try:
                fut.result(15)
                log.info("created target topic %s", name)
            except KafkaException as err:
                if err.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # metadata of new topics can lag their creation
            md = admin.list_topics(timeout=5).topics
            if all(name in md and md[name].error is None and md[name].partitions for name in missing):
                return
            time.sleep(0.2)

    def _scope(self, mapping: dict[str, str], counts: dict[str, int],
               limits: dict[str, TargetLimits] | None = None) -> layout.RestoreCheckpoint:
        """Records in scope per partition, exactly; with ``limits``, also how many of them each target
        would delete or refuse, and the oldest one's timestamp (``TargetLimits``)."""
        now = time.time()
        cp = layout.RestoreCheckpoint(self.id, self.backup_id, mapping, 0, self.window.from_time,
                                      self.window.to_time, created_ts=now, updated_ts=now,
                                      offset_header=self.cfg.offset_header)
        for topic in mapping:
            lim = (limits or {}).get(topic)
            cutoffs = [lim.deletes[0] if lim and lim.deletes else None, lim.refuses[0] if lim and lim.refuses else None]
            for p in range(counts[topic]):
                bcp = self._backup_checkpoint(topic, p)
                records = 0
                for seg in self.segments_of[(topic, p)]:
                    n, older, oldest = self._count(seg, cutoffs)
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

    def _backup_checkpoint(self, topic: str, partition: int) -> layout.Checkpoint:
        key = layout.checkpoint_key(self.backup_id, topic, partition)
        raw = self.storage.get_optional(key, "checkpoint", report=True)
        # a partition that never had a record has no checkpoint: it is empty, not missing
        cp = layout.decode_checkpoint(raw, key) if raw else layout.Checkpoint(topic, partition, 0)
        if (cp.topic, cp.partition) != (topic, partition):
            raise layout.MetadataError(key, f"belongs to {cp.topic}/{cp.partition}, not {topic}/{partition}",
                                       "integrity")
        listed = layout.all_segments(cp, lambda k: self.storage.get(k, "index"), self.backup_id)
        self.segments_of[(topic, partition)] = sorted(listed, key=lambda s: s.start_offset)
        self.owner_of.update((seg.key, (topic, partition)) for seg in listed)
        return cp

    def _segments(self, cur: layout.RestoreCursor) -> list[layout.SegmentInfo]:
        key = (cur.topic, cur.partition)
        if key not in self.segments_of:
            self._backup_checkpoint(cur.topic, cur.partition)
        return self.segments_of[key]

    def _count(self, seg: layout.SegmentInfo,
               cutoffs: list[int | None] | None = None) -> tuple[int, list[int], int | None]:
        """Records of ``seg`` in the window; of those, how many are older than each cutoff; the oldest's time.

        Read only when the checkpoint's ``min_ts``/``max_ts`` cannot answer (a window edge or a
        cutoff falls inside the segment)."""
        cutoffs = cutoffs or []
        if self.window.misses(seg):
            return 0, [0] * len(cutoffs), None
        known = seg.min_ts is not None and seg.max_ts is not None
        if self.window.covers(seg) and known and all(
                c is None or seg.max_ts < c or seg.min_ts >= c for c in cutoffs):
            return seg.records, [seg.records if c is not None and seg.max_ts < c else 0 for c in cutoffs], seg.min_ts
        if self.window.covers(seg) and not cutoffs:
            return seg.records, [], seg.min_ts
        records = self._load(seg)
        inside = [r.timestamp for r in records if self.window.contains(r.timestamp)]
        if inside and self.cache_bytes + seg.uncompressed_bytes <= PARTIAL_CACHE_BYTES:
            self.cache[seg.key] = records
            self.cache_bytes += seg.uncompressed_bytes
        older = [0 if c is None else sum(1 for t in inside if t < c) for c in cutoffs]
        return len(inside), older, min(inside, default=None)

    def _load(self, seg: layout.SegmentInfo) -> list[segments.StoredRecord]:
        cached = self.cache.pop(seg.key, None)
        if cached is not None:
            self.cache_bytes -= seg.uncompressed_bytes
            return cached
        data = self.storage.get(seg.key, "segment")
        topic, partition = self._owner(seg)
        try:
            records = layout.read_segment(data, seg, topic, partition)
        except layout.SegmentDamaged as err:
            self._error(err.error_type, str(err), operation="read")
            raise RestoreFailed(f"segment {err}; it is refused (records before it are restored and "
                                "checkpointed, its own records are not)") from None
        self.checked.add(seg.key)
        if not seg.sha256:
            self.unverified.add(seg.key)
        return records

    def _owner(self, seg: layout.SegmentInfo) -> tuple[str, int]:
        """The partition whose index names ``seg``: its records must be that partition's."""
        return self.owner_of[seg.key]

    def _records(self, cur: layout.RestoreCursor, start: int) -> Iterator[segments.StoredRecord]:
        """The partition's in-scope records from source offset ``start``, in offset order."""
        for seg in self._segments(cur):
            if seg.end_offset <= start or seg.start_offset >= cur.end_offset or self.window.misses(seg):
                continue
            for r in self._load(seg):
                if start <= r.offset < cur.end_offset and self.window.contains(r.timestamp):
                    yield r

    # -- target side -----------------------------------------------------

    @property
    def producer(self) -> Producer:
        """Made on first use: nothing connects to the target before the scope is known."""
        if self._producer is None:
            self._producer = Producer(client_config(self.bootstrap, **{
                "enable.idempotence": True,  # in order, no gaps, no retry duplicates: what resume relies on
                "linger.ms": 5,
                "message.timeout.ms": 120_000,
                "error_cb": self._on_kafka_error,
            }))
        return self._producer

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(client_config(self.bootstrap, **{
                "group.id": f"kafka-backup-restore.{self.id}",  # never joined, never committed
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }))
        return self._consumer

    def _high_watermark(self, topic: str, partition: int) -> int:
        last: Exception | None = None
        for attempt in range(5):
            try:
                return self.consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1]
            except KafkaException as err:  # a just-created topic may not be served yet
                last = err
                time.sleep(0.2 * (attempt + 1))
        assert last is not None
        raise last

    def _reconcile(self, cur: layout.RestoreCursor) -> int:
        """Adopt records acknowledged after the last checkpoint (see the module docstring)."""
        hwm = self._high_watermark(cur.target_topic, cur.partition)
        if hwm == cur.target_next:
            return 0
        where = f"{cur.target_topic}/{cur.partition}"
        if hwm < cur.target_next:
            self._error("offset_invalid", f"target {where} ends at {hwm}, before {cur.target_next}")
            raise RestoreFailed(f"target partition {where} ends at offset {hwm}, before the {cur.target_next} "
                                "this restore had written: it was truncated or recreated; restore with a new "
                                "--restore-id into a new topic")
        extra = hwm - cur.target_next
        expected = list(islice(self._records(cur, cur.next_offset), extra))
        actual = self._read_target(cur.target_topic, cur.partition, cur.target_next, extra)
        if len(expected) != extra or [(r.key, r.value, self._headers(r)) for r in expected] != actual:
            self._error("offset_invalid", f"target {where} has {extra} records after {cur.target_next} "
                                          "that this restore did not write")
            raise RestoreFailed(f"target partition {where} has {extra} records after offset {cur.target_next} "
                                "that this restore did not write; stop other producers to it, or restore "
                                "into a new topic with a new --restore-id")
        log.warning("restore %s: adopting %d records in %s acknowledged after the last checkpoint",
                    self.id, extra, where)
        cur.next_offset = expected[-1].offset + 1
        cur.restored += extra
        cur.target_next = hwm
        assert self.checkpoint is not None
        adopted_bytes = sum(r.size for r in expected)
        self.checkpoint.restored_total += extra
        self.checkpoint.restored_bytes += adopted_bytes
        self._adopted_bytes += adopted_bytes
        return extra

    def _read_target(self, topic: str, partition: int, start: int, n: int) -> list[tuple]:
        c = self.consumer
        c.assign([TopicPartition(topic, partition, start)])
        out: list[tuple] = []
        deadline = time.monotonic() + 30
        try:
            while len(out) < n and time.monotonic() < deadline:
                for msg in c.consume(num_messages=min(n - len(out), 1000), timeout=1.0):
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            return out
                        raise KafkaException(err)
                    out.append((msg.key(), msg.value(), list(msg.headers() or [])))
        finally:
            c.unassign()
        return out

    # -- producing -------------------------------------------------------

    def _open_bar(self) -> None:
        """tqdm's bar (records, rate, ETA) on a terminal; nothing when stderr is a file or a pipe."""
        from tqdm import tqdm

        cp = self.checkpoint
        assert cp is not None
        interactive = hasattr(self.progress_file, "isatty") and self.progress_file.isatty()
        self.bar = tqdm(total=cp.total_records, initial=cp.restored_total, unit="rec", unit_scale=True,
                        desc=f"restore {self.id}", file=self.progress_file, disable=not interactive,
                        dynamic_ncols=True)

    def _restore_all(self) -> None:
        cp = self.checkpoint
        assert cp is not None
        try:
            for cur in cp.partitions:
                if cur.restored < cur.records:
                    self._restore_partition(cur)
        except RestoreInterrupted:
            raise RestoreInterrupted(f"stopped at {cp.restored_total} of {cp.total_records} records; run "
                                     f"again with --restore-id {self.id} to resume") from None

    def _restore_partition(self, cur: layout.RestoreCursor) -> None:
        records = self._records(cur, cur.next_offset)
        flights: deque[Flight] = deque()
        batch: list[segments.StoredRecord] = []
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
        finally:  # stopping, failing or done: what was sent is acknowledged, then checkpointed
            self._settle(cur, flights, wait=True)
            self._checkpoint_progress()

    def _pace(self, n: int) -> None:
        """Hold ``rate_limit`` records/s over the run: a batch waits until its records are due."""
        if self.stopping.is_set():
            raise RestoreInterrupted("stop requested")
        if not self.cfg.rate_limit:
            return
        now = time.monotonic()
        if self.pace_start is None:
            self.pace_start = now
        delay = self.pace_start + (self.paced + n) / self.cfg.rate_limit - now
        if delay > 0 and self.stopping.wait(delay):
            raise RestoreInterrupted("stop requested")
        self.paced += n

    def _headers(self, r: segments.StoredRecord) -> list[tuple[str, bytes | None]]:
        """The record's headers, and (unless ``restore.offset_header`` was off when the restore began)
        ``kafka-backup.offset``: its source offset, appended last, for ``offset-reset --from-backup``."""
        assert self.checkpoint is not None
        if not self.checkpoint.offset_header:
            return list(r.headers)
        return [*r.headers, (layout.OFFSET_HEADER, str(r.offset).encode())]

    def _send(self, cur: layout.RestoreCursor, batch: list[segments.StoredRecord], flights: deque) -> None:
        """Produce a batch without waiting for it; settle the batches before it that are acknowledged."""
        self._pace(len(batch))
        flight = Flight(batch)
        flights.append(flight)
        self.in_flight += len(batch)
        produce, delivered = self.producer.produce, flight.delivered
        topic, partition = cur.target_topic, cur.partition
        for r in batch:
            while True:
                try:
                    produce(topic, value=r.value, key=r.key, partition=partition,
                            timestamp=r.timestamp if r.timestamp > 0 else 0,
                            headers=self._headers(r) or None, on_delivery=delivered)
                    break
                except BufferError:  # local queue full: serve deliveries, then retry this record
                    self.producer.poll(0.1)
        self.producer.poll(0)
        # paced (rate limit): each batch is acknowledged and claimed before the next is due, as progress
        # should move with the pace; unpaced: batches stay in flight
        self._settle(cur, flights, wait=bool(self.cfg.rate_limit))
        while self.in_flight > MAX_IN_FLIGHT:
            self.producer.poll(0.1)
            self.emitter.poll()
            self._settle(cur, flights, wait=False)

    def _settle(self, cur: layout.RestoreCursor, flights: deque, wait: bool) -> None:
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
                self._checkpoint_progress()  # the batches before this one are good
                err = flight.failures[0] if flight.failures else None
                error_type, transient = classify_kafka_error(err) if err else ("broker_connection", True)
                text = err.str() if err else "records not acknowledged"
                self.emitter.emit(ev.ErrorRaised, error_type=error_type, transient=transient, operation="produce",
                                  message=text[:500])
                raise RestoreFailed(f"target {cur.target_topic}/{cur.partition}: {text}; the checkpoint holds the "
                                    f"last acknowledged batch, run again with --restore-id {self.id} to resume")
            batch = flight.batch
            cur.next_offset = batch[-1].offset + 1
            cur.restored += len(batch)
            cur.target_next = max(flight.offsets) + 1
            cp = self.checkpoint
            assert cp is not None
            batch_bytes = sum(r.size for r in batch)
            cp.restored_total += len(batch)
            cp.restored_bytes += batch_bytes
            self.unreported[0] += len(batch)
            self.unreported[1] += batch_bytes
            if self.bar is not None:
                self.bar.update(len(batch))
            if (self.unreported[1] >= CHECKPOINT_EVERY_BYTES or self.cfg.rate_limit
                    or time.monotonic() - self.checkpointed_at >= CHECKPOINT_EVERY_S):
                self._checkpoint_progress()

    def _checkpoint_progress(self) -> None:
        """Write the checkpoint with every claimed batch, then report them in one ``RestoreProgress``."""
        self.checkpointed_at = time.monotonic()
        records, nbytes = self.unreported
        if not records:
            return
        cp = self.checkpoint
        assert cp is not None
        self._write_checkpoint()
        self.unreported = [0, 0]
        self.emitter.emit(ev.RestoreProgress, records=records, restored_total=cp.restored_total,
                          bytes=nbytes, restored_bytes=cp.restored_bytes)
        self.emitter.poll()

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


class Flight:
    """One produced batch and its delivery reports."""

    __slots__ = ("batch", "offsets", "failures")

    def __init__(self, batch: list[segments.StoredRecord]) -> None:
        self.batch = batch
        self.offsets: list[int] = []
        self.failures: list[KafkaError] = []

    def delivered(self, err: KafkaError | None, msg) -> None:
        if err is None:
            self.offsets.append(msg.offset())
        else:
            self.failures.append(err)

    @property
    def done(self) -> bool:
        return len(self.offsets) + len(self.failures) >= len(self.batch)


class Plan:
    """What a restore would do, found the way the restore finds it, with nothing written."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, str, int, int]] = []  # source topic, partition, target, records, bytes
        self.targets: list[tuple[str, str]] = []  # target, what happens to it
        self.refusals: list[str] = []
        self.resume: str = ""
        self.estimate: str = ""


def plan_restore(worker: RestoreWorker) -> Plan:
    """A dry run: the scope, the targets, the retention verdict and an estimate; no write anywhere.

    Reads the backup's metadata (and the segments a time window cuts, as the restore counts them)
    and the target cluster's metadata and topic configurations; creates, produces, checkpoints and
    emits nothing.
    """
    plan = Plan()
    manifest = worker._read_manifest()
    if not manifest.topics:
        raise ConfigError(f"restore.backup_id: backup {worker.backup_id!r} holds no topics yet; run a backup first")
    key = layout.restore_checkpoint_key(worker.backup_id, worker.id)
    raw = worker.storage.get_optional(key, "checkpoint")
    if raw is not None:
        cp = layout.decode_restore_checkpoint(raw, key)
        plan.resume = (f"restore {worker.id!r} exists: the run would resume at {cp.restored_total:,} of "
                       f"{cp.total_records:,} records")
        mapping = resolve_topic_map(worker.requested_map, dict.fromkeys(cp.topic_map, 0), worker.backup_id)
        try:
            worker._check_same_restore(cp, mapping)
        except ConfigError as err:
            plan.refusals.append(str(err))
        for cur in cp.partitions:
            plan.rows.append((cur.topic, cur.partition, cur.target_topic, cur.records - cur.restored, -1))
        remaining = cp.total_records - cp.restored_total
    else:
        mapping = resolve_topic_map(worker.requested_map, manifest.topics, worker.backup_id)
        counts = {t: manifest.topics[t] for t in mapping}
        try:
            missing = worker._check_targets(mapping, counts)
        except ConfigError as err:
            plan.refusals.append(str(err))
            missing = {}
        created = dict(missing)
        limits = worker._target_limits(mapping, missing, manifest, create=False)
        cp = worker._scope(mapping, counts, limits)
        try:
            worker._check_limits(cp, limits)
        except ConfigError as err:
            plan.refusals.append(str(err))
        for source, target in sorted(mapping.items()):
            if target in created:
                snap = manifest.topic_configs.get(source)
                configs = ", ".join(f"{k}={v}" for k, v in sorted(snap.configs.items())) if snap else ""
                what = (f"would be created with {created[target]} partitions and the source's configuration"
                        f"{': ' + configs if configs else ''}" if snap else
                        f"would be created with {created[target]} partitions and the broker's defaults "
                        "(this backup recorded no topic configuration)")
            else:
                what = "exists"
            lim = limits[source]
            verdict = ("retention: keeps every record in scope" if not (lim.deleted or lim.refused) else
                       f"retention: would delete {lim.deleted:,} and reject {lim.refused:,} of the records in scope")
            plan.targets.append((target, f"{what}; {verdict}"))
        for cur in cp.partitions:
            plan.rows.append((cur.topic, cur.partition, cur.target_topic, cur.records,
                              sum(_bytes_in(worker, seg) for seg in worker._segments(cur))))
        remaining = cp.total_records
    plan.estimate = _estimate(worker, remaining)
    return plan


def _bytes_in(worker: RestoreWorker, seg: layout.SegmentInfo) -> int:
    """Key + value bytes of the segment's records inside the window, as the restore reports them."""
    if worker.window.misses(seg):
        return 0
    if worker.window.covers(seg):
        return seg.bytes
    return sum(len(r.key or b"") + len(r.value or b"") for r in worker._load(seg)
               if worker.window.contains(r.timestamp))


def _estimate(worker: RestoreWorker, remaining: int) -> str:
    """From the rate limit, else from the fastest earlier restore of this backup that completed."""
    if remaining == 0:
        return "nothing to restore"
    if worker.cfg.rate_limit:
        return f"about {remaining / worker.cfg.rate_limit:,.0f} s at the rate limit of {worker.cfg.rate_limit:,}/s"
    best = None
    for rid in worker.storage.children(f"{worker.backup_id}/restores/"):
        raw = worker.storage.get_optional(layout.restore_checkpoint_key(worker.backup_id, rid), "checkpoint")
        if raw is None:
            continue
        try:
            cp = layout.decode_restore_checkpoint(raw, rid)
        except layout.MetadataError:
            continue
        if cp.completed_ts and cp.completed_ts > cp.created_ts and cp.restored_total:
            rate = cp.restored_total / (cp.completed_ts - cp.created_ts)
            best = max(best or 0.0, rate)
    if best:
        return f"about {remaining / best:,.0f} s at {best:,.0f} records/s, measured by an earlier restore of this backup"
    return "unknown: no rate limit, and no earlier restore of this backup to measure one"


def run_dry(bootstrap: str, rcfg: RestoreConfig, storage: Storage, out=None) -> int:
    """``restore --dry-run``: print the plan; exit 1 when the real restore would refuse to start."""
    from kafka_backup.producers.verify import NullEmitter

    out = out or sys.stdout
    worker = RestoreWorker(bootstrap, rcfg, storage, NullEmitter())
    plan = plan_restore(worker)
    w = out.write
    w(f"dry run of restore {worker.id!r} of backup {worker.backup_id!r}: nothing is written\n")
    if plan.resume:
        w(plan.resume + "\n")
    window = worker.window
    if window.from_time is not None or window.to_time is not None:
        w(f"time window: [{window.from_time}, {window.to_time}) ms\n")
    w(f"{'SOURCE':<30} {'PART':>4}  {'TARGET':<30} {'RECORDS':>12} {'BYTES':>14}\n")
    for topic, p, target, records, nbytes in plan.rows:
        w(f"{topic:<30} {p:>4}  {target:<30} {records:>12,} {(f'{nbytes:,}' if nbytes >= 0 else '-'):>14}\n")
    total = sum(r[3] for r in plan.rows)
    total_bytes = sum(r[4] for r in plan.rows if r[4] >= 0)
    w(f"{'total':<30} {'':>4}  {'':<30} {total:>12,} {total_bytes:>14,}\n")
    for target, what in plan.targets:
        w(f"target {target}: {what}\n")
    w(f"estimated duration: {plan.estimate}\n")
    for refusal in plan.refusals:
        w(f"WOULD REFUSE: {refusal}\n")
    w("verdict: " + ("the restore would refuse to start\n" if plan.refusals else "the restore would start\n"))
    return 1 if plan.refusals else 0


def run_restore(bootstrap: str, telemetry_bootstrap: str, rcfg: RestoreConfig, tcfg: TelemetryConfig,
                storage: Storage, dry_run: bool = False) -> int:
    Window(rcfg.from_time, rcfg.to_time)  # user mistakes fail before anything is emitted
    parse_topic_map(rcfg.topic_map)
    if dry_run:
        return run_dry(bootstrap, rcfg, storage)
    emitter = Emitter(telemetry_bootstrap or bootstrap, tcfg, "restore", rcfg.restore_id)
    return run_reporting(RestoreWorker(bootstrap, rcfg, storage, emitter), emitter)
