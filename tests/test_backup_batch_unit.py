"""The backup buffers records as tuples: the segments they make are byte for byte those of StoredRecords."""

from __future__ import annotations

import random
import sys

import pytest

from kafka_backup.producers import segments
from kafka_backup.schemas import events as ev
from tests.conftest import FakeMessage


def buffered(buffer: segments.SegmentBuffer) -> list[tuple]:
    """What a segment buffer holds, decoded back to ``StoredRecord`` tuples (headers as tuples)."""
    data, size = buffer.seal("t", 0, "none")
    return [(r.offset, r.timestamp, r.timestamp_type, r.key, r.value, tuple(tuple(h) for h in r.headers))
            for r in segments.decode(data, "none", size).records]


@pytest.mark.parametrize("count", [1, 15, 16, 17, 65535, 65536, 70001])
@pytest.mark.parametrize("topic", ["t", "a" * 249, "b" * 300])
def test_a_segment_encoded_as_its_runs_arrive_is_byte_for_byte_the_segment_of_its_records(count, topic):
    """Around the sizes where msgpack's array header changes form (fixarray, array16, array32), and
    with Kafka's longest topic name (the head fits the room kept for it) and a longer one (it does not)."""
    rng = random.Random(count)
    rows = [(1000 + i, 1_790_000_000_000 + rng.randrange(10_000), 1 + i % 2, None if i % 5 == 0 else b"k%d" % i,
             None if i % 7 == 0 else b"v" * (i % 50), (("h", b"%d" % i), ("n", None)) if i % 3 == 0 else ())
            for i in range(count)]
    buffer, i = segments.SegmentBuffer(), 0
    while i < count:
        j = min(count, i + rng.randint(1, 2000))
        buffer.add(rows[i:j])
        i = j
    for alg in ("none", "zstd"):
        assert buffer.seal(topic, 5, alg) == segments.encode(topic, 5, rows, alg)
    assert (buffer.records, buffer.first_offset, buffer.last_offset) == (count, 1000, 1000 + count - 1)
    assert (buffer.min_ts, buffer.max_ts) == (min(r[1] for r in rows), max(r[1] for r in rows))


def test_tuples_and_stored_records_make_the_same_segment():
    rows = [(10, 1_790_000_000_000, 1, b"k", b"v" * 50, [("h", b"1"), ("n", None)]),
            (11, 1_790_000_000_001, 2, None, None, []),
            (12, 1_790_000_000_002, 1, b"", b"x", [])]
    for alg in segments.ALGORITHMS:
        as_structs = segments.encode("t", 3, [segments.StoredRecord(*r) for r in rows], alg)
        as_tuples = segments.encode("t", 3, rows, alg)
        assert as_tuples == as_structs
        back = segments.decode(as_tuples[0], alg, as_tuples[1])
        assert [tuple(getattr(r, f) for f in r.__struct_fields__) for r in back.records] == [
            (o, ts, tt, k, v, [tuple(h) for h in hs]) for o, ts, tt, k, v, hs in rows]


class Eof:
    def code(self) -> int:
        from confluent_kafka import KafkaError

        return KafkaError._PARTITION_EOF


def test_take_buffers_each_run_of_a_batch_and_skips_partitions_not_owned():
    """Runs of one partition's records at a time: a partition this worker does not own is skipped
    whole, records at or past a one-shot target are not buffered, an EOF moves the position."""
    from types import SimpleNamespace

    from kafka_backup.producers.backup import BackupWorker, PartitionWork

    worker = BackupWorker.__new__(BackupWorker)
    worker.cfg = SimpleNamespace(segment_max_records=1000, segment_max_bytes=1 << 30)
    worker.consumed, worker._buffered_bytes = {}, 0
    mine = PartitionWork("t", 0, 0, None, None, target=None)  # type: ignore[arg-type]
    capped = PartitionWork("t", 2, 0, None, None, target=6)  # type: ignore[arg-type]
    worker.parts = {"t/0": mine, "t/2": capped}
    batch = [FakeMessage("t", 0, 0, headers=[("h", b"1")]), FakeMessage("t", 0, 1, key=None),
             FakeMessage("t", 1, 0), FakeMessage("t", 1, 1),  # not owned: skipped, run and all
             FakeMessage("t", 2, 5), FakeMessage("t", 2, 6), FakeMessage("t", 2, 7),  # 6 and 7: past the target
             FakeMessage("t", 0, 2, value=None),
             FakeMessage("t", 2, 9, error=Eof())]
    worker._take(batch)
    rows = buffered(mine.buffer)
    assert [r[0] for r in rows] == [0, 1, 2]
    assert rows[0] == (0, 1_790_000_000_000, 1, b"k", b"vv", (("h", b"1"),))
    assert rows[1][3] is None and rows[2][4] is None and rows[1][5] == ()
    assert mine.buffer_bytes == 3 + 2 + 1 and mine.position == 3
    assert [r[0] for r in buffered(capped.buffer)] == [5] and capped.position == 6
    assert worker.consumed == {"t": [4, 3 + 2 + 1 + 3]}
    assert mine.newest_available_ts == 1_790_000_000_002 and capped.newest_available_ts == 1_790_000_000_005


def test_buffered_records_are_held_encoded_not_as_objects():
    """A fetched run is encoded into its segment's buffer at once and its objects let go: a segment's
    50,000 records held as Python objects until it was cut cost the fetch loop a third of its rate
    (memory no longer reused, caches cold; bench/backup.py). Before that, rows whose headers were
    lists stayed tracked by the garbage collector and every full collection walked them."""
    from types import SimpleNamespace

    from kafka_backup.producers.backup import BackupWorker, PartitionWork

    worker = BackupWorker.__new__(BackupWorker)
    worker.cfg = SimpleNamespace(segment_max_records=1000, segment_max_bytes=1 << 30)
    worker.consumed, worker._buffered_bytes = {}, 0
    work = PartitionWork("t", 0, 0, None, None)  # type: ignore[arg-type]
    worker.parts = {"t/0": work}
    value = b"a value no other object holds " + bytes(range(64))
    before = sys.getrefcount(value)
    worker._take([FakeMessage("t", 0, 0, headers=[("h", b"1"), ("n", None)], value=value), FakeMessage("t", 0, 1),
                  FakeMessage("t", 0, 2, key=None, value=None, headers=[])])
    assert sys.getrefcount(value) == before  # the buffer holds its bytes, not it
    assert buffered(work.buffer)[0][4] == value and work.buffer.records == 3


def test_take_cuts_segments_inside_a_run_where_the_record_or_byte_limit_is_reached():
    from types import SimpleNamespace

    from kafka_backup.producers.backup import BackupWorker, PartitionWork

    worker = BackupWorker.__new__(BackupWorker)
    worker.cfg = SimpleNamespace(segment_max_records=3, segment_max_bytes=10)
    worker.consumed, worker._buffered_bytes = {}, 0
    work = PartitionWork("t", 0, 0, None, None)  # type: ignore[arg-type]
    worker.parts = {"t/0": work}
    cuts: list[tuple[list[int], int, int]] = []  # (offsets, buffered bytes, position) at each cut

    def flush(w: PartitionWork) -> None:
        cuts.append(([r[0] for r in buffered(w.buffer)], w.buffer_bytes, w.position))
        w.buffer, w.buffer_bytes = segments.SegmentBuffer(), 0

    worker._flush = flush  # type: ignore[method-assign]
    sizes = [2, 2, 2, 2, 9, 1, 1, 1, 1]  # key + value bytes of offsets 0..8
    worker._take([FakeMessage("t", 0, o, key=b"", value=b"x" * n) for o, n in enumerate(sizes)])
    # 3 records (the record limit); 2 + 9 >= 10 bytes (the byte limit); 3 records again; 1 left over
    assert cuts == [([0, 1, 2], 6, 3), ([3, 4], 11, 5), ([5, 6, 7], 3, 8)]
    assert [r[0] for r in buffered(work.buffer)] == [8] and work.buffer_bytes == 1 and work.position == 9
    assert worker.consumed == {"t": [9, sum(sizes)]}


class SealingEmitter:
    """The worker's emitter, recording each event with the thread that emitted it."""

    worker = "test"

    def __init__(self) -> None:
        import threading

        self.events: list[tuple[str, dict, int]] = []
        self._ident = threading.get_ident

    def emit(self, event_type, on_delivered=None, **fields) -> None:
        self.events.append((event_type.__name__, fields, self._ident()))

    def storage_op(self, backend, r) -> None:
        self.events.append(("StorageOp", {"operation": r.operation, "error": r.error}, self._ident()))

    def kafka_error(self, err, operation) -> None:
        pass  # the real consumer, closed at once, may say its (unreachable) broker is down


class Commits:
    """The consumer's commit, recorded (the rest of the consumer is never reached here)."""

    def __init__(self) -> None:
        self.offsets: list[tuple[str, int, int]] = []
        self.requests = 0

    def commit(self, offsets, asynchronous=True):
        assert not asynchronous
        self.requests += 1
        self.offsets += [(tp.topic, tp.partition, tp.offset) for tp in offsets]
        return offsets  # what the consumer returns: each with its error (none here)


def sealing_worker(tmp_path, backend, **config):
    import threading

    from kafka_backup.producers.backup import BackupWorker
    from kafka_backup.producers.storage import Storage
    from kafka_backup.schemas.config import BackupConfig

    cfg = BackupConfig(**{"backup_id": "b1", "topics": ["t"], "segment_max_records": 2, "compression": "none",
                          **config})
    emitter = SealingEmitter()
    worker = BackupWorker("127.0.0.1:9", cfg, Storage(backend, backoff_s=0), emitter)  # type: ignore[arg-type]
    worker.consumer.close()
    worker.consumer = Commits()  # type: ignore[assignment]
    worker._load_partitions({("t", 0): None})
    return worker, emitter, threading.get_ident()


class Recording:
    """A file backend recording each put's key (below the backup) and the thread that made it; it
    fails the put of ``fail_key`` (not transient: no retry)."""

    def __new__(cls, root: str, fail_key: str | None = None):  # a FileBackend, recording
        import threading

        from kafka_backup.producers.storage import FileBackend, StorageError

        class _Recording(FileBackend):
            def put(self, key, data):
                short = key.removeprefix("b1/topics/t/0/").lstrip("0") or key
                self.puts.append((short, threading.current_thread().name))
                if short == fail_key:
                    raise StorageError("auth", f"{key}: access denied")
                super().put(key, data)

        backend = _Recording(root)
        backend.puts = []
        return backend


def test_segments_are_sealed_off_the_loop_and_completed_on_it_in_order(tmp_path):
    """Six records, segments of two: each segment stored before the checkpoint naming it, by the
    sealing thread; each completed in order on the loop's thread: its storage calls reported, then
    its SegmentStored; then the offset after the last, committed once."""
    from kafka_backup.producers import layout
    from kafka_backup.producers.storage import FileBackend, Storage

    backend = Recording(str(tmp_path))
    worker, emitter, loop = sealing_worker(tmp_path, backend)
    worker._take([FakeMessage("t", 0, o) for o in range(6)])
    worker._flush_all()
    assert [k for k, _ in backend.puts] == [".seg", "checkpoint.json", "2.seg", "checkpoint.json", "4.seg",
                                            "checkpoint.json"]  # one partition's: one after the other, in order
    assert all(thread.startswith("seal_") for _, thread in backend.puts)
    assert [(name, f.get("operation")) for name, f, _ in emitter.events] == [
        ("StorageOp", "segment"), ("StorageOp", "checkpoint"), ("SegmentStored", None),
    ] * 3 + [("OffsetsCommitted", None)]
    stored = [(f["start_offset"], f["end_offset"], f["covers_from"]) for name, f, _ in emitter.events
              if name == "SegmentStored"]
    assert stored == [(0, 2, 0), (2, 4, 2), (4, 6, 4)]
    assert worker.consumer.offsets == [("t", 0, 6)]
    assert {ident for _, _, ident in emitter.events} == {loop}  # the emitter is the loop thread's alone
    cp = layout.read_checkpoint(Storage(FileBackend(str(tmp_path))), "b1", "t", 0)
    assert cp is not None and cp.next_offset == 6 and worker.parts["t/0"].next_offset == 6


def test_beyond_buffer_max_bytes_the_largest_buffers_are_cut_early_and_every_record_is_stored_once(tmp_path):
    """A catch-up reads a slice of every partition per fetch: four partitions, 10-byte records, 3 of each
    partition a batch, no record or time limit reached, ``buffer_max_bytes`` 100. After each batch the
    buffers hold at most 100 bytes together, each cut taking the largest buffer; at the end every
    partition's segments hold its records, each exactly once, in offset order, and its offset is committed."""
    from kafka_backup.producers import layout
    from kafka_backup.producers.storage import FileBackend, Storage

    worker, _emitter, _loop = sealing_worker(tmp_path, FileBackend(str(tmp_path)), segment_max_records=1000,
                                             buffer_max_bytes=100)
    for p in range(1, 4):
        worker._load_partitions({("t", p): None})
    cuts: list[tuple[int, int, int]] = []  # partition, its buffered bytes, the largest other buffer's
    flush = worker._flush

    def recorded(work) -> None:
        others = max(w.buffer_bytes for w in worker.parts.values() if w is not work)
        cuts.append((work.partition, work.buffer_bytes, others))
        flush(work)

    worker._flush = recorded  # type: ignore[method-assign]
    for batch in range(10):
        worker._take([FakeMessage("t", p, 3 * batch + i, key=b"k", value=b"v" * 9) for p in range(4) for i in range(3)])
        worker._flush_largest()
        held = sum(w.buffer_bytes for w in worker.parts.values())
        assert worker._buffered_bytes == held and held <= 100, batch
    assert cuts and all(size >= others for _, size, others in cuts)
    assert {p for p, _, _ in cuts} == {0, 1, 2, 3}
    worker._flush_all()
    storage = Storage(FileBackend(str(tmp_path)))
    storage.listener = lambda report: None
    for p in range(4):
        cp, listed = layout.read_index(storage, "b1", "t", p)
        offsets = [r.offset for seg in listed
                   for r in layout.read_segment(storage.get(seg.key, "segment"), seg, "t", p)]
        assert offsets == list(range(30)) and cp is not None and cp.next_offset == 30, p
    assert {(t, p): o for t, p, o in worker.consumer.offsets} == {("t", p): 30 for p in range(4)}  # the last of each
    assert worker._buffered_bytes == 0


def test_a_revoked_partition_s_buffer_leaves_the_buffered_total(tmp_path):
    """A revocation drops the partition's unflushed records (its next owner reads them again from the
    checkpoint): they no longer count against ``buffer_max_bytes``."""
    from confluent_kafka import TopicPartition

    from kafka_backup.producers.storage import FileBackend

    worker, _emitter, _loop = sealing_worker(tmp_path, FileBackend(str(tmp_path)), segment_max_records=1000)
    worker._load_partitions({("t", 1): None})
    worker._take([FakeMessage("t", p, o, key=b"k", value=b"v" * 9) for p in range(2) for o in range(5)])
    assert worker._buffered_bytes == 100
    worker._on_revoke(worker.consumer, [TopicPartition("t", 1)])
    assert worker._buffered_bytes == 50 and list(worker.parts) == ["t/0"]


def test_a_commit_a_partition_refuses_is_reported_and_retried_for_that_partition_alone(tmp_path, monkeypatch):
    """Two partitions' segments complete in one cycle: one commit request for both. The broker
    refuses partition 1 (a partition-level error in the reply): partition 0's offset is reported
    committed, the error is reported, and the retry asks for partition 1 alone. A commit that keeps
    failing (the request itself) is reported each time, retried twice, then left to the next commit."""
    from types import SimpleNamespace

    from confluent_kafka import KafkaError, KafkaException

    from kafka_backup.producers import backup
    from kafka_backup.producers.storage import FileBackend

    monkeypatch.setattr(backup.time, "sleep", lambda s: None)
    refused = KafkaError(KafkaError.OFFSET_METADATA_TOO_LARGE)

    class Refusing(Commits):
        def __init__(self, answers) -> None:
            super().__init__()
            self.answers = answers
            self.asked: list[list[tuple[str, int, int]]] = []

        def commit(self, offsets, asynchronous=True):
            assert not asynchronous
            self.asked.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])
            answer = self.answers.pop(0)
            if isinstance(answer, KafkaError):
                raise KafkaException(answer)
            return [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=tp.offset,
                                    error=refused if tp.partition in answer else None) for tp in offsets]

    worker, emitter, _loop = sealing_worker(tmp_path, FileBackend(str(tmp_path)))
    worker._load_partitions({("t", 1): None})
    worker.consumer = Refusing([{1}, set()])  # type: ignore[assignment]
    worker._take([FakeMessage("t", p, o) for p in range(2) for o in range(2)])
    worker._flush_all()
    assert worker.consumer.asked == [[("t", 0, 2), ("t", 1, 2)], [("t", 1, 2)]]
    reported = [(name, f.get("offsets"), f.get("operation")) for name, f, _ in emitter.events
                if name in ("OffsetsCommitted", "ErrorRaised", "Retry")]
    assert reported == [
        ("OffsetsCommitted", [ev.TopicPartitionOffset("t", 0, 2)], None), ("ErrorRaised", None, "commit"),
        ("Retry", None, "commit"), ("OffsetsCommitted", [ev.TopicPartitionOffset("t", 1, 2)], None)]
    errors = [f for name, f, _ in emitter.events if name == "ErrorRaised"]
    assert (errors[0]["error_type"], errors[0]["transient"]) == ("consumer_error", False)
    assert errors[0]["message"] == "Broker: Offset metadata string too large"

    emitter.events.clear()
    down = KafkaError(KafkaError._TRANSPORT)
    worker.consumer = Refusing([down, down, down])  # type: ignore[assignment]
    worker._take([FakeMessage("t", 0, o) for o in range(2, 4)])
    worker._flush_all()
    assert worker.consumer.asked == [[("t", 0, 4)]] * 3
    assert [(name, f.get("operation")) for name, f, _ in emitter.events
            if name in ("OffsetsCommitted", "ErrorRaised", "Retry")] == [
        ("ErrorRaised", "commit"), ("Retry", "commit"), ("ErrorRaised", "commit"), ("Retry", "commit"),
        ("ErrorRaised", "commit")]
    assert worker.parts["t/0"].next_offset == 4 and not worker._uncommitted  # stored; the next commit tries again


def test_while_the_loop_runs_completed_partitions_are_committed_at_most_once_a_poll_interval(tmp_path,
                                                                                         monkeypatch):
    """Partitions completing in passes one after the other (a continuous backup's staggered flushes):
    the first pass commits at once, the passes within the poll interval after it (500 ms) wait, the
    first pass after it commits what they completed in one request, and the end of the run commits
    what is left without waiting."""
    from concurrent.futures import wait
    from types import SimpleNamespace

    from kafka_backup.producers import backup
    from kafka_backup.producers.storage import FileBackend

    clock = [1000.0]
    monkeypatch.setattr(backup, "time", SimpleNamespace(monotonic=lambda: clock[0], sleep=lambda s: None))
    worker, emitter, _loop = sealing_worker(tmp_path, FileBackend(str(tmp_path)))
    for p in (1, 2, 3):
        worker._load_partitions({("t", p): None})

    def loop_pass(at: float, partition: int | None = None) -> list[list[tuple[str, int, int]]]:
        """A pass of the fetch loop at ``at``, in which ``partition``'s segment (two records) is cut
        and sealed; the commit requests made so far."""
        clock[0] = at
        if partition is not None:
            worker._take([FakeMessage("t", partition, o) for o in range(2)])  # two records: a segment
            wait(list(worker._sealing))
        worker._complete_sealed()
        return requests

    requests: list[list[tuple[str, int, int]]] = []
    commit = worker.consumer.commit

    def recorded(offsets, asynchronous=True):
        requests.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])
        return commit(offsets, asynchronous)

    worker.consumer.commit = recorded  # type: ignore[method-assign]
    assert loop_pass(1000.0, 0) == [[("t", 0, 2)]]
    assert loop_pass(1000.2, 1) == [[("t", 0, 2)]]  # within the interval: waits
    assert loop_pass(1000.4, 2) == [[("t", 0, 2)]]
    assert [p for name, f, _ in emitter.events if name == "SegmentStored" for p in [f["partition"]]] == [0, 1, 2]
    assert loop_pass(1000.5) == [[("t", 0, 2)], [("t", 1, 2), ("t", 2, 2)]]  # due: both, one request
    assert loop_pass(1000.6, 3) == [[("t", 0, 2)], [("t", 1, 2), ("t", 2, 2)]]
    worker._flush_all()  # the end of the run: at once
    assert requests == [[("t", 0, 2)], [("t", 1, 2), ("t", 2, 2)], [("t", 3, 2)]]
    committed = [[(o.partition, o.offset) for o in f["offsets"]] for name, f, _ in emitter.events
                 if name == "OffsetsCommitted"]
    assert committed == [[(0, 2)], [(1, 2), (2, 2)], [(3, 2)]]


def test_after_a_failed_seal_nothing_later_is_stored_and_the_run_fails_with_that_error(tmp_path):
    """The second segment's put fails: the third, already handed to the sealing thread, must not be
    stored either (its checkpoint would say offsets 2-3 are backed up), the durable offset stays at
    2, and the storage error surfaces on the loop's thread, reported before it is raised."""
    import pytest

    from kafka_backup.producers import layout
    from kafka_backup.producers.run import Outcome
    from kafka_backup.producers.storage import FileBackend, Storage, StorageError

    backend = Recording(str(tmp_path), fail_key="2.seg")
    worker, emitter, _loop = sealing_worker(tmp_path, backend)
    with pytest.raises(StorageError, match="access denied"):
        worker._take([FakeMessage("t", 0, o) for o in range(6)])
        worker._flush_all()
    for later in list(worker._sealing):  # what was handed to the sealing thread after the failure
        later.result()
    worker.after_end(Outcome("failed"))
    assert [k for k, _ in backend.puts] == [".seg", "checkpoint.json", "2.seg"]
    cp = layout.read_checkpoint(Storage(FileBackend(str(tmp_path))), "b1", "t", 0)
    assert cp is not None and cp.next_offset == 2 and worker.parts["t/0"].next_offset == 2
    assert worker.consumer.offsets == [("t", 0, 2)]
    assert [(name, f.get("operation"), f.get("error") is not None) for name, f, _ in emitter.events] == [
        ("StorageOp", "segment", False), ("StorageOp", "checkpoint", False), ("SegmentStored", None, False),
        ("StorageOp", "segment", True), ("OffsetsCommitted", None, False)]  # the stored segment's offset still goes out


def test_segments_of_different_partitions_are_sealed_at_once_and_each_partition_s_in_order(tmp_path):
    """Four partitions, two segments each (eight: as many as the filesystem's concurrency, so none
    waits to be handed over): the first segment of every partition is stored at a barrier of four (sealed one after the other, the first would wait there alone and fail); each
    partition's segments and checkpoints are still stored in order, and completed in the order cut."""
    import threading

    from kafka_backup.producers import layout
    from kafka_backup.producers.storage import FileBackend, Storage

    assert FileBackend(str(tmp_path)).concurrency >= 8
    meet = threading.Barrier(4, timeout=10)
    puts: list[tuple[int, str]] = []
    lock = threading.Lock()

    class Together(FileBackend):
        def put(self, key, data):
            partition, name = int(key.split("/")[3]), key.split("/")[4]
            if name == "00000000000000000000.seg":
                meet.wait()
            with lock:
                puts.append((partition, name.lstrip("0")))
            super().put(key, data)

    worker, emitter, _loop = sealing_worker(tmp_path, Together(str(tmp_path)))
    for p in range(1, 4):
        worker._load_partitions({("t", p): None})
    worker._take([FakeMessage("t", p, o) for p in range(4) for o in range(4)])  # cut at 2 records each
    worker._flush_all()
    for p in range(4):
        assert [name for q, name in puts if q == p] == [".seg", "checkpoint.json", "2.seg", "checkpoint.json"], p
        cp = layout.read_checkpoint(Storage(FileBackend(str(tmp_path))), "b1", "t", p)
        assert cp is not None and cp.next_offset == 4 and cp.segment_count == 2
    stored = [(f["partition"], f["start_offset"]) for name, f, _ in emitter.events if name == "SegmentStored"]
    assert stored == [(p, o) for p in range(4) for o in (0, 2)]  # completed in the order cut
    assert worker.consumer.offsets == [("t", p, 4) for p in range(4)]  # after the last segments, together
    assert worker.consumer.requests == 1


def test_the_storage_s_concurrency_is_how_many_segments_are_sealed_and_checkpoints_read_at_once(tmp_path):
    """A backend of concurrency 3, six partitions: the checkpoints are read three at a time and the
    first segments stored three at a time (each three meet at a barrier: fewer at once would wait
    there alone and fail), never more (the peak of calls under way)."""
    import threading

    from kafka_backup.producers import layout
    from kafka_backup.producers.storage import FileBackend, Storage

    lock = threading.Lock()
    meet = threading.Barrier(3, timeout=10)
    under_way = {"get": [0, 0], "put": [0, 0]}  # now, peak

    class Three(FileBackend):
        def _held(self, kind: str, call):
            with lock:
                count = under_way[kind]
                count[0] += 1
                count[1] = max(count)
            try:
                meet.wait()
                return call()
            finally:
                with lock:
                    under_way[kind][0] -= 1

        def get(self, key):
            if key.endswith("checkpoint.json"):
                return self._held("get", lambda: super(Three, self).get(key))
            return super().get(key)

        def put(self, key, data):
            if key.endswith(".seg"):
                return self._held("put", lambda: super(Three, self).put(key, data))
            return super().put(key, data)

    worker, _emitter, _loop = sealing_worker(tmp_path, Three(str(tmp_path), concurrency=3))
    assert worker._read_checkpoints([("t", p) for p in range(6)]) == {("t", p): None for p in range(6)}
    for p in range(1, 6):
        worker._load_partitions({("t", p): None})
    worker._take([FakeMessage("t", p, o) for p in range(6) for o in range(2)])  # a segment each
    worker._flush_all()
    assert under_way == {"get": [0, 3], "put": [0, 3]}
    stored = Storage(FileBackend(str(tmp_path)))
    for p in range(6):
        cp = layout.read_checkpoint(stored, "b1", "t", p)
        assert cp is not None and cp.next_offset == 2


def test_watermarks_are_asked_in_two_requests_not_one_a_partition():
    """Every partition's oldest offset and high watermark: one request for the earliest offsets and one
    for the latest, made before either is waited for; a partition's error raises its KafkaException,
    as ``get_watermark_offsets`` did."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import OffsetSpec

    from kafka_backup.producers.watermarks import high_watermarks, watermarks

    earliest = type(OffsetSpec.earliest())

    class Admin:
        def __init__(self, failing: int | None = None) -> None:
            self.asked: list[tuple[str, list[tuple[str, int]], float]] = []
            self.failing = failing

        def list_offsets(self, request, request_timeout):
            kinds = {"earliest" if isinstance(spec, earliest) else "latest" for spec in request.values()}
            assert len(kinds) == 1
            kind = kinds.pop()
            self.asked.append((kind, [(tp.topic, tp.partition) for tp in request], request_timeout))
            answers = {}
            for tp in request:
                answers[tp] = future = Future()
                if tp.partition == self.failing:
                    future.set_exception(KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION)))
                else:
                    future.set_result(SimpleNamespace(offset=(10 if kind == "earliest" else 1000) + tp.partition))
            return answers

    admin = Admin()
    partitions = [("a", p) for p in range(3)] + [("b", 0)]
    assert watermarks(admin, partitions) == {("a", 0): (10, 1000), ("a", 1): (11, 1001), ("a", 2): (12, 1002),
                                             ("b", 0): (10, 1000)}
    assert admin.asked == [("earliest", partitions, 10), ("latest", partitions, 10)]
    assert watermarks(admin, []) == {} and len(admin.asked) == 2  # nothing to ask: no request
    assert high_watermarks(admin, partitions) == {("a", 0): 1000, ("a", 1): 1001, ("a", 2): 1002, ("b", 0): 1000}
    assert admin.asked[2:] == [("latest", partitions, 10)]  # one request, the ends only
    with pytest.raises(KafkaException) as err:
        watermarks(Admin(failing=1), partitions)
    assert err.value.args[0].code() == KafkaError.NOT_LEADER_FOR_PARTITION


def test_checkpoints_are_read_several_at_a_time_each_for_its_own_partition(tmp_path):
    """Four partitions' checkpoints: the reads meet at a barrier of four (one after the other, the first
    would wait there alone and fail), and each partition gets its own."""
    import threading

    from kafka_backup.producers import layout
    from kafka_backup.producers.storage import FileBackend, Storage

    store = Storage(FileBackend(str(tmp_path)))
    for p in range(4):
        store.put(layout.checkpoint_key("b1", "t", p), layout.encode(layout.Checkpoint("t", p, 100 + p)), "checkpoint")
    meet = threading.Barrier(4, timeout=10)

    class Together(FileBackend):
        def get(self, key):
            if key in {layout.checkpoint_key("b1", "t", p) for p in range(4)}:
                meet.wait()
            return super().get(key)

    worker, _emitter, _loop = sealing_worker(tmp_path, Together(str(tmp_path)))
    found = worker._read_checkpoints([("t", p) for p in range(4)])
    assert {tp: (cp.topic, cp.partition, cp.next_offset) for tp, cp in found.items() if cp} == {
        ("t", p): ("t", p, 100 + p) for p in range(4)}
    assert worker._read_checkpoints([("t", 9), ("t", 8)]) == {("t", 9): None, ("t", 8): None}


class Acknowledging(SealingEmitter):
    """A telemetry cluster that acknowledges every event as it is sent (the end of a run waits on it)."""

    def emit(self, event_type, on_delivered=None, **fields) -> None:
        super().emit(event_type, on_delivered, **fields)
        if on_delivered is not None:
            on_delivered(True)

    def flush(self, timeout: float) -> None:
        pass

    def room(self) -> int:
        return 1000


def test_a_run_rewrites_only_the_checkpoints_it_stored_nothing_in_with_the_acknowledged_mark(tmp_path):
    """Run 1 stores two segments in partition 0 and none in partition 1 (a checkpoint of an earlier run,
    whose report was acknowledged after it was written): partition 0's checkpoint stays as sealed (its mark
    trails its last segment, which the next run reports again), partition 1's is rewritten with the mark.
    Run 2, nothing new: it reports partition 0's unacknowledged segment again, then records the mark. Run 3
    reports nothing again and writes nothing."""
    from kafka_backup.producers import layout
    from kafka_backup.producers.storage import FileBackend, Storage

    store = Storage(FileBackend(str(tmp_path)))
    old = layout.SegmentInfo(key=layout.segment_key("b1", "t", 1, 0, "none"), start_offset=0, end_offset=5,
                             records=5, bytes=50, uncompressed_bytes=80, stored_bytes=80, algorithm="none",
                             covers_from=0)
    store.put(old.key, b"x" * 80, "segment")
    store.put(layout.checkpoint_key("b1", "t", 1), layout.encode(layout.append("b1", layout.Checkpoint("t", 1, 0),
                                                                                old, 0)[0]), "checkpoint")

    def run(records: int) -> tuple[list[tuple[str, int, int]], list[str]]:
        backend = Recording(str(tmp_path))
        worker, _emitter, _loop = sealing_worker(tmp_path, backend)
        worker.emitter = worker.reporter.emitter = Acknowledging()
        worker.parts.clear()
        worker._load_partitions(worker._read_checkpoints([("t", 0), ("t", 1)]))
        worker._take([FakeMessage("t", 0, o) for o in range(records)])
        worker._flush_all()
        worker._save_confirmations()
        reported = [(f["partition"], f["start_offset"], f["end_offset"]) for name, f, _ in worker.emitter.events
                    if name == "SegmentStored"]
        return reported, [key for key, _ in backend.puts if key.endswith("checkpoint.json")]

    def marks() -> list[tuple[int, int]]:
        cps = [layout.read_checkpoint(store, "b1", "t", p) for p in (0, 1)]
        return [(cp.next_offset, cp.reported_offset) for cp in cps if cp is not None]

    reported, rewritten = run(4)
    assert reported == [(1, 0, 5), (0, 0, 2), (0, 2, 4)]
    assert rewritten == ["checkpoint.json", "checkpoint.json", "b1/topics/t/1/checkpoint.json"]  # 2 seals, 1 mark
    (next0, mark0), (next1, mark1) = marks()
    assert next0 == 4 and mark0 in (0, 2) and (next1, mark1) == (5, 5)
    reported, rewritten = run(0)
    assert reported == [(0, s, e) for s, e in ((0, 2), (2, 4)) if e > mark0]
    assert rewritten == ["checkpoint.json"] and marks() == [(4, 4), (5, 5)]
    assert run(0) == ([], [])
