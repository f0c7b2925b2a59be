"""The one catalogue of metrics: name, type, unit, help, labels, buckets.

The aggregator takes histogram buckets from here, the exporter builds every
family from here, and ``docs/metrics.md`` is generated from here
(``python -m kafka_backup.schemas.catalogue > docs/metrics.md``). A metric name is written
once, in this file; code refers to the module constants.

Names and semantics follow the PRD (``metrics-prd.md``). Where the PRD's
choice is weak we keep its metric and add a better one next to it, flagged
``extension`` with the reason in ``note``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Literal, ParamSpec

import msgspec

MetricType = Literal["counter", "gauge", "histogram", "stateset", "info"]

# Runs last from seconds (an offset reset, a small one-shot backup) to weeks (a continuous
# backup is observed when it stops): up to an hour as before, then 2 h, 4 h, 8 h, a day, two
# days, a week and 30 days, so neither a nightly backup nor a long restore lands in +Inf.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                    7200.0, 14400.0, 28800.0, 86400.0, 172800.0, 604800.0, 2592000.0)
# Storage calls: 10 ms to 10 s as before, then 30 s and 60 s, where client timeouts fire.
STORAGE_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Former layouts: state written with them is moved over exactly (each is a subset of today's bounds).
LEGACY_DURATION_BUCKETS = ((1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0),)
LEGACY_STORAGE_LATENCY_BUCKETS = ((0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),)
OFFSET_RESET_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metric(msgspec.Struct, frozen=True):
    name: str
    type: MetricType
    unit: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    section: str = ""
    legacy_buckets: tuple[tuple[float, ...], ...] = ()  # earlier bucket layouts, each a subset of ``buckets``
    extension: bool = False
    note: str = ""

    @property
    def family_name(self) -> str:
        """Name handed to prometheus_client, which appends ``_total`` to counters itself."""
        if self.type == "counter":
            return self.name.removesuffix("_total")
        if self.type == "info":
            return self.name.removesuffix("_info")
        return self.name

    @property
    def om_unit(self) -> str:
        """OpenMetrics UNIT, only where the name ends with it (the strict parser demands so)."""
        return self.unit if self.family_name.endswith("_" + self.unit) else ""


CATALOGUE: list[Metric] = []


_P = ParamSpec("_P")


def _registered(make: Callable[_P, Metric]) -> Callable[_P, Metric]:
    """``make`` (Metric's own signature, checked) that also appends what it makes to the catalogue."""

    def register(*args: _P.args, **kwargs: _P.kwargs) -> Metric:
        metric = make(*args, **kwargs)
        CATALOGUE.append(metric)
        return metric

    return register


_m = _registered(Metric)


# 1. Consumer lag
S1 = "1. Consumer lag"
LAG_RECORDS = _m(
    "kafka_backup_lag_records", "gauge", "records",
    "Records behind the high watermark: high watermark minus the durably committed offset",
    ("topic", "partition", "backup_id"), section=S1)
LAG_BYTES = _m(
    "kafka_backup_lag_bytes", "gauge", "bytes",
    "Approximate bytes behind: lag in records times the partition's average record size over the last hour",
    ("topic", "partition", "backup_id"), section=S1)
LAG_SECONDS = _m(
    "kafka_backup_lag_seconds", "gauge", "seconds",
    "Timestamp of the newest fetched record minus timestamp of the newest backed-up record (0 when caught up)",
    ("topic", "partition", "backup_id"), section=S1)
LAG_RECORDS_MAX = _m(
    "kafka_backup_lag_records_max", "gauge", "records",
    "Maximum lag in records across the backup's partitions", ("backup_id",), section=S1)

# 2. Throughput
S2 = "2. Throughput"
THROUGHPUT_RECORDS = _m(
    "kafka_backup_throughput_records_per_sec", "gauge", "records/s",
    "Records consumed per second over the rolling window", ("backup_id", "topic"), section=S2,
    note="A rate kept in a gauge; prefer rate(kafka_backup_consumed_records_total[1m]).")
THROUGHPUT_BYTES = _m(
    "kafka_backup_throughput_bytes_per_sec", "gauge", "bytes/s",
    "Key plus value bytes consumed per second over the rolling window", ("backup_id", "topic"), section=S2,
    note="A rate kept in a gauge; prefer rate(kafka_backup_consumed_bytes_total[1m]).")
FETCH_RATE = _m(
    "kafka_backup_fetch_rate", "gauge", "fetches/s",
    "Consumer poll calls per second over the rolling window", ("backup_id",), section=S2,
    note="A rate kept in a gauge; prefer rate(kafka_backup_fetches_total[1m]).")
RECORDS_TOTAL = _m(
    "kafka_backup_records_total", "counter", "records",
    "Records durably backed up (segment and checkpoint written), counted once per offset range",
    ("backup_id",), section=S2)
BYTES_TOTAL = _m(
    "kafka_backup_bytes_total", "counter", "bytes",
    "Key plus value bytes of the records durably backed up", ("backup_id",), section=S2)
CONSUMED_RECORDS_TOTAL = _m(
    "kafka_backup_consumed_records_total", "counter", "records",
    "Records fetched from the source, including re-fetches after a restart", ("backup_id", "topic"),
    section=S2, extension=True,
    note="Counter behind the throughput gauge: Prometheus computes any rate window from it exactly.")
CONSUMED_BYTES_TOTAL = _m(
    "kafka_backup_consumed_bytes_total", "counter", "bytes",
    "Key plus value bytes fetched from the source", ("backup_id", "topic"), section=S2, extension=True,
    note="Counter behind the bytes throughput gauge.")
FETCHES_TOTAL = _m(
    "kafka_backup_fetches_total", "counter", "fetches",
    "Consumer poll calls", ("backup_id",), section=S2, extension=True,
    note="Counter behind kafka_backup_fetch_rate.")

# 3. Operation durations
S3 = "3. Operation durations"
BACKUP_DURATION = _m(
    "kafka_backup_duration_seconds", "histogram", "seconds",
    "Backup run duration, observed once per run when it ends", ("backup_id", "status"),
    DURATION_BUCKETS, section=S3, legacy_buckets=LEGACY_DURATION_BUCKETS,
    note="Buckets reach 30 days: a continuous backup is observed when it stops, after days or weeks.")

RESTORE_DURATION = _m(
    "kafka_restore_duration_seconds", "histogram", "seconds",
    "Restore run duration, observed once per run when it ends", ("backup_id", "status"),
    DURATION_BUCKETS, section=S3, legacy_buckets=LEGACY_DURATION_BUCKETS)
OFFSET_RESET_DURATION = _m(
    "kafka_offset_reset_duration_seconds", "histogram", "seconds",
    "Offset reset duration per consumer group", ("consumer_group", "status"),
    OFFSET_RESET_BUCKETS, section=S3)

# 4. Storage I/O
S4 = "4. Storage I/O"
STORAGE_WRITE_LATENCY = _m(
    "kafka_backup_storage_write_latency_seconds", "histogram", "seconds",
    "Storage write latency from request to response, of every call whatever its outcome", ("backend", "operation"),
    STORAGE_LATENCY_BUCKETS, section=S4, legacy_buckets=LEGACY_STORAGE_LATENCY_BUCKETS,
    note="Failed and timed-out calls are observed too, so a p99 shows the timeouts; "
         "kafka_backup_storage_call_duration_seconds splits them by outcome.")
STORAGE_READ_LATENCY = _m(
    "kafka_backup_storage_read_latency_seconds", "histogram", "seconds",
    "Storage read latency from request to response, of every call whatever its outcome", ("backend", "operation"),
    STORAGE_LATENCY_BUCKETS, section=S4, legacy_buckets=LEGACY_STORAGE_LATENCY_BUCKETS)
STORAGE_CALL_DURATION = _m(
    "kafka_backup_storage_call_duration_seconds", "histogram", "seconds",
    "Storage call latency by outcome: success, or the error type of a failed call (timeout, auth, not_found, "
    "quota, unknown)", ("direction", "backend", "operation", "outcome"),
    STORAGE_LATENCY_BUCKETS, section=S4, extension=True, legacy_buckets=LEGACY_STORAGE_LATENCY_BUCKETS,
    note="The PRD's two latency families mix successes and failures; this one tells them apart "
         "(e.g. the p99 of successful writes only).")
STORAGE_WRITE_BYTES = _m(
    "kafka_backup_storage_write_bytes_total", "counter", "bytes",
    "Bytes written to storage (segments, checkpoints, manifests)", ("backend", "backup_id"), section=S4)
STORAGE_READ_BYTES = _m(
    "kafka_backup_storage_read_bytes_total", "counter", "bytes",
    "Bytes read from storage", ("backend", "backup_id"), section=S4)
STORAGE_ERRORS = _m(
    "kafka_backup_storage_errors_total", "counter", "errors",
    "Storage operation failures by type (timeout, auth, not_found, quota, unknown)",
    ("backend", "error_type"), section=S4)

# 5. Compression
S5 = "5. Compression"
COMPRESSION_RATIO = _m(
    "kafka_backup_compression_ratio", "gauge", "ratio",
    "Uncompressed over compressed segment bytes, cumulative (4.5 means 4.5x smaller)",
    ("algorithm", "backup_id"), section=S5,
    note="Derived; for a ratio over a window use rate() of the two byte counters.")
COMPRESSED_BYTES = _m(
    "kafka_backup_compressed_bytes_total", "counter", "bytes",
    "Segment bytes after compression: the stored objects' sizes", ("algorithm", "backup_id"), section=S5)
UNCOMPRESSED_BYTES = _m(
    "kafka_backup_uncompressed_bytes_total", "counter", "bytes",
    "Encoded segment bytes before compression", ("algorithm", "backup_id"), section=S5)

# 6. Errors and health
S6 = "6. Errors and health"
ERRORS_TOTAL = _m(
    "kafka_backup_errors_total", "counter", "errors",
    "A backup's errors by category (broker_connection, consumer_timeout, deserialization, storage_io, "
    "offset_invalid)", ("backup_id", "error_type"), section=S6,
    note="The PRD's `codec` category (a segment that does not decode) is a restore's error: "
         "kafka_restore_errors_total.")
PERMANENT_ERRORS_TOTAL = _m(
    "kafka_backup_permanent_errors_total", "counter", "errors",
    "Errors a retry cannot fix (authentication, missing topic or object, deleted offsets, ...), by category",
    ("backup_id", "error_type"), section=S6, extension=True,
    note="The PRD's OKR asks for transient vs permanent errors: kafka_backup_errors_total counts both, this "
         "one the permanent ones; transient = errors_total - permanent_errors_total.")
RETRIES_TOTAL = _m(
    "kafka_backup_retries_total", "counter", "retries",
    "Retried operations: commit (offset commit), write and read (storage calls)", ("backup_id", "operation"),
    section=S6, note="The PRD also names fetch: librdkafka retries fetches inside the client, unseen, so "
                     "the value never occurs.")
LAST_SUCCESSFUL_COMMIT = _m(
    "kafka_backup_last_successful_commit", "gauge", "timestamp",
    "Unix time of the last successful offset commit", ("backup_id", "topic", "partition"), section=S6,
    note="Alert on time() - kafka_backup_last_successful_commit to catch stalled backups.")
JOB_INFO = _m(
    "kafka_backup_job_info", "info", "",
    "One series per backup, value 1: its mode (continuous or one-shot), to scope alerts with "
    "`and on (backup_id) kafka_backup_job_info{mode=\"continuous\"}`", ("backup_id", "mode"),
    section=S6, extension=True,
    note="Continuous backups are judged by progress (lag, commits); one-shot (scheduled) backups by outcome "
         "and recovery point, since their lag is frozen at the end of each run.")
LAST_SUCCESS = _m(
    "kafka_backup_last_success_timestamp_seconds", "gauge", "seconds",
    "Unix time at which the backup's last successful run ended", ("backup_id",), section=S6, extension=True,
    note="Alert on time() - this > kafka_backup_expected_interval_seconds for scheduled backups.")
EXPECTED_INTERVAL = _m(
    "kafka_backup_expected_interval_seconds", "gauge", "seconds",
    "One-shot backups: a successful run is due at least this often (backup.expected_interval_s)",
    ("backup_id",), section=S6, extension=True,
    note="Set it to the schedule's period plus the longest expected run (default 26 h: daily plus 2 h).")
NEWEST_STORED_RECORD = _m(
    "kafka_backup_newest_stored_record_timestamp_seconds", "gauge", "seconds",
    "Record timestamp of the newest durably backed-up record of each partition: the recovery point",
    ("topic", "partition", "backup_id"), section=S6, extension=True,
    note="time() - this is the data a restore would miss, while the partition has records beyond it.")
RECOVERY_POINT_OBJECTIVE = _m(
    "kafka_backup_recovery_point_objective_seconds", "gauge", "seconds",
    "How old the newest backed-up record may be while newer records wait (backup.recovery_point_objective_s)",
    ("backup_id",), section=S6, extension=True)
REBALANCES_TOTAL = _m(
    "kafka_backup_consumer_rebalance_total", "counter", "rebalances",
    "Consumer group rebalances (partition assignments) seen by the backup's workers", ("backup_id",),
    section=S6, note="PRD name kept; this counter's samples end in _total as OpenMetrics requires. One "
                     "rebalance (revoke, then assign) counts once.")
TELEMETRY_DROPPED = _m(
    "kafka_backup_telemetry_dropped_events_total", "counter", "events",
    "Telemetry events a worker could not deliver (buffer full or delivery timed out)",
    ("kind", "job_id"), section=S6, extension=True,
    note="Makes telemetry loss visible: a non-zero value means other counters of this job may be low. "
         "Lost segment reports are sent again (once the telemetry cluster answers, or by the job's next "
         "run), so records, bytes and compression counters recover; storage latency, errors and "
         "consumed counts do not.")

BACKUP_STATUS = _m(
    "kafka_backup_status", "stateset", "",
    "Backup health evaluated like Burrow: OK, WARN (lag grows while offsets advance), STALL (no progress "
    "while lagging), STOP (no report for longer than metrics.worker_stop_after_s), ERROR (last run failed or was interrupted)",
    ("backup_id",), section=S6, extension=True,
    note="One series per state, value 1 for the current one. Alert on kafka_backup_status{kafka_backup_status!=\"OK\"} == 1.")
WORKER_LAST_SEEN = _m(
    "kafka_backup_worker_last_seen_timestamp_seconds", "gauge", "seconds",
    "Event time of the last telemetry event from each worker process of a job", ("kind", "job_id", "worker"),
    section=S6, extension=True,
    note="`worker` is the event's `instance` (one per process start); the newest 64 per job are kept. Not "
         "labelled `instance`: Prometheus owns that label and would rename ours to `exported_instance`.")
EXPORTER_DROPPED_SERIES = _m(
    "kafka_backup_exporter_dropped_series", "gauge", "series",
    "Label combinations left out of the last scrape because their family exceeded metrics.max_series_per_family",
    ("metric",), section=S6, extension=True,
    note="Cardinality guard (PRD open question 1: unique label combinations; a histogram's buckets and a "
         "stateset's states count once). Never dropped silently.")
EXPORTER_EXPIRED_JOBS = _m(
    "kafka_backup_exporter_expired_jobs", "gauge", "jobs",
    "Jobs whose series are no longer exported: ended or silent for longer than metrics.expire_after_s", (),
    section=S6, extension=True)
TELEMETRY_INVALID = _m(
    "kafka_backup_telemetry_invalid_events_total", "counter", "events",
    "Telemetry records the aggregator skipped: not our msgpack, unknown type, future version, bad key or values",
    ("reason",), section=S6, extension=True,
    note="Skipped events never change other aggregates; this counter makes them visible. Reason `expired`: "
         "telemetry records deleted by the topic's retention before the aggregator read them (it was down "
         "for longer than the retention).")
TELEMETRY_FOLD_FAILURES = _m(
    "kafka_backup_telemetry_fold_failures_total", "counter", "events",
    "Telemetry records the aggregator skipped because folding them raised an unexpected error, by exception type",
    ("exception",), section=S6, extension=True,
    note="A bug in the aggregator, not a bad record: the record's job misses it (sent to the dead-letter topic "
         "when one is set). The first of each kind is logged with its traceback; please report it.")

# 7. Restore
S7 = "7. Restore"
RESTORE_PROGRESS = _m(
    "kafka_restore_progress_percent", "gauge", "percent",
    "Records restored over records in the restore's scope (backup and time window), times 100",
    ("restore_id", "backup_id"), section=S7)
RESTORE_ETA = _m(
    "kafka_restore_eta_seconds", "gauge", "seconds",
    "Remaining records over the throughput of the rolling window; NaN while throughput is unknown",
    ("restore_id",), section=S7,
    note="Never a made-up number: NaN until a rate was measured; 0 once the restore is complete.")
RESTORE_THROUGHPUT = _m(
    "kafka_restore_throughput_records_per_sec", "gauge", "records/s",
    "Records acknowledged by the target cluster per second over the rolling window", ("restore_id",), section=S7,
    note="A rate kept in a gauge; prefer rate(kafka_restore_records_total[1m]).")
RESTORE_RECORDS_TOTAL = _m(
    "kafka_restore_records_total", "counter", "records",
    "Records restored (produced and acknowledged by the target cluster)", ("restore_id",), section=S7)
RESTORE_ERRORS_TOTAL = _m(
    "kafka_restore_errors_total", "counter", "errors",
    "A restore's errors by category (codec: a segment that does not decode; storage_io; broker_connection; ...)",
    ("restore_id", "error_type"), section=S7, extension=True,
    note="A restore's errors are its own: counting them in the backup's kafka_backup_errors_total let any "
         "restore (or a forged restore event) raise a backup's error alerts.")

# 8. Verification
S8 = "8. Verification"
VERIFY_DURATION = _m(
    "kafka_backup_verify_duration_seconds", "histogram", "seconds",
    "kafka-backup verify run duration, observed once per run when it ends", ("backup_id", "status"),
    DURATION_BUCKETS, section=S8, extension=True)
LAST_VERIFIED = _m(
    "kafka_backup_last_verified_timestamp_seconds", "gauge", "seconds",
    "Unix time of the last verify run that checked every segment of the backup (whatever it found)",
    ("backup_id",), section=S8, extension=True,
    note="Proven restorable: kafka_backup_verify_failed_segments == 0 and kafka_backup_verify_gaps == 0, "
         "with time() - kafka_backup_last_verified_timestamp_seconds below your verification interval.")
VERIFY_FAILED_SEGMENTS = _m(
    "kafka_backup_verify_failed_segments", "gauge", "segments",
    "Segments that failed a check (missing, size, SHA-256, decoding, records not as indexed) in the last "
    "complete verify run", ("backup_id",), section=S8, extension=True)
VERIFY_GAPS = _m(
    "kafka_backup_verify_gaps", "gauge", "gaps",
    "Holes or overlaps in a partition's offset coverage found by the last complete verify run",
    ("backup_id",), section=S8, extension=True)
VERIFY_SEGMENTS_TOTAL = _m(
    "kafka_backup_verify_segments_total", "counter", "segments",
    "Segments read and checked by verify runs", ("backup_id",), section=S8, extension=True)
UNVERIFIED_SEGMENTS_TOTAL = _m(
    "kafka_backup_unverified_segments_total", "counter", "segments",
    "Segments restored or verified without a digest to check (written by layout 1): integrity unknown",
    ("backup_id",), section=S8, extension=True,
    note="Non-zero means an old backup: run a new backup (its segments get digests) to make it checkable.")

# 9. The exporter's own endpoint (appended last: counted by the exporter process itself, not from state)
S9 = "9. Exporter endpoint"
EXPORTER_AUTH_FAILURES = _m(
    "kafka_backup_exporter_auth_failures_total", "counter", "requests",
    "Requests refused with 401 (every path but /health asks for credentials), by reason: missing, malformed, "
    "unknown_user, wrong_password",
    ("reason",), section=S9, extension=True,
    note="Counted since the exporter started; failed logins are also logged, at most one line per 10 s.")
EXPORTER_CONNECTIONS_CLOSED = _m(
    "kafka_backup_exporter_connections_closed_total", "counter", "connections",
    "Connections the exporter closed without answering, by reason: header_timeout (no complete request "
    "within metrics.header_timeout_s), tls_handshake (failed), connection_limit (metrics.max_connections "
    "reached: the oldest connection still sending headers is closed), bad_request",
    ("reason",), section=S9, extension=True,
    note="Slow or idle clients cost a socket, not a thread, and never lock a scraper out.")
EXPORTER_STATE_AGE = _m(
    "kafka_backup_exporter_state_age_seconds", "gauge", "seconds",
    "Seconds since the exporter last proved its copy of the state topic current (every partition read to "
    "the end the broker reports, checked every 2 s); what every other metric it serves may lag by",
    section=S9, extension=True,
    note="Not the age of the newest state record: a fleet at rest writes no state for hours, which is not "
         "staleness. This grows when the telemetry cluster is unreachable or the exporter falls behind; "
         "/-/ready answers 503 above metrics.ready_max_state_age_s, and KafkaBackupExporterStateStale fires.")
TELEMETRY_LAG_RECORDS = _m(
    "kafka_backup_telemetry_lag_records", "gauge", "records",
    "Telemetry records the aggregator has not folded into the state yet, per telemetry partition: the topic's "
    "end minus the aggregator group's committed offset (asked of the broker by the exporter every 2 s)",
    ("partition",), section=S9, extension=True,
    note="The aggregator commits a record only once the state it changed is written, so this is what the "
         "served numbers do not include yet. Absent while the exporter cannot ask the broker, and while the "
         "aggregator group commits on other topics only (the exporter's telemetry.topic is not the "
         "aggregator's: one error line says so).")
TELEMETRY_LAG_SECONDS = _m(
    "kafka_backup_telemetry_lag_seconds", "gauge", "seconds",
    "How long the oldest telemetry record not folded yet has waited, per telemetry partition (0 when none "
    "waits): how late every job's series are",
    ("partition",), section=S9, extension=True,
    note="A lower bound, from when each end of the topic was first seen (as Burrow does), so "
         "KafkaBackupAggregatorBehind never fires early. With the aggregator down it grows without end, "
         "while the job alerts would only say that every backup went silent.")
EXPORTER_UNDECODABLE_STATE = _m(
    "kafka_backup_exporter_undecodable_state_values_total", "counter", "values",
    "State topic records the exporter could not read, by reason: newer_version (written by a newer aggregator: "
    "upgrade the exporter), malformed (not a state value), no_key",
    ("reason",), section=S9, extension=True,
    note="The job keeps the last value the exporter could read; each reason is logged once with the key.")
EXPORTER_FAILED_BUILDS = _m(
    "kafka_backup_exporter_failed_builds_total", "counter", "scrapes",
    "Scrapes in which building a metric family failed with an unexpected error (the family was served empty)",
    ("metric",), section=S9, extension=True,
    note="A bug in the exporter, or a state value it did not expect: the first of each kind is logged with "
         "its traceback; please report it.")
BUILD_INFO = _m(
    "kafka_backup_build_info", "gauge", "",
    "Always 1: the exporter's version and the versions of Python, Faust and confluent-kafka it runs with "
    "(kafka-backup --version prints the same)",
    ("version", "python", "faust", "confluent_kafka"), section=S9, extension=True,
    note="Join on it to see which version each exporter runs, e.g. during a rolling upgrade.")



def render_markdown() -> str:
    """docs/metrics.md, generated: never edit the file by hand."""
    out = [
        "# Metrics reference",
        "",
        "<!-- Generated by `python -m kafka_backup.schemas.catalogue > docs/metrics.md`; do not edit. -->",
        "",
        "Every metric the exporter serves, from the catalogue in `schemas/catalogue.py`.",
        "Counters are shown with their sample name (`_total`); histograms expose",
        "`_bucket`, `_sum` and `_count` samples. Metrics marked *extension* are not in",
        "the PRD: they are added next to a PRD metric whose design is weak, and the",
        "note says why.",
        "",
    ]
    section = None
    for m in CATALOGUE:
        if m.section != section:
            section = m.section
            out += [f"## {section}", "", "| Metric | Type | Unit | Labels | Buckets | Description |",
                    "|---|---|---|---|---|---|"]
        labels = ", ".join(f"`{label}`" for label in m.labels) or "—"
        buckets = ", ".join(f"{b:.10g}" for b in m.buckets) or "—"
        desc = m.help + (f". *Note:* {m.note}" if m.note else "")
        name = f"`{m.name}`" + (" *(extension)*" if m.extension else "")
        out.append(f"| {name} | {m.type} | {m.unit} | {labels} | {buckets} | {desc} |")
        nxt = CATALOGUE.index(m) + 1
        if nxt == len(CATALOGUE) or CATALOGUE[nxt].section != section:
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
