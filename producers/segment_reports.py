"""Which ``SegmentStored`` reports of a backup reached the telemetry cluster, per partition.

A segment is durable once its checkpoint is written; its report is safe once the
telemetry cluster acknowledged it (or the spool holds it). ``reported_offset`` is
the end of the longest prefix of a partition's segments whose reports are safe:
the checkpoint records it, so the next worker reports again what a killed one
may have lost, and ``kafka_backup_records_total`` catches up with the checkpoint.
A report the emitter lost (queue full, cluster away past the delivery timeout) is
kept and sent again as soon as the cluster answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kafka_backup.producers import layout
from kafka_backup.producers.telemetry import Emitter
from kafka_backup.schemas import events as ev

log = logging.getLogger("kafka_backup.backup")


@dataclass
class PartitionReports:
    topic: str
    partition: int
    reported_offset: int = 0  # every segment ending at or below it: its SegmentStored is safe
    unsettled: dict[int, bool] = field(default_factory=dict)  # end_offset -> report safe; in offset order
    lost: list[tuple[int, layout.SegmentInfo]] = field(default_factory=list)  # reports to send again

    def settled(self, covers_from: int, info: layout.SegmentInfo, safe: bool) -> None:
        """Outcome of one SegmentStored: move ``reported_offset`` over the safe prefix, or keep it to resend."""
        if not safe:
            self.lost.append((covers_from, info))
            return
        self.unsettled[info.end_offset] = True
        for end, done in list(self.unsettled.items()):
            if not done:
                break
            del self.unsettled[end]
            self.reported_offset = end

    @property
    def tp(self) -> str:
        return f"{self.topic}/{self.partition}"


class SegmentReporter:
    """Sends each stored segment's ``SegmentStored`` and follows it until it is safe.

    ``owned``: the reports of the partitions the worker owns now, asked when lost reports are sent
    again (the worker's own registry: a revoked partition's are gone with it, and its next owner
    reports again what was not confirmed).
    """

    def __init__(self, emitter: Emitter, owned: Callable[[], Iterable[PartitionReports]]) -> None:
        self.emitter = emitter
        self.owned = owned

    def report(self, reports: PartitionReports, info: layout.SegmentInfo, covers_from: int) -> None:
        reports.unsettled[info.end_offset] = False
        self.emitter.emit(ev.SegmentStored, on_delivered=lambda safe: reports.settled(covers_from, info, safe),
                          topic=reports.topic, partition=reports.partition,
                          start_offset=info.start_offset, end_offset=info.end_offset,
                          records=info.records, bytes=info.bytes, uncompressed_bytes=info.uncompressed_bytes,
                          stored_bytes=info.stored_bytes, algorithm=info.algorithm, min_ts=info.min_ts,
                          max_ts=info.max_ts, covers_from=covers_from)

    def report_unconfirmed(self, reports: PartitionReports, cp: layout.Checkpoint,
                           read_index: Callable[[str], bytes], backup_id: str) -> int:
        """Report again the checkpointed segments whose SegmentStored was not acknowledged when the
        checkpoint was written; return how many.

        A killed worker loses the events still in its producer queue, though their segments
        are durable; without this, ``records_total`` would stay short of the checkpoint for
        good. Normally this is the last segment of the previous run (its acknowledgement came
        after its checkpoint was written, and a run does not rewrite the checkpoints it stored
        segments in); the aggregator counts an offset range once.
        """
        listed = list(cp.segments)
        for chunk in layout.chunks(cp, read_index, backup_id, stop_below=reports.reported_offset):
            listed[:0] = chunk.segments  # only the sealed chunks holding unconfirmed segments are read
        previous_end = 0
        again = []
        for info in listed:
            covers_from = info.covers_from if info.covers_from >= 0 else previous_end
            if info.end_offset > reports.reported_offset:
                again.append((covers_from, info))
            previous_end = info.end_offset
        if again:
            log.debug("%s: reporting %d stored segment(s) again, their telemetry was not confirmed",
                      reports.tp, len(again))
        for covers_from, info in again:
            self.report(reports, info, covers_from)
        return len(again)

    def resend_lost(self, deadline: float = 0.0) -> None:
        """Send again the reports the emitter lost (queue full, telemetry cluster away past the delivery
        timeout) as soon as it answers, a queue's worth at a time, so ``records_total`` recovers
        within the run. At the end of a run, keep at it until ``deadline`` (monotonic)."""
        while any(r.lost for r in self.owned()):
            sent = 0
            for reports in self.owned():
                while reports.lost and self.emitter.room() > 0:
                    covers_from, info = reports.lost.pop(0)
                    self.report(reports, info, covers_from)
                    sent += 1
            if sent:
                log.info("reported %d segment(s) again whose telemetry was lost", sent)
            if time.monotonic() >= deadline:
                return
            self.emitter.flush(0.5)

    def confirm(self, wait_s: float) -> None:
        """At the end of a run: resend what was lost and wait (at most ``wait_s``) for acknowledgements."""
        deadline = time.monotonic() + wait_s
        self.resend_lost(deadline)
        self.emitter.flush(max(0.0, deadline - time.monotonic()))
