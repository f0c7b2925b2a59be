"""End to end on real processes: broker, backup worker, Faust aggregator, exporter.

Every expected value is computed independently of the pipeline: records and
bytes from what the test produced, lag from the broker's watermarks and the
group's committed offsets, compressed bytes from the objects in storage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas.topics import consumer_group
from tests.conftest import (
    ROOT,
    backup,
    cli,
    committed,
    create_topic,
    produce,
    unique,
    wait_for,
    watermarks,
)

pytestmark = pytest.mark.e2e


def segment_files(root: str, backup_id: str) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(os.path.join(root, backup_id)):
        out += [os.path.join(dirpath, f) for f in files if ".seg" in f]
    return out


def test_one_shot_then_incremental_exact(broker, shared_pipeline, tmp_path):
    topic, bid = unique("orders"), unique("bk")
    create_topic(broker, topic, 3)
    truth = produce(broker, topic, 3, 1000)
    store = tmp_path / "store"
    # the write-latency series is per backend, shared with every job on this broker: count this run's share
    latency = (cat.STORAGE_WRITE_LATENCY.name + "_count", {"backend": "filesystem", "operation": "segment"})
    writes_before = shared_pipeline.caught_up().get_value(latency[0], **latency[1]) or 0
    backup(broker, topic, bid, f"file://{store}")

    s = shared_pipeline.wait_value(cat.RECORDS_TOTAL.name, 1000, backup_id=bid)
    assert s.get_value(cat.BYTES_TOTAL.name, backup_id=bid) == truth.total_bytes
    files = segment_files(str(store), bid)
    assert len(files) == 3
    assert s.get_value(cat.COMPRESSED_BYTES.name, algorithm="zstd", backup_id=bid) == sum(
        os.path.getsize(f) for f in files)
    hwm = watermarks(broker, topic, 3)
    group = committed(broker, consumer_group(bid), topic, 3)
    for p in range(3):
        assert group[p] == hwm[p] == truth.records[p]
        assert s.get_value(cat.LAG_RECORDS.name, topic=topic, partition=p, backup_id=bid) == hwm[p] - group[p]
    assert s.get_value(cat.BACKUP_DURATION.name + "_count", backup_id=bid, status="success") == 1
    assert shared_pipeline.caught_up().get_value(latency[0], **latency[1]) - writes_before == len(files) == 3

    # A second run resumes at the checkpoint: only the new records are backed up, once.
    truth = produce(broker, topic, 3, 500, seed=1, truth=truth)
    backup(broker, topic, bid, f"file://{store}")
    s = shared_pipeline.wait_value(cat.RECORDS_TOTAL.name, 1500, backup_id=bid)
    assert s.get_value(cat.BYTES_TOTAL.name, backup_id=bid) == truth.total_bytes
    s = shared_pipeline.wait_value(cat.BACKUP_DURATION.name + "_count", 2, backup_id=bid, status="success")
    files = segment_files(str(store), bid)
    assert len(files) == 6
    stored = sum(os.path.getsize(f) for f in files)
    assert s.get_value(cat.COMPRESSED_BYTES.name, algorithm="zstd", backup_id=bid) == stored
    uncompressed = s.get_value(cat.UNCOMPRESSED_BYTES.name, algorithm="zstd", backup_id=bid)
    assert s.get_value(cat.COMPRESSION_RATIO.name, algorithm="zstd", backup_id=bid) == pytest.approx(
        uncompressed / stored)
    assert s.get_value(cat.CONSUMED_RECORDS_TOTAL.name, backup_id=bid, topic=topic) == 1500

    # A third run with nothing new adds a run but no records.
    backup(broker, topic, bid, f"file://{store}")
    s = shared_pipeline.wait_value(cat.BACKUP_DURATION.name + "_count", 3, backup_id=bid, status="success")
    assert s.get_value(cat.RECORDS_TOTAL.name, backup_id=bid) == 1500
    assert len(segment_files(str(store), bid)) == 6


@pytest.mark.parametrize("algorithm", ["lz4", "snappy", "gzip", "none"])
def test_each_compression_counts_stored_sizes(broker, shared_pipeline, tmp_path, algorithm):
    topic, bid = unique("comp"), unique(f"bk-{algorithm}")
    create_topic(broker, topic, 2)
    truth = produce(broker, topic, 2, 300)
    backup(broker, topic, bid, f"file://{tmp_path}", "--compression", algorithm)
    s = shared_pipeline.wait_value(cat.RECORDS_TOTAL.name, truth.total_records, backup_id=bid)
    files = segment_files(str(tmp_path), bid)
    stored = sum(os.path.getsize(f) for f in files)
    assert s.get_value(cat.COMPRESSED_BYTES.name, algorithm=algorithm, backup_id=bid) == stored
    if algorithm == "none":
        assert s.get_value(cat.UNCOMPRESSED_BYTES.name, algorithm=algorithm, backup_id=bid) == stored
        assert s.get_value(cat.COMPRESSION_RATIO.name, algorithm=algorithm, backup_id=bid) == 1.0


def test_continuous_lag_equals_broker_truth(broker, shared_pipeline, tmp_path):
    """Records fetched but not yet in a durable segment are lag, exactly as the broker sees it."""
    topic, bid = unique("live"), unique("bk-live")
    create_topic(broker, topic, 1)
    truth = produce(broker, topic, 1, 250)
    log = open(tmp_path / "backup.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kafka_backup.cli.main", "backup", "--bootstrap-servers", broker, "--topics", topic,
         "--backup-id", bid, "--storage", f"file://{tmp_path}/store", "--continuous",
         "--backup-segment-max-records", "100", "--backup-flush-interval-ms", "600000",
         "--backup-poll-interval-ms", "200", "--instance-id", f"{bid}-w1"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    started = time.time()
    try:
        s = shared_pipeline.wait_value(cat.LAG_RECORDS.name, 50, topic=topic, partition=0, backup_id=bid)
        assert watermarks(broker, topic, 1)[0] == 250
        # the group's offset follows the durable one within a poll interval (commits are paced)
        wait_for(lambda: committed(broker, consumer_group(bid), topic, 1)[0] == 200, timeout=10, interval=0.1,
                 what="the group's committed offset at the stored 200")
        assert committed(broker, consumer_group(bid), topic, 1)[0] == 200  # and not beyond what is stored
        assert s.get_value(cat.LAG_RECORDS_MAX.name, backup_id=bid) == 50
        assert s.get_value(cat.RECORDS_TOTAL.name, backup_id=bid) == 200
        # record i has timestamp base + i ms: newest fetched is 249, newest stored 199
        assert s.get_value(cat.LAG_SECONDS.name, topic=topic, partition=0, backup_id=bid) == pytest.approx(0.050)
        stored_bytes = sum(len(f"value-0-{i}-" + "x" * ((i * 7) % 120)) + (len(f"key-0-{i}") if i % 5 else 0)
                           for i in range(200))
        assert s.get_value(cat.LAG_BYTES.name, topic=topic, partition=0, backup_id=bid) == pytest.approx(
            50 * stored_bytes / 200)
        assert s.get_value(cat.REBALANCES_TOTAL.name, backup_id=bid) == 1
        assert started <= s.get_value(cat.LAST_SUCCESSFUL_COMMIT.name, backup_id=bid, topic=topic, partition=0
                                      ) <= time.time()
        assert s.get_value(cat.THROUGHPUT_RECORDS.name, backup_id=bid, topic=topic) > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    # A graceful stop flushes what was buffered: everything is backed up, lag is 0.
    s = shared_pipeline.wait_value(cat.RECORDS_TOTAL.name, 250, backup_id=bid)
    s = shared_pipeline.wait_values((cat.LAG_RECORDS.name, 0, {"topic": topic, "partition": 0, "backup_id": bid}),
                                    (cat.BACKUP_DURATION.name + "_count", 1, {"backup_id": bid, "status": "success"}))
    assert s.get_value(cat.BYTES_TOTAL.name, backup_id=bid) == truth.total_bytes
    assert committed(broker, consumer_group(bid), topic, 1)[0] == 250


def test_restarted_aggregator_and_exporter_serve_same_totals(broker, pipeline_factory, tmp_path):
    topic, bid = unique("rs"), unique("bk-rs")
    create_topic(broker, topic, 2)
    truth = produce(broker, topic, 2, 400)
    pipe = pipeline_factory()
    backup(broker, topic, bid, f"file://{tmp_path}")
    before = pipe.wait_value(cat.RECORDS_TOTAL.name, 400, backup_id=bid)
    wait_for(lambda: pipe.scrape().get_value(cat.BACKUP_DURATION.name + "_count", backup_id=bid,
                                             status="success") == 1, 30)
    before = pipe.scrape()
    pipe.stop()
    pipe.start()
    after = pipe.wait_value(cat.RECORDS_TOTAL.name, 400, backup_id=bid)
    for metric in (cat.BYTES_TOTAL, cat.COMPRESSED_BYTES, cat.UNCOMPRESSED_BYTES):
        keys = before.matching(metric.name, backup_id=bid)
        assert keys and all(after[k] == v for k, v in keys.items())
    # and the restarted pipeline keeps counting exactly
    truth = produce(broker, topic, 2, 100, seed=2, truth=truth)
    backup(broker, topic, bid, f"file://{tmp_path}")
    s = pipe.wait_value(cat.RECORDS_TOTAL.name, 500, backup_id=bid)
    assert s.get_value(cat.BYTES_TOTAL.name, backup_id=bid) == truth.total_bytes
    pipe.wait_value(cat.BACKUP_DURATION.name + "_count", 2, backup_id=bid, status="success")


def test_backup_to_s3_counts_stored_object_sizes(broker, shared_pipeline, s3_endpoint):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = unique("bkt")
    s3.create_bucket(Bucket=bucket)
    # every version kept: the bytes of each write, overwritten checkpoints and manifests included
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    latency = (cat.STORAGE_WRITE_LATENCY.name + "_count", {"backend": "s3", "operation": "segment"})
    writes_before = shared_pipeline.caught_up().get_value(latency[0], **latency[1]) or 0
    topic, bid = unique("s3src"), unique("bk-s3")
    create_topic(broker, topic, 2)
    truth = produce(broker, topic, 2, 600)
    backup(broker, topic, bid, f"s3://{bucket}/backups", "--s3-endpoint-url", s3_endpoint,
           "--compression", "lz4")
    s = shared_pipeline.wait_value(cat.RECORDS_TOTAL.name, 600, backup_id=bid)
    objects = s3.list_objects_v2(Bucket=bucket, Prefix=f"backups/{bid}/")["Contents"]
    segs = [o for o in objects if ".seg" in o["Key"]]
    assert len(segs) == 2
    assert s.get_value(cat.BYTES_TOTAL.name, backup_id=bid) == truth.total_bytes
    assert s.get_value(cat.COMPRESSED_BYTES.name, algorithm="lz4", backup_id=bid) == sum(o["Size"] for o in segs)
    s = shared_pipeline.caught_up()
    assert s.get_value(latency[0], **latency[1]) - writes_before == len(segs)
    versions = s3.list_object_versions(Bucket=bucket, Prefix=f"backups/{bid}/")["Versions"]
    assert s.get_value(cat.STORAGE_WRITE_BYTES.name, backend="s3", backup_id=bid) == sum(v["Size"] for v in versions)


def test_records_lost_to_retention_before_backup_are_an_error_and_a_gap(broker, shared_pipeline, tmp_path):
    """The backup lagged behind retention: what was deleted unseen is reported, never silently skipped."""
    import json

    from confluent_kafka import Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    topic, bid = unique("ret"), unique("bk-ret")
    admin = AdminClient({"bootstrap.servers": broker})
    admin.create_topics([NewTopic(topic, 1, 1, config={"retention.ms": "6000"})])[topic].result(15)
    produce(broker, topic, 1, 100)  # timestamps an hour old: make them fresh for this topic
    c = Consumer({"bootstrap.servers": broker, "group.id": unique("lw")})
    wait_for(lambda: c.get_watermark_offsets(TopicPartition(topic, 0), timeout=5)[0] == 100, 30,
             what="the hour-old records to fall to the 6 s retention")
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": broker})
    for i in range(100):
        p.produce(topic, value=b"fresh-%d" % i, partition=0)
    p.flush(10)
    backup(broker, topic, bid, f"file://{tmp_path}/store")  # backs up 100..199
    for i in range(50):
        p.produce(topic, value=b"missed-%d" % i, partition=0)  # 200..249: deleted before the next run
    p.flush(10)
    wait_for(lambda: c.get_watermark_offsets(TopicPartition(topic, 0), timeout=5)[0] >= 250, 60,
             what="retention to delete records the backup never saw")
    for i in range(30):
        p.produce(topic, value=b"late-%d" % i, partition=0)  # 250..279
    p.flush(10)
    low = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=5)[0]
    c.close()
    backup(broker, topic, bid, f"file://{tmp_path}/store")
    shared_pipeline.wait_value(cat.ERRORS_TOTAL.name, 1, backup_id=bid, error_type="offset_invalid")
    shared_pipeline.wait_value(cat.RECORDS_TOTAL.name, 100 + (280 - low), backup_id=bid)
    r = cli("replay", "--bootstrap-servers", broker, "--backup-id", bid, "--output", os.devnull,
            "--report-json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    (part,) = json.loads((tmp_path / "r.json").read_text())["backups"][0]["partitions"]
    assert part["ranges"] == [[100, 200], [low, 280]]
    assert part["gaps"] == [[200, low]]
