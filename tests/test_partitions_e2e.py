"""A telemetry topic that already exists with another partition count (issue #12, "fix first").

Before: Faust's agent died with PartitionsMismatch at the first table write while the
process stayed up, folding nothing. Now the aggregator adopts the topic's count, or
exits non-zero with one line when its state topic was made for another count.
"""

from __future__ import annotations

import subprocess

import pytest

from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas.topics import state_topic
from tests.conftest import backup, cli, create_topic, produce, unique

pytestmark = pytest.mark.e2e


def test_an_existing_telemetry_topic_with_one_partition_is_adopted(broker, pipeline_factory, tmp_path):
    telemetry = unique("tele")
    create_topic(broker, telemetry, 1)  # as the broker's auto-creation makes it; the default is 6
    pipe = pipeline_factory(extra_aggregator_args=["--telemetry-topic", telemetry])
    topic, bid = unique("src"), unique("bk-parts")
    create_topic(broker, topic, 2)
    truth = produce(broker, topic, 2, 500)
    backup(broker, topic, bid, f"file://{tmp_path}/store", "--telemetry-topic", telemetry)
    pipe.wait_value(cat.RECORDS_TOTAL.name, 500, timeout=90, backup_id=bid)
    samples = pipe.wait_value(cat.BACKUP_DURATION.name + "_count", 1, timeout=60, backup_id=bid, status="success")
    assert samples.get_value(cat.BYTES_TOTAL.name, backup_id=bid) == truth.total_bytes
    with open(pipe.aggregator.log_path, errors="replace") as fh:
        log = fh.read()
    assert f"telemetry topic {telemetry} has 1 partitions, not 6 (telemetry.partitions); using 1" in log
    assert "PartitionsMismatch" not in log
    assert pipe.aggregator.proc.poll() is None


def test_a_state_topic_made_for_another_count_stops_the_aggregator_in_one_line(broker):
    telemetry, app_id = unique("tele"), unique("agg")
    create_topic(broker, telemetry, 1)
    create_topic(broker, state_topic(app_id), 6)  # left by an aggregator that ran with 6 partitions
    try:
        r = cli("aggregate", "--bootstrap-servers", broker, "--app-id", app_id, "--telemetry-topic", telemetry,
                timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the aggregator stayed up instead of exiting")
    assert r.returncode == 2
    assert r.stderr == (
        f"kafka-backup aggregate: error: telemetry.topic: {telemetry} has 1 partitions but the state topic "
        f"{state_topic(app_id)} has 6; they must match: start the aggregator and the exporter with a new "
        f"--app-id (the state is rebuilt from the telemetry log), or recreate {telemetry} with 6 partitions\n")
