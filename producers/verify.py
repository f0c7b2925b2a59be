"""``kafka-backup verify``: prove a backup restorable without restoring it.

Reads every segment a partition's index names (the checkpoint head and its
sealed chunks, each chunk checked against the digest naming it) and checks,
per segment: present, the recorded size, the recorded SHA-256, decodable
within the recorded uncompressed size, and holding exactly the records the
index claims (the partition's, as many, at the offsets claimed). Per
partition: offset continuity, i.e. each segment starts its coverage where the
previous one ended (``covers_from``) without overlap, and the last one ends
at the checkpoint's next offset.

Each bad segment is printed with its storage key, each gap with its offsets;
any of either makes the run fail (exit status 1). Unusable metadata (a garbled
checkpoint or manifest, a newer layout, a key outside the backup) stops the
run with one line naming the object.

Telemetry: kind ``verify``, job = the backup id. ``JobStarted``, one
``ErrorRaised`` per bad segment or gap (``integrity``, ``codec``,
``storage_io``, ``gap``), a ``SegmentsChecked`` with the counts (``complete``
once every segment was checked), and ``JobEnded``; the exporter turns them
into ``kafka_backup_last_verified_timestamp_seconds`` and
``kafka_backup_verify_failed_segments`` ("proven restorable").
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from typing import TextIO

from kafka_backup.producers import layout
from kafka_backup.producers.index_groups import in_groups
from kafka_backup.producers.run import (
    Job,
    JobFailed,
    JobInterrupted,
    NullEmitter,
    Outcome,
    Reporter,
    run_reporting,
)
from kafka_backup.producers.storage import READ_AHEAD_BYTES, Missing, OpReport, Storage, StorageError
from kafka_backup.producers.threads import ReadAhead
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.collector import collect_rarely
from kafka_backup.schemas.config import TelemetryConfig, VerifyConfig

log = logging.getLogger("kafka_backup.verify")


class VerifyFailed(JobFailed):
    """Bad segments or gaps found, or the run could not finish: exit status 1."""


class VerifyInterrupted(VerifyFailed, JobInterrupted):
    """Stopped by SIGTERM/SIGINT: nothing is proven, status ``interrupted``."""


class VerifyWorker(Job):
    failed = VerifyFailed
    operation = "read"

    def __init__(self, cfg: VerifyConfig, storage: Storage, emitter: Reporter, out: TextIO | None = None) -> None:
        self.cfg = cfg
        self.backup_id = cfg.backup_id
        self.storage = storage
        self.emitter = emitter
        self.out = out if out is not None else sys.stdout
        self.stopping = False
        self.segments = self.records = self.bytes = self.unverified = self.partitions = 0
        self.bad: list[str] = []  # storage keys
        self.gaps: list[str] = []
        self.complete = False  # every segment checked: the verdict stands
        # segments fetched ahead, in the order checked, the storage's concurrency at a time: one after the other,
        # a backup's every segment on S3 was a round trip in a row
        self.ahead: ReadAhead[layout.SegmentInfo, bytes] = ReadAhead(
            lambda seg: self.storage.get(seg.key, "segment"), lambda seg: seg.stored_bytes, storage.concurrency,
            READ_AHEAD_BYTES, "verify-read-ahead")
        storage.listener = self._on_storage_op

    def _on_storage_op(self, r: OpReport) -> None:
        self.emitter.storage_op(self.storage.name, r)

    def stop(self, *_args: object) -> None:
        self.stopping = True

    def begin(self) -> None:
        self.emitter.emit(ev.JobStarted, backend=self.storage.name, backup_id=self.backup_id)

    def work(self) -> None:
        collect_rarely()  # the records decoded by the segment are walked no more (schemas/collector.py)
        manifest = layout.read_manifest(self.storage, self.backup_id, "verify", self.cfg.storage)
        partitions = [(topic, p) for topic, count in sorted(manifest.topics.items()) for p in range(count)]
        # The partitions' checkpoints and indexes are read a group at a time (index_groups: the next group
        # while this one's segments are checked, two groups within a bound however long the backup); the
        # segments are fetched ahead in the order checked, across partitions. An error (a garbled
        # checkpoint, storage trouble) is met in partition order.
        for group in in_groups(self.storage, self.backup_id, partitions, "verify-indexes"):
            reads = [(tp, read) for tp, read in group if read is not None]  # verify holds none: each was read
            self.ahead.extend(seg for _, read in itertools.takewhile(lambda r: r[1].exception() is None, reads)
                              for seg in read.result()[1])
            for (topic, partition), read in reads:
                self._partition(topic, partition, *read.result())
        self.complete = True
        if self.bad or self.gaps:
            raise VerifyFailed(f"backup {self.backup_id!r}: {len(self.bad)} bad segment(s), {len(self.gaps)} "
                               f"gap(s) in {self.segments} segments (listed above)")
        note = (f"; {self.unverified} written without a digest (layout 1): integrity not checkable"
                if self.unverified else "")
        print(f"verified backup {self.backup_id}: {self.segments} segments in {self.partitions} partitions, "
              f"{self.records} records, {self.bytes} bytes: all intact, no gaps{note}", file=self.out)

    def explain(self, reason: str) -> str:
        return f"{reason}; {self.segments} segments checked before it"

    def before_end(self, outcome: Outcome) -> None:
        if self.complete:
            self._record_verdict()
        self.emitter.emit(ev.SegmentsChecked, backup_id=self.backup_id, segments=self.segments,
                          bad=len(self.bad), unverified=self.unverified, gaps=len(self.gaps), complete=self.complete)

    def _record_verdict(self) -> None:
        """Beside the backup, for ``kafka-backup describe``; a storage that refuses it costs the verdict
        there, not the run (the telemetry carries it as well)."""
        doc = layout.Verification(ts=time.time(), segments=self.segments, bad=len(self.bad), gaps=len(self.gaps),
                                  unverified=self.unverified, bad_keys=self.bad[:100])
        try:
            self.storage.put(layout.verification_key(self.backup_id), layout.encode(doc), "manifest")
        except StorageError as err:
            log.warning("could not record the verdict in %s: %s", layout.verification_key(self.backup_id), err)

    def _partition(self, topic: str, partition: int, cp: layout.Checkpoint | None,
                   listed: list[layout.SegmentInfo]) -> None:
        if cp is None:
            return
        self.partitions += 1
        where = f"{topic}/{partition}"
        previous: layout.SegmentInfo | None = None
        for seg in listed:
            if self.stopping:
                raise VerifyInterrupted(f"stopped after {self.segments} segments; the backup is not proven "
                                        "until a run checks them all")
            if previous is not None:
                self._continuity(where, previous, seg)
            self._segment(seg, topic, partition)
            previous = seg
            self.emitter.poll()
        end = previous.end_offset if previous is not None else 0
        if previous is not None and end != cp.next_offset:
            self._gap(where, f"the last segment ends at offset {end}, the checkpoint's next offset is "
                             f"{cp.next_offset}")

    def _continuity(self, where: str, previous: layout.SegmentInfo, seg: layout.SegmentInfo) -> None:
        """Each segment's coverage starts where the previous one ended; layout 1 lacks ``covers_from``,
        so there only overlaps are provable (offsets may legitimately hold no record)."""
        if seg.start_offset < previous.end_offset:
            self._gap(where, f"{seg.key} starts at offset {seg.start_offset}, inside the previous segment "
                             f"(which ends at {previous.end_offset}): overlap")
        elif seg.covers_from >= 0 and seg.covers_from != previous.end_offset:
            self._gap(where, f"offsets {previous.end_offset}..{seg.covers_from - 1} are in no segment "
                             f"(before {seg.key})" if seg.covers_from > previous.end_offset else
                             f"{seg.key} covers from {seg.covers_from}, before the previous segment's end "
                             f"{previous.end_offset}: overlap")

    def _gap(self, where: str, text: str) -> None:
        line = f"GAP {where}: {text}"
        self.gaps.append(line)
        print(line, file=self.out)
        self.emitter.emit(ev.ErrorRaised, error_type="gap", transient=False, operation="verify",
                          message=line[:500])

    def _segment(self, seg: layout.SegmentInfo, topic: str, partition: int) -> None:
        self.segments += 1
        try:
            fetching = self.ahead.take(seg)
            data = fetching.result() if fetching is not None else self.storage.get(seg.key, "segment")
            records = layout.read_segment(data, seg, topic, partition)
        except Missing:  # other storage trouble is no verdict on the backup: the run fails, unfinished
            self._bad(seg.key, "missing from storage", None)  # the storage listener reported it (storage_io)
            return
        except layout.SegmentDamaged as err:
            self._bad(seg.key, str(err).removeprefix(seg.key + ": "), err.error_type)
            return
        self.records += len(records)
        self.bytes += len(data)
        if not seg.sha256:
            self.unverified += 1

    def _bad(self, key: str, problem: str, error_type: str | None) -> None:
        line = f"BAD {key}: {problem}"
        self.bad.append(key)
        print(line, file=self.out)
        if error_type is not None:
            self.emitter.emit(ev.ErrorRaised, error_type=error_type, transient=False, operation="verify",
                              backend=self.storage.name, message=line[:500])


def run_verify(telemetry_bootstrap: str, cfg: VerifyConfig, tcfg: TelemetryConfig, storage: Storage, out: TextIO | None = None) -> int:
    from kafka_backup.producers.telemetry import Emitter

    emitter: Reporter
    if telemetry_bootstrap:
        emitter = Emitter(telemetry_bootstrap, tcfg, "verify", cfg.backup_id)
    else:
        log.info("verify: no Kafka cluster given (--bootstrap-servers or KAFKA_BOOTSTRAP_SERVERS): "
                    "verifying without telemetry")
        emitter = NullEmitter()
    return run_reporting(VerifyWorker(cfg, storage, emitter, out), emitter)
