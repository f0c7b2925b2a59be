"""How far a backup worker knows its segment reports are safe, without Kafka."""

from __future__ import annotations

from kafka_backup.producers import layout
from kafka_backup.producers.segment_reports import PartitionReports


def info(start: int, end: int) -> layout.SegmentInfo:
    return layout.SegmentInfo(f"s{start}", start, end, end - start, 10, 20, 5, "zstd")


def test_the_reported_mark_moves_only_over_a_safe_prefix():
    work = PartitionReports("t", 0)
    segs = [info(0, 10), info(10, 20), info(20, 30)]
    for s in segs:
        work.unsettled[s.end_offset] = False
    work.settled(10, segs[1], True)  # acknowledged before the first: the mark must wait for it
    assert work.reported_offset == 0
    work.settled(0, segs[0], True)
    assert work.reported_offset == 20 and list(work.unsettled) == [30]
    work.settled(20, segs[2], False)  # lost: kept to be sent again, the mark stays below it
    assert work.reported_offset == 20 and work.lost == [(20, segs[2])]
    work.settled(20, segs[2], True)  # the second attempt got through
    assert work.reported_offset == 30 and not work.unsettled
