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


def test_continuous_backup_reads_consumer_groups_off_the_fetch_loop_and_saves_them_on_it():
    """Thousands of groups take seconds to read (one request per group): the fetch loop must not wait."""
    import threading
    from types import SimpleNamespace

    from kafka_backup.producers.backup import BackupWorker

    worker = BackupWorker.__new__(BackupWorker)
    worker.cfg = SimpleNamespace(consumer_groups=["*"], consumer_groups_interval_s=60)
    worker.groups_due, worker._groups_reading = 0.0, None
    release, reads, saved = threading.Event(), [], []

    def read_groups():
        reads.append(threading.current_thread().name)
        release.wait(30)  # a slow cluster
        return {"g": len(reads)}, []

    worker._read_groups = read_groups  # type: ignore[method-assign]
    worker._save_groups = lambda found, problems: saved.append((found, threading.current_thread().name))  # type: ignore[method-assign]
    worker._poll_groups()  # due: starts a reading and returns while it is still under way
    assert not release.is_set() and saved == [] and worker._groups_reading is not None
    worker._poll_groups()  # still reading: neither waits nor starts a second one
    release.set()
    worker._groups_reading.exception(30)  # the reading finished (its result is taken by the loop below)
    assert saved == []
    worker._poll_groups()
    assert saved == [({"g": 1}, threading.current_thread().name)]  # saved on the loop's thread
    assert reads == ["consumer-groups"]
    worker._poll_groups()  # not due for another interval
    assert worker._groups_reading is None and len(reads) == 1
    worker._record_groups()  # the end of the run: read now, on the loop's thread, after the last flush
    assert reads == ["consumer-groups", threading.current_thread().name] and saved[-1][0] == {"g": 2}
