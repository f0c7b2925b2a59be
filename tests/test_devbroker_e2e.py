"""The embedded dev broker ignores fetch size limits (issue #12, "fix first").

It answers a fetch with everything it holds past the offset, so a partition with more
than librdkafka's receive.message.max.bytes (100 MB) unread makes a consumer refuse every
reply and stall. The state topic is the one that grows that large on the dev broker (it
does not compact): ``kafka-backup up`` raises the limit for its processes, as here.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest
from confluent_kafka import Producer

from kafka_backup.cli.devbroker import free_port
from kafka_backup.schemas.topics import state_topic
from tests.conftest import Proc, create_topic, unique, wait_for

pytestmark = pytest.mark.e2e

VALUE = b"\xc1" * 100_000  # not msgpack: the exporter skips it, and counts it
RECORDS = 1_100  # 110 MB in one partition


def health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.skipif(bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS")), reason="a dev-broker limit")
def test_an_exporter_with_a_raised_limit_catches_up_past_100_mb(broker, tmp_path):
    app_id = unique("agg")
    create_topic(broker, state_topic(app_id), 1)
    producer = Producer({"bootstrap.servers": broker, "linger.ms": 50})
    for _ in range(RECORDS):
        while True:
            try:
                producer.produce(state_topic(app_id), VALUE, b"backup:big")
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(120) == 0
    port = free_port()
    exporter = Proc(["exporter", "--bootstrap-servers", broker, "--app-id", app_id, "--port", str(port),
                     "--kafka-receive-message-max-bytes", "1000000000"], str(tmp_path / "exporter.log")).start()
    try:
        wait_for(lambda: health(port) == 200, 90, what="the exporter caught up with 110 MB of state topic")
    finally:
        exporter.stop()
