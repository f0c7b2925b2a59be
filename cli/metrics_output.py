"""``--metrics-output FILE``: a worker run's own metrics, written when it ends.

For hosts without the aggregator and exporter (a nightly cron job, node_exporter's
textfile collector): the events this process emitted (kept in memory,
``producers.telemetry.keep_run_events``) are folded by the aggregator's fold
(``streams.replay``) and rendered by the exporter's collector, exactly as
``replay`` does, so the names, labels and values are the ones the exporter would
serve for this run. A file name ending in ``.json`` gets JSON, any other the
Prometheus text format. The file is replaced atomically (a temporary file in the
same directory, then a rename), as the textfile collector requires.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.utils import floatToGoString

from kafka_backup.exporter.collector import frozen_collector
from kafka_backup.schemas.config import Config, ConfigError
from kafka_backup.streams import fold
from kafka_backup.streams.replay import LogRecord, replay, snapshot


def check_writable(path: str) -> None:
    """Fail before the run, not after it: the directory must exist and be writable."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"run.metrics_output: cannot write {path}: directory {directory} does not exist "
                          "or is not writable (--metrics-output FILE)")


def render(cfg: Config, events: list[tuple[bytes, bytes]], fmt: str) -> bytes:
    """The run's metrics: its events folded as the aggregator folds them, rendered by the exporter's collector."""
    records = [LogRecord(partition=0, offset=n, timestamp_ms=0, key=key, value=value)
               for n, (key, value) in enumerate(events)]
    result = replay(records, None, fold.Settings.of(cfg.aggregator))
    snap = snapshot(result)
    now = max((s.last_event_ts for s in result.jobs.values()), default=0.0)  # the run's end, not the wall clock
    registry = CollectorRegistry(auto_describe=False)
    registry.register(frozen_collector(snap, now, cfg.aggregator.throughput_window_s, cfg.metrics.worker_stop_after_s,
                                       cfg.metrics.max_series_per_family))
    if fmt == "prometheus":
        return generate_latest(registry)
    samples: dict[str, list[dict]] = {}
    for family in registry.collect():
        for s in family.samples:
            value = s.value if math.isfinite(s.value) else floatToGoString(s.value)  # "+Inf", "NaN" as Prometheus
            samples.setdefault(s.name, []).append({"labels": dict(sorted(s.labels.items())), "value": value})
    return (json.dumps(samples, indent=2, sort_keys=True, allow_nan=False, default=str) + "\n").encode()


def write(cfg: Config, path: str, events: list[tuple[bytes, bytes]]) -> None:
    data = render(cfg, events, "json" if path.endswith(".json") else "prometheus")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
