"""The exporter's copy of the state topic sees a changelog write when it lands, not at the end of a poll."""

from __future__ import annotations

import pytest
from confluent_kafka import Producer

from kafka_backup.exporter import state_reader
from kafka_backup.exporter.state_reader import StateReader
from kafka_backup.schemas.state import JobState, encode_state
from kafka_backup.schemas.topics import state_topic
from tests.conftest import create_topic, unique, wait_for

pytestmark = pytest.mark.e2e


def write(broker: str, topic: str, state: JobState) -> None:
    p = Producer({"bootstrap.servers": broker})
    p.produce(topic, encode_state(state), key=f"backup:{state.job}".encode())
    assert p.flush(10) == 0


def test_a_write_is_read_without_waiting_out_the_poll(broker, monkeypatch):
    """``Consumer.consume(n, timeout)`` returns early only when ``n`` records arrived: with a poll of a
    minute, the copy would neither become ready nor see a write for a minute. It must see both at once."""
    monkeypatch.setattr(state_reader, "POLL_S", 60.0)
    app_id = unique("reader")
    topic = state_topic(app_id)
    create_topic(broker, topic, 2)
    write(broker, topic, JobState(kind="backup", job="j", records=1))
    reader = StateReader(broker, app_id).start()
    try:
        assert reader.ready.wait(20), "the copy never caught up"
        assert reader.snapshot()["backup:j"].records == 1
        for records in (2, 3):
            write(broker, topic, JobState(kind="backup", job="j", records=records))
            wait_for(lambda n=records: reader.snapshot()["backup:j"].records == n, 20,
                     interval=0.05, what=f"the copy to show records={records}")
    finally:
        reader.stop(timeout=1)  # its poll may be in a 60 s wait; the thread is a daemon
