"""Topic configurations: read from the source by the backup, given to targets by the restore, and checked.

Kafka deletes by record timestamp, and a restore keeps the original
timestamps: a record older than its target topic's ``retention.ms`` is
deleted by the broker shortly after it is restored. So the backup records each
source topic's configuration (``layout.TopicSnapshot``, in the manifest), a
restore creates missing targets with it, and before producing anything the
restore compares every target's effective configuration with the records in
scope: records the target would delete (``retention.ms``), or refuse
(``message.timestamp.before.max.ms`` / ``difference.max.ms``), stop the
restore with one line naming the topic, the oldest record and the setting,
unless ``--allow-retention-loss`` accepts the deletion.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from confluent_kafka.admin import AdminClient, ConfigResource, ConfigSource

from kafka_backup.producers.layout import TOPIC_CONFIG_KEYS, TopicSnapshot

FOREVER = 2**63 - 1  # Kafka's Long.MAX_VALUE: no limit


def describe(admin: AdminClient, topics: list[str], timeout: float = 15) -> dict[str, TopicSnapshot]:
    """The configs of ``topics`` that matter for a faithful copy (raises ``KafkaException``)."""
    if not topics:
        return {}
    now = time.time()
    futures = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics],
                                     request_timeout=timeout)
    out = {}
    for resource, fut in futures.items():
        entries = fut.result(timeout)
        configs = {k: e.value for k, e in entries.items() if k in TOPIC_CONFIG_KEYS and e.value is not None}
        explicit = sorted(k for k in configs if entries[k].source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value)
        out[resource.name] = TopicSnapshot(partitions=0, configs=configs, explicit=explicit, read_ts=now)
    return out


def _int(configs: dict[str, str], key: str) -> int | None:
    try:
        return int(configs[key])
    except (KeyError, ValueError):
        return None


def deletes_before(configs: dict[str, str], now_ms: int) -> tuple[int, str] | None:
    """(cutoff, setting): records with a timestamp below the cutoff are deleted by this topic's retention.

    None when the topic deletes nothing by age: compaction only, retention -1, or LogAppendTime
    (the broker stamps restored records with the time they arrive).
    """
    if "delete" not in configs.get("cleanup.policy", "delete"):
        return None
    if configs.get("message.timestamp.type") == "LogAppendTime":
        return None
    retention = _int(configs, "retention.ms")
    if retention is None or retention < 0 or retention >= FOREVER:
        return None
    return now_ms - retention, f"retention.ms={retention} ({human(retention)})"


def refuses_before(configs: dict[str, str], now_ms: int) -> tuple[int, str] | None:
    """(cutoff, setting): the broker rejects records with a timestamp below the cutoff (CreateTime topics)."""
    if configs.get("message.timestamp.type") == "LogAppendTime":
        return None
    limits = [(v, k) for k in ("message.timestamp.before.max.ms", "message.timestamp.difference.max.ms")
              if (v := _int(configs, k)) is not None and 0 <= v < FOREVER]
    if not limits:
        return None
    value, key = min(limits)
    return now_ms - value, f"{key}={value} ({human(value)})"


def human(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms >= size:
            return f"{ms / size:g} {unit}"
    return f"{ms} ms"


def iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
