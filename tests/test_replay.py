"""Replay for audits: deterministic, schema-evolution safe, and equal to the live pipeline."""

from __future__ import annotations

import json
import os
import random

import pytest

from kafka_backup.schemas import catalogue as cat
from kafka_backup.streams import audit
from kafka_backup.streams.replay import read_log, replay, write_log
from tests.conftest import ROOT, backup, cli, create_topic, parse_prometheus, produce, unique

DATA = os.path.join(ROOT, "tests", "data")
PERIOD = ["--from", "2026-07-25T17:00:00Z", "--to", "2026-07-26T00:00:00Z"]


@pytest.mark.e2e
def test_recorded_v1_log_gives_the_stored_report_byte_for_byte(tmp_path):
    r = cli("replay", "--input", os.path.join(DATA, "telemetry-v1.log"), *PERIOD,
            "--output", str(tmp_path / "m.prom"), "--report-json", str(tmp_path / "r.json"),
            "--report-md", str(tmp_path / "r.md"))
    assert r.returncode == 0, r.stderr
    for mine, stored in (("r.json", "telemetry-v1.report.json"), ("r.md", "telemetry-v1.report.md"),
                         ("m.prom", "telemetry-v1.metrics.prom")):
        assert (tmp_path / mine).read_bytes() == open(os.path.join(DATA, stored), "rb").read(), stored


def test_v1_log_facts():
    """What the stored log must say, checked against the history written in make_v1_log.py."""
    with open(os.path.join(DATA, "telemetry-v1.log"), "rb") as fh:
        result = replay(read_log(fh.read()))
    report = json.loads(audit.to_json(audit.build(result, None)))
    (b,) = report["backups"]
    assert b["records_in_period"] == 150 + 170 + 200  # two redelivered segments counted once
    assert [p["ranges"] for p in b["partitions"]] == [[[0, 320]], [[10, 210]]]
    assert [(r["instance"], r["status"]) for r in b["runs"]] == [("host-a-1", "failure"), ("host-b-1", "success")]
    assert b["restores"][0]["records_in_period"] == 520
    assert report["invalid_events"] == {"unknown_type": 1}  # the later version's new event type, skipped
    state = result.jobs["backup:orders-bk"]
    assert state.retries == {"commit": 1}  # the later version's extra field, ignored


def test_reports_do_not_depend_on_arrival_order_or_duplicates():
    with open(os.path.join(DATA, "telemetry-v1.log"), "rb") as fh:
        records = read_log(fh.read())
    expected = audit.to_json(audit.build(replay(records), None))
    rng = random.Random(5)
    for _ in range(5):
        noisy = records + [rng.choice(records) for _ in range(15)]
        rng.shuffle(noisy)
        again = read_log(write_log(noisy))
        assert audit.to_json(audit.build(replay(again), None)) == expected


def test_period_bounds_select_events_by_event_time():
    with open(os.path.join(DATA, "telemetry-v1.log"), "rb") as fh:
        records = read_log(fh.read())
    first_hour = replay(records, until=1_785_000_000.0 + 1800)
    report = audit.build(first_hour, 1_785_000_000.0)
    (b,) = report.backups
    assert b.records_in_period == 150 and [r.status for r in b.runs] == ["failure"]
    assert b.restores == []


@pytest.mark.e2e
@pytest.mark.parametrize("args,needle", [
    (["--from", "yesterday"], "--from: 'yesterday' is neither ISO 8601"),
    (["--from", "2026-01-02", "--to", "2026-01-01"], "--from: must be before --to"),
    (["--input", "/nonexistent.log"], "--input: cannot read /nonexistent.log"),
])
def test_replay_mistakes_are_one_line(args, needle):
    r = cli("replay", *args)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.e2e
def test_replay_of_the_live_period_equals_the_live_exporter(broker, shared_pipeline, tmp_path):
    topic, bid = unique("aud"), unique("bk-aud")
    create_topic(broker, topic, 3)
    truth = produce(broker, topic, 3, 450)
    for _ in range(2):
        backup(broker, topic, bid, f"file://{tmp_path}/store", "--compression", "gzip")
        truth = produce(broker, topic, 3, 150, seed=9, truth=truth) if _ == 0 else truth
    live = shared_pipeline.wait_value(cat.BACKUP_DURATION.name + "_count", 2, backup_id=bid, status="success")
    live = shared_pipeline.wait_value(cat.RECORDS_TOTAL.name, 600, backup_id=bid)
    r = cli("replay", "--bootstrap-servers", broker, "--backup-id", bid, "--output", str(tmp_path / "m.prom"),
            "--report-json", str(tmp_path / "r.json"), "--record", str(tmp_path / "log.bin"))
    assert r.returncode == 0, r.stderr
    replayed = parse_prometheus((tmp_path / "m.prom").read_text())
    exact = [cat.RECORDS_TOTAL, cat.BYTES_TOTAL, cat.COMPRESSED_BYTES, cat.UNCOMPRESSED_BYTES,
             cat.CONSUMED_RECORDS_TOTAL, cat.FETCHES_TOTAL]
    for m in exact:
        keys = live.matching(m.name, backup_id=bid)
        assert keys and all(replayed[k] == v for k, v in keys.items()), m.name
    for status_key in live.matching(cat.BACKUP_DURATION.name + "_count", backup_id=bid):
        assert replayed[status_key] == live[status_key] == 2
    report = json.loads((tmp_path / "r.json").read_text())
    (b,) = report["backups"]
    assert b["records_in_period"] == truth.total_records == 600
    assert b["bytes_in_period"] == truth.total_bytes
    assert [(p["partition"], p["ranges"], p["gaps"]) for p in b["partitions"]] == [
        (p, [[0, truth.records[p]]], []) for p in range(3)]
    assert [r["status"] for r in b["runs"]] == ["success", "success"]
    # the recorded copy replays to the same report, byte for byte
    r2 = cli("replay", "--input", str(tmp_path / "log.bin"), "--backup-id", bid, "--output", os.devnull,
             "--report-json", str(tmp_path / "r2.json"))
    assert r2.returncode == 0 and (tmp_path / "r2.json").read_bytes() == (tmp_path / "r.json").read_bytes()


@pytest.mark.e2e
def test_rebuild_under_a_new_application_id(broker, shared_pipeline, pipeline_factory, tmp_path):
    """A metric definition changed: a new aggregator app rebuilds every table from the start of the log."""
    topic, bid = unique("reb"), unique("bk-reb")
    create_topic(broker, topic, 2)
    produce(broker, topic, 2, 250)
    backup(broker, topic, bid, f"file://{tmp_path}")
    live = shared_pipeline.wait_value(cat.RECORDS_TOTAL.name, 250, backup_id=bid)
    rebuilt = pipeline_factory(app_id=unique("agg-v2"))
    s = rebuilt.wait_value(cat.RECORDS_TOTAL.name, 250, backup_id=bid)
    for k, v in live.matching(cat.BYTES_TOTAL.name, backup_id=bid).items():
        assert s[k] == v


def ed25519_pair(tmp_path, name: str):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.mark.e2e
def test_signed_audit_evidence_verifies_and_any_changed_byte_does_not(tmp_path):
    private, public = ed25519_pair(tmp_path, "auditor")
    _, other = ed25519_pair(tmp_path, "someone-else")
    report, md = tmp_path / "r.json", tmp_path / "r.md"
    r = cli("replay", "--input", os.path.join(DATA, "telemetry-v1.log"), *PERIOD, "--output", str(tmp_path / "m"),
            "--report-json", str(report), "--report-md", str(md), "--sign-key", str(private))
    assert r.returncode == 0, r.stderr
    # the signed report is the very report anyone recomputes from the log
    assert report.read_bytes() == open(os.path.join(DATA, "telemetry-v1.report.json"), "rb").read()
    for path in (report, md):
        ok = cli("replay", "--verify-report", str(path), "--public-key", str(public))
        assert ok.returncode == 0 and "verifies" in ok.stdout, ok.stderr
    assert cli("replay", "--verify-report", str(report), "--public-key", str(other)).returncode == 1
    data = bytearray(report.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    report.write_bytes(bytes(data))
    bad = cli("replay", "--verify-report", str(report), "--signature", str(report) + ".sig",
              "--public-key", str(public))
    assert bad.returncode == 1 and "does NOT match" in bad.stderr
    not_a_key = tmp_path / "nokey.pem"
    not_a_key.write_text("hello")
    r = cli("replay", "--input", os.path.join(DATA, "telemetry-v1.log"), "--report-json", str(tmp_path / "x.json"),
            "--sign-key", str(not_a_key))
    assert r.returncode == 2 and "--sign-key" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.json").exists()  # refused before any work
