"""Telemetry nobody can poison: forged events into the real telemetry topic, real processes.

Each test has a telemetry topic of its own, so every refusal it counts is one it produced.
Ground truth: records the test produced and backed up; refusals the test sent, by reason.
"""

from __future__ import annotations

import json
import math
import time

import msgspec
import pytest
from confluent_kafka import Producer

from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas import events as ev
from tests.conftest import backup, cli, create_topic, produce, unique, wait_for

pytestmark = pytest.mark.e2e

FLOOD = 20_000
MAX_KEYS = 256  # aggregator.max_keys_per_map's default


def forged(job: str, seq: int, now: float) -> list[tuple[ev.Event, str]]:
    """Hand-made events a buggy or hostile producer could send, each with the reason it must get."""
    base = dict(worker="forger-1", job=job)
    return [
        (ev.StorageOp(**base, seq=seq, ts=now, backend="s3", operation="segment", direction="write",
                      latency_s=float("nan"), bytes=1), "bad_value"),
        (ev.JobEnded(**base, seq=seq + 1, ts=now, status="success", duration_s=float("inf")), "bad_value"),
        (ev.SegmentStored(**base, seq=seq + 2, ts=now, topic="t", partition=0, start_offset=0, end_offset=10,
                          records=10, bytes=-100, uncompressed_bytes=1, stored_bytes=1, algorithm="zstd"),
         "bad_value"),
        (ev.SegmentStored(**base, seq=seq + 3, ts=now, topic="t", partition=0, start_offset=50, end_offset=10,
                          records=0, bytes=0, uncompressed_bytes=1, stored_bytes=1, algorithm="zstd"), "bad_value"),
        (ev.SegmentStored(**base, seq=seq + 4, ts=now, topic="t", partition=0, start_offset=0, end_offset=2**63,
                          records=1, bytes=1, uncompressed_bytes=1, stored_bytes=1, algorithm="zstd"), "bad_value"),
        (ev.StorageOp(**base, seq=seq + 5, ts=now, backend="s3|write", operation="segment", direction="write",
                      latency_s=0.1, bytes=1), "bad_value"),
        (ev.Retry(**base, seq=seq + 6, ts=now + 3600, operation="commit"), "bad_timestamp"),
    ]


def values_are_finite(text: str) -> list[str]:
    """Every exported sample but a restore's ETA (NaN by contract while no rate is measured) is finite."""
    bad = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            if not math.isfinite(float(value)) and not name.startswith(cat.RESTORE_ETA.name):
                bad.append(line)
    return bad


def test_forged_events_and_a_label_flood_are_refused_by_reason_and_touch_no_other_job(
        broker, pipeline_factory, tmp_path):
    telemetry = unique("telemetry-poison")
    store = f"file://{tmp_path / 'store'}"
    before_topic, after_topic = unique("poison-a"), unique("poison-b")
    for topic in (before_topic, after_topic):
        create_topic(broker, topic, 2)
    truth_a = produce(broker, before_topic, 2, 400)
    truth_b = produce(broker, after_topic, 2, 250, seed=1)
    flag = ["--telemetry-topic", telemetry]
    pipe = pipeline_factory(extra_aggregator_args=flag)
    backup(broker, before_topic, "clean-a", store, *flag)

    victim, flood = unique("victim"), unique("flood")
    p = Producer({"bootstrap.servers": broker, "linger.ms": 20})
    now = time.time()
    expected: dict[str, int] = {}
    for event, reason in forged(victim, 1, now):
        p.produce(telemetry, ev.encode(event), ev.event_key("backup", victim).encode())
        expected[reason] = expected.get(reason, 0) + 1
    flood_key = ev.event_key("backup", flood).encode()
    for i in range(FLOOD):  # 20,000 distinct error types on one job
        e = ev.ErrorRaised(worker="flooder", seq=i + 1, ts=now, job=flood, error_type=f"type{i:05d}",
                           transient=True)
        p.produce(telemetry, ev.encode(e), flood_key)
        if i % 5000 == 0:
            p.poll(0)
    # the same forgeries inside one batch record, around a good event: each refused by its own
    # reason, the good one folded; a batch over the cap refused once, as a whole
    mixed = unique("mixed")
    bad = forged(mixed, 2, now)
    good = ev.SegmentStored(worker="forger-1", seq=1, ts=now, job=mixed, topic="t", partition=0, start_offset=0,
                            end_offset=10, records=10, bytes=100, uncompressed_bytes=1, stored_bytes=1,
                            algorithm="zstd")
    payloads = [ev.encode(good)] + [ev.encode(event) for event, _ in bad]
    p.produce(telemetry, ev.encode_batch(payloads), ev.event_key("backup", mixed).encode())
    for _, reason in bad:
        expected[reason] += 1
    too_many = ev.Retry(worker="forger-2", seq=1, ts=now, job=mixed, operation="commit")
    p.produce(telemetry, msgspec.msgpack.encode({"type": "batch", "events": [too_many] * (ev.MAX_BATCH_EVENTS + 1)}),
              ev.event_key("backup", mixed).encode())
    expected["batch_too_large"] = 1
    assert p.flush(60) == 0
    expected["too_many_keys"] = FLOOD - MAX_KEYS

    # a job that starts after the flood is counted within a minute (asserted below), exactly; its
    # worker sends batch records
    started = time.monotonic()
    backup(broker, after_topic, "clean-b", store, *flag, "--telemetry-batch-events", "true")
    pipe.wait_value(cat.RECORDS_TOTAL.name, truth_b.total_records, 90, backup_id="clean-b")
    counted_after_s = time.monotonic() - started
    for reason, n in expected.items():
        pipe.wait_value(cat.TELEMETRY_INVALID.name, n, 60, reason=reason)
    text, _ = pipe.scrape_text()
    s = pipe.scrape()
    assert s.get_value(cat.RECORDS_TOTAL.name, backup_id="clean-a") == truth_a.total_records
    assert s.get_value(cat.BYTES_TOTAL.name, backup_id="clean-a") == truth_a.total_bytes
    assert s.get_value(cat.BYTES_TOTAL.name, backup_id="clean-b") == truth_b.total_bytes
    assert len(s.matching(cat.ERRORS_TOTAL.family_name + "_total", backup_id=flood)) == MAX_KEYS
    assert s.get_value(cat.RECORDS_TOTAL.name, backup_id=victim) is None  # nothing of the forgeries folded
    assert s.get_value(cat.RECORDS_TOTAL.name, backup_id=mixed) == 10  # the good event of the batch
    assert s.get_value(cat.RETRIES_TOTAL.name, backup_id=mixed, operation="commit") is None
    assert values_are_finite(text) == []
    assert counted_after_s < 60, f"the job after the flood took {counted_after_s:.0f} s to be counted"

    # the poisoned log still replays, with the same verdicts
    report = tmp_path / "report.json"
    r = cli("replay", "--bootstrap-servers", broker, *flag, "--output", str(tmp_path / "m.prom"),
            "--report-json", str(report), timeout=300)
    assert r.returncode == 0, r.stderr
    assert report.exists() and json.loads(report.read_text())
    replayed = (tmp_path / "m.prom").read_text()
    for reason, n in expected.items():
        assert f'{cat.TELEMETRY_INVALID.name}{{reason="{reason}"}} {float(n)}' in replayed, reason
    assert values_are_finite(replayed) == []


def test_with_a_signing_key_unsigned_records_are_refused_and_signed_workers_counted(
        broker, pipeline_factory, tmp_path):
    telemetry, topic = unique("telemetry-signed"), unique("signed")
    create_topic(broker, topic, 2)
    truth = produce(broker, topic, 2, 300)
    key_file = tmp_path / "telemetry.key"
    key_file.write_text("k" * 32 + "\n")
    flags = ["--telemetry-topic", telemetry, "--telemetry-signing-key-file", str(key_file)]
    pipe = pipeline_factory(extra_aggregator_args=flags)
    backup(broker, topic, "signed-bk", f"file://{tmp_path / 'store'}", *flags, "--telemetry-batch-events", "true")
    pipe.wait_value(cat.RECORDS_TOTAL.name, truth.total_records, 60, backup_id="signed-bk")
    # a forger without the key: a well-formed segment report for the same job, unsigned or signed wrongly
    p = Producer({"bootstrap.servers": broker})
    fake = ev.SegmentStored(worker="forger", seq=1, ts=time.time(), job="signed-bk", topic=topic, partition=0,
                            start_offset=10_000, end_offset=20_000, records=10_000, bytes=1, uncompressed_bytes=1,
                            stored_bytes=1, algorithm="zstd")
    key = ev.event_key("backup", "signed-bk").encode()
    p.produce(telemetry, ev.encode(fake), key)
    p.produce(telemetry, ev.encode(fake), key, headers=[("kafka-backup-sig", b"sha256=" + b"0" * 64)])
    p.flush(10)
    s = pipe.wait_value(cat.TELEMETRY_INVALID.name, 2, 60, reason="bad_signature")
    assert s.get_value(cat.RECORDS_TOTAL.name, backup_id="signed-bk") == truth.total_records
    # a worker with another key is refused too, every one of its events
    other = tmp_path / "other.key"
    other.write_text("x" * 32)
    r = cli("backup", "--bootstrap-servers", broker, "--topics", topic, "--backup-id", "signed-other",
            "--storage", f"file://{tmp_path / 'store'}", "--telemetry-topic", telemetry,
            "--telemetry-signing-key-file", str(other))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: (pipe.scrape().get_value(cat.TELEMETRY_INVALID.name, reason="bad_signature") or 0) > 2, 60,
             what="the other worker's events refused")
    assert pipe.scrape().get_value(cat.RECORDS_TOTAL.name, backup_id="signed-other") is None
    # a key file that is too short is a one-line configuration error
    short = tmp_path / "short.key"
    short.write_text("abc")
    r = cli("backup", "--bootstrap-servers", broker, "--topics", topic, "--backup-id", "x",
            "--storage", f"file://{tmp_path / 'store'}", "--telemetry-signing-key-file", str(short))
    assert r.returncode == 2 and "telemetry.signing_key_file" in r.stderr and "Traceback" not in r.stderr
