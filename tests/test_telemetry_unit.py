"""classify_kafka_error against the installed confluent-kafka: every code it names exists and lands in its class."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from kafka_backup.producers.telemetry import classify_kafka_error

NAMED = [
    ("_TRANSPORT", "broker_connection", True),
    ("_ALL_BROKERS_DOWN", "broker_connection", True),
    ("_RESOLVE", "broker_connection", True),
    ("NETWORK_EXCEPTION", "broker_connection", True),
    ("BROKER_NOT_AVAILABLE", "broker_connection", True),
    ("_TIMED_OUT", "consumer_timeout", True),
    ("REQUEST_TIMED_OUT", "consumer_timeout", True),
    ("_MSG_TIMED_OUT", "consumer_timeout", True),
    ("OFFSET_OUT_OF_RANGE", "offset_invalid", False),
    ("_AUTO_OFFSET_RESET", "offset_invalid", False),
    ("_BAD_MSG", "deserialization", False),
    ("INVALID_MSG", "deserialization", False),  # the broker's CORRUPT_MESSAGE
    ("_VALUE_DESERIALIZATION", "deserialization", False),
    ("_KEY_DESERIALIZATION", "deserialization", False),
]


@pytest.mark.parametrize(("name", "error_type", "transient"), NAMED)
def test_every_named_code_is_classified(name, error_type, transient):
    err = KafkaError(getattr(KafkaError, name))
    assert classify_kafka_error(err) == (error_type, transient)


@pytest.mark.parametrize(("retriable", "expected"), [(True, ("broker_connection", True)),
                                                     (False, ("consumer_error", False))])
def test_codes_outside_the_named_classes_follow_retriable(retriable, expected):
    # TOPIC_AUTHORIZATION_FAILED is in no named class; reaching the last line used to raise AttributeError
    err = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, retriable=retriable)
    assert classify_kafka_error(err) == expected


def test_an_unknown_code_is_reported_not_raised():
    err = KafkaError(31337)
    assert classify_kafka_error(err) == ("consumer_error", False)
