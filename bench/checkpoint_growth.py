"""Metadata bytes a backup writes per flush, early and late in a partition's life (issue #9, item 5).

Layout 1 rewrote the partition's whole segment list on every flush, so a
continuous backup's per-flush write grew linearly with its age. Layout 2
keeps fewer than ``CHUNK_SEGMENTS`` segments in the checkpoint head and seals
the rest into immutable index chunks. This replays the backup's own index
code (``producers.layout.append``) for 10,000 flushes and prints the bytes of
the flush that adds segment 10 and segment 10,000, the mean and maximum over
the last ``CHUNK_SEGMENTS`` flushes (a sealing flush writes a chunk too), and
what layout 1 would have written. No timing: bytes are deterministic.

    python bench/checkpoint_growth.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kafka_backup.producers import layout  # noqa: E402

BACKUP, TOPIC, PARTITION = "orders-prod", "orders", 7
N = 10_000


def info(i: int) -> layout.SegmentInfo:
    start = i * 5000
    return layout.SegmentInfo(
        key=layout.segment_key(BACKUP, TOPIC, PARTITION, start, "zstd"), start_offset=start,
        end_offset=start + 5000, records=5000, bytes=1_250_000, uncompressed_bytes=1_400_000,
        stored_bytes=310_000, algorithm="zstd", min_ts=1_764_000_000_000 + i * 60_000,
        max_ts=1_764_000_000_000 + i * 60_000 + 59_999, sha256="ab" * 32, covers_from=start)


def main() -> None:
    cp = layout.Checkpoint(TOPIC, PARTITION, 0)
    per_flush: list[int] = []
    v1_segments: list[layout.SegmentInfo] = []
    v1_bytes: dict[int, int] = {}
    for i in range(N):
        seg = info(i)
        cp, chunks = layout.append(BACKUP, cp, seg, 0)
        per_flush.append(len(layout.encode(cp)) + sum(len(data) for _, data in chunks))
        v1_segments.append(seg)
        if i + 1 in (10, N):
            v1_bytes[i + 1] = len(layout.encode(layout.Checkpoint(TOPIC, PARTITION, seg.end_offset, v1_segments,
                                                                  version=1)))
    window = per_flush[-layout.CHUNK_SEGMENTS:]
    early, late = per_flush[9], per_flush[N - 1]
    print(f"layout 2, bytes written by the flush adding segment 10:      {early:>12,}")
    print(f"layout 2, bytes written by the flush adding segment {N:,}:  {late:>12,}")
    print(f"layout 2, last {layout.CHUNK_SEGMENTS} flushes: mean {sum(window) / len(window):,.0f}, max {max(window):,}")
    print(f"layout 2, max over all {N:,} flushes:                     {max(per_flush):>12,}")
    print(f"ratio segment {N:,} / segment 10 (layout 2): {late / early:.2f}")
    print(f"layout 1 would write {v1_bytes[10]:,} then {v1_bytes[N]:,} bytes: ratio {v1_bytes[N] / v1_bytes[10]:.0f}")


if __name__ == "__main__":
    main()
