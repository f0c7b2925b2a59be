"""Issue #9 end to end on the real broker: integrity proven, corrupt metadata refused, honest run outcomes.

Ground truth comes from outside the code under test: records from what the test
produced, damage made by the test's own hands on the stored objects (a flipped
byte, a truncated checkpoint, a key pointing outside the backup), the manifest
and checkpoints as JSON on disk, and what the broker holds.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import UTC, datetime

import pytest

from kafka_backup.schemas import catalogue as cat
from tests.conftest import Proc, backup, cli, create_topic, produce, unique, wait_for, watermarks

pytestmark = pytest.mark.e2e


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def read_json(path) -> dict:
    with open(path, "rb") as fh:
        return json.load(fh)


def segment_paths(store, bid: str, topic: str, partition: int) -> list[str]:
    base = os.path.join(store, bid, "topics", topic, str(partition))
    return sorted(os.path.join(base, f) for f in os.listdir(base) if ".seg" in f)


def flip_byte(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    with open(path, "wb") as fh:
        fh.write(bytes(data))


def verify(bid: str, url: str, broker: str | None = None):
    return cli("verify", "--backup-id", bid, "--storage", url, *(["--bootstrap-servers", broker] if broker else []),
               env={} if broker else {"KAFKA_BOOTSTRAP_SERVERS": ""})


def restore(broker: str, bid: str, url: str, rid: str, *extra: str):
    return cli("restore", "--bootstrap-servers", broker, "--backup-id", bid, "--storage", url, "--restore-id", rid,
               *extra)


# ---- item 4: a one-shot backup cut short ---------------------------------------------------------


def test_sigterm_ends_a_one_shot_backup_as_interrupted_and_the_next_run_resumes(broker, shared_pipeline, tmp_path):
    topic, bid = unique("cut"), unique("bk-cut")
    create_topic(broker, topic, 1)
    truth = produce(broker, topic, 1, 20_000)
    store = tmp_path / "store"
    url = f"file://{store}"
    head = store / bid / "topics" / topic / "0" / "checkpoint.json"
    proc = Proc(["backup", "--bootstrap-servers", broker, "--topics", topic, "--backup-id", bid, "--storage", url,
                 "--backup-segment-max-records", "20"], str(tmp_path / "backup.log")).start()
    wait_for(lambda: head.exists() and read_json(head)["next_offset"] > 0, 60, 0.02, "the first checkpoint")
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(60) == 1, proc.log()
    assert "kafka-backup backup: interrupted: stopped before the end" in proc.log()
    stopped_at = read_json(head)["next_offset"]
    assert 0 < stopped_at < 20_000, "the run was cut short"
    assert [r["status"] for r in read_json(store / bid / "manifest.json")["runs"]] == ["interrupted"]

    s = shared_pipeline.wait_value(cat.BACKUP_DURATION.name + "_count", 1, backup_id=bid, status="interrupted")
    assert s.get_value(cat.BACKUP_DURATION.name + "_count", backup_id=bid, status="success") is None
    assert s.get_value(cat.BACKUP_STATUS.name, backup_id=bid, kafka_backup_status="ERROR") == 1
    shared_pipeline.wait_value(cat.RECORDS_TOTAL.name, stopped_at, backup_id=bid)

    backup(broker, topic, bid, url, "--backup-segment-max-records", "20")  # resumes: exit 0
    assert read_json(head)["next_offset"] == 20_000 == watermarks(broker, topic, 1)[0]
    assert [r["status"] for r in read_json(store / bid / "manifest.json")["runs"]] == ["interrupted", "success"]
    s = shared_pipeline.wait_values((cat.RECORDS_TOTAL.name, 20_000, {"backup_id": bid}),
                                    (cat.BACKUP_STATUS.name, 1, {"backup_id": bid, "kafka_backup_status": "OK"}))
    assert s.get_value(cat.BYTES_TOTAL.name, backup_id=bid) == truth.total_bytes
    # 1000 segments: the head holds the newest few, sealed chunks the rest, and verify walks them all
    assert len(read_json(head)["segments"]) == 1000 % 64 and read_json(head)["index"]["segments"] == 960
    r = verify(bid, url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1000 segments in 1 partitions, 20000 records" in r.stdout
    # ...and a restore reads the chain back: every record, in order (conftest.produce's formula, seed 0)
    target = f"{topic}-r"
    r = restore(broker, bid, url, unique("rs-cut"), "--topic-map", f"{topic}:{target}")
    assert r.returncode == 0, r.stderr
    expected = [(f"key-0-{i}".encode() if i % 5 else None, (f"value-0-{i}-" + "x" * ((i * 7) % 120)).encode())
                for i in range(20_000)]
    assert [(k, v) for k, v, _ts in read_partition0(broker, target)] == expected


# ---- item 2: digests, verify, and restore refusing damage -----------------------------------------


def test_a_flipped_byte_fails_verify_naming_the_segment_and_restore_refuses_it(broker, shared_pipeline, tmp_path):
    topic, bid = unique("flip"), unique("bk-flip")
    create_topic(broker, topic, 2)
    truth = produce(broker, topic, 2, 400)
    store = tmp_path / "store"
    url = f"file://{store}"
    backup(broker, topic, bid, url, "--compression", "lz4", "--backup-segment-max-records", "50")
    r = verify(bid, url, broker)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == (f"verified backup {bid}: 8 segments in 2 partitions, 400 records, "
                                f"{sum(os.path.getsize(p) for q in (0, 1) for p in segment_paths(store, bid, topic, q))}"
                                " bytes: all intact, no gaps")
    s = shared_pipeline.wait_value(cat.VERIFY_DURATION.name + "_count", 1, backup_id=bid, status="success")
    assert s.get_value(cat.VERIFY_FAILED_SEGMENTS.name, backup_id=bid) == 0
    assert s.get_value(cat.VERIFY_GAPS.name, backup_id=bid) == 0
    assert s.get_value(cat.VERIFY_SEGMENTS_TOTAL.name, backup_id=bid) == 8
    first_verified = s.get_value(cat.LAST_VERIFIED.name, backup_id=bid)
    assert first_verified is not None

    damaged = segment_paths(store, bid, topic, 1)[2]  # partition 1, records 100..149
    key = os.path.relpath(damaged, store).replace(os.sep, "/")
    flip_byte(damaged)
    r = verify(bid, url, broker)
    assert r.returncode == 1
    assert r.stdout.splitlines() == [f"BAD {key}: does not match its SHA-256 digest: the object was altered or damaged"]
    assert "1 bad segment(s), 0 gap(s) in 8 segments" in one_line(r.stderr)
    s = shared_pipeline.wait_values((cat.VERIFY_FAILED_SEGMENTS.name, 1, {"backup_id": bid}),
                                    (cat.VERIFY_DURATION.name + "_count", 1, {"backup_id": bid, "status": "failure"}))
    assert s.get_value(cat.LAST_VERIFIED.name, backup_id=bid) > first_verified
    assert s.get_value(cat.ERRORS_TOTAL.name, backup_id=bid, error_type="integrity") == 1

    rid, target = unique("rs-flip"), f"{topic}-r"
    r = restore(broker, bid, url, rid, "--topic-map", f"{topic}:{target}")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert key in line and "SHA-256" in line and "refused" in line
    # nothing of the damaged segment reached the target; what precedes it did
    assert watermarks(broker, target, 2) == {0: 200, 1: 100}
    # the restore's refusal is the restore's error; the backup's count is verify's finding alone. The run's
    # end comes after its error, maybe in a later telemetry record: wait for it rather than race it
    shared_pipeline.wait_values(
        (cat.RESTORE_DURATION.name + "_count", 1, {"backup_id": bid, "status": "failure"}),
        (cat.RESTORE_ERRORS_TOTAL.name, 1, {"restore_id": rid, "error_type": "integrity"}),
        (cat.ERRORS_TOTAL.name, 1, {"backup_id": bid, "error_type": "integrity"}))
    assert truth.records == {0: 200, 1: 200}


def test_a_key_escaping_the_backup_and_a_truncated_checkpoint_stop_every_command_in_one_line(
        broker, shared_pipeline, tmp_path):
    topic, bid = unique("meta"), unique("bk-meta")
    create_topic(broker, topic, 1)
    produce(broker, topic, 1, 100)
    store = tmp_path / "store"
    url = f"file://{store}"
    backup(broker, topic, bid, url, "--backup-segment-max-records", "50")
    head = store / bid / "topics" / topic / "0" / "checkpoint.json"
    original = head.read_bytes()

    # a segment key that climbs out of the backup (the file it names exists, and is valid)
    outside = tmp_path / "outside.seg.zst"
    outside.write_bytes(open(segment_paths(store, bid, topic, 0)[0], "rb").read())
    cp = json.loads(original)
    cp["segments"][0]["key"] = f"{bid}/topics/{topic}/0/../../../../outside.seg.zst"
    head.write_text(json.dumps(cp))
    rid_esc, rid_trunc = unique("rs-esc"), unique("rs-trunc")
    for name, r in (("restore", restore(broker, bid, url, rid_esc, "--topic-map", f"{topic}:{topic}-e")),
                    ("verify", verify(bid, url, broker))):
        assert r.returncode == 1, (name, r.stderr)
        line = one_line(r.stderr)
        assert f"{bid}/topics/{topic}/0/checkpoint.json" in line and "outside" in line, line
    assert not os.path.exists(os.path.join(store, f"{topic}-e"))

    # truncated: backup, restore and verify each stop with one line naming the file
    head.write_bytes(original[: len(original) // 2])
    runs = {
        "backup": cli("backup", "--bootstrap-servers", broker, "--topics", topic, "--backup-id", bid,
                      "--storage", url),
        "restore": restore(broker, bid, url, rid_trunc),
        "verify": verify(bid, url, broker),
    }
    for name, r in runs.items():
        assert r.returncode == 1, (name, r.stderr)
        line = one_line(r.stderr)
        assert f"kafka-backup {name}: failed: {bid}/topics/{topic}/0/checkpoint.json: is corrupt or truncated" in line
    # backup and verify count under the backup; each restore under its own id
    shared_pipeline.wait_values(
        (cat.ERRORS_TOTAL.name, 2, {"backup_id": bid, "error_type": "corrupt_metadata"}),
        (cat.RESTORE_ERRORS_TOTAL.name, 1, {"restore_id": rid_trunc, "error_type": "corrupt_metadata"}),
        (cat.ERRORS_TOTAL.name, 1, {"backup_id": bid, "error_type": "integrity"}),  # verify: the escaping key
        (cat.RESTORE_ERRORS_TOTAL.name, 1, {"restore_id": rid_esc, "error_type": "integrity"}),
        (cat.BACKUP_DURATION.name + "_count", 1, {"backup_id": bid, "status": "failure"}),
        (cat.RESTORE_DURATION.name + "_count", 2, {"backup_id": bid, "status": "failure"}),
        (cat.VERIFY_DURATION.name + "_count", 2, {"backup_id": bid, "status": "failure"}),
        (cat.BACKUP_STATUS.name, 1, {"backup_id": bid, "kafka_backup_status": "ERROR"}))

    # a manifest from a newer writer: one line saying so
    head.write_bytes(original)
    manifest = store / bid / "manifest.json"
    doc = json.loads(manifest.read_bytes())
    doc["version"] = 99
    manifest.write_text(json.dumps(doc))
    r = verify(bid, url)
    assert r.returncode == 1
    assert f"{bid}/manifest.json: has layout version 99, newer than this kafka-backup reads" in one_line(r.stderr)


def test_a_layout_1_backup_still_restores_and_its_unverifiable_segments_are_counted(broker, shared_pipeline,
                                                                                    tmp_path):
    topic, bid = unique("old"), unique("bk-old")
    create_topic(broker, topic, 1)
    produce(broker, topic, 1, 150)
    store = tmp_path / "store"
    url = f"file://{store}"
    backup(broker, topic, bid, url, "--backup-segment-max-records", "50")
    # rewrite it as layout 1 wrote it: no digests, no covers_from, version 1
    head = store / bid / "topics" / topic / "0" / "checkpoint.json"
    cp = read_json(head)
    cp["version"] = 1
    for seg in cp["segments"]:
        del seg["sha256"], seg["covers_from"]
    head.write_text(json.dumps(cp))
    r = verify(bid, url, broker)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 written without a digest (layout 1): integrity not checkable" in r.stdout
    rid = unique("rs-old")
    r = restore(broker, bid, url, rid, "--topic-map", f"{topic}:{topic}-r")
    assert r.returncode == 0, r.stderr
    assert watermarks(broker, f"{topic}-r", 1) == {0: 150}
    s = shared_pipeline.wait_value(cat.UNVERIFIED_SEGMENTS_TOTAL.name, 6, backup_id=bid)  # 3 verified, 3 restored
    assert s.get_value(cat.VERIFY_FAILED_SEGMENTS.name, backup_id=bid) == 0
    # the next backup run migrates nothing it need not: new segments get digests, old ones stay readable
    produce(broker, topic, 1, 50, seed=1)
    backup(broker, topic, bid, url, "--backup-segment-max-records", "50")
    cp = read_json(head)
    assert cp["version"] == 2 and [bool(s.get("sha256")) for s in cp["segments"]] == [False] * 3 + [True]
    r = verify(bid, url)
    assert r.returncode == 0 and "3 written without a digest" in r.stdout, r.stdout + r.stderr


# ---- item 1: restored data that stays --------------------------------------------------------------


DAY_MS = 86_400_000


def produce_old(broker: str, topic: str, n: int, age_ms: int, seed: int = 0) -> list[tuple[bytes, bytes, int]]:
    """n records on partition 0 with timestamps ``age_ms`` old (one ms apart); returns (key, value, ts)."""
    from confluent_kafka import Producer

    base = int(time.time() * 1000) - age_ms
    p = Producer({"bootstrap.servers": broker, "linger.ms": 5})
    out = []
    for i in range(n):
        rec = (b"k%d" % i, b"old-%d-%d-" % (seed, i) + b"x" * (i % 50), base + i)
        p.produce(topic, key=rec[0], value=rec[1], partition=0, timestamp=rec[2])
        out.append(rec)
    assert p.flush(30) == 0
    return out


def low_watermark(broker: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": broker, "group.id": unique("lw")})
    try:
        return c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[0]
    finally:
        c.close()


def topic_config(broker: str, topic: str) -> dict[str, str]:
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"bootstrap.servers": broker})
    (fut,) = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)]).values()
    return {k: e.value for k, e in fut.result(15).items()}


def read_partition0(broker: str, topic: str) -> list[tuple[bytes, bytes, int]]:
    from confluent_kafka import Consumer, TopicPartition

    high = watermarks(broker, topic, 1)[0]
    c = Consumer({"bootstrap.servers": broker, "group.id": unique("rd"), "enable.auto.commit": False})
    out = []
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + 60
        while len(out) < high and time.monotonic() < deadline:
            for m in c.consume(500, timeout=1):
                assert m.error() is None, m.error()
                out.append((m.key(), m.value(), m.timestamp()[1]))
    finally:
        c.close()
    return out


def sweep_has_run(broker: str) -> None:
    """Ground truth that the broker's retention sweep ran: a default-retention topic loses its old records."""
    control = unique("sweep")
    create_topic(broker, control, 1)
    produce_old(broker, control, 10, 30 * DAY_MS)
    wait_for(lambda: low_watermark(broker, control) == 10, 90, 0.5, "the retention sweep to delete old records")


def test_restore_creates_targets_with_the_recorded_configuration_and_refuses_retention_loss(
        broker, shared_pipeline, tmp_path):
    from confluent_kafka.admin import AdminClient, NewTopic

    source, bid = unique("keep"), unique("bk-keep")
    configs = {"retention.ms": "-1", "cleanup.policy": "delete", "max.message.bytes": "2000000",
               "message.timestamp.type": "CreateTime", "segment.ms": "3600000"}
    admin = AdminClient({"bootstrap.servers": broker})
    admin.create_topics([NewTopic(source, 1, 1, config=configs)])[source].result(15)
    truth = produce_old(broker, source, 300, 30 * DAY_MS)  # a month old: kept only because retention is -1
    store = tmp_path / "store"
    url = f"file://{store}"
    before = time.time()
    backup(broker, source, bid, url, "--backup-segment-max-records", "100")
    snap = read_json(store / bid / "manifest.json")["topic_configs"][source]
    assert snap["partitions"] == 1 and before <= snap["read_ts"] <= time.time()
    assert {k: snap["configs"][k] for k in configs} == configs
    assert set(configs) <= set(snap["explicit"]) and "retention.bytes" in snap["configs"]

    # 1. a created target gets the recorded configuration, and its records stay
    target, rid = f"{source}-restored", unique("rs-keep")
    r = restore(broker, bid, url, rid, "--topic-map", f"{source}:{target}")
    assert r.returncode == 0, r.stderr
    got = topic_config(broker, target)
    assert {k: got[k] for k in configs} == configs
    sweep_has_run(broker)  # a sweep ran after the restore ended...
    assert low_watermark(broker, target) == 0  # ...and deleted nothing of the restored topic
    assert read_partition0(broker, target) == truth

    # 2. an existing target with the default retention (7 days) is refused, counted, nothing produced
    existing, rid2 = unique("short"), unique("rs-short")
    create_topic(broker, existing, 1)
    retention = int(topic_config(broker, existing)["retention.ms"])
    r = restore(broker, bid, url, rid2, "--topic-map", f"{source}:{existing}")
    assert r.returncode == 2
    line = one_line(r.stderr)
    oldest = datetime.fromtimestamp(truth[0][2] / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (f"restore.allow_retention_loss: target topic {existing!r} has retention.ms={retention} (7 d): "
            f"300 of 300 records in scope are older (the oldest is {oldest})") in line
    assert "--allow-retention-loss" in line
    assert watermarks(broker, existing, 1) == {0: 0}
    assert not (store / bid / "restores" / rid2).exists()
    shared_pipeline.wait_values((cat.RESTORE_ERRORS_TOTAL.name, 1, {"restore_id": rid2, "error_type": "retention"}),
                                (cat.RESTORE_DURATION.name + "_count", 1, {"backup_id": bid, "status": "failure"}))

    # 3. the override restores, the loss is counted, and the broker does delete what the check counted
    r = restore(broker, bid, url, rid2, "--topic-map", f"{source}:{existing}", "--allow-retention-loss")
    assert r.returncode == 0, r.stderr
    assert watermarks(broker, existing, 1) == {0: 300}
    shared_pipeline.wait_value(cat.RESTORE_ERRORS_TOTAL.name, 2, restore_id=rid2, error_type="retention")
    wait_for(lambda: low_watermark(broker, existing) == 300, 90, 0.5, "the broker to delete the 300 old records")

    # 4. a target to be created whose recorded retention is too short (the source kept 10 minutes): refused
    #    before the topic is created
    manifest = store / bid / "manifest.json"
    doc = read_json(manifest)
    doc["topic_configs"][source]["configs"]["retention.ms"] = "600000"
    manifest.write_text(json.dumps(doc))
    fresh = f"{source}-fresh"
    r = restore(broker, bid, url, unique("rs-fresh"), "--topic-map", f"{source}:{fresh}")
    assert r.returncode == 2
    assert (f"target topic {fresh!r} will be created with retention.ms=600000 (10 min): 300 of 300 records"
            in one_line(r.stderr))
    assert fresh not in admin.list_topics(timeout=10).topics
