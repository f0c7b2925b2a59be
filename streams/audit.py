"""The audit report: what a replay proves about each backup over a period.

Built only from the deduplicated, canonically ordered events of a replay, with
fixed formatting (UTC ISO 8601 times, sorted keys), so the same events always
give the same bytes. The JSON is the record; the Markdown says the same for
people.
"""

from __future__ import annotations

import datetime as dt

import msgspec

from kafka_backup.schemas import events as ev
from kafka_backup.schemas.state import PartitionState
from kafka_backup.streams.replay import Replay

REPORT_VERSION = 1


class Run(msgspec.Struct):
    worker: str = msgspec.field(name="instance")  # the report keeps version 1's name
    started: str
    ended: str | None
    duration_s: float | None
    status: str  # success | failure | running (no end seen: still running, or the worker died)
    mode: str


class PartitionCoverage(msgspec.Struct):
    topic: str
    partition: int
    first_offset: int | None
    next_offset: int | None
    ranges: list[tuple[int, int]]  # merged [start, end) offset ranges backed up, whole history until `to`
    gaps: list[tuple[int, int]]  # holes between ranges: offsets never backed up
    records_in_period: int
    bytes_in_period: int


class Restore(msgspec.Struct):
    restore_id: str
    records_in_period: int
    runs: list[Run]


class BackupReport(msgspec.Struct):
    backup_id: str
    records_in_period: int
    bytes_in_period: int
    records_total: int
    partitions: list[PartitionCoverage]
    runs: list[Run]
    errors: dict[str, int]
    worst_lag_records: int
    worst_lag_at: str | None
    worst_recovery_point_s: float
    worst_recovery_point_at: str | None
    telemetry_dropped: int
    restores: list[Restore]


class AuditReport(msgspec.Struct):
    version: int
    period_from: str | None
    period_to: str | None
    invalid_events: dict[str, int]
    backups: list[BackupReport]


def iso_at(ts: float) -> str:
    """An event's time (finite: events outside 1970..2100 are refused when decoded)."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso(ts: float | None) -> str | None:
    """A bound or a time that may be unknown (None) or open (infinite): None for both."""
    if ts is None or ts in (float("inf"), float("-inf")):
        return None
    return iso_at(ts)


def _runs(events: list[ev.AnyEvent], start: float, end: float) -> list[Run]:
    started: dict[str, ev.JobStarted] = {}
    runs: list[Run] = []
    for e in events:
        if isinstance(e, ev.JobStarted):
            started[e.worker] = e
        elif isinstance(e, ev.JobEnded):
            s = started.pop(e.worker, None)
            if start <= e.ts < end or (s is not None and start <= s.ts < end):
                runs.append(Run(e.worker, iso_at(s.ts if s else e.ts - e.duration_s), iso_at(e.ts),
                                round(e.duration_s, 3), e.status, s.mode if s else ""))
    for s in started.values():
        if start <= s.ts < end:
            runs.append(Run(s.worker, iso_at(s.ts), None, None, "running", s.mode))
    return sorted(runs, key=lambda r: (r.started, r.worker))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _restored_in_period(events: list[ev.AnyEvent], start: float, end: float) -> int:
    """How far the restore's cumulative count (the fold's rule) rose during the period."""
    high, added = 0, 0
    for e in events:
        if isinstance(e, ev.RestoreProgress | ev.JobStarted) and e.restored_total > high:
            if start <= e.ts < end:
                added += e.restored_total - high
            high = e.restored_total
    return added


def _backup(job: str, events: list[ev.AnyEvent], replayed: Replay, start: float, end: float) -> BackupReport:
    ranges: dict[tuple[str, int], list[tuple[int, int]]] = {}
    counted: dict[tuple[str, int], PartitionState] = {}
    period: dict[tuple[str, int], list[int]] = {}
    errors: dict[str, int] = {}
    worst_lag, worst_lag_at, worst_rp, worst_rp_at = 0, None, 0.0, None
    for e in events:
        in_period = start <= e.ts < end
        if isinstance(e, ev.SegmentStored):
            tp = (e.topic, e.partition)
            ranges.setdefault(tp, []).append((e.start_offset, e.end_offset))
            coverage = counted.setdefault(tp, PartitionState(e.topic, e.partition))
            if coverage.claim(e.covers_from, e.end_offset):  # the fold's rule: each offset range counts once
                if in_period:
                    slot = period.setdefault(tp, [0, 0])
                    slot[0] += e.records
                    slot[1] += e.bytes
        elif isinstance(e, ev.ErrorRaised) and in_period:
            errors[e.error_type] = errors.get(e.error_type, 0) + 1
        elif isinstance(e, ev.Progress) and in_period:
            for p in e.partitions:
                lag = max(0, p.high_watermark - p.committed) if p.high_watermark >= 0 else 0
                if lag > worst_lag:
                    worst_lag, worst_lag_at = lag, e.ts
                if lag and p.newest_stored_ts is not None:
                    rp = round(max(0.0, e.ts - p.newest_stored_ts / 1000), 3)
                    if rp > worst_rp:
                        worst_rp, worst_rp_at = rp, e.ts
    partitions = []
    for tp in sorted(ranges):
        merged = _merge(ranges[tp])
        gaps = [(a[1], b[0]) for a, b in zip(merged, merged[1:], strict=False)]
        records, nbytes = period.get(tp, [0, 0])
        partitions.append(PartitionCoverage(tp[0], tp[1], merged[0][0], merged[-1][1], merged, gaps, records, nbytes))
    state = replayed.jobs.get(ev.event_key("backup", job))
    restores = []
    for key, rstate in sorted(replayed.jobs.items()):
        if rstate.kind == "restore" and rstate.backup_id == job:
            revents = replayed.events[key]
            restores.append(Restore(rstate.job, _restored_in_period(revents, start, end), _runs(revents, start, end)))
    return BackupReport(
        backup_id=job,
        records_in_period=sum(p.records_in_period for p in partitions),
        bytes_in_period=sum(p.bytes_in_period for p in partitions),
        records_total=state.records if state else 0,
        partitions=partitions,
        runs=_runs(events, start, end),
        errors=dict(sorted(errors.items())),
        worst_lag_records=worst_lag,
        worst_lag_at=iso(worst_lag_at),
        worst_recovery_point_s=worst_rp,
        worst_recovery_point_at=iso(worst_rp_at),
        telemetry_dropped=sum(state.dropped.values()) if state else 0,
        restores=restores,
    )


def build(replayed: Replay, start: float | None, backup_id: str | None = None) -> AuditReport:
    lo = start if start is not None else float("-inf")
    backups = []
    for key, state in sorted(replayed.jobs.items()):
        if state.kind == "backup" and (backup_id is None or state.job == backup_id):
            backups.append(_backup(state.job, replayed.events[key], replayed, lo, replayed.until))
    return AuditReport(REPORT_VERSION, iso(start), iso(replayed.until),
                       dict(sorted(replayed.invalid.invalid.items())), backups)


def to_json(report: AuditReport) -> bytes:
    return msgspec.json.format(msgspec.json.encode(report, order="sorted"), indent=2) + b"\n"


def to_markdown(report: AuditReport) -> str:
    period = f"{report.period_from or 'the beginning of the log'} to {report.period_to or 'the end of the log'}"
    out = ["# Backup audit report", "", f"Period: {period} (event time, UTC).", ""]
    if report.invalid_events:
        skipped = ", ".join(f"{k}: {v}" for k, v in report.invalid_events.items())
        out += [f"Telemetry records skipped as invalid: {skipped}.", ""]
    if not report.backups:
        out += ["No backup in the period.", ""]
    for b in report.backups:
        out += [f"## Backup `{b.backup_id}`", "",
                f"- Records backed up in the period: {b.records_in_period} ({b.bytes_in_period} bytes); "
                f"in total: {b.records_total}",
                f"- Worst lag: {b.worst_lag_records} records" + (f" at {b.worst_lag_at}" if b.worst_lag_at else ""),
                f"- Worst recovery point: {b.worst_recovery_point_s:g} s"
                + (f" at {b.worst_recovery_point_at}" if b.worst_recovery_point_at else ""),
                "- Errors: " + (", ".join(f"{k}: {v}" for k, v in b.errors.items()) or "none"),
                f"- Telemetry events lost by workers: {b.telemetry_dropped}"
                + (" (counts above may be low)" if b.telemetry_dropped else ""),
                "", "| topic | partition | offsets backed up | gaps | records in period |", "|---|---|---|---|---|"]
        for p in b.partitions:
            ranges = ", ".join(f"{a}–{c - 1}" for a, c in p.ranges)
            gaps = ", ".join(f"{a}–{c - 1}" for a, c in p.gaps) or "none"
            out.append(f"| {p.topic} | {p.partition} | {ranges} | {gaps} | {p.records_in_period} |")
        out += ["", "| run (instance) | started | ended | duration (s) | status |", "|---|---|---|---|---|"]
        for r in b.runs:
            duration = "" if r.duration_s is None else f"{r.duration_s:g}"
            out.append(f"| {r.worker} | {r.started} | {r.ended or '—'} | {duration} | {r.status} |")
        if b.restores:
            out += ["", "| restore | records restored in period | runs (status, duration s) |", "|---|---|---|"]
            for rs in b.restores:
                runs = "; ".join(f"{r.status} {'' if r.duration_s is None else f'{r.duration_s:g}'}".strip()
                                 for r in rs.runs)
                out.append(f"| {rs.restore_id} | {rs.records_in_period} | {runs or '—'} |")
        out.append("")
    return "\n".join(out)
