"""The restore's reading side: a backup's segments, read once, checked, and cut to the time window.

Segments whose ``[min_ts, max_ts]`` lie inside the window are counted from the
checkpoint without reading them; segments outside are never read; a segment
straddling a window edge is read and its records counted one by one, and kept
decoded (up to ``PARTIAL_CACHE_BYTES``) so it is read from storage once per run.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future

from kafka_backup.producers import layout
from kafka_backup.producers.restore_scope import RestoreFailed, Window
from kafka_backup.producers.run import Reporter
from kafka_backup.producers.segments import StoredRecord  # by name: the method segments() hides the module
from kafka_backup.producers.storage import Storage
from kafka_backup.producers.threads import in_daemon_thread
from kafka_backup.schemas import events as ev

PARTIAL_CACHE_BYTES = 64 * 1024 * 1024  # decoded straddling segments kept between scoping and producing


class SegmentReader:
    """Per source partition: its segments (from the backup's checkpoint and index), and their records."""

    def __init__(self, storage: Storage, backup_id: str, window: Window, emitter: Reporter) -> None:
        self.storage = storage
        self.backup_id = backup_id
        self.window = window
        self.emitter = emitter
        self.segments_of: dict[tuple[str, int], list[layout.SegmentInfo]] = {}
        self.owner_of: dict[str, tuple[str, int]] = {}  # segment key -> the partition whose index names it
        self.cache: dict[str, list[StoredRecord]] = {}
        self.cache_bytes = 0
        self.checked: set[str] = set()  # segments read and checked this run
        self.unverified: set[str] = set()  # of those, without a digest (layout 1)
        self._ahead: tuple[str, Future[list[StoredRecord]]] | None = None  # the next segment, being read

    def backup_checkpoint(self, topic: str, partition: int) -> layout.Checkpoint:
        # a partition that never had a record has no checkpoint: it is empty, not missing
        cp = (layout.read_checkpoint(self.storage, self.backup_id, topic, partition, report=True)
              or layout.Checkpoint(topic, partition, 0))
        listed = layout.all_segments(cp, lambda k: self.storage.get(k, "index"), self.backup_id)
        self.segments_of[(topic, partition)] = sorted(listed, key=lambda s: s.start_offset)
        self.owner_of.update((seg.key, (topic, partition)) for seg in listed)
        return cp

    def segments(self, cur: layout.RestoreCursor) -> list[layout.SegmentInfo]:
        key = (cur.topic, cur.partition)
        if key not in self.segments_of:
            self.backup_checkpoint(cur.topic, cur.partition)
        return self.segments_of[key]

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
        ahead, self._ahead = self._ahead, None
        try:
            if ahead is not None and ahead[0] == seg.key:
                records = ahead[1].result()  # read while the previous segment's records were produced
            else:
                records = self._read(seg)
        except layout.SegmentDamaged as err:
            self.emitter.emit(ev.ErrorRaised, error_type=err.error_type, transient=False, operation="read",
                              backend=self.storage.name, message=str(err)[:500])
            raise RestoreFailed(f"segment {err}; it is refused (records before it are restored and "
                                "checkpointed, its own records are not)") from None
        self.checked.add(seg.key)
        if not seg.sha256:
            self.unverified.add(seg.key)
        return records

    def _read(self, seg: layout.SegmentInfo) -> list[StoredRecord]:
        """Fetch, check and decode one segment (``SegmentDamaged`` when it is not what its index says)."""
        data = self.storage.get(seg.key, "segment")
        topic, partition = self.owner_of[seg.key]  # the partition whose index names it: its records must be its
        return layout.read_segment(data, seg, topic, partition)

    def _read_ahead(self, seg: layout.SegmentInfo) -> None:
        """Start reading ``seg`` in a thread of its own: fetching, the digest and decompression run while
        the current segment's records are produced (round trips to S3 included). One segment ahead at
        most; its outcome, records or error, is taken by :meth:`load` in order, as if read then."""
        if seg.key in self.cache:
            return
        self._ahead = (seg.key, in_daemon_thread(lambda: self._read(seg), "segment-read-ahead"))

    def records(self, cur: layout.RestoreCursor, start: int) -> Iterator[StoredRecord]:
        """The partition's in-scope records from source offset ``start``, in offset order."""
        wanted = [seg for seg in self.segments(cur)
                  if not (seg.end_offset <= start or seg.start_offset >= cur.end_offset or self.window.misses(seg))]
        for i, seg in enumerate(wanted):
            records = self.load(seg)
            if i + 1 < len(wanted):
                self._read_ahead(wanted[i + 1])
            for r in records:
                if start <= r.offset < cur.end_offset and self.window.contains(r.timestamp):
                    yield r
