"""Names of the internal topics, shared by workers, aggregator and exporter."""

from __future__ import annotations

TELEMETRY_TOPIC = "kafka-backup.telemetry"
TELEMETRY_PARTITIONS = 6
TELEMETRY_RETENTION_MS = 30 * 24 * 3600 * 1000  # 30 days; -1 keeps the log forever
AGGREGATOR_APP_ID = "kafka-backup-aggregator"
STATE_TABLE = "jobs"


def state_topic(app_id: str = AGGREGATOR_APP_ID) -> str:
    """The compacted changelog of the aggregator's table: what the exporter reads.

    Faust names a table's changelog ``{app_id}-{table}-changelog``.
    """
    return f"{app_id}-{STATE_TABLE}-changelog"


def consumer_group(backup_id: str) -> str:
    """The consumer group a backup commits its durable offsets to."""
    return f"kafka-backup.{backup_id}"
