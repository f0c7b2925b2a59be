"""The restore's reading side: a backup's segments, read once, checked, and cut to the time window.

Segments whose ``[min_ts, max_ts]`` lie inside the window are counted from the
checkpoint without reading them; segments outside are never read; a segment
straddling a window edge is read and its records counted one by one, and kept
decoded (up to ``PARTIAL_CACHE_BYTES``) so it is read from storage once per run.

The partitions' indexes are read a group at a time (:meth:`SegmentReader.in_groups`, ``index_groups``),
the next group while this one is used, and kept after use only up to ``INDEX_HELD_SEGMENTS`` segments:
a backup's every index at once can be millions of segments.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from kafka_backup.producers import index_groups, layout
from kafka_backup.producers.index_groups import Partition, in_groups
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
        # the partitions' checkpoints and indexes held now (in_groups: up to INDEX_HELD_SEGMENTS, and the group in use)
        self.checkpoint_of: dict[Partition, layout.Checkpoint] = {}
        self.segments_of: dict[Partition, list[layout.SegmentInfo]] = {}
        self.owner_of: dict[str, Partition] = {}  # segment key -> the partition whose index names it
        self.held_segments = 0  # in segments_of
        self.cache: dict[str, list[StoredRecord]] = {}
        self.cache_bytes = 0
        self.checked = 0  # segments read and checked this run, each counted once
        self.unverified = 0  # of those, without a digest (layout 1)
        # segments read before the producing (scoping, a resume's reconciling) and not kept decoded: the
        # producing may read them again, and must not count them twice (a few a partition: window edges)
        self.read_before: set[str] = set()
        self.producing = False  # set by the restore once it produces: what it reads is read once
        # the segments to load next, fetched ahead (plan); one already decoded when scoping is not fetched. They
        # wait as bytes, decoded only when their turn comes (decoding ahead in a thread took the GIL from the
        # producing and kept another segment's records alive: 0.2-0.6 s more CPU in a 200,000-record run)
        self.ahead: ReadAhead[layout.SegmentInfo, bytes] = ReadAhead(
            lambda seg: self._fetch(seg), lambda seg: seg.stored_bytes, storage.concurrency, READ_AHEAD_BYTES,
            "segment-read-ahead", skip=lambda seg: seg.key in self.cache)

    def backup_checkpoint(self, topic: str, partition: int) -> layout.Checkpoint:
        """The partition's checkpoint in the backup, read (with its sealed index chunks) unless held."""
        key = (topic, partition)
        if key not in self.checkpoint_of:
            self._keep(key, *layout.read_index(self.storage, self.backup_id, topic, partition))
        return self.checkpoint_of[key]

    def in_groups(self, partitions: list[Partition]) -> Iterator[list[Partition]]:
        """``partitions`` a group at a time (``index_groups.in_groups``: the next group's indexes read while
        this one is used), each group's checkpoints and indexes held while it is used. A failed read raises
        when its group comes, the first in partition order. Once used, a group is dropped if more than
        ``INDEX_HELD_SEGMENTS`` segments are held: within that, each index is read once a run."""
        for reads in in_groups(self.storage, self.backup_id, partitions, "restore-indexes",
                               held=lambda tp: tp in self.checkpoint_of):
            for tp, read in reads:
                if read is not None and tp not in self.checkpoint_of:
                    self._keep(tp, *read.result())
            group = [tp for tp, _ in reads]
            yield group
            if self.held_segments > index_groups.INDEX_HELD_SEGMENTS:
                self.forget(group)

    def cursors_in_groups(self, cursors: list[layout.RestoreCursor]) -> Iterator[list[layout.RestoreCursor]]:
        """``cursors`` a group at a time, their partitions' indexes held while it is used (:meth:`in_groups`)."""
        of = {(cur.topic, cur.partition): cur for cur in cursors}
        for group in self.in_groups(list(of)):
            yield [of[tp] for tp in group]

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Drop the partitions' checkpoints and indexes (read again when next needed)."""
        for tp in partitions:
            self.checkpoint_of.pop(tp, None)
            listed = self.segments_of.pop(tp, [])
            self.held_segments -= len(listed)
            for seg in listed:
                self.owner_of.pop(seg.key, None)

    def _keep(self, key: Partition, cp: layout.Checkpoint | None, listed: list[layout.SegmentInfo]) -> None:
        self.forget([key])
        self.checkpoint_of[key] = cp or layout.Checkpoint(*key, 0)  # never had a record: empty, not missing
        self.segments_of[key] = sorted(listed, key=lambda s: s.start_offset)
        self.held_segments += len(listed)
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
            self.read_before.discard(seg.key)  # taken from the cache, not read again
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
        if seg.key not in self.read_before:
            self.checked += 1
            if not seg.sha256:
                self.unverified += 1
            if not self.producing:
                self.read_before.add(seg.key)
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
