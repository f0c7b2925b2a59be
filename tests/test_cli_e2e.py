"""The two commands a newcomer runs first: ``dev-broker`` and ``up``."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from kafka_backup.cli.devbroker import free_port
from kafka_backup.schemas import catalogue as cat
from tests.conftest import (
    ROOT,
    create_topic,
    indexed_segments,
    parse_prometheus,
    produce,
    wait_for,
    watermarks,
)

pytestmark = pytest.mark.e2e


def test_dev_broker_serves_kafka_until_terminated(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kafka_backup.cli.main", "dev-broker", "--port", str(port),
                             "--data-dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith(f"dev-broker: Kafka on 127.0.0.1:{port}")
        bootstrap = f"127.0.0.1:{port}"
        create_topic(bootstrap, "t", 2)
        produce(bootstrap, "t", 2, 10)
        assert watermarks(bootstrap, "t", 2) == {0: 5, 1: 5}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    with pytest.raises(KafkaException):
        AdminClient({"bootstrap.servers": f"127.0.0.1:{port}", "socket.timeout.ms": 1000}).list_topics(timeout=2)


def test_up_runs_the_whole_pipeline_and_reports_what_is_on_disk(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.Popen([sys.executable, "-m", "kafka_backup.cli.main", "up", "--metrics-port", str(port)], cwd=tmp_path,
                            env=env, stdout=open(tmp_path / "up.log", "wb"), stderr=subprocess.STDOUT)

    def scrape():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            return parse_prometheus(r.read().decode())

    def on_disk() -> int:
        total = 0
        for path in glob.glob(str(tmp_path / "kafka-backup-data" / "demo" / "topics" / "*" / "*" / "checkpoint.json")):
            with open(path) as fh:
                total += sum(s["records"] for s in indexed_segments(str(tmp_path / "kafka-backup-data"),
                                                                    json.load(fh)))
        return total

    try:
        # the demo backup flushes every 5 s: between flushes, metrics and disk must agree exactly
        def agree():
            n = on_disk()
            return n > 0 and scrape().get_value(cat.RECORDS_TOTAL.name, backup_id="demo") == n

        wait_for(agree, 120, what="records_total == records in checkpoints on disk")
        s = scrape()
        lagging = s.matching(cat.LAG_RECORDS.name, backup_id="demo", topic="demo.orders")
        assert len(lagging) == 3
        assert s.get_value(cat.THROUGHPUT_RECORDS.name, backup_id="demo", topic="demo.orders") > 0
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
