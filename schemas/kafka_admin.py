"""Kafka plumbing every stage shares: client settings and the telemetry topic's creation."""

from __future__ import annotations

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.config import TelemetryConfig


def client_config(bootstrap_servers: str, **extra: object) -> dict[str, object]:
    return {"bootstrap.servers": bootstrap_servers, **extra}


def ensure_topic(admin: AdminClient, name: str, partitions: int, replication: int = 1,
                 config: dict[str, str] | None = None, timeout: float = 15.0) -> bool:
    """Create ``name`` unless it exists; True when this call created it."""
    if name in admin.list_topics(timeout=timeout).topics:
        return False
    futures = admin.create_topics([NewTopic(name, partitions, replication, config=config or {})],
                                  operation_timeout=timeout)
    try:
        futures[name].result(timeout)
    except KafkaException as err:
        if err.args[0].name() != "TOPIC_ALREADY_EXISTS":
            raise
        return False
    return True


def ensure_telemetry_topic(bootstrap_servers: str, tcfg: TelemetryConfig) -> bool:
    admin = AdminClient(client_config(bootstrap_servers))
    return ensure_topic(admin, tcfg.topic, tcfg.partitions, tcfg.replication_factor,
                        {"retention.ms": str(tcfg.retention_ms), "cleanup.policy": "delete"})
