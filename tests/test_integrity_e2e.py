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

import pytest

from schemas import catalogue as cat
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
    s = shared_pipeline.wait_value(cat.RECORDS_TOTAL.name, 20_000, backup_id=bid)
    assert s.get_value(cat.BYTES_TOTAL.name, backup_id=bid) == truth.total_bytes
    assert s.get_value(cat.BACKUP_STATUS.name, backup_id=bid, kafka_backup_status="OK") == 1
    # 1000 segments: the head holds the newest few, sealed chunks the rest, and verify walks them all
    assert len(read_json(head)["segments"]) == 1000 % 64 and read_json(head)["index"]["segments"] == 960
    r = verify(bid, url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1000 segments in 1 partitions, 20000 records" in r.stdout


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
    s = shared_pipeline.wait_value(cat.VERIFY_FAILED_SEGMENTS.name, 1, backup_id=bid)
    assert s.get_value(cat.LAST_VERIFIED.name, backup_id=bid) > first_verified
    assert s.get_value(cat.VERIFY_DURATION.name + "_count", backup_id=bid, status="failure") == 1
    assert s.get_value(cat.ERRORS_TOTAL.name, backup_id=bid, error_type="integrity") == 1

    rid, target = unique("rs-flip"), f"{topic}-r"
    r = restore(broker, bid, url, rid, "--topic-map", f"{topic}:{target}")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert key in line and "SHA-256" in line and "refused" in line
    # nothing of the damaged segment reached the target; what precedes it did
    assert watermarks(broker, target, 2) == {0: 200, 1: 100}
    s = shared_pipeline.wait_value(cat.ERRORS_TOTAL.name, 2, backup_id=bid, error_type="integrity")
    assert s.get_value(cat.RESTORE_DURATION.name + "_count", backup_id=bid, status="failure") == 1
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
    for name, r in (("restore", restore(broker, bid, url, unique("rs-esc"), "--topic-map", f"{topic}:{topic}-e")),
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
        "restore": restore(broker, bid, url, unique("rs-trunc")),
        "verify": verify(bid, url, broker),
    }
    for name, r in runs.items():
        assert r.returncode == 1, (name, r.stderr)
        line = one_line(r.stderr)
        assert f"kafka-backup {name}: failed: {bid}/topics/{topic}/0/checkpoint.json: is corrupt or truncated" in line
    s = shared_pipeline.wait_value(cat.ERRORS_TOTAL.name, 3, backup_id=bid, error_type="corrupt_metadata")
    assert s.get_value(cat.ERRORS_TOTAL.name, backup_id=bid, error_type="integrity") == 2  # the escaping key
    assert s.get_value(cat.BACKUP_DURATION.name + "_count", backup_id=bid, status="failure") == 1
    assert s.get_value(cat.RESTORE_DURATION.name + "_count", backup_id=bid, status="failure") == 2
    assert s.get_value(cat.VERIFY_DURATION.name + "_count", backup_id=bid, status="failure") == 2
    assert s.get_value(cat.BACKUP_STATUS.name, backup_id=bid, kafka_backup_status="ERROR") == 1

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
