"""`kafka-backup status` rows: the exporter's own values for the same state, and the exit codes."""

from __future__ import annotations

import json

from kafka_backup.exporter import status
from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas.state import JobRate, JobState
from tests.test_exporter_unit import NOW, SEC, both, get, snapshot


def restore_state(**kw) -> JobState:
    return JobState(kind="restore", job="r9", backup_id="b1", status="running", started_ts=NOW - 30,
                    last_event_ts=NOW - 1, total_records=1000, restored_total=250, records=250,
                    job_rates=[JobRate(SEC - 10, 120)], **kw)


def test_rows_carry_the_values_metrics_serves_for_the_same_state():
    snap = {**snapshot(), "restore:r9": restore_state()}
    rows = {(r.kind, r.id): r for r in status.rows(snap, NOW, throughput_window_s=60)}
    for v in both(snap):  # Prometheus text and OpenMetrics, both parsed
        b1 = rows[("backup", "b1")]
        assert b1.records == get(v, cat.RECORDS_TOTAL, backup_id="b1") == 510
        assert b1.lag_records == get(v, cat.LAG_RECORDS_MAX, backup_id="b1") == 900
        assert b1.worst_partition == "orders/0"
        assert b1.lag_seconds == get(v, cat.LAG_SECONDS, backup_id="b1", topic="orders", partition="0")
        assert b1.throughput_records_per_sec == sum(
            get(v, cat.THROUGHPUT_RECORDS, backup_id="b1", topic=t) for t in ("orders", "payments"))
        assert get(v, cat.BACKUP_STATUS, backup_id="b1", kafka_backup_status=b1.status) == 1
        r9 = rows[("restore", "r9")]
        assert r9.progress_percent == get(v, cat.RESTORE_PROGRESS, restore_id="r9", backup_id="b1") == 25.0
        assert r9.throughput_records_per_sec == get(v, cat.RESTORE_THROUGHPUT, restore_id="r9") == 4.0
        assert r9.eta_seconds == get(v, cat.RESTORE_ETA, restore_id="r9") == 750 / 4.0
        assert r9.records == get(v, cat.RESTORE_RECORDS_TOTAL, restore_id="r9") == 250
    assert (r9.status, r9.backup_id) == ("OK", "b1")


def test_selection_and_exit_codes():
    snap = {**snapshot(), "restore:r9": restore_state()}
    assert [r.id for r in status.rows(snap, NOW, backup_id="b2")] == ["b2"]
    assert [r.id for r in status.rows(snap, NOW, restore_id="r9")] == ["r9"]
    done = {"backup:n": JobState(kind="backup", job="n", status="success", last_event_ts=NOW - 3600)}
    assert status.exit_code(status.rows(done, NOW, backup_id="n")) == status.EXIT_OK
    assert status.exit_code(status.rows(snap, NOW, backup_id="nope")) == status.EXIT_NO_JOB
    failed = {"restore:r9": restore_state()}
    failed["restore:r9"].status = "failure"
    assert status.exit_code(status.rows(failed, NOW, restore_id="r9")) == status.EXIT_UNHEALTHY
    silent = {"backup:s": JobState(kind="backup", job="s", status="running", last_event_ts=NOW - 120)}
    (row,) = status.rows(silent, NOW, backup_id="s", stop_after_s=60)
    assert row.status == "STOP" and status.exit_code([row]) == status.EXIT_UNHEALTHY


def test_json_is_stable_and_plain_lines_carry_no_escape_codes():
    snap = {**snapshot(), "restore:r9": restore_state()}
    selected = status.rows(snap, NOW)
    doc = json.loads(json.dumps(status.as_json(selected, NOW)))
    assert doc["version"] == 1 and doc["generated_at"].endswith("Z")
    assert set(doc["jobs"][0]) == {"kind", "id", "status", "mode", "backup_id", "records", "lag_records",
                                   "lag_seconds", "worst_partition", "throughput_records_per_sec",
                                   "last_success_ts", "last_success_age_s", "last_verified_ts",
                                   "last_verified_age_s", "progress_percent", "eta_seconds"}
    lines = status.plain_lines(selected)
    assert len(lines) == len(selected)
    assert lines[0].startswith("backup b1 ") and "lag=900" in lines[0] and "worst=orders/0" in lines[0]
    assert all("\x1b" not in line for line in lines)
    assert status.age(3 * 86400 + 4 * 3600) == "3d4h" and status.age(125) == "2m05s" and status.age(None) == "-"
