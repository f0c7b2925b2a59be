"""The fleet at a glance: one row per job, taken from the exporter's own metric families.

``kafka-backup status`` reads the state topic the exporter reads and renders it with the
same :class:`~exporter.collector.StateCollector`, so every number in a row is the number
``/metrics`` serves for the same state: nothing here computes a metric of its own. The
JSON form (:func:`as_json`) is a documented, stable contract (docs/status.md).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from kafka_backup.exporter.collector import StateCollector, backup_status
from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas.state import JobState

JSON_VERSION = 1
HEALTHY = "OK"
EXIT_OK, EXIT_UNHEALTHY, EXIT_NO_JOB = 0, 1, 3  # 2 is a configuration error, as for every command


@dataclass
class Row:
    """One job. ``None`` where the exporter has no value (not measured yet, or not this kind's)."""

    kind: str  # backup | restore
    id: str
    status: str  # OK | WARN | STALL | STOP | ERROR
    mode: str | None = None  # backups: continuous | one-shot
    backup_id: str | None = None  # restores: the backup they read
    records: float | None = None  # backed up (backups) or restored (restores), all runs
    lag_records: float | None = None  # backups: the worst partition's lag
    lag_seconds: float | None = None  # backups: the worst partition's lag in record time
    worst_partition: str | None = None  # backups: "topic/partition" with the most lag
    throughput_records_per_sec: float | None = None  # over the rolling window
    last_success_ts: float | None = None  # backups: end of the last successful run (Unix seconds)
    last_success_age_s: float | None = None
    last_verified_ts: float | None = None  # backups: the last complete `kafka-backup verify`
    last_verified_age_s: float | None = None
    progress_percent: float | None = None  # restores
    eta_seconds: float | None = None  # restores: None while no throughput is measured


def _families(snapshot: Mapping[str, Any], now: float, **collector_args: Any) -> dict[str, list[tuple[dict, float]]]:
    collector = StateCollector(lambda: snapshot, clock=lambda: now, **collector_args)
    out: dict[str, list[tuple[dict, float]]] = {}
    for family in collector.collect():
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _sample_name(m: cat.Metric) -> str:
    return m.family_name + "_total" if m.type == "counter" else m.name


def _by(samples: dict, m: cat.Metric, label: str) -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list[tuple[dict, float]]] = {}
    for labels, value in samples.get(_sample_name(m), []):
        out.setdefault(labels.get(label, ""), []).append((labels, value))
    return out


def _one(groups: dict, key: str) -> float | None:
    values = [v for _, v in groups.get(key, [])]
    return values[0] if values else None


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def rows(snapshot: Mapping[str, Any], now: float, backup_id: str | None = None, restore_id: str | None = None,
         **collector_args: Any) -> list[Row]:
    """Rows of every exported backup and restore (or of the one selected), ordered by kind and id."""
    f = _families(snapshot, now, **collector_args)
    status = {bid: next((lab[cat.BACKUP_STATUS.name] for lab, v in group if v == 1), "OK")
              for bid, group in _by(f, cat.BACKUP_STATUS, "backup_id").items()}
    lag = _by(f, cat.LAG_RECORDS, "backup_id")
    lag_s = _by(f, cat.LAG_SECONDS, "backup_id")
    rate = _by(f, cat.THROUGHPUT_RECORDS, "backup_id")
    out: list[Row] = []
    want_backups = restore_id is None
    for bid in sorted(status):
        if not want_backups or (backup_id is not None and bid != backup_id):
            continue
        row = Row(kind="backup", id=bid, status=status[bid])
        row.mode = next((lab["mode"] for lab, _ in _by(f, cat.JOB_INFO, "backup_id").get(bid, [])), None)
        row.records = _one(_by(f, cat.RECORDS_TOTAL, "backup_id"), bid)
        if lag.get(bid):
            labels, worst = max(lag[bid], key=lambda lv: lv[1])
            row.lag_records, row.worst_partition = worst, f"{labels['topic']}/{labels['partition']}"
        if lag_s.get(bid):
            row.lag_seconds = max(v for _, v in lag_s[bid])
        if rate.get(bid):
            row.throughput_records_per_sec = sum(v for _, v in rate[bid])
        row.last_success_ts = _one(_by(f, cat.LAST_SUCCESS, "backup_id"), bid)
        row.last_verified_ts = _one(_by(f, cat.LAST_VERIFIED, "backup_id"), bid)
        if row.last_success_ts is not None:
            row.last_success_age_s = max(0.0, now - row.last_success_ts)
        if row.last_verified_ts is not None:
            row.last_verified_age_s = max(0.0, now - row.last_verified_ts)
        out.append(row)
    if backup_id is None or restore_id is not None:
        restores = _restores(snapshot)
        rate_r = _by(f, cat.RESTORE_THROUGHPUT, "restore_id")
        for rid in sorted(rate_r):
            if restore_id is not None and rid != restore_id:
                continue
            state = restores.get(rid)
            stop_after_s = collector_args.get("stop_after_s", 60.0)
            row = Row(kind="restore", id=rid,
                      status=backup_status(state, now, stop_after_s) if state is not None else "OK")
            row.backup_id = state.backup_id if state is not None and state.backup_id else None
            row.records = _one(_by(f, cat.RESTORE_RECORDS_TOTAL, "restore_id"), rid)
            row.throughput_records_per_sec = _one(rate_r, rid)
            row.progress_percent = _one(_by(f, cat.RESTORE_PROGRESS, "restore_id"), rid)
            row.eta_seconds = _finite(_one(_by(f, cat.RESTORE_ETA, "restore_id"), rid))
            out.append(row)
    return out


def _restores(snapshot: Mapping[str, Any]) -> dict[str, JobState]:
    return {v.job: v for v in snapshot.values() if isinstance(v, JobState) and v.kind == "restore"}


def exit_code(selected: list[Row]) -> int:
    """0: every selected job is OK; 1: at least one is not; 3: no job matched the selection."""
    if not selected:
        return EXIT_NO_JOB
    return EXIT_OK if all(r.status == HEALTHY for r in selected) else EXIT_UNHEALTHY


def as_json(selected: Iterable[Row], now: float) -> dict[str, Any]:
    return {
        "version": JSON_VERSION,
        "generated_at": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "jobs": [asdict(r) for r in selected],
    }


def age(seconds: float | None) -> str:
    """``3d4h``, ``2h05m``, ``4m10s``, ``12s``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def number(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


COLUMNS = ("KIND", "ID", "STATUS", "RECORDS", "LAG", "LAG AGE", "WORST", "RATE/S", "LAST SUCCESS", "VERIFIED",
           "PROGRESS", "ETA")


def cells(r: Row) -> tuple[str, ...]:
    """A row's cells for the table, in ``COLUMNS`` order."""
    return (r.kind, r.id, r.status, number(r.records), number(r.lag_records), age(r.lag_seconds),
            r.worst_partition or "-", number(r.throughput_records_per_sec, 1),
            f"{age(r.last_success_age_s)} ago" if r.last_success_age_s is not None else "-",
            f"{age(r.last_verified_age_s)} ago" if r.last_verified_age_s is not None else "-",
            f"{r.progress_percent:.1f}%" if r.progress_percent is not None else "-", age(r.eta_seconds))


def plain_lines(selected: Iterable[Row]) -> list[str]:
    """For pipes and logs: one ``key=value`` line per job, no colours, no escape codes."""
    out = []
    for r in selected:
        pairs = [f"{c.lower().replace(' ', '_').replace('/', '_per_')}={v}"
                 for c, v in zip(COLUMNS[3:], cells(r)[3:], strict=True) if v != "-"]
        out.append(" ".join([r.kind, r.id, r.status, *pairs]))
    return out
