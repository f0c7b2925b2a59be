"""Restore scoping and user mistakes, without a broker: window arithmetic, topic maps, exact counts."""

from __future__ import annotations

import pytest

from kafka_backup.producers import layout, segments
from kafka_backup.producers.offset_reset import target_of
from kafka_backup.producers.restore import RestoreWorker
from kafka_backup.producers.restore_scope import Window, parse_topic_map, resolve_topic_map
from kafka_backup.producers.storage import FileBackend, OpReport, Storage
from kafka_backup.schemas.config import ConfigError, OffsetResetConfig, RestoreConfig
from tests.conftest import cli


def seg(min_ts: int | None, max_ts: int | None) -> layout.SegmentInfo:
    return layout.SegmentInfo("k", 0, 1, 1, 1, 1, 1, "none", min_ts, max_ts)


def test_window_is_from_inclusive_to_exclusive_and_classifies_segments():
    w = Window(100, 200)
    assert [w.contains(t) for t in (99, 100, 199, 200)] == [False, True, True, False]
    assert w.covers(seg(100, 199)) and not w.covers(seg(100, 200)) and not w.covers(seg(None, None))
    assert w.misses(seg(200, 300)) and w.misses(seg(0, 99)) and not w.misses(seg(0, 100))
    assert not w.misses(seg(None, None)), "unknown timestamps must be read, never skipped"
    assert Window(None, None).covers(seg(None, None))
    with pytest.raises(ConfigError, match="restore.from_time"):
        Window(5, 5)


def test_topic_map_syntax_and_resolution():
    assert parse_topic_map(["a:b", " c : d "]) == {"a": "b", "c": "d"}
    for bad, needle in ((["a"], "not source:target"), (["a:"], "not source:target"), (["a:b", "a:c"], "twice"),
                        (["a:b/c"], "not a valid topic name")):
        with pytest.raises(ConfigError, match=needle):
            parse_topic_map(bad)
    assert resolve_topic_map({"a": "a2"}, {"a": 3, "b": 1}, "bk") == {"a": "a2", "b": "b"}
    with pytest.raises(ConfigError, match="'x' is not in backup 'bk'"):
        resolve_topic_map({"x": "y"}, {"a": 1}, "bk")
    with pytest.raises(ConfigError, match="would both restore into 'b'"):
        resolve_topic_map({"a": "b"}, {"a": 1, "b": 1}, "bk")


class Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def emit(self, event_type, **fields) -> None:
        self.events.append((event_type.__name__, fields))

    def poll(self) -> None:
        pass


def write_partition(storage: Storage, backup_id: str, topic: str, spans: list[range]) -> list[layout.SegmentInfo]:
    """Segments of one partition; record with offset o has timestamp 1000 + o."""
    infos = []
    for span in spans:
        records = [segments.StoredRecord(o, 1000 + o, 1, b"k", b"v%d" % o) for o in span]
        data, raw = segments.encode(topic, 0, records, "zstd")
        key = layout.segment_key(backup_id, topic, 0, span.start, "zstd")
        storage.put(key, data, "segment")
        infos.append(layout.SegmentInfo(key, span.start, span.stop, len(records), 0, raw, len(data), "zstd",
                                        1000 + span.start, 1000 + span.stop - 1))
    storage.put(layout.checkpoint_key(backup_id, topic, 0),
                layout.encode(layout.Checkpoint(topic, 0, spans[-1].stop, infos)), "checkpoint")
    return infos


def test_scope_counts_exactly_and_reads_only_straddling_segments_once(tmp_path):
    reports: list[OpReport] = []
    storage = Storage(FileBackend(str(tmp_path)))
    infos = write_partition(storage, "bk", "t", [range(0, 100), range(100, 200), range(200, 300)])
    cfg = RestoreConfig(restore_id="r", backup_id="bk", from_time=1000 + 20, to_time=1000 + 150)
    worker = RestoreWorker("127.0.0.1:1", cfg, storage, Events())
    storage.listener = reports.append
    cp = worker.scope({"t": "t"}, {"t": 1})
    assert cp.total_records == 130 and cp.partitions[0].records == 130 and cp.partitions[0].end_offset == 300
    # read: the partition checkpoint, then the two straddling segments; the third lies outside
    assert [(r.operation, r.nbytes) for r in reports] == [
        ("checkpoint", reports[0].nbytes), ("segment", infos[0].stored_bytes), ("segment", infos[1].stored_bytes)]
    reports.clear()
    offsets = [r.offset for r in worker.reader.records(cp.partitions[0], 0)]
    assert offsets == list(range(20, 150)) and reports == [], "kept decoded: not read again"


def test_a_restore_reads_its_partitions_checkpoints_several_at_a_time_and_each_once(tmp_path):
    """Six partitions, a backend of concurrency 3: the checkpoint reads meet three at a time at a
    barrier (one after the other, the first would wait there alone and fail); each partition gets its
    own checkpoint, read once a run, and the scope counts each exactly."""
    import threading

    meet = threading.Barrier(3, timeout=10)
    reads: list[str] = []

    class Three(FileBackend):
        def get(self, key):
            if key.endswith("checkpoint.json"):
                reads.append(key)
                meet.wait()
            return super().get(key)

    setup = Storage(FileBackend(str(tmp_path)))
    infos = {}
    for p in range(6):
        infos[p] = layout.SegmentInfo(layout.segment_key("bk", "t", p, 0, "zstd"), 0, 10 + p, 10 + p, 1, 1, 1,
                                      "zstd", 1000, 2000)
        setup.put(layout.checkpoint_key("bk", "t", p), layout.encode(layout.Checkpoint("t", p, 10 + p, [infos[p]])),
                  "checkpoint")
    storage = Storage(Three(str(tmp_path), concurrency=3))
    worker = RestoreWorker("127.0.0.1:1", RestoreConfig(restore_id="r", backup_id="bk"), storage, Events())
    storage.listener = lambda report: None
    cp = worker.scope({"t": "t"}, {"t": 6})
    assert [(c.partition, c.records, c.end_offset) for c in cp.partitions] == [(p, 10 + p, 10 + p) for p in range(6)]
    assert sorted(reads) == sorted(layout.checkpoint_key("bk", "t", p) for p in range(6))
    assert worker.reader.segments(cp.partitions[2]) == [infos[2]] and len(reads) == 6  # not read again


def test_an_unbounded_restore_yields_every_record_from_its_start_to_the_partition_s_end(tmp_path):
    """No time window: whole segments go out as read (their offsets were proved by read_segment);
    a resume inside a segment, and a scope ending inside one, still cut at the exact offsets."""
    storage = Storage(FileBackend(str(tmp_path)))
    write_partition(storage, "bk", "t", [range(0, 100), range(100, 200), range(200, 300)])
    worker = RestoreWorker("127.0.0.1:1", RestoreConfig(restore_id="r", backup_id="bk"), storage, Events())
    storage.listener = lambda report: None
    cp = worker.scope({"t": "t"}, {"t": 1})
    cur = cp.partitions[0]
    assert cp.total_records == 300 and cur.end_offset == 300
    assert [r.offset for r in worker.reader.records(cur, 0)] == list(range(300))
    assert [r.offset for r in worker.reader.records(cur, 150)] == list(range(150, 300))  # a resume mid-segment
    cur.end_offset = 250  # the scope ends inside the last segment
    assert [r.offset for r in worker.reader.records(cur, 100)] == list(range(100, 250))


def write_partitions(storage: Storage, backup_id: str, topic: str, partitions: int,
                     spans: list[range]) -> dict[int, list[segments.StoredRecord]]:
    """``spans`` segments in each of ``partitions`` partitions (digests recorded); record with offset o
    of partition p has timestamp 1000 + o and value ``v<p>-<o>``. Returns each partition's records."""
    written = {}
    for p in range(partitions):
        infos, written[p] = [], []
        for span in spans:
            records = [segments.StoredRecord(o, 1000 + o, 1, b"k", b"v%d-%d" % (p, o)) for o in span]
            data, raw = segments.encode(topic, p, records, "zstd")
            key = layout.segment_key(backup_id, topic, p, span.start, "zstd")
            storage.put(key, data, "segment")
            infos.append(layout.SegmentInfo(key, span.start, span.stop, len(records), 0, raw, len(data), "zstd",
                                            1000 + span.start, 1000 + span.stop - 1, sha256=layout.digest(data)))
            written[p] += records
        storage.put(layout.checkpoint_key(backup_id, topic, p),
                    layout.encode(layout.Checkpoint(topic, p, spans[-1].stop, infos)), "checkpoint")
    return written


class Produced:
    """A restore's writer without a cluster: what each partition was given, in order."""

    def __init__(self) -> None:
        self.records: dict[int, list[segments.StoredRecord]] = {}

    def restore_partition(self, cur: layout.RestoreCursor, records) -> None:
        self.records[cur.partition] = list(records)
        cur.restored = cur.records

    def finish(self) -> None:
        pass


@pytest.mark.parametrize("window", [(None, None), (1000 + 25, 1000 + 45)])
def test_beyond_its_index_budget_a_restore_holds_two_groups_of_indexes_and_restores_the_same(
        tmp_path, monkeypatch, window):
    """A backup of more segments than ``INDEX_HELD_SEGMENTS`` (5; 3 a partition): the scope and the
    producing each read the partitions' indexes a group at a time, one partition a group (two would
    hold more than half of 5), each dropped once used while the next is held; every record in scope
    still reaches its partition, in order, and each segment read is counted checked once (with a
    window, the edges are read by the scope and again by the producing: nothing is kept decoded here)."""
    from kafka_backup.producers import index_groups, restore_reader

    monkeypatch.setattr(index_groups, "INDEX_HELD_SEGMENTS", 5)
    monkeypatch.setattr(restore_reader, "PARTIAL_CACHE_BYTES", 0)
    storage = Storage(FileBackend(str(tmp_path), concurrency=2))
    written = write_partitions(storage, "bk", "t", 10, [range(0, 20), range(20, 40), range(40, 60)])
    worker = RestoreWorker("127.0.0.1:1", RestoreConfig(restore_id="r", backup_id="bk", from_time=window[0],
                                                          to_time=window[1]), storage, Events())
    reads: list[str] = []
    held: list[int] = []  # partitions held, each time one more is
    keep = worker.reader._keep

    def kept(*args) -> None:
        keep(*args)
        held.append(len(worker.reader.checkpoint_of))

    worker.reader._keep = kept  # type: ignore[method-assign]
    storage.listener = lambda report: reads.append(report.operation)
    cp = worker.scope({"t": "t"}, {"t": 10})
    worker.checkpoint, worker.writer = cp, Produced()  # type: ignore[assignment]
    worker._restore_all()
    inside = [r for r in written[0] if window[0] is None or window[0] <= r.timestamp < window[1]]
    assert cp.total_records == 10 * len(inside)
    assert worker.writer.records == {  # type: ignore[attr-defined]
        p: [r for r in rs if window[0] is None or window[0] <= r.timestamp < window[1]] for p, rs in written.items()}
    # each partition's index read by the scope and again by the producing, but the last one's: within the
    # budget, it is still held when the producing starts
    assert reads.count("checkpoint") == 19
    assert max(held) == 2 and len(worker.reader.checkpoint_of) == 1, "the group in use and the next one"
    # unbounded: 3 segments a partition, read once; the window misses the first and cuts the other two,
    # which the scope reads to count and the producing reads again
    assert reads.count("segment") == (30 if window[0] is None else 40)
    assert worker.reader.checked == (30 if window[0] is None else 20) and worker.reader.unverified == 0


def test_within_its_index_budget_a_restore_reads_each_index_once_and_counts_each_segment_once(tmp_path):
    """A window cuts the first two segments: the scope reads them (and keeps them decoded), the
    producing takes them from memory; three partitions' indexes, each read once; two segments checked
    a partition, the third is outside the window and never read."""
    storage = Storage(FileBackend(str(tmp_path)))
    write_partitions(storage, "bk", "t", 3, [range(0, 20), range(20, 40), range(40, 60)])
    worker = RestoreWorker("127.0.0.1:1", RestoreConfig(restore_id="r", backup_id="bk", from_time=1000 + 15,
                                                          to_time=1000 + 25), storage, Events())
    reports: list[OpReport] = []
    storage.listener = reports.append
    cp = worker.scope({"t": "t"}, {"t": 3})
    worker.checkpoint, worker.writer = cp, Produced()  # type: ignore[assignment]
    worker._restore_all()
    assert [len(rs) for rs in worker.writer.records.values()] == [10, 10, 10]  # type: ignore[attr-defined]
    assert sorted(r.operation for r in reports) == ["checkpoint"] * 3 + ["segment"] * 6
    assert worker.reader.checked == 6


def test_a_restore_asks_its_targets_ends_in_one_request_and_again_while_a_new_topic_is_not_served(monkeypatch):
    """Every target partition's end in one request (a round trip a partition before); a just-created
    topic may not be served yet: the request is made again (up to five times), then its error raised."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from confluent_kafka import KafkaError, KafkaException

    from kafka_backup.producers import restore_targets
    from kafka_backup.producers.restore_targets import Targets

    class Admin:
        def __init__(self, unknown_for: int) -> None:
            self.requests: list[list[tuple[str, int]]] = []
            self.unknown_for = unknown_for

        def list_offsets(self, request, request_timeout):
            self.requests.append([(tp.topic, tp.partition) for tp in request])
            answers = {}
            for tp in request:
                answers[tp] = future = Future()
                if len(self.requests) <= self.unknown_for:
                    future.set_exception(KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)))
                else:
                    future.set_result(SimpleNamespace(offset=100 + tp.partition))
            return answers

    monkeypatch.setattr(restore_targets.time, "sleep", lambda s: None)
    targets = Targets.__new__(Targets)
    targets.admin = Admin(unknown_for=2)  # type: ignore[assignment]
    partitions = [("t2", p) for p in range(4)]
    assert targets.high_watermarks(partitions) == {("t2", p): 100 + p for p in range(4)}
    assert targets.admin.requests == [partitions] * 3  # type: ignore[union-attr]
    targets.admin = Admin(unknown_for=5)  # type: ignore[assignment]
    with pytest.raises(KafkaException) as err:
        targets.high_watermarks(partitions)
    assert err.value.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART and len(targets.admin.requests) == 5


def test_offset_reset_needs_exactly_one_target():
    assert target_of(OffsetResetConfig(group="g", topics=["t"], to_timestamp=0)) == "to_timestamp"
    # an empty --to-timestamp is no time: it used to count as the target and reach the broker as offset None
    for cfg in (OffsetResetConfig(), OffsetResetConfig(to_earliest=True, to_latest=True),
                OffsetResetConfig(to_timestamp="")):
        with pytest.raises(ConfigError, match="exactly one"):
            target_of(cfg)


@pytest.mark.parametrize("args,needle", [
    (["restore", "--backup-id", "b", "--storage", "/tmp/x", "--restore-id", "a/b"],
     "restore.restore_id: 'a/b' is not a safe id"),
    (["restore", "--backup-id", "b", "--restore-id", "r"], "restore.storage: no storage given"),
    (["restore", "--backup-id", "b", "--storage", "/tmp/x", "--restore-id", "r", "--topic-map", "a"],
     "restore.topic_map: 'a' is not source:target"),
    (["restore", "--backup-id", "b", "--storage", "/tmp/x", "--restore-id", "r", "--from-time", "9",
      "--to-time", "3"], "restore.from_time: 9 is not before"),
    (["restore", "--backup-id", "b", "--storage", "/tmp/x", "--restore-id", "r", "--rate-limit", "x"],
     "restore.rate_limit"),
    (["offset-reset", "--group", "g", "--topics", "t"], "give exactly one of"),
    (["offset-reset", "--group", "g", "--topics", "t", "--to-latest", "--to-timestamp", "5"],
     "(got --to-timestamp and --to-latest)"),
    (["offset-reset", "--group", "g", "--to-latest"], "offset_reset.topics: no topics given"),
    (["offset-reset", "--group", "g", "--topics", "t", "--to-timestamp", "yesterday"],
     "offset_reset.to_timestamp: 'yesterday' is neither ISO 8601 (2026-01-31T00:00:00Z) nor epoch ms"),
    (["offset-reset", "--group", "g", "--topics", "t", "--to-timestamp", "1969-12-31T00:00:00Z"],
     "offset_reset.to_timestamp: 1969-12-31T00:00:00Z is before 1970"),
    (["offset-reset", "--group", "", "--topics", "t", "--to-latest"], "offset_reset.group: '' is not a safe id"),
])
@pytest.mark.e2e
def test_cli_mistakes_exit_2_with_one_line(args, needle):
    r = cli(*args, "--bootstrap-servers", "127.0.0.1:1")
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_resumed_restore_rate_counts_only_the_current_run():
    from kafka_backup.exporter.collector import View, restore_eta, restore_rate
    from kafka_backup.schemas.state import JobRate, JobState

    now = 1_800_000_000.0
    s = JobState(kind="restore", job="r", backup_id="b", started_ts=now - 2, total_records=1000,
                 restored_total=700, job_rates=[JobRate(int(now) - 30, 600),  # earlier run
                                                JobRate(int(now) - 1, 100)])
    view = View(now=now, window=60, jobs=[s])
    assert restore_rate(s, view) == 100 / 2
    assert restore_eta(s, view) == 300 / 50


def test_reported_optional_read_counts_hits_and_misses_without_errors(tmp_path):
    reports: list[OpReport] = []
    storage = Storage(FileBackend(str(tmp_path)), reports.append)
    storage.put("a/cp.json", b"12345", "checkpoint")
    reports.clear()
    assert storage.get_optional("a/cp.json", "checkpoint", report=True) == b"12345"
    assert storage.get_optional("a/none.json", "checkpoint", report=True) is None
    assert storage.get_optional("a/cp.json", "checkpoint") == b"12345"  # unreported, as the backup reads
    assert [(r.direction, r.operation, r.nbytes, r.error) for r in reports] == [
        ("read", "checkpoint", 5, None), ("read", "checkpoint", 0, None)]


@pytest.mark.parametrize("given,ms", [("1785000000123", 1785000000123), ("2026-07-25T17:20:00.123Z", 1785000000123),
                                      ("2026-07-25T19:20:00.123+02:00", 1785000000123),
                                      ("2026-07-25T17:20:00.123", 1785000000123)])  # zone-less is UTC
def test_offset_reset_takes_epoch_ms_or_iso_8601(given, ms):
    from kafka_backup.producers.offset_reset import timestamp_ms
    from kafka_backup.schemas.config import load

    assert timestamp_ms(load(None, {"offset_reset.to_timestamp": given}, environ={}).offset_reset) == ms


def test_segments_are_fetched_ahead_in_order_several_at_once_and_a_damaged_one_fails_only_when_reached(tmp_path):
    """Fetching ahead, a backend of concurrency 2: while one segment's records are restored, the next two
    are fetched in threads of their own (the first two meet at a barrier: one at a time, the first would
    wait there alone and fail), never more; each is checked and decoded on the restoring thread when
    its turn comes, so everything before a damaged segment is restored and its error comes in order."""
    import threading

    from kafka_backup.producers import layout
    from kafka_backup.producers.restore_reader import SegmentReader
    from kafka_backup.producers.restore_scope import RestoreFailed, Window
    from kafka_backup.producers.run import NullEmitter
    from kafka_backup.producers.segments import StoredRecord

    segs = [layout.SegmentInfo(key=f"s{i}", start_offset=2 * i, end_offset=2 * i + 2, records=2, bytes=2,
                               uncompressed_bytes=2, stored_bytes=2, algorithm="none") for i in range(4)]
    restoring = threading.get_ident()
    fetched: list[tuple[str, bool]] = []  # (segment, on the restoring thread)
    checked: list[tuple[str, bool]] = []
    meet = threading.Barrier(2, timeout=10)
    lock = threading.Lock()
    under_way = [0, 0]  # now, peak

    def fetch(seg: layout.SegmentInfo) -> bytes:
        with lock:
            fetched.append((seg.key, threading.get_ident() == restoring))
            under_way[0] += 1
            under_way[1] = max(under_way)
        try:
            if seg.key in ("s0", "s1"):
                meet.wait()
            return seg.key.encode()
        finally:
            with lock:
                under_way[0] -= 1

    def check(seg: layout.SegmentInfo, data: bytes) -> list[StoredRecord]:
        checked.append((data.decode(), threading.get_ident() == restoring))
        if seg.key == "s2":
            raise layout.SegmentDamaged(seg.key, "is corrupt (a test)", "codec")
        return [StoredRecord(o, 1, 1, None, b"v") for o in range(seg.start_offset, seg.end_offset)]

    reader = SegmentReader(Storage(FileBackend(str(tmp_path), concurrency=2)), "bk", Window(None, None), NullEmitter())
    reader.segments = lambda cur: segs  # type: ignore[method-assign]
    reader._fetch = fetch  # type: ignore[method-assign]
    reader._check = check  # type: ignore[method-assign]
    cur = layout.RestoreCursor("t", 0, "t2", end_offset=8, records=8)
    got = reader.records(cur, 1)
    offsets = [next(got).offset]  # s0 (from offset 1); s1 and s2 being fetched
    assert [seg.key for seg in reader.ahead.under_way()] == ["s1", "s2"]
    offsets += [next(got).offset, next(got).offset]  # s1's records; s2 and s3 being fetched
    assert offsets == [1, 2, 3]
    with pytest.raises(RestoreFailed, match="segment s2: is corrupt"):
        next(got)  # the damaged segment's error, where it comes in order
    assert sorted(fetched) == [("s0", False), ("s1", False), ("s2", False), ("s3", False)]
    assert checked == [("s0", True), ("s1", True), ("s2", True)]  # s3 fetched, never decoded
    assert under_way[1] == 2


def test_the_restore_s_partitions_are_read_ahead_as_one_sequence(tmp_path):
    """A segment a partition (a many-partition backup): the restore plans every pending partition from
    its start, so the next partition's segment is fetched while this one's is restored (the two fetches
    meet at a barrier), and a partition's segments before its resume point are never fetched."""
    import threading

    from kafka_backup.producers import layout
    from kafka_backup.producers.restore_reader import SegmentReader
    from kafka_backup.producers.restore_scope import Window
    from kafka_backup.producers.run import NullEmitter
    from kafka_backup.producers.segments import StoredRecord

    def seg(p: int, start: int) -> layout.SegmentInfo:
        return layout.SegmentInfo(key=f"p{p}-{start}", start_offset=start, end_offset=start + 2, records=2, bytes=2,
                                  uncompressed_bytes=2, stored_bytes=2, algorithm="none")

    segs = {0: [seg(0, 0)], 1: [seg(1, 0), seg(1, 2)]}
    reads: list[str] = []
    meet = threading.Barrier(2, timeout=10)

    def fetch(s: layout.SegmentInfo) -> bytes:
        reads.append(s.key)
        meet.wait()
        return b""

    def check(s: layout.SegmentInfo, data: bytes) -> list[StoredRecord]:
        return [StoredRecord(o, 1, 1, None, b"v") for o in range(s.start_offset, s.end_offset)]

    reader = SegmentReader(Storage(FileBackend(str(tmp_path))), "bk", Window(None, None), NullEmitter())
    reader.segments = lambda cur: segs[cur.partition]  # type: ignore[method-assign]
    reader._fetch = fetch  # type: ignore[method-assign]
    reader._check = check  # type: ignore[method-assign]
    first = layout.RestoreCursor("t", 0, "t2", end_offset=2, records=2)
    second = layout.RestoreCursor("t", 1, "t2", end_offset=4, records=4)
    reader.plan([(first, 0), (second, 2)])  # the second resumes at offset 2: its segment p1-2
    assert [r.offset for r in reader.records(first, 0)] == [0, 1]
    assert [r.offset for r in reader.records(second, 2)] == [2, 3]
    assert sorted(reads) == ["p0-0", "p1-2"]  # p1-0 is before the resume point: never read


def test_a_finished_partition_is_checkpointed_on_the_cadence_and_a_stopped_one_at_once(tmp_path, monkeypatch):
    """A partition's batches are claimed as they are acknowledged; the checkpoint (a storage round trip)
    is written on its cadence, not at every partition's end, and always for what a stop leaves (then
    the run ends, and the restore's end writes the rest)."""
    import io
    import threading

    from kafka_backup.producers import restore_writer
    from kafka_backup.producers.restore_scope import RestoreInterrupted
    from kafka_backup.producers.restore_writer import Pacer, Writer
    from kafka_backup.producers.segments import StoredRecord

    clock = [100.0]
    monkeypatch.setattr(restore_writer.time, "monotonic", lambda: clock[0])

    class Acked:
        """A producer acknowledging every record at its next poll or flush, at the partition's next offset."""

        def __init__(self) -> None:
            self.queued: list = []
            self.next: dict[int, int] = {}

        def produce(self, topic, value, key, partition, timestamp, headers, on_delivery):
            self.queued.append((partition, on_delivery))

        def poll(self, timeout=0):
            queued, self.queued = self.queued, []
            for partition, on_delivery in queued:
                offset = self.next.get(partition, 0)
                self.next[partition] = offset + 1
                on_delivery(None, type("Msg", (), {"offset": lambda self, o=offset: o})())
            return len(queued)

        def flush(self, timeout=0):
            self.poll()
            return 0

    saves: list[int] = []
    cp = layout.RestoreCheckpoint("r", "bk", {"t": "t2"}, 6)
    cp.partitions = [layout.RestoreCursor("t", p, "t2", end_offset=2, records=2) for p in range(3)]
    stopping = threading.Event()
    writer = Writer("127.0.0.1:1", RestoreConfig(restore_id="r", backup_id="bk", batch_records=1), cp, Events(),
                    Pacer(0, stopping), lambda: saves.append(cp.restored_total), lambda err: None, io.StringIO())
    writer._producer = Acked()  # type: ignore[assignment]

    def records(p: int):
        return iter([StoredRecord(o, 1, 1, None, b"v") for o in range(2)])

    writer.restore_partition(cp.partitions[0], records(0))
    assert cp.partitions[0].restored == 2 and saves == []  # acknowledged, not checkpointed: within the cadence
    clock[0] += 1.0  # the cadence (CHECKPOINT_EVERY_S) is due at the next claim
    writer.restore_partition(cp.partitions[1], records(1))
    assert cp.partitions[1].restored == 2 and saves == [3]  # partition 0 and the first batch of 1, in one
    stopping.set()
    with pytest.raises(RestoreInterrupted):
        writer.restore_partition(cp.partitions[2], records(2))
    assert saves == [3, 4]  # a stop writes what is acknowledged at once: partition 1's last batch
    assert [f["restored_total"] for e, f in writer.emitter.events if e == "RestoreProgress"] == [3, 4]


class AckedOnFlush:
    """A producer whose records are acknowledged only by a flush (a broker still working through them),
    each at its partition's next offset."""

    def __init__(self) -> None:
        self.queued: list = []
        self.next: dict[int, int] = {}
        self.flushes = 0

    def produce(self, topic, value, key, partition, timestamp, headers, on_delivery):
        self.queued.append((partition, on_delivery))

    def poll(self, timeout=0):
        return 0

    def flush(self, timeout=0):
        self.flushes += 1
        queued, self.queued = self.queued, []
        for partition, on_delivery in queued:
            offset = self.next.get(partition, 0)
            self.next[partition] = offset + 1
            on_delivery(None, type("Msg", (), {"offset": lambda self, o=offset: o})())
        return 0


def pipelined_writer(partitions: int):
    import io
    import threading

    from kafka_backup.producers.restore_writer import Pacer, Writer

    saves: list[int] = []
    cp = layout.RestoreCheckpoint("r", "bk", {"t": "t2"}, 2 * partitions)
    cp.partitions = [layout.RestoreCursor("t", p, "t2", end_offset=2, records=2) for p in range(partitions)]
    stopping = threading.Event()
    writer = Writer("127.0.0.1:1", RestoreConfig(restore_id="r", backup_id="bk", batch_records=1), cp, Events(),
                    Pacer(0, stopping), lambda: saves.append(cp.restored_total), lambda err: None, io.StringIO())
    writer._producer = AckedOnFlush()  # type: ignore[assignment]
    return writer, cp, saves, stopping


def two_records():
    from kafka_backup.producers.segments import StoredRecord

    return iter([StoredRecord(o, 1, 1, None, b"v") for o in range(2)])


def test_a_partition_s_end_does_not_wait_for_its_acknowledgements_the_run_s_end_does():
    """The next partition is produced while the broker still works through the last one's batches (a
    wait at each partition's end drained the producer while the segments' reading and decoding stood
    still); the run's end waits for every partition, claims each batch at its exact target offsets,
    and checkpoints once."""
    writer, cp, saves, _stopping = pipelined_writer(3)
    for cur in cp.partitions:
        writer.restore_partition(cur, two_records())
    assert [c.restored for c in cp.partitions] == [0, 0, 0] and writer.producer.flushes == 0  # type: ignore[attr-defined]
    assert writer.in_flight == 6 and len(writer.open) == 3
    writer.finish()
    assert [(c.restored, c.next_offset, c.target_next) for c in cp.partitions] == [(2, 2, 2)] * 3
    assert saves == [6] and writer.in_flight == 0 and writer.open == []
    assert [f["restored_total"] for e, f in writer.emitter.events if e == "RestoreProgress"] == [6]


def test_a_stop_waits_for_what_every_partition_sent_and_checkpoints_it():
    """Partition 0 sent, not acknowledged; a stop as partition 1 starts: partition 0's batches are
    acknowledged, claimed and checkpointed before the stop goes on."""
    from kafka_backup.producers.restore_scope import RestoreInterrupted

    writer, cp, saves, stopping = pipelined_writer(2)
    writer.restore_partition(cp.partitions[0], two_records())
    assert cp.partitions[0].restored == 0
    stopping.set()
    with pytest.raises(RestoreInterrupted):
        writer.restore_partition(cp.partitions[1], two_records())
    assert (cp.partitions[0].restored, cp.partitions[1].restored) == (2, 0) and saves == [2]


@pytest.mark.e2e  # a fresh interpreter: whether tqdm gets imported
def test_the_progress_bar_is_tqdm_s_on_a_terminal_and_tqdm_is_not_imported_otherwise():
    """stderr a file or a pipe (a CronJob, a container log): no bar, and no 15-20 ms tqdm import."""
    import subprocess
    import sys

    probe = r'''
import io, sys
from kafka_backup.producers import layout
from kafka_backup.producers.restore_writer import _open_bar

class Tty(io.StringIO):
    def isatty(self):
        return True

cp = layout.RestoreCheckpoint("r", "b", {"t": "t"}, 10, None, None, created_ts=0.0, updated_ts=0.0)
piped = _open_bar(cp, "r", io.StringIO())
piped.update(3)
piped.close()
print(type(piped).__name__, "tqdm" in sys.modules)
term = Tty()
bar = _open_bar(cp, "r", term)
bar.update(3)
bar.close()
print(type(bar).__name__, "restore r:  30%" in term.getvalue())
'''
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["NoBar False", "tqdm True"]


def test_the_restore_producer_is_connected_to_a_named_broker_before_its_first_send(monkeypatch):
    """An idempotent producer holds its first records until it has a producer id, which it asks only
    of a connected broker: made and sent to at once, its first record was acknowledged 0.5 s later
    (the id timer), 14 ms with two metadata requests first (``kafka_admin.connect_producer``). The
    writer makes them before its first batch, once; a cluster that does not answer them is left to
    the producer's own retries."""
    import io
    import threading
    from collections import deque

    from confluent_kafka import KafkaError, KafkaException

    from kafka_backup.producers import restore_writer
    from kafka_backup.producers.restore_writer import Pacer, Writer
    from kafka_backup.producers.segments import StoredRecord
    from kafka_backup.schemas import kafka_admin

    calls: list[tuple] = []

    class Recorded:
        answering = True

        def __init__(self, conf) -> None:
            assert conf["enable.idempotence"] is True
            calls.append(("made",))

        def list_topics(self, topic=None, timeout=-1):
            calls.append(("metadata", topic))
            if not self.answering:
                raise KafkaException(KafkaError(KafkaError._TRANSPORT))

        def produce(self, topic, value, key, partition, timestamp, headers, on_delivery):
            calls.append(("produce", topic))

        def poll(self, timeout=0):
            return 0

    monkeypatch.setattr(restore_writer, "Producer", Recorded)
    cp = layout.RestoreCheckpoint("r", "bk", {"t": "t2"}, 6)
    cur = layout.RestoreCursor("t", 0, "t2", end_offset=4, records=4)
    writer = Writer("127.0.0.1:1", RestoreConfig(restore_id="r", backup_id="bk", batch_records=2), cp, Events(),
                    Pacer(0, threading.Event()), lambda: None, lambda err: None, io.StringIO())
    flights: deque = deque()
    for start in (0, 2):
        writer._send(cur, [StoredRecord(o, 1, 1, None, b"v") for o in (start, start + 1)], flights)
    assert calls == [("made",), ("metadata", "t2"), ("metadata", "t2")] + [("produce", "t2")] * 4
    Recorded.answering = False
    calls.clear()
    assert kafka_admin.connect_producer(Recorded({"enable.idempotence": True}), "t2", timeout=0.1) is False
    assert calls == [("made",), ("metadata", "t2")]  # the first unanswered request ends it
