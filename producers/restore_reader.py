"""The restore's reading side: a backup's segments, read once, checked, and cut to the time window.

Segments whose ``[min_ts, max_ts]`` lie inside the window are counted from the
checkpoint without reading them; segments outside are never read; a segment
straddling a window edge is read and its records counted one by one, and kept
decoded (up to ``PARTIAL_CACHE_BYTES``) so it is read from storage once per run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from kafka_backup.producers import layout
from kafka_backup.producers.restore_scope import RestoreFailed, Window
from kafka_backup.producers.run import Reporter
from kafka_backup.producers.segments import StoredRecord  # by name: the method segments() hides the module
from kafka_backup.producers.storage import READ_AHEAD_BYTES, Storage
from kafka_backup.producers.threads import ReadAhead
from kafka_backup.schemas import events as ev

PARTIAL_CACHE_BYTES = 64 * 1024 * 1024  # decoded straddling segments kept between scoping and producing


class SegmentReader:
    """Per source partition: its segments (from the backup's checkpoint and index), and their records."""

    def __init__(self, storage: Storage, backup_id: str, window: Window, emitter: Reporter) -> None:
        self.storage = storage
        self.backup_id = backup_id
        self.window = window
        self.emitter = emitter
        self.checkpoint_of: dict[tuple[str, int], layout.Checkpoint] = {}  # each partition's, read once a run
        self.segments_of: dict[tuple[str, int], list[layout.SegmentInfo]] = {}
        self.owner_of: dict[str, tuple[str, int]] = {}  # segment key -> the partition whose index names it
        self.cache: dict[str, list[StoredRecord]] = {}
        self.cache_bytes = 0
        self.checked: set[str] = set()  # segments read and checked this run
        self.unverified: set[str] = set()  # of those, without a digest (layout 1)
        # the segments to load next, fetched ahead (plan); one already decoded when scoping is not fetched. They
        # wait as bytes, decoded only when their turn comes (decoding ahead in a thread took the GIL from the
        # producing and kept another segment's records alive: 0.2-0.6 s more CPU in a 200,000-record run)
        self.ahead: ReadAhead[layout.SegmentInfo, bytes] = ReadAhead(
            lambda seg: self._fetch(seg), lambda seg: seg.stored_bytes, storage.concurrency, READ_AHEAD_BYTES,
            "segment-read-ahead", skip=lambda seg: seg.key in self.cache)

    def backup_checkpoint(self, topic: str, partition: int) -> layout.Checkpoint:
        """The partition's checkpoint in the backup, read (with its sealed index chunks) once a run."""
        key = (topic, partition)
        if key not in self.checkpoint_of:
            self._keep(key, *self._read_checkpoint(topic, partition))
        return self.checkpoint_of[key]

    def read_checkpoints(self, partitions: list[tuple[str, int]]) -> None:
        """Read the checkpoints of ``partitions`` not read yet, the storage's ``concurrency`` at a time:
        one after the other, a restore of 128 partitions from S3 waited 128 round trips (and more for
        index chunks) before its first record. A failed read raises here, the first in partition order."""
        todo = [tp for tp in dict.fromkeys(partitions) if tp not in self.checkpoint_of]
        for tp, read in zip(todo, self.storage.at_once(self._read_checkpoint, todo, "checkpoints"), strict=True):
            self._keep(tp, *read.result())

    def _read_checkpoint(self, topic: str, partition: int) -> tuple[layout.Checkpoint, list[layout.SegmentInfo]]:
        cp, listed = layout.read_index(self.storage, self.backup_id, topic, partition)
        return cp or layout.Checkpoint(topic, partition, 0), listed  # never had a record: empty, not missing

    def _keep(self, key: tuple[str, int], cp: layout.Checkpoint, listed: list[layout.SegmentInfo]) -> None:
        self.checkpoint_of[key] = cp
        self.segments_of[key] = sorted(listed, key=lambda s: s.start_offset)
        self.owner_of.update((seg.key, key) for seg in listed)

    def segments(self, cur: layout.RestoreCursor) -> list[layout.SegmentInfo]:
        self.backup_checkpoint(cur.topic, cur.partition)
        return self.segments_of[cur.topic, cur.partition]

    def count(self, seg: layout.SegmentInfo,
              cutoffs: list[int | None] | None = None) -> tuple[int, list[int], int | None]:
        """Records of ``seg`` in the window; of those, how many are older than each cutoff; the oldest's time.

        Read only when the checkpoint's ``min_ts``/``max_ts`` cannot answer (a window edge or a
        cutoff falls inside the segment)."""
        cutoffs = cutoffs or []
        if self.window.misses(seg):
            return 0, [0] * len(cutoffs), None
        lo, hi = seg.min_ts, seg.max_ts
        if self.window.covers(seg) and lo is not None and hi is not None and all(
                c is None or hi < c or lo >= c for c in cutoffs):
            return seg.records, [seg.records if c is not None and hi < c else 0 for c in cutoffs], lo
        if self.window.covers(seg) and not cutoffs:
            return seg.records, [], seg.min_ts
        records = self.load(seg)
        inside = [r.timestamp for r in records if self.window.contains(r.timestamp)]
        if inside and self.cache_bytes + seg.uncompressed_bytes <= PARTIAL_CACHE_BYTES:
            self.cache[seg.key] = records
            self.cache_bytes += seg.uncompressed_bytes
        older = [0 if c is None else sum(1 for t in inside if t < c) for c in cutoffs]
        return len(inside), older, min(inside, default=None)

    def load(self, seg: layout.SegmentInfo) -> list[StoredRecord]:
        cached = self.cache.pop(seg.key, None)
        if cached is not None:
            self.cache_bytes -= seg.uncompressed_bytes
            return cached
        try:
            fetching = self.ahead.take(seg)
            if fetching is not None:
                records = self._check(seg, fetching.result())  # fetched while the ones before were produced
            else:
                self.ahead.drop()  # read out of the planned order: the plan no longer holds
                records = self._check(seg, self._fetch(seg))
        except layout.SegmentDamaged as err:
            self.emitter.emit(ev.ErrorRaised, error_type=err.error_type, transient=False, operation="read",
                              backend=self.storage.name, message=str(err)[:500])
            raise RestoreFailed(f"segment {err}; it is refused (records before it are restored and "
                                "checkpointed, its own records are not)") from None
        self.checked.add(seg.key)
        if not seg.sha256:
            self.unverified.add(seg.key)
        return records

    def _fetch(self, seg: layout.SegmentInfo) -> bytes:
        return self.storage.get(seg.key, "segment")

    def _check(self, seg: layout.SegmentInfo, data: bytes) -> list[StoredRecord]:
        """Check and decode a fetched segment (``SegmentDamaged`` when it is not what its index says)."""
        topic, partition = self.owner_of[seg.key]  # the partition whose index names it: its records must be its
        return layout.read_segment(data, seg, topic, partition)

    def plan(self, reads: Iterable[tuple[layout.RestoreCursor, int]]) -> None:
        """The segments the restore loads next, in order: each of ``reads``' partitions from its start.

        They are fetched ahead, each in a thread of its own, the storage's ``concurrency`` at a time and
        up to ``READ_AHEAD_BYTES``, while the records before them are produced: their round trips overlap
        each other and the producing (one segment ahead at a time, a restore of 128 one-segment
        partitions from S3 waited a round trip for each). Each is checked and decoded by :meth:`load`
        when its turn comes, and a fetch's error raised there, in order, as if read then."""
        self.ahead.plan(seg for cur, start in reads for seg in self.wanted(cur, start))

    def wanted(self, cur: layout.RestoreCursor, start: int) -> list[layout.SegmentInfo]:
        """The partition's segments holding in-scope records from source offset ``start``."""
        return [seg for seg in self.segments(cur)
                if not (seg.end_offset <= start or seg.start_offset >= cur.end_offset or self.window.misses(seg))]

    def records(self, cur: layout.RestoreCursor, start: int) -> Iterator[StoredRecord]:
        """The partition's in-scope records from source offset ``start``, in offset order; its segments
        are read ahead (:meth:`plan`), as part of the restore's plan or, outside it, on their own."""
        wanted = self.wanted(cur, start)
        first = next((seg for seg in wanted if seg.key not in self.cache), None)
        if first is not None and self.ahead.head() != first:
            self.plan([(cur, start)])
        for seg in wanted:
            records = self.load(seg)
            for r in records:
                if start <= r.offset < cur.end_offset and self.window.contains(r.timestamp):
                    yield r
