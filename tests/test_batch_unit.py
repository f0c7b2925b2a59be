"""Batch records: several events of one job in one telemetry record, each judged as if it came alone.

The envelope (``events.Batch``), the emitter that coalesces a poll cycle's events into one record,
and the equivalence that makes it safe: a log re-encoded as batches folds to the same state bytes
and replays to the same report and verdicts as the log it came from.
"""

from __future__ import annotations

import os
import time

import msgspec
import pytest
from confluent_kafka import KafkaError

from kafka_backup.producers.spool import Spool
from kafka_backup.producers.telemetry import Emitter
from kafka_backup.schemas import events as ev
from kafka_backup.schemas import signing
from kafka_backup.schemas.state import encode_state
from kafka_backup.streams import audit, fold
from kafka_backup.streams.replay import LogRecord, read_log, replay
from kafka_backup.streams.working import WorkingSet
from tests.conftest import ROOT

NOW = 1_780_000_000.0
KEY = b"backup:j"


def event(seq: int, cls: type[ev.Event] = ev.Retry, **fields) -> ev.Event:
    fields = fields or {"operation": "commit"}
    return cls(worker="w-1", seq=seq, ts=NOW + seq, job="j", **fields)


# --- the envelope ---------------------------------------------------------------------------

def test_a_batch_unpacks_to_its_events_in_order_and_a_single_event_to_itself():
    payloads = [ev.encode(event(n)) for n in range(1, 4)]
    assert ev.unpack(ev.encode_batch(payloads)) == payloads
    assert ev.unpack(payloads[0]) == [payloads[0]]
    assert [ev.decode(p).seq for p in ev.unpack(ev.encode_batch(payloads))] == [1, 2, 3]


def test_a_bad_event_inside_a_batch_is_refused_alone_by_its_own_reason():
    good = ev.encode(event(1))
    unknown = msgspec.msgpack.encode({"type": "from_the_future", "instance": "w-1", "seq": 2, "ts": NOW, "job": "j"})
    negative = msgspec.msgpack.encode({"type": "retry", "instance": "w-1", "seq": -3, "ts": NOW, "job": "j",
                                       "operation": "commit"})
    nested = ev.encode_batch([good])
    verdicts = []
    for payload in ev.unpack(ev.encode_batch([good, unknown, negative, nested, good])):
        try:
            verdicts.append(type(ev.decode(payload)).__name__)
        except ev.InvalidEvent as err:
            verdicts.append(err.reason)
    assert verdicts == ["Retry", "unknown_type", "bad_value", "unknown_type", "Retry"]  # batches do not nest


@pytest.mark.parametrize(("value", "reason"), [
    ({"type": "batch", "events": [{"type": "retry"}] * (ev.MAX_BATCH_EVENTS + 1)}, "batch_too_large"),
    ({"type": "batch", "events": []}, "malformed"),
    ({"type": "batch", "events": 3}, "malformed"),
    ({"type": "batch"}, "malformed"),
    ({"type": "batch", "v": ev.SCHEMA_VERSION + 1, "events": [{"type": "retry"}]}, "future_version"),
])
def test_a_batch_record_that_cannot_be_used_is_refused_once_as_a_whole(value, reason):
    with pytest.raises(ev.InvalidEvent) as err:
        ev.unpack(msgspec.msgpack.encode(value))
    assert err.value.reason == reason


def test_the_cap_is_the_structs_and_the_encoder_keeps_to_it():
    assert len(ev.unpack(ev.encode_batch([ev.encode(event(1))] * ev.MAX_BATCH_EVENTS))) == ev.MAX_BATCH_EVENTS
    for n in (0, ev.MAX_BATCH_EVENTS + 1):
        with pytest.raises(ValueError):
            ev.encode_batch([ev.encode(event(1))] * n)


def test_an_aggregator_without_batches_refuses_a_batch_record_as_unknown_type():
    """What an older aggregator does: ``decode`` on the whole record (hence: upgrade aggregators first)."""
    with pytest.raises(ev.InvalidEvent) as err:
        ev.decode(ev.encode_batch([ev.encode(event(1)), ev.encode(event(2))]))
    assert err.value.reason == "unknown_type"


# --- the emitter ----------------------------------------------------------------------------

class FakeProducer:
    """Takes records, acknowledges them at ``poll`` (or fails them with ``fail``); full after ``room`` records."""

    def __init__(self, room: int = 1_000_000) -> None:
        self.records: list[tuple[bytes, bytes, list | None]] = []
        self.waiting: list = []
        self.room = room
        self.fail: KafkaError | None = None

    def produce(self, topic, value, key, headers=None, on_delivery=None) -> None:
        if len(self.waiting) >= self.room:
            raise BufferError("queue full")
        self.records.append((key, value, headers))
        self.waiting.append(on_delivery)

    def poll(self, _timeout: float = 0) -> int:
        waiting, self.waiting = self.waiting, []
        for callback in waiting:
            callback(self.fail, None)
        return len(waiting)

    def flush(self, _timeout: float = 0) -> int:
        self.poll()
        return 0

    def __len__(self) -> int:
        return len(self.waiting)


def emitter(batch: bool, producer: FakeProducer | None = None, spool: Spool | None = None,
            signing_key: bytes | None = None) -> Emitter:
    """An emitter sending through a fake producer: no cluster, the send path only."""
    from kafka_backup.schemas.config import TelemetryConfig

    em = Emitter("unused:9092", TelemetryConfig(batch_events=batch, buffer_max_events=1000), "backup", "j",
                 worker="w-1", producer=producer if producer is not None else FakeProducer())
    em._signing_key, em._spool = signing_key, spool  # as loaded from their files
    return em


def sent_events(producer: FakeProducer) -> list[list[int]]:
    """The seqs each record carried, record by record."""
    return [[ev.decode(p).seq for p in ev.unpack(value)] for _, value, _ in producer.records]


def test_a_poll_cycles_events_go_as_one_record_and_each_delivery_callback_fires_once():
    em = emitter(batch=True)
    outcomes: list[tuple[int, bool]] = []
    for n in range(1, 4):
        em.emit(ev.Retry, on_delivered=lambda safe, n=n: outcomes.append((n, safe)), operation="commit")
    assert em._producer.records == []  # waiting for the cycle's end
    em.poll()  # sends, and serves the acknowledgement
    assert sent_events(em._producer) == [[1, 2, 3]]
    assert outcomes == [(1, True), (2, True), (3, True)]
    em.emit(ev.Retry, operation="write")
    em.poll()
    key, value, _ = em._producer.records[-1]
    assert key == KEY and ev.decode(value).seq == 4  # a lone event travels as a single-event record


def test_without_batch_events_every_event_is_its_own_record():
    em = emitter(batch=False)
    for _ in range(3):
        em.emit(ev.Retry, operation="commit")
    em.poll()
    assert sent_events(em._producer) == [[1], [2], [3]]
    assert all(ev.decode(value) for _, value, _ in em._producer.records)  # no batch envelope at all


def test_a_lost_batch_counts_every_event_and_fails_every_callback():
    em = emitter(batch=True)
    em._producer.fail = KafkaError(KafkaError._MSG_TIMED_OUT)
    em._last_drop_report = time.monotonic()  # no drop report yet (it would be lost too)
    outcomes: list[bool] = []
    for _ in range(4):
        em.emit(ev.Retry, on_delivered=outcomes.append, operation="commit")
    em.send_batch()
    em._producer.poll()
    assert em.dropped == 4 and outcomes == [False] * 4


def test_a_full_batch_is_sent_before_the_next_event_joins_it():
    em = emitter(batch=True)
    for _ in range(ev.MAX_BATCH_EVENTS + 2):
        em.emit(ev.Retry, operation="commit")
    em.flush(1)
    assert [len(seqs) for seqs in sent_events(em._producer)] == [ev.MAX_BATCH_EVENTS, 2]
    assert [s for seqs in sent_events(em._producer) for s in seqs] == list(range(1, ev.MAX_BATCH_EVENTS + 3))


def test_an_old_batch_is_sent_by_the_next_emit(monkeypatch):
    import kafka_backup.producers.telemetry as telemetry

    clock = [100.0]
    monkeypatch.setattr(telemetry.time, "monotonic", lambda: clock[0])
    em = emitter(batch=True)
    em.emit(ev.Retry, operation="commit")
    em.emit(ev.Retry, operation="commit")
    clock[0] += telemetry.BATCH_LINGER_S + 0.001
    em.emit(ev.Retry, operation="commit")
    assert sent_events(em._producer) == [[1, 2, 3]]


def test_the_drop_report_follows_the_events_emitted_before_it():
    em = emitter(batch=True)
    em.dropped = 7  # lost earlier, not reported yet
    em.emit(ev.Retry, operation="commit")
    em.emit(ev.Retry, operation="commit")
    em.close(1)
    values = [value for _, value, _ in em._producer.records]
    assert sent_events(em._producer) == [[1, 2], [3]]  # sequence numbers reach the cluster in order
    assert isinstance(ev.decode(values[-1]), ev.TelemetryDropped) and ev.decode(values[-1]).total == 7


def test_a_batch_waits_in_the_spool_as_one_record_and_is_signed_as_one(tmp_path):
    key = b"k" * 32
    spool = Spool(os.path.join(tmp_path, "t.spool"), 1 << 20)
    producer = FakeProducer(room=0)  # the cluster is away: everything goes to the spool
    em = emitter(batch=True, producer=producer, spool=spool, signing_key=key)
    outcomes: list[bool] = []
    for _ in range(3):
        em.emit(ev.Retry, on_delivered=outcomes.append, operation="commit")
    em.poll()
    assert producer.records == [] and spool.pending == 1 and outcomes == [True] * 3  # safe on disk
    producer.room = 10
    em.poll()  # drained back, in order
    assert sent_events(producer) == [[1, 2, 3]] and spool.pending == 0
    record_key, value, headers = producer.records[0]
    assert signing.verified(key, record_key, value, headers)
    assert not signing.verified(key, record_key, ev.encode_batch(ev.unpack(value)[:2]), headers)


# --- equivalence: batched and unbatched logs fold and replay the same -------------------------

def golden() -> list[LogRecord]:
    with open(os.path.join(ROOT, "tests", "data", "telemetry-v1.log"), "rb") as fh:
        return read_log(fh.read())


def batched(records: list[LogRecord], size: int) -> list[LogRecord]:
    """The same log as a batching emitter would have written it: runs of up to ``size`` consecutive
    records of one key on one partition in one record, stamped with the run's last timestamp.
    Records that are not msgpack stay single (an emitter only batches events it encoded)."""
    out: list[LogRecord] = []
    run: list[LogRecord] = []

    def close() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            out.append(LogRecord(run[0].partition, len(out), max(r.timestamp_ms for r in run), run[0].key,
                                 ev.encode_batch([r.value for r in run if r.value is not None])))
        run.clear()

    for rec in records:
        try:
            msgspec.msgpack.decode(rec.value or b"")
            packable = bool(rec.value)
        except msgspec.DecodeError:
            packable = False
        if run and (len(run) >= size or rec.key != run[0].key or rec.partition != run[0].partition
                    or not packable):
            close()
        if packable:
            run.append(rec)
        else:
            out.append(rec)
    close()
    return out


@pytest.mark.parametrize("size", [2, 3, 7, ev.MAX_BATCH_EVENTS])
def test_a_log_re_encoded_as_batches_replays_to_the_same_report_and_state_bytes(size):
    records = golden()
    again = batched(records, size)
    assert len(again) < len(records)  # batches were made
    single, batch = replay(records), replay(again)
    assert audit.to_json(audit.build(batch, None)) == audit.to_json(audit.build(single, None))
    assert {k: encode_state(v) for k, v in batch.jobs.items()} == {k: encode_state(v) for k, v in single.jobs.items()}
    assert batch.invalid.invalid == single.invalid.invalid == {"unknown_type": 1}


def live_fold(records: list[LogRecord]) -> tuple[dict[bytes, bytes], dict[str, int]]:
    """The aggregator's per-record path (streams/app.py ``handle``) on a working set, the table a dict."""
    table: dict[bytes, bytes] = {}
    work = WorkingSet(fold.DEFAULT_SETTINGS)
    invalid: dict[str, int] = {}
    for rec in records:
        try:
            payloads = ev.unpack(rec.value)
        except ev.InvalidEvent as err:
            invalid[err.reason] = invalid.get(err.reason, 0) + 1
            continue
        for payload in payloads:
            try:
                event = ev.decode(payload)
                fold.check(event, rec.timestamp_ms / 1000, None)
                if rec.key != ev.event_key(event.kind, event.job).encode():
                    raise ev.InvalidEvent("bad_key")
            except ev.InvalidEvent as err:
                invalid[err.reason] = invalid.get(err.reason, 0) + 1
                continue
            _, refused = work.apply(rec.key, rec.partition, event, len(payload), table.get)
            assert refused is None
        for partition in work.dirty_partitions():
            table.update(work.flush(partition))
    return table, invalid


def test_batched_and_unbatched_records_fold_to_identical_state_bytes_live_and_under_redelivery():
    records = sorted(golden(), key=lambda r: (r.partition, r.offset))  # the live order: per partition
    single = live_fold(records)
    assert single[0] and single[1] == {"unknown_type": 1}
    for size in (2, 5, ev.MAX_BATCH_EVENTS):
        again = batched(records, size)
        assert live_fold(again) == single
        # a whole batch record delivered twice (a restart before the commit): every event a duplicate
        assert live_fold([r for rec in again for r in (rec, rec)])[0] == single[0]


# telemetry.batch_events: auto (producers.batch_readers)

AGG = ev.AGGREGATOR_CLIENT_ID


def test_the_aggregator_s_client_id_carries_the_mark_and_only_a_whole_mark_counts():
    assert ev.reads_batches(AGG)
    assert not ev.reads_batches("faust-0.15.3")  # an aggregator older than batch records: Faust's default id
    assert not ev.reads_batches("kafka-backup-aggregator")
    assert not ev.reads_batches(f"x-{ev.BATCH_READER_MARK}")  # inside another word: not the mark
    assert not ev.reads_batches("kafka-backup-aggregator+reads-batch-v10")


def test_batch_records_only_when_every_member_of_the_aggregator_group_reads_them():
    from kafka_backup.producers.batch_readers import verdict

    assert verdict([(AGG, "agg-0"), (AGG, "agg-1")]) == (True, "every member reads batch records (2)")
    on, why = verdict([(AGG, "agg-0"), ("faust-0.15.3", "agg-1")])  # a rolling upgrade half done
    assert not on and "agg-1" in why and "faust-0.15.3" in why
    assert verdict([]) == (False, "it has no member")  # aggregators stopped, or a group that does not exist


def test_batch_readers_tells_each_change_once_and_a_failure_means_single_event_records(caplog):
    from kafka_backup.producers.batch_readers import BatchReaders

    answers: list[object] = [[(AGG, "a")], [(AGG, "a")], [("faust-0.15.3", "b")], RuntimeError("no Describe"),
                             RuntimeError("no Describe"), [(AGG, "a")]]

    def describe(group: str) -> list[tuple[str, str]]:
        assert group == "agg"
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    told: list[bool] = []
    readers = BatchReaders("unused:9092", "agg", told.append, describe=describe)
    with caplog.at_level("INFO", logger="kafka_backup.telemetry"):
        assert [readers.check() for _ in range(6)] == [True, True, False, False, False, True]
    assert told == [True, False, True]
    assert sum("cannot describe aggregator group agg" in r.getMessage() for r in caplog.records) == 1


def test_batch_readers_asks_at_start_off_the_caller_s_thread_and_stops():
    import threading

    from kafka_backup.producers.batch_readers import BatchReaders

    asked = threading.Event()
    told: list[bool] = []

    def describe(_group: str) -> list[tuple[str, str]]:
        asked.set()
        return [(AGG, "a")]

    readers = BatchReaders("unused:9092", "agg", told.append, interval_s=3600, describe=describe)
    readers.start()
    assert asked.wait(10) and readers._thread is not None
    readers.stop()
    readers._thread.join(10)
    assert not readers._thread.is_alive() and told == [True]


def test_auto_sends_single_event_records_until_told_and_a_held_batch_goes_before_the_next_single():
    em = emitter(batch="auto")  # type: ignore[arg-type]
    em.emit(ev.Retry, operation="commit")
    em.poll()
    em._set_batching(True)
    em.emit(ev.Retry, operation="commit")
    em.emit(ev.Retry, operation="commit")
    em._set_batching(False)  # from the readers' thread, between two emits of one cycle
    em.emit(ev.Retry, operation="commit")
    em.poll()
    assert sent_events(em._producer) == [[1], [2, 3], [4]]  # in order: nothing overtook the held batch


def test_batch_events_is_auto_by_default_and_takes_true_false_and_auto_only():
    from kafka_backup.schemas.config import ConfigError, TelemetryConfig, load

    assert TelemetryConfig().batch_events == "auto"
    for text, value in (("true", True), ("false", False), ("auto", "auto")):
        assert load(None, environ={"KAFKA_BACKUP_TELEMETRY_BATCH_EVENTS": text}).telemetry.batch_events == value
    with pytest.raises(ConfigError, match=r"BATCH_EVENTS: .*one of true, false, auto \(telemetry.batch_events\)"):
        load(None, environ={"KAFKA_BACKUP_TELEMETRY_BATCH_EVENTS": "sometimes"})


@pytest.mark.parametrize("batch", [False, True])
def test_events_emitted_from_several_threads_keep_one_sequence_in_send_order(batch):
    """The checkpoint readers report their storage calls from their own threads: sequence numbers must
    stay unique and reach the producer in order, or the aggregator drops the late ones as duplicates."""
    import sys
    import threading

    em = emitter(batch=batch)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        def emit_many() -> None:
            for _ in range(2000):
                em.emit(ev.Retry, operation="read")
                em.poll()

        threads = [threading.Thread(target=emit_many) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    em.flush(1)
    seqs = [s for record in sent_events(em._producer) for s in record]
    assert seqs == list(range(1, 16001))
