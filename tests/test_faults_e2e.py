"""Fault injection on real processes; every test ends by asserting exact totals.

Ground truth is read from storage (the checkpoints name every durable segment
and its record count) and from what the test produced, never from the pipeline.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import msgspec
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from kafka_backup.cli.devbroker import free_port
from kafka_backup.exporter.state_reader import StateReader
from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.state import PIPELINE_PREFIX
from kafka_backup.schemas.topics import TELEMETRY_TOPIC
from tests.conftest import (
    AFTER_RESTART_S,
    ROOT,
    Pipeline,
    backup,
    cli,
    create_topic,
    indexed_segments,
    produce,
    unique,
    wait_for,
)

pytestmark = pytest.mark.e2e


def stored_records(root: str, backup_id: str) -> int:
    total = 0
    for path in glob.glob(os.path.join(root, backup_id, "topics", "*", "*", "checkpoint.json")):
        with open(path) as fh:
            total += sum(s["records"] for s in indexed_segments(root, json.load(fh)))
    return total


class Monotonic:
    """Scrapes in the background and remembers every value of one counter: it must never go down.

    Every scrape also checks that no counter on the page fell since the last (``Pipeline.scrape``);
    a failure there is kept and raised when the block ends (before, it ended the thread as an
    unhandled thread exception, a pytest warning, and the test passed)."""

    def __init__(self, pipe: Pipeline, name: str, **labels) -> None:
        self.pipe, self.name, self.labels = pipe, name, labels
        self.values: list[float] = []
        self.failure: AssertionError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            try:
                v = self.pipe.scrape().get_value(self.name, **self.labels)
            except OSError:
                continue  # exporter restarting
            except AssertionError as err:  # a counter fell: the test fails with it
                self.failure = err
                return
            if v is not None:
                self.values.append(v)

    def __enter__(self) -> Monotonic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.failure is not None:
            raise self.failure
        assert self.values == sorted(self.values), f"{self.name} decreased: {self.values}"


class SteadyWorkload:
    """Produces to a topic until stopped, so a continuous backup keeps emitting."""

    def __init__(self, bootstrap: str, topic: str, rate: int = 400) -> None:
        self.bootstrap, self.topic, self.rate = bootstrap, topic, rate
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        p = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 10})
        while not self._stop.wait(0.05):
            for _ in range(self.rate // 20):
                p.produce(self.topic, value=b"v" * (self.count % 90), key=str(self.count).encode())
                self.count += 1
            p.poll(0)
        p.flush(10)

    def __enter__(self) -> SteadyWorkload:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def continuous_backup(broker: str, topic: str, bid: str, store: str, log_path: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kafka_backup.cli.main", "backup", "--bootstrap-servers", broker, "--topics", topic,
         "--backup-id", bid, "--storage", f"file://{store}", "--continuous", "--instance-id", f"{bid}-w",
         "--backup-flush-interval-ms", "700", "--backup-poll-interval-ms", "200", *extra],
        cwd=ROOT, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def read_job_events(bootstrap: str, kind: str, job: str) -> list[tuple[bytes, bytes]]:
    """Every raw telemetry record of one job, as the topic holds it."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("read"), "enable.partition.eof": True})
    md = c.list_topics(TELEMETRY_TOPIC, timeout=10).topics[TELEMETRY_TOPIC]
    c.assign([TopicPartition(TELEMETRY_TOPIC, p, 0) for p in md.partitions])
    key = ev.event_key(kind, job).encode()
    out, eof = [], set()
    deadline = time.monotonic() + 30
    while len(eof) < len(md.partitions) and time.monotonic() < deadline:
        for m in c.consume(500, 0.5):
            if m.error():
                eof.add(m.partition())
            elif m.key() == key:
                out.append((m.key(), m.value()))
    c.close()
    return out


def checkpoints(root: str, backup_id: str) -> list[dict]:
    return [json.load(open(path)) for path in
            sorted(glob.glob(os.path.join(root, backup_id, "topics", "*", "*", "checkpoint.json")))]


def test_reports_that_died_in_a_workers_queue_are_sent_again_by_its_next_run(broker, shared_pipeline, tmp_path):
    """A killed worker loses its queued events though their segments are durable: the next run reports them."""
    topic, bid, store = unique("lost"), unique("bk-lost"), str(tmp_path / "store")
    create_topic(broker, topic, 2)
    first = produce(broker, topic, 2, 400)
    # The first run's telemetry cluster never answers: every event dies in its queue, as with kill -9.
    backup(broker, topic, bid, f"file://{store}", "--backup-segment-max-records", "50",
           "--telemetry-bootstrap-servers", f"127.0.0.1:{free_port()}", "--telemetry-delivery-timeout-ms", "500")
    assert read_job_events(broker, "backup", bid) == []
    assert [cp["reported_offset"] for cp in checkpoints(store, bid)] == [0, 0]
    segments_on_disk = sum(len(indexed_segments(store, cp)) for cp in checkpoints(store, bid))
    assert segments_on_disk == 8  # 200 records per partition in segments of 50
    # The next run finds nothing new to back up, reports every unconfirmed segment once...
    backup(broker, topic, bid, f"file://{store}", "--backup-segment-max-records", "50")
    s = shared_pipeline.wait_value(cat.BACKUP_DURATION.name + "_count", 1, backup_id=bid, status="success")
    assert s.get_value(cat.RECORDS_TOTAL.name, backup_id=bid) == 400 == stored_records(store, bid)
    assert s.get_value(cat.BYTES_TOTAL.name, backup_id=bid) == first.total_bytes
    # ...and records in the checkpoint that they were acknowledged, so a third run reports only new ones.
    assert [cp["reported_offset"] for cp in checkpoints(store, bid)] == [
        cp["next_offset"] for cp in checkpoints(store, bid)]
    second = produce(broker, topic, 2, 100, seed=1)
    backup(broker, topic, bid, f"file://{store}", "--backup-segment-max-records", "50")
    s = shared_pipeline.wait_value(cat.BACKUP_DURATION.name + "_count", 2, backup_id=bid, status="success")
    assert s.get_value(cat.RECORDS_TOTAL.name, backup_id=bid) == 500 == stored_records(store, bid)
    assert s.get_value(cat.BYTES_TOTAL.name, backup_id=bid) == first.total_bytes + second.total_bytes
    reports = [ev.decode(v) for _k, v in read_job_events(broker, "backup", bid)]
    reports = [e for e in reports if isinstance(e, ev.SegmentStored)]
    by_run = [e.worker for e in reports]
    second_run, third_run = dict.fromkeys(by_run)
    assert by_run.count(second_run) == segments_on_disk
    assert by_run.count(third_run) == sum(len(indexed_segments(store, cp)) for cp in checkpoints(store, bid)) - segments_on_disk


def test_duplicated_and_replayed_events_change_no_aggregate(broker, shared_pipeline, tmp_path):
    topic, bid = unique("dup"), unique("bk-dup")
    create_topic(broker, topic, 3)
    truth = produce(broker, topic, 3, 600)
    backup(broker, topic, bid, f"file://{tmp_path}")
    shared_pipeline.wait_value(cat.BACKUP_DURATION.name + "_count", 1, backup_id=bid, status="success")
    records = read_job_events(broker, "backup", bid)
    assert len(records) >= 8
    # Every event of the job folded before the snapshot: a run saves its confirmed checkpoints after
    # JobEnded, and those storage events may still be on their way when the duration shows.
    last: dict[str, ev.Event] = {}
    for _, value in records:
        for payload in ev.unpack(value):
            e = ev.decode(payload)
            if e.worker not in last or e.seq > last[e.worker].seq:
                last[e.worker] = e
    for e in last.values():
        shared_pipeline.wait_value(cat.WORKER_LAST_SEEN.name, e.ts, kind="backup", job_id=bid, worker=e.worker)
    before = shared_pipeline.scrape()
    # The whole log of the job written again, then again in reverse order: a replay and a storm of retries.
    p = Producer({"bootstrap.servers": broker})
    for key, value in records + records[::-1]:
        p.produce(TELEMETRY_TOPIC, value=value, key=key)
    assert p.flush(10) == 0
    # A marker event after the duplicates tells us when the aggregator has read past them.
    marker = ev.Retry(worker=unique("marker"), seq=1, ts=time.time(), job=bid, operation="marker")
    p.produce(TELEMETRY_TOPIC, value=ev.encode(marker), key=ev.event_key("backup", bid).encode())
    p.flush(10)
    after = shared_pipeline.wait_value(cat.RETRIES_TOTAL.name, 1, backup_id=bid, operation="marker")
    assert after.get_value(cat.RECORDS_TOTAL.name, backup_id=bid) == truth.total_records == 600
    mine = {k: v for k, v in before.items() if ("backup_id", bid) in k[1] and "rate" not in k[0]
            and "throughput" not in k[0]}
    changed = {k: (v, after.get(k)) for k, v in mine.items() if after.get(k) != v}
    assert mine and not changed, changed


def test_invalid_records_are_skipped_counted_and_dead_lettered(broker, pipeline_factory, tmp_path):
    topic, bid, dlq = unique("bad"), unique("bk-bad"), unique("dlq")
    pipe = pipeline_factory(extra_aggregator_args=["--aggregator-dead-letter-topic", dlq])
    create_topic(broker, topic, 1)
    produce(broker, topic, 1, 100)
    key = ev.event_key("backup", bid).encode()
    now = time.time()
    bad = [
        (b"not msgpack at all \xff", "malformed"),
        (msgspec.msgpack.encode({"type": "from_the_future", "v": 1, "instance": "x", "seq": 1}), "unknown_type"),
        (msgspec.msgpack.encode({"type": "retry", "v": 99, "instance": "x", "seq": 1}), "future_version"),
        (ev.encode(ev.Progress(worker="x", seq=1, ts=now, job=bid, partitions=[
            ev.PartitionProgress(topic, 0, committed=500, high_watermark=100)])), "bad_value"),
        (ev.encode(ev.Retry(worker="x", seq=2, ts=now + 5 * 365 * 86400, job=bid, operation="w")), "bad_timestamp"),
    ]
    p = Producer({"bootstrap.servers": broker})
    for value, _reason in bad:
        p.produce(TELEMETRY_TOPIC, value=value, key=key)
    p.flush(10)
    # valid events around the bad ones
    backup(broker, topic, bid, f"file://{tmp_path}")
    for value, _reason in bad:
        p.produce(TELEMETRY_TOPIC, value=value, key=key)
    p.flush(10)
    # Skip counts are written in batches (a flush can fall between two of these records): wait for the
    # last bad record's count; the records before it in the partition were counted by then.
    s = pipe.wait_value(cat.TELEMETRY_INVALID.name, 2, reason=bad[-1][1])
    for _value, reason in bad:
        assert s.get_value(cat.TELEMETRY_INVALID.name, reason=reason) == 2, reason
    pipe.wait_values((cat.RECORDS_TOTAL.name, 100, {"backup_id": bid}),
                     (cat.BACKUP_DURATION.name + "_count", 1, {"backup_id": bid, "status": "success"}))
    # and the dead-letter topic holds the 10 skipped records with their reason
    c = Consumer({"bootstrap.servers": broker, "group.id": unique("dlq"), "auto.offset.reset": "earliest"})
    c.subscribe([dlq])
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 10 and time.monotonic() < deadline:
        got += [m for m in c.consume(100, 0.5) if not m.error()]
    c.close()
    reasons = sorted(dict(m.headers())["kafka-backup-reason"].decode() for m in got)
    assert reasons == sorted([r for _, r in bad] * 2)
    assert {m.value() for m in got} == {v for v, _ in bad}


def where_records_went(broker: str, pipe: Pipeline, bid: str) -> str:
    """On a mismatch, say which stage lost records: the telemetry log, the group's commits, or the changelog."""
    from kafka_backup.streams.replay import read_topic, replay

    logged = replay(r for r in read_topic(broker, TELEMETRY_TOPIC) if r.key == ev.event_key("backup", bid).encode())
    state = logged.jobs.get(ev.event_key("backup", bid))
    c = Consumer({"bootstrap.servers": broker, "group.id": pipe.app_id})
    md = c.list_topics(TELEMETRY_TOPIC, timeout=10).topics[TELEMETRY_TOPIC]
    tps = [TopicPartition(TELEMETRY_TOPIC, p) for p in md.partitions]
    committed = {tp.partition: tp.offset for tp in c.committed(tps, timeout=10)}
    high = {tp.partition: c.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
    c.close()
    reader = StateReader(broker, pipe.app_id).start()
    reader.ready.wait(30)
    in_changelog = reader.snapshot().get(ev.event_key("backup", bid))
    reader.stop()
    return (f"telemetry log folded offline: records={state.records if state else None}; "
            f"changelog read afresh: records={in_changelog.records if in_changelog else None}; "
            f"aggregator group committed={committed} telemetry high watermarks={high}")


def test_aggregator_killed_mid_stream_restarts_exact(broker, pipeline_factory, tmp_path):
    topic, bid = unique("kill"), unique("bk-kill")
    create_topic(broker, topic, 3)
    pipe = pipeline_factory()
    store = str(tmp_path / "store")
    with Monotonic(pipe, cat.RECORDS_TOTAL.name, backup_id=bid), SteadyWorkload(broker, topic):
        worker = continuous_backup(broker, topic, bid, store, str(tmp_path / "backup.log"))
        try:
            wait_for(lambda: (pipe.scrape().get_value(cat.RECORDS_TOTAL.name, backup_id=bid) or 0) > 500, 60)
            # Three kills, each right after the restarted worker's first visible write (mid catch-up, before
            # its first commit): where Faust 0.15.3 was caught skipping events (streams/guards.py).
            for _ in range(3):
                pipe.aggregator.stop(kill=True)  # SIGKILL: no commit, no LeaveGroup
                killed_at = time.time()  # stop() returns once the process is gone: its writes are final
                # what the killed worker wrote, once the exporter has read the state topic to its end
                seen = pipe.state_read_since(killed_at).get_value(cat.RECORDS_TOTAL.name, backup_id=bid)
                pipe.aggregator.start()  # same static instance id
                # counting again: the restarted worker recovered its table and consumes new events
                wait_for(lambda seen=seen: pipe.scrape().get_value(cat.RECORDS_TOTAL.name, backup_id=bid) > seen,
                         AFTER_RESTART_S,
                         what="the restarted aggregator to count new segments")
        finally:
            stop(worker)
        truth = stored_records(store, bid)
        try:
            pipe.wait_value(cat.RECORDS_TOTAL.name, truth, 90, backup_id=bid)
        except AssertionError as err:
            raise AssertionError(f"{where_records_went(broker, pipe, bid)}\n{err}") from None
    # the run's end is folded after its last segment: wait for it rather than race it
    s = pipe.wait_value(cat.BACKUP_DURATION.name + "_count", 1, 60, backup_id=bid, status="success")
    # every state the killed and restarted workers wrote, not only those the scrapes happened to see
    pipe.assert_state_never_fell(bid, PIPELINE_PREFIX)
    seg_files = glob.glob(os.path.join(store, bid, "topics", "*", "*", "*.seg*"))
    assert s.get_value(cat.COMPRESSED_BYTES.name, algorithm="zstd", backup_id=bid) == sum(
        os.path.getsize(f) for f in seg_files)


def test_exporter_killed_and_restarted_serves_the_same_values_from_its_first_scrape(broker, shared_pipeline,
                                                                                    tmp_path):
    topic, bid = unique("exp"), unique("bk-exp")
    create_topic(broker, topic, 2)
    produce(broker, topic, 2, 300)
    backup(broker, topic, bid, f"file://{tmp_path}")
    before = shared_pipeline.wait_value(cat.RECORDS_TOTAL.name, 300, backup_id=bid)
    shared_pipeline.exporter.stop(kill=True)
    started = time.monotonic()
    shared_pipeline.exporter.start()
    after = wait_for(lambda: shared_pipeline.health() == 200 and shared_pipeline.scrape(), 30)
    elapsed = time.monotonic() - started
    mine = {k: v for k, v in before.items() if ("backup_id", bid) in k[1] and "throughput" not in k[0]
            and "rate" not in k[0]}
    assert mine and all(after[k] == v for k, v in mine.items())
    print(f"exporter served the same values {elapsed:.1f}s after a kill -9")


def test_telemetry_deleted_before_it_was_read_is_counted_as_expired(broker, pipeline_factory, tmp_path):
    """An aggregator down for longer than the telemetry retention: the records it never saw are counted."""
    from confluent_kafka.admin import AdminClient

    telemetry = unique("tel")
    pipe = pipeline_factory(extra_aggregator_args=["--telemetry-topic", telemetry, "--telemetry-partitions", "1"])
    topic, bid = unique("exp"), unique("bk-expired")
    create_topic(broker, topic, 1)
    produce(broker, topic, 1, 100)
    backup(broker, topic, bid, f"file://{tmp_path}", "--telemetry-topic", telemetry)
    pipe.wait_value(cat.RECORDS_TOTAL.name, 100, backup_id=bid)
    pipe.aggregator.stop()  # graceful: commits what it folded

    produce(broker, topic, 1, 50)
    backup(broker, topic, bid, f"file://{tmp_path}", "--telemetry-topic", telemetry)  # read by nobody yet
    c = Consumer({"bootstrap.servers": broker, "group.id": pipe.app_id})
    tp = TopicPartition(telemetry, 0)
    committed = c.committed([tp], timeout=10)[0].offset
    _, high = c.get_watermark_offsets(tp, timeout=10, cached=False)
    assert 0 < committed < high - 3
    # Retention takes the events the aggregator has not read, up to the second run's first new segment's
    # report. Before it comes the first run's last segment, reported again (acknowledged after its
    # checkpoint was written): a range already counted, so nothing of it is lost.
    c.assign([TopicPartition(telemetry, 0, committed)])
    doomed: list = []
    deadline = time.monotonic() + 30
    while not any(isinstance(e, ev.SegmentStored) and e.covers_from >= 100 for e in doomed):
        assert time.monotonic() < deadline
        doomed += [ev.decode(m.value()) for m in c.consume(1, 1.0) if not m.error()]
    deleted_to = committed + len(doomed)
    assert deleted_to < high and len(doomed) >= 2
    assert [(e.covers_from, e.end_offset) for e in doomed if isinstance(e, ev.SegmentStored)] == [(0, 100), (100, 150)]
    lost = 50  # the new segment's records, never counted, by design
    admin = AdminClient({"bootstrap.servers": broker})  # kept alive until its future resolves
    for fut in admin.delete_records([TopicPartition(telemetry, 0, deleted_to)]).values():
        fut.result(30)
    assert c.get_watermark_offsets(tp, timeout=10, cached=False)[0] == deleted_to
    c.close()

    pipe.aggregator.start()
    s = pipe.wait_value(cat.TELEMETRY_INVALID.name, len(doomed), AFTER_RESTART_S, reason="expired")
    # the rest of the second run is folded too (job states are written once per flush interval, so it
    # can show a moment after the skip count)
    s = pipe.wait_value(cat.BACKUP_DURATION.name + "_count", 2, AFTER_RESTART_S, backup_id=bid, status="success")
    assert s.get_value(cat.RECORDS_TOTAL.name, backup_id=bid) == stored_records(str(tmp_path), bid) - lost == 150 - lost
    assert s.get_value(cat.TELEMETRY_INVALID.name, reason="expired") == len(doomed)


def test_two_aggregator_workers_equal_one(broker, pipeline_factory, tmp_path):
    """Two workers of one application split the telemetry partitions; totals match a single worker's."""
    single = pipeline_factory()
    pair = pipeline_factory()
    topic = unique("two")
    create_topic(broker, topic, 2)
    truth = produce(broker, topic, 2, 200)
    bids = [unique("bk-two") for _ in range(8)]  # eight jobs spread over the telemetry partitions
    for i, bid in enumerate(bids):
        backup(broker, topic, bid, f"file://{tmp_path}")
        if i == 3:  # a rebalance in the middle: a second worker joins and takes half the partitions
            pair.add_aggregator_worker()
    for bid in bids:
        a = single.wait_value(cat.RECORDS_TOTAL.name, 200, backup_id=bid)
        # A join can hit Faust's rebalance hang: the recovery watchdog restarts the stuck worker
        # after aggregator.recovery_stall_s (30 s), then it recovers and re-reads the telemetry
        # backlog of the whole suite; 60 s was not always enough on a loaded machine.
        b = pair.wait_value(cat.RECORDS_TOTAL.name, 200, timeout=180, backup_id=bid)
        assert a.get_value(cat.BYTES_TOTAL.name, backup_id=bid) == truth.total_bytes
        assert b.get_value(cat.BYTES_TOTAL.name, backup_id=bid) == truth.total_bytes
        pair.wait_value(cat.BACKUP_DURATION.name + "_count", 1, backup_id=bid, status="success")
    pair.assert_state_never_fell("bk-two", PIPELINE_PREFIX)  # across the join's rebalance and any restart


@pytest.fixture
def telemetry_cluster(tmp_path):
    """A second broker: the telemetry cluster, separate from the source cluster, that tests can freeze."""
    from kafka_backup.cli.devbroker import DevBroker

    with DevBroker(log_path=str(tmp_path / "telemetry-broker.log")) as b:
        yield b


def dropped_in_log(path: str) -> int:
    import re

    found = re.findall(r"telemetry: (\d+) events dropped so far", open(path, errors="replace").read())
    return int(found[-1]) if found else 0


@pytest.mark.parametrize("mode", ["queue", "spool", "tiny-buffer"])
def test_telemetry_outage_backup_goes_on_and_totals_are_exact(broker, telemetry_cluster, tmp_path, mode):
    """SIGSTOP the telemetry broker during a backup; the backup goes on; afterwards the totals are exact
    (queue: librdkafka holds the events; spool: a tiny queue overflows to disk; tiny-buffer without spool:
    events are dropped and counted, and the worker sends its lost segment reports again once the
    cluster answers)."""
    tele = telemetry_cluster
    pipe = Pipeline(tele.bootstrap, str(tmp_path)).start()
    topic, bid = unique("out"), unique(f"bk-{mode}")
    create_topic(broker, topic, 2)
    store, log_path = str(tmp_path / "store"), str(tmp_path / "backup.log")
    extra = ["--telemetry-bootstrap-servers", tele.bootstrap, "--log-level", "INFO"]
    if mode != "queue":
        extra += ["--telemetry-buffer-max-events", "20"]
    if mode == "spool":
        extra += ["--telemetry-spool-dir", str(tmp_path / "spool")]
    freeze_s = 30 if mode == "queue" else 8
    try:
        with SteadyWorkload(broker, topic):
            worker = continuous_backup(broker, topic, bid, store, log_path, *extra)
            try:
                wait_for(lambda: (pipe.scrape().get_value(cat.RECORDS_TOTAL.name, backup_id=bid) or 0) > 0, 60)
                tele.pause()
                before = stored_records(store, bid)
                # Not synchronisation: the outage itself, long enough to fill the buffer of each mode.
                time.sleep(freeze_s)
                during = stored_records(store, bid)
                tele.resume()
                assert during > before + 100, "the backup must go on while telemetry is frozen"
                # the worker's telemetry is through again (its lost reports sent again, in tiny-buffer
                # mode) for everything it stored during the outage, before it is stopped
                wait_for(lambda: (pipe.scrape().get_value(cat.RECORDS_TOTAL.name, backup_id=bid) or 0) >= during,
                         90, what="the worker's telemetry to cover what it stored during the outage")
            finally:
                tele.resume()
                stop(worker)
        truth = stored_records(store, bid)
        if mode == "tiny-buffer":
            s = wait_for(lambda: (v := pipe.scrape()).get_value(
                cat.TELEMETRY_DROPPED.name, kind="backup", job_id=bid) == dropped_in_log(log_path) > 0 and v, 60,
                what="dropped events reported and equal to the worker's own count")
            pipe.wait_value(cat.RECORDS_TOTAL.name, truth, 60, backup_id=bid)
            log = open(log_path).read()
            assert "dropping events" in log and "again whose telemetry was lost" in log
        else:
            pipe.wait_value(cat.BACKUP_DURATION.name + "_count", 1, 90, backup_id=bid, status="success")
            s = pipe.wait_value(cat.RECORDS_TOTAL.name, truth, 90, backup_id=bid)
            assert s.get_value(cat.TELEMETRY_DROPPED.name, kind="backup", job_id=bid) == 0
            if mode == "spool":
                assert "spooling events to" in open(log_path).read()
                assert not os.listdir(tmp_path / "spool"), "the spool is drained and removed"
    finally:
        pipe.stop()


def test_dead_worker_shows_stop_not_a_frozen_healthy_lag(broker, pipeline_factory, tmp_path):
    pipe = pipeline_factory(extra_exporter_args=["--metrics-worker-stop-after-s", "5"])
    topic, bid = unique("dead"), unique("bk-dead")
    create_topic(broker, topic, 1)
    store = str(tmp_path / "store")

    def status(s):
        return {st for st in ("OK", "WARN", "STALL", "STOP", "ERROR")
                if s.get_value(cat.BACKUP_STATUS.name, backup_id=bid, kafka_backup_status=st) == 1}

    with SteadyWorkload(broker, topic, rate=100):
        worker = continuous_backup(broker, topic, bid, store, str(tmp_path / "backup.log"))
        try:
            wait_for(lambda: status(pipe.scrape()) == {"OK"}, 60, what="status OK while running")
        finally:
            worker.kill()
            worker.wait()
        s = wait_for(lambda: (v := pipe.scrape()) and status(v) == {"STOP"} and v, 30, what="status STOP")
    last_seen = s.matching(cat.WORKER_LAST_SEEN.name, kind="backup", job_id=bid)
    assert len(last_seen) == 1 and time.time() - list(last_seen.values())[0] >= 5
    # the same static instance id restarts the backup: OK again, and nothing was counted twice
    worker = continuous_backup(broker, topic, bid, store, str(tmp_path / "backup.log"))
    try:
        wait_for(lambda: status(pipe.scrape()) == {"OK"}, 60, what="status OK after restart")
    finally:
        stop(worker)
    pipe.wait_value(cat.RECORDS_TOTAL.name, stored_records(store, bid), 60, backup_id=bid)


def test_sasl_settings_reach_every_client(broker, pipeline_factory, tmp_path):
    """SASL/PLAIN on every connection: worker (librdkafka), aggregator (Faust's aiokafka), exporter, replay.

    The dev broker accepts any SASL/PLAIN credentials but no SCRAM: PLAIN working everywhere and
    SCRAM failing shows the settings reach the clients (no broker here enforces credentials).
    """
    sasl = ["--kafka-security-protocol", "SASL_PLAINTEXT", "--kafka-sasl-mechanism", "PLAIN",
            "--kafka-sasl-username", "backup", "--kafka-sasl-password", "secret"]
    pipe = pipeline_factory(extra_aggregator_args=sasl, extra_exporter_args=sasl)
    topic, bid = unique("sasl"), unique("bk-sasl")
    create_topic(broker, topic, 2)
    truth = produce(broker, topic, 2, 120)
    backup(broker, topic, bid, f"file://{tmp_path}", *sasl)
    s = pipe.wait_value(cat.RECORDS_TOTAL.name, 120, backup_id=bid)
    assert s.get_value(cat.BYTES_TOTAL.name, backup_id=bid) == truth.total_bytes
    assert "Authenticated as backup via PLAIN" in open(pipe.aggregator.log_path).read()
    r = cli("backup", "--bootstrap-servers", broker, "--topics", topic, "--backup-id", unique("bk-scram"),
            "--storage", f"file://{tmp_path}", *sasl, "--kafka-sasl-mechanism", "SCRAM-SHA-512",
            "--telemetry-bootstrap-servers", broker.replace("127.0.0.1", "localhost"),
            "--kafka-telemetry-security-protocol", "PLAINTEXT")
    assert r.returncode == 1 and "failed: kafka:" in r.stderr, r.stderr[-500:]
    r = cli("replay", "--bootstrap-servers", broker, "--backup-id", bid, "--output", "-", *sasl)
    assert r.returncode == 0 and f'kafka_backup_records_total{{backup_id="{bid}"}} 120.0' in r.stdout
    # and a missing password is a one-line error before any connection
    r = cli("backup", "--bootstrap-servers", broker, "--topics", topic, "--backup-id", bid,
            "--storage", f"file://{tmp_path}", "--kafka-security-protocol", "SASL_PLAINTEXT")
    assert r.returncode == 2 and "kafka.sasl_username: SASL_PLAINTEXT needs a username and a password" in r.stderr
