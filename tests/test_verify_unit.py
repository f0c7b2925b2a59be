"""Verification and run-outcome telemetry without a broker: events folded, then exposed, values exact."""

from __future__ import annotations

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from kafka_backup.exporter.collector import StateCollector
from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas import events as ev
from kafka_backup.streams import fold
from tests.conftest import parse_prometheus

T0 = 1_700_000_000.0


def fold_all(events: list[ev.Event]) -> dict:
    states: dict = {}
    for e in events:
        key = ev.event_key(e.kind, e.job)
        new = fold.apply(states.get(key), e)
        if new is not None:
            states[key] = new
    return states


def scrape(states: dict, now: float):
    registry = CollectorRegistry()
    registry.register(StateCollector(lambda: states, clock=lambda: now))
    return parse_prometheus(generate_latest(registry).decode())


def envelope(kind: str, job: str, seq: int, ts: float, instance: str = "i1") -> dict:
    return {"worker": instance, "seq": seq, "ts": ts, "kind": kind, "job": job}


def test_verify_runs_give_last_verified_time_failed_segments_gaps_and_counts():
    v = lambda seq, ts, inst="i1": envelope("verify", "bk", seq, ts, inst)  # noqa: E731
    events = [
        ev.JobStarted(**v(1, T0), backup_id="bk"),
        ev.SegmentsChecked(**v(2, T0 + 5), backup_id="bk", segments=8, bad=0, gaps=0, complete=True),
        ev.JobEnded(**v(3, T0 + 5), status="success", duration_s=5.0),
        # the second run finds a bad segment and a gap
        ev.JobStarted(**v(1, T0 + 100, "i2"), backup_id="bk"),
        ev.ErrorRaised(**v(2, T0 + 101, "i2"), error_type="integrity", transient=False),
        ev.SegmentsChecked(**v(3, T0 + 102, "i2"), backup_id="bk", segments=8, bad=1, unverified=3, gaps=1,
                           complete=True),
        ev.JobEnded(**v(4, T0 + 102, "i2"), status="failure", duration_s=2.0),
        # a third run that did not finish changes no verdict, but its segments are counted
        ev.JobStarted(**v(1, T0 + 200, "i3"), backup_id="bk"),
        ev.SegmentsChecked(**v(2, T0 + 201, "i3"), backup_id="bk", segments=4, complete=False),
        ev.JobEnded(**v(3, T0 + 201, "i3"), status="interrupted", duration_s=1.0),
        # a restore of the same backup read 2 segments without digest
        ev.JobStarted(**envelope("restore", "r1", 1, T0 + 300), backup_id="bk", total_records=10),
        ev.SegmentsChecked(**envelope("restore", "r1", 2, T0 + 301), backup_id="bk", segments=2, unverified=2),
    ]
    s = scrape(fold_all(events), T0 + 400)
    assert s.get_value(cat.LAST_VERIFIED.name, backup_id="bk") == T0 + 102
    assert s.get_value(cat.VERIFY_FAILED_SEGMENTS.name, backup_id="bk") == 1
    assert s.get_value(cat.VERIFY_GAPS.name, backup_id="bk") == 1
    assert s.get_value(cat.VERIFY_SEGMENTS_TOTAL.name, backup_id="bk") == 20
    assert s.get_value(cat.UNVERIFIED_SEGMENTS_TOTAL.name, backup_id="bk") == 5
    for status, n in (("success", 1), ("failure", 1), ("interrupted", 1)):
        assert s.get_value(cat.VERIFY_DURATION.name + "_count", backup_id="bk", status=status) == n
    assert s.get_value(cat.ERRORS_TOTAL.name, backup_id="bk", error_type="integrity") == 1


def test_no_verdict_before_a_verify_run_completes():
    v = lambda seq, ts: envelope("verify", "bk2", seq, ts)  # noqa: E731
    s = scrape(fold_all([ev.JobStarted(**v(1, T0), backup_id="bk2"),
                         ev.SegmentsChecked(**v(2, T0 + 1), backup_id="bk2", segments=3)]), T0 + 10)
    assert s.get_value(cat.LAST_VERIFIED.name, backup_id="bk2") is None
    assert s.get_value(cat.VERIFY_FAILED_SEGMENTS.name, backup_id="bk2") is None
    assert s.get_value(cat.VERIFY_SEGMENTS_TOTAL.name, backup_id="bk2") == 3


def test_an_interrupted_backup_run_is_not_ok():
    b = lambda seq, ts: envelope("backup", "bk3", seq, ts)  # noqa: E731
    s = scrape(fold_all([ev.JobStarted(**b(1, T0)), ev.JobEnded(**b(2, T0 + 30), status="interrupted",
                                                                  duration_s=30.0)]), T0 + 40)
    assert s.get_value(cat.BACKUP_STATUS.name, backup_id="bk3", kafka_backup_status="ERROR") == 1
    assert s.get_value(cat.BACKUP_DURATION.name + "_count", backup_id="bk3", status="interrupted") == 1
    assert s.get_value(cat.BACKUP_DURATION.name + "_sum", backup_id="bk3", status="interrupted") == 30.0


def test_verify_names_each_missing_segment_and_each_gap(tmp_path):
    import io

    import msgspec
    import pytest

    from kafka_backup.producers import layout, segments
    from kafka_backup.producers.run import NullEmitter
    from kafka_backup.producers.storage import FileBackend, Storage
    from kafka_backup.producers.verify import VerifyFailed, VerifyWorker
    from kafka_backup.schemas.config import VerifyConfig

    storage = Storage(FileBackend(str(tmp_path)))
    storage.put(layout.manifest_key("bk"), layout.encode(layout.Manifest("bk", {"t": 1})), "manifest")
    cp, infos = layout.Checkpoint("t", 0, 0), []
    for start in range(0, 100, 10):
        records = [segments.StoredRecord(o, 1000 + o, 1, None, b"v") for o in range(start, start + 10)]
        data, raw = segments.encode("t", 0, records, "none")
        info = layout.SegmentInfo(layout.segment_key("bk", "t", 0, start, "none"), start, start + 10, 10, 10, raw,
                                  len(data), "none", 1000 + start, 1009 + start, layout.digest(data), start)
        storage.put(info.key, data, "segment")
        cp, _ = layout.append("bk", cp, info, 0)
        infos.append(info)
    # segment 30..39 lost from storage; 60..69 dropped from the index (a hole in the coverage)
    (tmp_path / infos[3].key).unlink()
    cp = msgspec.structs.replace(cp, segments=[s for s in cp.segments if s.start_offset != 60])
    storage.put(layout.checkpoint_key("bk", "t", 0), layout.encode(cp), "checkpoint")

    out = io.StringIO()
    with pytest.raises(VerifyFailed, match="1 bad segment\\(s\\), 1 gap\\(s\\) in 9 segments"):
        VerifyWorker(VerifyConfig(backup_id="bk", storage=str(tmp_path)), storage, NullEmitter(), out).run()
    assert out.getvalue().splitlines() == [
        f"BAD {infos[3].key}: missing from storage",
        f"GAP t/0: offsets 60..69 are in no segment (before {infos[7].key})",
    ]


def write_backup(storage, backup_id: str, topic: str, partitions: list[list[range]]) -> list:
    """A backup of one topic written directly: per partition, a segment per span (offsets as given)."""
    from kafka_backup.producers import layout, segments

    infos = []
    for p, spans in enumerate(partitions):
        mine = []
        for span in spans:
            data, raw = segments.encode(topic, p, [segments.StoredRecord(o, 1000 + o, 1, b"k", b"v") for o in span],
                                        "zstd")
            key = layout.segment_key(backup_id, topic, p, span.start, "zstd")
            storage.put(key, data, "segment")
            mine.append(layout.SegmentInfo(key, span.start, span.stop, len(span), 0, raw, len(data), "zstd",
                                           1000 + span.start, 1000 + span.stop - 1, covers_from=span.start,
                                           sha256=layout.digest(data)))
        storage.put(layout.checkpoint_key(backup_id, topic, p),
                    layout.encode(layout.Checkpoint(topic, p, spans[-1].stop, mine)), "checkpoint")
        infos += mine
    storage.put(layout.manifest_key(backup_id), layout.encode(layout.Manifest(backup_id, topics={topic: len(partitions)})),
                "manifest")
    return infos


def test_verify_fetches_segments_ahead_across_partitions_and_reports_each_in_order(tmp_path):
    """A backend of concurrency 2: the first segments of partitions 0 and 1 meet at a barrier, so verify
    must fetch the next partition's segment while it checks this one's (one after the other, the first
    would wait there alone and the run would fail); the verdicts come in the order checked: a damaged
    segment and a missing one, each named, the intact ones counted."""
    import io
    import os
    import threading

    from kafka_backup.producers.run import NullEmitter
    from kafka_backup.producers.storage import FileBackend, Storage
    from kafka_backup.producers.verify import VerifyFailed, VerifyWorker
    from kafka_backup.schemas.config import VerifyConfig

    setup = Storage(FileBackend(str(tmp_path)))
    infos = write_backup(setup, "bk", "t", [[range(0, 50)], [range(0, 40), range(40, 80), range(80, 90)],
                                            [range(0, 5)]])
    damaged, missing = infos[2], infos[3]
    path = os.path.join(tmp_path, *damaged.key.split("/"))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    os.remove(os.path.join(tmp_path, *missing.key.split("/")))
    meet = threading.Barrier(2, timeout=10)
    fetched: list[str] = []

    class Two(FileBackend):
        def get(self, key):
            if key in (infos[0].key, infos[1].key):
                meet.wait()
            if key in {i.key for i in infos}:
                fetched.append(key)
            return super().get(key)

    out = io.StringIO()
    worker = VerifyWorker(VerifyConfig(backup_id="bk", storage=f"file://{tmp_path}"),
                          Storage(Two(str(tmp_path), concurrency=2)), NullEmitter(), out)
    with pytest.raises(VerifyFailed, match="2 bad segment"):
        worker.work()
    assert out.getvalue().splitlines() == [
        f"BAD {damaged.key}: does not match its SHA-256 digest: the object was altered or damaged",
        f"BAD {missing.key}: missing from storage"]
    assert (worker.segments, worker.partitions, worker.records) == (5, 3, 50 + 40 + 5)
    assert sorted(fetched) == sorted(i.key for i in infos)  # each segment fetched once


def test_verify_holds_two_groups_of_partition_indexes_at_most(tmp_path):
    """Nine partitions on a backend of concurrency 1: indexes are read four partitions at a time, the next
    group while this one is checked, so the third group's checkpoints are read only once the first group's
    segments are (a backup's every index at once could be millions of segments); the verdict covers all."""
    import io

    from kafka_backup.producers import layout
    from kafka_backup.producers.run import NullEmitter
    from kafka_backup.producers.storage import FileBackend, Storage
    from kafka_backup.producers.verify import VerifyWorker
    from kafka_backup.schemas.config import VerifyConfig

    infos = write_backup(Storage(FileBackend(str(tmp_path))), "bk", "t", [[range(0, 10 + p)] for p in range(9)])
    gets: list[str] = []

    class Logged(FileBackend):
        def get(self, key):
            gets.append(key)
            return super().get(key)

    out = io.StringIO()
    worker = VerifyWorker(VerifyConfig(backup_id="bk", storage=f"file://{tmp_path}"),
                          Storage(Logged(str(tmp_path), concurrency=1)), NullEmitter(), out)
    worker.work()
    assert out.getvalue().startswith("verified backup bk: 9 segments in 9 partitions, "
                                     f"{sum(10 + p for p in range(9))} records")
    assert sorted(gets) == sorted([layout.manifest_key("bk"), *(layout.checkpoint_key("bk", "t", p) for p in range(9)),
                                   *(i.key for i in infos)])  # each object read once
    assert gets.index(layout.checkpoint_key("bk", "t", 8)) > gets.index(infos[3].key)
