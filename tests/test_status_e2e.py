"""`kafka-backup status` against real processes: a backup, a rate-limited restore, a killed worker.

Ground truth: the records the test produced; the exporter's /metrics for the same state; the
exit status a cron job or CI script would see; the rows a person sees on a terminal (a pty).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys

import pytest

from kafka_backup.schemas import catalogue as cat
from tests.conftest import ROOT, backup, cli, create_topic, produce, unique, wait_for
from tests.test_faults_e2e import continuous_backup
from tests.test_restore_e2e import restore_proc

pytestmark = pytest.mark.e2e

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def status(pipe, *args: str) -> subprocess.CompletedProcess:
    return cli("status", "--bootstrap-servers", pipe.bootstrap, "--app-id", pipe.app_id, *args, timeout=60)


def status_json(pipe, *args: str) -> tuple[int, dict]:
    r = status(pipe, "--format", "json", *args)
    assert r.returncode in (0, 1, 3), r.stderr
    return r.returncode, json.loads(r.stdout)


def on_a_terminal(pipe, *args: str) -> str:
    """Run `status` with its stdout on a pseudo-terminal and return what the terminal received."""
    main, replica = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "kafka_backup.cli.main", "status", "--bootstrap-servers", pipe.bootstrap,
                             "--app-id", pipe.app_id, *args], cwd=ROOT, stdout=replica, stderr=subprocess.PIPE,
                            env={**os.environ, "COLUMNS": "200", "TERM": "xterm-256color"})
    os.close(replica)
    out = b""
    while True:
        ready, _, _ = select.select([main], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        out += chunk
    proc.wait(30)
    os.close(main)
    return out.decode(errors="replace")


def test_status_matches_metrics_and_ground_truth_and_exits_by_health(broker, pipeline_factory, tmp_path):
    topic, bid, rid = unique("st"), unique("bk-st"), unique("rs-st")
    create_topic(broker, topic, 2)
    truth = produce(broker, topic, 2, 400)
    store = f"file://{tmp_path / 'store'}"
    pipe = pipeline_factory()
    backup(broker, topic, bid, store)
    pipe.wait_value(cat.RECORDS_TOTAL.name, truth.total_records, 60, backup_id=bid)

    # a rate-limited restore into a new topic: while it runs, status shows it moving
    proc = restore_proc(broker, bid, store, rid, tmp_path / "restore.log", "--rate-limit", "100",
                        "--topic-map", f"{topic}:{topic}-restored")
    try:
        def moving():
            code, doc = status_json(pipe, "--restore-id", rid)
            jobs = doc["jobs"]
            return jobs and 0 < (jobs[0]["progress_percent"] or 0) < 100 and jobs[0]
        running = wait_for(moving, 60, what="the restore in progress")
        assert running["kind"] == "restore" and running["backup_id"] == bid and running["status"] == "OK"
        assert running["records"] < truth.total_records
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    pipe.wait_value(cat.RESTORE_RECORDS_TOTAL.name, truth.total_records, 60, restore_id=rid)

    code, doc = status_json(pipe)
    metrics = pipe.scrape()
    jobs = {(j["kind"], j["id"]): j for j in doc["jobs"]}
    b, r = jobs[("backup", bid)], jobs[("restore", rid)]
    assert b["records"] == metrics.get_value(cat.RECORDS_TOTAL.name, backup_id=bid) == truth.total_records
    assert b["status"] == "OK" and b["mode"] == "one-shot"
    assert b["lag_records"] == metrics.get_value(cat.LAG_RECORDS_MAX.name, backup_id=bid) == 0
    assert b["last_success_ts"] == metrics.get_value(cat.LAST_SUCCESS.name, backup_id=bid)
    assert r["records"] == metrics.get_value(cat.RESTORE_RECORDS_TOTAL.name, restore_id=rid) == truth.total_records
    assert r["progress_percent"] == 100.0 and r["eta_seconds"] == 0.0

    # exit status: a healthy selection is 0, an unknown one 3
    assert status(pipe, "--backup-id", bid).returncode == 0
    assert status(pipe, "--backup-id", "no-such-backup").returncode == 3

    # a continuous backup killed with -9 turns STOP after worker_stop_after_s, and status says so with exit 1
    live_topic, live = unique("st-live"), unique("bk-live")
    create_topic(broker, live_topic, 1)
    produce(broker, live_topic, 1, 50)
    worker = continuous_backup(broker, live_topic, live, str(tmp_path / "store"), str(tmp_path / "live.log"))
    try:
        pipe.wait_value(cat.RECORDS_TOTAL.name, 50, 60, backup_id=live)
        assert status(pipe, "--backup-id", live, "--metrics-worker-stop-after-s", "5").returncode == 0
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)

    def stopped():
        r = status(pipe, "--backup-id", live, "--metrics-worker-stop-after-s", "5")
        return r.returncode == 1 and r
    r = wait_for(stopped, 60, what="STOP after the kill")
    assert r.stdout.startswith(f"backup {live} STOP ")  # not a terminal: plain lines

    # on a terminal: a table with a header and one row per selected job
    screen = ANSI.sub("", on_a_terminal(pipe, "--backup-id", bid))
    lines = [line for line in screen.splitlines() if line.strip()]
    assert lines[0].split()[:4] == ["KIND", "ID", "STATUS", "RECORDS"]
    assert lines[1].split()[:4] == ["backup", bid, "OK", f"{truth.total_records:,}"]
    assert len(lines) == 2

    # --watch refreshes until Ctrl-C; off a terminal each refresh is a new stamped block
    proc = subprocess.Popen([sys.executable, "-m", "kafka_backup.cli.main", "status", "--bootstrap-servers", pipe.bootstrap,
                             "--app-id", pipe.app_id, "--backup-id", bid, "--watch", "0.5"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        blocks = []
        while len(blocks) < 3:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            if line.startswith("# "):
                blocks.append(line)
            else:
                assert line.startswith(f"backup {bid} OK ")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0  # the last refresh was healthy
    finally:
        if proc.poll() is None:
            proc.kill()
