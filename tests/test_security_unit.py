"""SASL/TLS settings reach every Kafka client of the right cluster, in librdkafka's and aiokafka's terms."""

from __future__ import annotations

import pytest

from kafka_backup.schemas import kafka_admin
from kafka_backup.schemas.config import ConfigError, load
from kafka_backup.streams.app import faust_credentials


def test_source_and_telemetry_clusters_get_their_own_settings():
    cfg = load(None, {
        "kafka.bootstrap_servers": "src:9093", "kafka.security_protocol": "SASL_SSL",
        "kafka.sasl_mechanism": "SCRAM-SHA-512", "kafka.sasl_username": "backup", "kafka.sasl_password": "pw",
        "kafka.telemetry_bootstrap_servers": "tele:9092", "kafka.telemetry_security_protocol": "SASL_PLAINTEXT",
        "kafka.telemetry_sasl_username": "tele", "kafka.telemetry_sasl_password": "pw2",
    })
    kafka_admin.register(cfg.kafka.bootstrap_servers, kafka_admin.source_security(cfg.kafka))
    kafka_admin.register(cfg.kafka.telemetry_bootstrap_servers, kafka_admin.telemetry_security(cfg.kafka))
    src = kafka_admin.client_config("src:9093", **{"group.id": "g"})
    assert src.pop("logger") is kafka_admin.LIBRDKAFKA_LOGGER  # librdkafka's lines go through Python logging
    assert src == {"bootstrap.servers": "src:9093", "reconnect.backoff.ms": 20, "security.protocol": "sasl_ssl",
                   "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "backup", "sasl.password": "pw",
                   "group.id": "g"}
    tele = kafka_admin.client_config("tele:9092")
    assert tele["security.protocol"] == "sasl_plaintext"
    # a separate telemetry cluster does not inherit the source's mechanism or credentials
    assert (tele["sasl.mechanism"], tele["sasl.username"]) == ("PLAIN", "tele")
    assert kafka_admin.client_config("other:1") == {"bootstrap.servers": "other:1", "reconnect.backoff.ms": 20,
                                                    "security.protocol": "plaintext",
                                                    "logger": kafka_admin.LIBRDKAFKA_LOGGER}


def test_telemetry_on_the_source_cluster_inherits_its_settings():
    cfg = load(None, {"kafka.security_protocol": "SSL", "kafka.ssl_ca_location": "/ca.pem"})
    sec = kafka_admin.telemetry_security(cfg.kafka)
    assert sec.librdkafka() == {"security.protocol": "ssl", "ssl.ca.location": "/ca.pem"}


def test_sasl_without_credentials_is_a_one_line_error():
    cfg = load(None, {"kafka.security_protocol": "SASL_SSL"})
    with pytest.raises(ConfigError, match=r"kafka.sasl_username: SASL_SSL needs a username and a password"):
        kafka_admin.source_security(cfg.kafka)


def test_faust_gets_the_same_cluster_settings():
    creds = faust_credentials(kafka_admin.Security("SASL_PLAINTEXT", "SCRAM-SHA-256", "u", "p"))
    assert (creds.username, creds.password, str(creds.mechanism.value)) == ("u", "p", "SCRAM-SHA-256")
    assert faust_credentials(kafka_admin.Security()) is None

