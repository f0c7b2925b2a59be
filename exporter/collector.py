"""Turning a snapshot of the state topic into metric families, at scrape time.

The aggregator stores facts (counters, watermarks, per-second samples); what
depends on "now" (rolling-window rates, the last hour's record size) is
derived here, so a stale state value never freezes a rate. Every family comes
from its catalogue entry, so names, help, labels, units and buckets cannot
drift from ``docs/metrics.md``. A catalogue entry without a builder below is
skipped, which lets others add metrics to the catalogue before the exporter
knows them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas.build import build_info
from kafka_backup.schemas.logs import FirstOfEach
from kafka_backup.schemas.state import (
    SIZE_WINDOW_MINUTES,
    Histogram,
    JobRate,
    JobState,
    PartitionState,
    PipelineState,
    RateSample,
)

log = logging.getLogger("kafka_backup.exporter")

Sample = tuple  # (label values, value) or (label values, buckets, sum)
Builder = Callable[["View"], Iterable[Sample]]


@dataclass
class View:
    """One scrape's inputs: every builder sees the same snapshot and the same "now"."""

    now: float
    window: int
    jobs: list[JobState] = field(default_factory=list)
    everyone: list[tuple[JobState, bool]] = field(default_factory=list)  # every job, in key order, and live?
    keys: list[str] = field(default_factory=list)  # the snapshot keys of ``everyone``
    pipelines: list[PipelineState] = field(default_factory=list)
    stop_after_s: float = 60.0
    expired: int = 0
    dropped_series: dict[str, int] = field(default_factory=dict)
    endpoint: EndpointCounters | None = None  # the exporter's own counters (section 8)


def expired(s: JobState, now: float, expire_after_s: float) -> bool:
    """Ended long ago, or silent long ago (a vanished worker): its series would only add cardinality.

    A scheduled backup is quiet between runs by design: it expires only ``expire_after_s`` after
    its next run was due, so "no recent success" fires for that long before its series go.
    """
    last = s.ended_ts if s.status != "running" and s.ended_ts is not None else s.last_event_ts
    if s.expected_interval_s is not None and s.mode != "continuous":
        expire_after_s += s.expected_interval_s
    return bool(last) and now - last > expire_after_s


def make_view(snapshot: Mapping[str, Any], now: float, window: int, expire_after_s: float = float("inf"),
              stop_after_s: float = 60.0) -> View:
    view = View(now=now, window=window, stop_after_s=stop_after_s)
    for key, value in sorted(snapshot.items()):
        if isinstance(value, JobState):
            live = not expired(value, now, expire_after_s)
            view.everyone.append((value, live))
            view.keys.append(key)
            if not live:
                view.expired += 1
                continue
            view.jobs.append(value)
        elif isinstance(value, PipelineState):
            view.pipelines.append(value)
    return view


# ---- builders a render can reuse (exporter.renderer) ----------------------------------------


JobSamples = Callable[[JobState, View], Iterable[Sample]]
TimeKey = Callable[[JobState, View], Any]


class PerJob:
    """A family whose samples for one job come from that job's state alone, job after job in key order.

    ``time_key``, when given, is everything of "now" the samples depend on (the minute, whether a
    threshold is passed, ...): the renderer reuses a job's lines while its state value and this
    key are unchanged. Without it they depend on the state value alone. ``build`` may read only
    the view's ``now``, ``window`` and ``stop_after_s``, and "now" only through the key.
    """

    def __init__(self, build: JobSamples, kinds: tuple[str, ...] | None = ("backup",),
                 time_key: TimeKey | None = None) -> None:
        self.build = build
        self.kinds = kinds  # None: every live job
        self.time_key = time_key

    def __call__(self, view: View) -> Iterator[Sample]:
        kinds = self.kinds
        for s in view.jobs:
            if kinds is None or s.kind in kinds:
                yield from self.build(s, view)


class Shared:
    """A family merged over every job, expired ones included (see :func:`_shared`): the renderer keeps
    each job's ``contribution`` with its state value and merges again only when the fleet changed."""

    def __init__(self, contribution: Contribution, merge: Callable[[Any, Any], Any],
                 sample: Callable[[tuple[str, ...], Any], Sample] = lambda labels, v: (labels, v)) -> None:
        self.contribution = contribution
        self.merge = merge
        self.sample = sample

    def __call__(self, view: View) -> Iterator[Sample]:
        return self.merged((self.contribution(s), live) for s, live in view.everyone)

    def merged(self, shares: Iterable[tuple[Iterable[tuple[tuple[str, ...], Any]], bool]]) -> Iterator[Sample]:
        """``shares``: each job's contribution and whether it is live, in key order."""
        sample = self.sample
        for labels, value in _shared(shares, self.merge).items():
            yield sample(labels, value)


# ---- helpers --------------------------------------------------------------------------------


Contribution = Callable[[JobState], Iterable[tuple[tuple[str, ...], Any]]]


def _shared(shares: Iterable[tuple[Iterable[tuple[tuple[str, ...], Any]], bool]],
            merge: Callable[[Any, Any], Any]) -> dict[tuple[str, ...], Any]:
    """Merge what several jobs add to one series (storage by backend, restores of one backup, ...).

    A series is served while at least one of its jobs is live, and then it holds the share of
    every job, expired ones included: dropping an expired job's share would make the counter
    fall, which Prometheus reads as a reset (``rate()`` and ``increase()`` spike). A series may
    disappear; it never goes down.
    """
    totals: dict[tuple[str, ...], Any] = {}
    live: set[tuple[str, ...]] = set()
    # One order for every scrape (the snapshot's key order), whoever is live: float sums in another
    # order can come out an ulp lower, and Prometheus reads even that as a reset. In a fixed order,
    # adding a job or growing a share can only raise the rounded sum.
    for contribution, is_live in shares:
        for labels, value in contribution:
            totals[labels] = value if labels not in totals else merge(totals[labels], value)
            if is_live:
                live.add(labels)
    return {labels: value for labels, value in totals.items() if labels in live}


def _add(a: Any, b: Any) -> Any:
    return a + b


def _shared_sum(contribution: Contribution) -> Builder:
    return Shared(contribution, _add)


def _shared_histogram(contribution: Contribution, metric: cat.Metric) -> Builder:
    """``contribution`` yields (labels, Histogram); buckets of older layouts are moved over exactly."""

    def fitted(s: JobState) -> Iterator[tuple[tuple[str, ...], Histogram]]:
        for labels, h in contribution(s):
            f = h.fitted(metric.buckets, metric.legacy_buckets)
            if f is not None:
                yield labels, f

    def merge(a: Histogram, b: Histogram) -> Histogram:
        return Histogram(counts=[x + y for x, y in zip(a.counts, b.counts, strict=True)], sum=a.sum + b.sum,
                         count=a.count + b.count)

    return Shared(fitted, merge, lambda labels, h: (labels, cumulative(h.counts, metric.buckets), h.sum))


def cumulative(counts: list[int], buckets: tuple[float, ...]) -> list[tuple[str, int]]:
    """State keeps per-bucket counts (cheap to merge); the exposition wants running totals."""
    les = [floatToGoString(b) for b in buckets] + ["+Inf"]
    out, running = [], 0
    for le, n in zip(les, counts, strict=True):
        running += n
        out.append((le, running))
    return out



def partition_lag(p: PartitionState) -> int | None:
    """None until the high watermark is known; coverage counts as committed even before a commit."""
    if p.high_watermark < 0:
        return None
    return max(0, p.high_watermark - max(p.committed, p.stored_next_offset, 0))


def avg_record_size(p: PartitionState, now: float) -> float:
    """The last hour's average (PRD), else the lifetime average, else 0."""
    horizon = int(now // 60) - SIZE_WINDOW_MINUTES
    recent = [x for x in p.sizes if x.minute > horizon]
    records = sum(x.records for x in recent)
    if records:
        return sum(x.bytes for x in recent) / records
    return p.bytes / p.records if p.records else 0.0


def lag_seconds(p: PartitionState, lag: int) -> float | None:
    """Record-time distance; unknown (None) while lagging without both timestamps."""
    if lag == 0:
        return 0.0
    if p.newest_stored_ts is None or p.newest_available_ts is None:
        return None
    return max(0.0, (p.newest_available_ts - p.newest_stored_ts) / 1000)


def rate_divisor(s: JobState, view: View) -> float:
    """A job younger than the window would otherwise show a rate diluted by time it did not run."""
    if s.started_ts is None:
        return float(view.window)
    return max(1.0, min(float(view.window), view.now - s.started_ts))


def _horizon(s: JobState, view: View) -> float:
    return max(view.now - view.window, int(s.started_ts or 0) - 1)


def _recent_rates(s: JobState, view: View) -> list[RateSample]:
    """Samples of the window, from the current run only: ``rate_divisor`` starts at the run's start,
    so a previous run's samples would be divided by the new run's first seconds (a huge rate)."""
    horizon = _horizon(s, view)
    return [r for r in s.rates if r.second > horizon]


def _recent_job_rates(s: JobState, view: View) -> list[JobRate]:
    """The job's own per-second counts (fetches, a restore's records), as ``_recent_rates``."""
    horizon = _horizon(s, view)
    return [r for r in s.job_rates if r.second > horizon]


def _lagging(s: JobState) -> Iterator[tuple[PartitionState, int]]:
    for p in s.partitions.values():
        lag = partition_lag(p)
        if lag is not None:
            yield p, lag


def _tp(s: JobState, p: PartitionState) -> tuple[str, str, str]:
    return (p.topic, str(p.partition), s.job)


def reader_id(s: JobState) -> str:
    """Storage traffic is labelled by the backup it belongs to: restores read someone else's."""
    if s.kind != "backup" and s.backup_id:
        return s.backup_id
    return s.job


# ---- 1. lag ---------------------------------------------------------------------------------


def _lag_records(s: JobState, view: View) -> Iterator[Sample]:
    for p, lag in _lagging(s):
        yield _tp(s, p), lag


def _lag_bytes(s: JobState, view: View) -> Iterator[Sample]:
    for p, lag in _lagging(s):
        yield _tp(s, p), lag * avg_record_size(p, view.now)


def _minute(s: JobState, view: View) -> int:
    """All of "now" that :func:`avg_record_size` reads."""
    return int(view.now // 60)


def _lag_seconds(s: JobState, view: View) -> Iterator[Sample]:
    for p, lag in _lagging(s):
        seconds = lag_seconds(p, lag)
        if seconds is not None:
            yield _tp(s, p), seconds


def _lag_records_max(s: JobState, view: View) -> Iterator[Sample]:
    """Per job: snapshot keys are ``kind:job``, so no two live backups share a job name."""
    worst = None
    for _, lag in _lagging(s):
        worst = max(0 if worst is None else worst, lag)
    if worst is not None:
        yield (s.job,), worst


# ---- 2. throughput --------------------------------------------------------------------------


def _rate_key(s: JobState, view: View) -> tuple[int, float]:
    """All of "now" that :func:`_recent_rates`, :func:`_recent_job_rates` and :func:`rate_divisor`
    read: seconds are whole, so ``second > horizon`` is ``second > floor(horizon)``."""
    return math.floor(_horizon(s, view)), rate_divisor(s, view)


def _throughput(field: str) -> JobSamples:
    def build(s: JobState, view: View) -> Iterator[Sample]:
        recent = _recent_rates(s, view)
        divisor = rate_divisor(s, view)
        for topic in s.consumed:
            total = sum(getattr(r, field) for r in recent if r.topic == topic)
            yield (s.job, topic), total / divisor

    return build


def _fetch_rate(s: JobState, view: View) -> Iterator[Sample]:
    total = sum(r.fetches for r in _recent_job_rates(s, view))
    yield (s.job,), total / rate_divisor(s, view)


def _records_total(s: JobState, view: View) -> Iterator[Sample]:
    yield (s.job,), s.records


def _bytes_total(s: JobState, view: View) -> Iterator[Sample]:
    yield (s.job,), s.bytes


def _consumed(field: str) -> JobSamples:
    def build(s: JobState, view: View) -> Iterator[Sample]:
        for topic, totals in s.consumed.items():
            yield (s.job, topic), getattr(totals, field)

    return build


def _fetches_total(s: JobState, view: View) -> Iterator[Sample]:
    yield (s.job,), s.fetches


# ---- 3. durations ---------------------------------------------------------------------------


def _duration(kind: str, metric: cat.Metric, label: Callable[[JobState], str]) -> Builder:
    """Per job kind; restores are labelled by the backup they read, so runs of several merge."""

    def contribution(s: JobState) -> Iterator[tuple[tuple[str, ...], Histogram]]:
        if s.kind == kind:
            for status, h in s.durations.items():
                yield (label(s), status), h

    return _shared_histogram(contribution, metric)


# ---- 4. storage -----------------------------------------------------------------------------


def _storage_latency(direction: str, metric: cat.Metric) -> Builder:
    """The PRD's family: every call of that direction, whatever its outcome."""

    def contribution(s: JobState) -> Iterator[tuple[tuple[str, ...], Histogram]]:
        for c in s.all_storage_calls():
            if c.direction == direction:
                yield (c.backend, c.operation), c.latency

    return _shared_histogram(contribution, metric)


def _storage_calls(s: JobState) -> Iterator[tuple[tuple[str, ...], Histogram]]:
    for c in s.all_storage_calls():
        yield (c.direction, c.backend, c.operation, c.outcome), c.latency


def _storage_bytes(direction: str) -> Builder:
    def contribution(s: JobState) -> Iterator[tuple[tuple[str, ...], float]]:
        for d, backend, n in s.storage_bytes_by():
            if d == direction:
                yield (backend, reader_id(s)), n

    return _shared_sum(contribution)


def _storage_errors(s: JobState) -> Iterator[tuple[tuple[str, ...], float]]:
    for backend, error_type, n in s.storage_errors_by():
        yield (backend, error_type), n


# ---- 5. compression -------------------------------------------------------------------------


def _compression_ratio(s: JobState, view: View) -> Iterator[Sample]:
    for alg, c in s.compression.items():
        if c.compressed:
            yield (alg, s.job), c.uncompressed / c.compressed


def _compression_bytes(field: str) -> JobSamples:
    def build(s: JobState, view: View) -> Iterator[Sample]:
        for alg, c in s.compression.items():
            yield (alg, s.job), getattr(c, field)

    return build


# ---- 6. errors and health -------------------------------------------------------------------


def _by_key(attr: str, kinds: tuple[str, ...] = ("backup", "verify")) -> Builder:
    """Counters kept as ``{label: n}`` dicts (errors by type, retries by operation), per backup.

    A restore's errors are its own (``kafka_restore_errors_total``): a restore must not raise the
    error count of the backup it reads. Its storage retries are storage traffic of that backup,
    labelled with it like its storage bytes and durations. A verification's errors (a damaged
    segment) are the backup's own problem and count under it.
    """

    def contribution(s: JobState) -> Iterator[tuple[tuple[str, ...], float]]:
        if s.kind in kinds:
            for key, n in getattr(s, attr).items():
                yield (reader_id(s), key), n

    return _shared_sum(contribution)


def _restore_errors(s: JobState, view: View) -> Iterator[Sample]:
    for error_type, n in s.errors.items():
        yield (s.job, error_type), n


def _last_commit(s: JobState, view: View) -> Iterator[Sample]:
    for p in s.partitions.values():
        if p.last_commit_ts is not None:
            yield (s.job, p.topic, str(p.partition)), p.last_commit_ts


def _job_info(s: JobState, view: View) -> Iterator[Sample]:
    yield ((s.job, s.mode or "one-shot"),)


def _last_success(s: JobState, view: View) -> Iterator[Sample]:
    ts = s.last_success_ts
    if ts is None and s.status == "success":  # state of an older aggregator: the last run's end
        ts = s.ended_ts
    if ts is not None:
        yield (s.job,), ts


def _expected_interval(s: JobState, view: View) -> Iterator[Sample]:
    if s.expected_interval_s is not None and s.mode != "continuous":
        yield (s.job,), s.expected_interval_s


def _newest_stored(s: JobState, view: View) -> Iterator[Sample]:
    for p in s.partitions.values():
        if p.newest_stored_ts is not None:
            yield _tp(s, p), p.newest_stored_ts / 1000


def _rpo(s: JobState, view: View) -> Iterator[Sample]:
    if s.recovery_point_objective_s is not None:
        yield (s.job,), s.recovery_point_objective_s


def _rebalances(s: JobState, view: View) -> Iterator[Sample]:
    yield (s.job,), s.rebalances


def _dropped(s: JobState, view: View) -> Iterator[Sample]:
    yield (s.kind, s.job), sum(s.dropped.values())


STATES = ("OK", "WARN", "STALL", "STOP", "ERROR")


def backup_status(s: JobState, now: float, stop_after_s: float) -> str:
    """Burrow's evaluation over the window of progress samples, plus the run's own outcome.

    ERROR: the last run failed, or was interrupted (a one-shot run stopped before it finished). STOP: a running job silent for longer than
    ``stop_after_s`` (a dead worker must not look healthy with a frozen lag).
    Then, over the window: any sample without lag is OK; no committed progress
    while lagging is STALL; lag growing at every step while offsets advance is
    WARN; anything else is OK.
    """
    if s.status in ("failure", "interrupted"):  # interrupted: a one-shot run stopped before it finished
        return "ERROR"
    if s.status != "running":
        return "OK"
    if now - s.last_event_ts > stop_after_s:
        return "STOP"
    w = s.window
    if len(w) < 2 or any(x.lag == 0 for x in w):
        return "OK"
    if w[-1].committed == w[0].committed:
        return "STALL"
    if all(b.lag > a.lag for a, b in zip(w, w[1:], strict=False)):
        return "WARN"
    return "OK"


def _status(s: JobState, view: View) -> Iterator[Sample]:
    current = backup_status(s, view.now, view.stop_after_s)
    yield (s.job,), {state: state == current for state in STATES}


def _stopped(s: JobState, view: View) -> bool:
    """All of "now" that :func:`backup_status` reads."""
    return s.status == "running" and view.now - s.last_event_ts > view.stop_after_s


def _last_seen(s: JobState, view: View) -> Iterator[Sample]:
    for worker, mark in s.seen.items():
        yield (s.kind, s.job, worker), mark.ts


def _dropped_series(view: View) -> Iterator[Sample]:
    return iter([((name,), n) for name, n in sorted(view.dropped_series.items())])


def _expired_jobs(view: View) -> Iterator[Sample]:
    yield (), view.expired


def _pipeline_counts(field: str) -> Builder:
    def build(view: View) -> Iterator[Sample]:
        totals: dict[tuple[str, ...], int] = {}
        for p in view.pipelines:  # one per telemetry partition; they never expire
            for reason, n in getattr(p, field).items():
                totals[(reason,)] = totals.get((reason,), 0) + n
        return iter(totals.items())

    return build


# ---- 7. restore -----------------------------------------------------------------------------


def restore_rate(s: JobState, view: View) -> float:
    """Records acknowledged per second over the window."""
    return sum(r.records for r in _recent_job_rates(s, view)) / rate_divisor(s, view)


def restore_eta(s: JobState, view: View) -> float:
    """Remaining over measured throughput; NaN, never a guess, while no throughput is measured."""
    remaining = max(0, (s.total_records or 0) - s.restored_total)
    if remaining == 0:
        return 0.0
    rate = restore_rate(s, view) if s.status == "running" else 0.0
    return remaining / rate if rate > 0 else float("nan")


def _restore_progress(s: JobState, view: View) -> Iterator[Sample]:
    if s.total_records is not None:
        pct = 100.0 if s.total_records == 0 else min(100.0, 100.0 * s.restored_total / s.total_records)
        yield (s.job, s.backup_id), pct


def _restore_eta(s: JobState, view: View) -> Iterator[Sample]:
    if s.total_records is not None:
        yield (s.job,), restore_eta(s, view)


def _restore_throughput(s: JobState, view: View) -> Iterator[Sample]:
    yield (s.job,), restore_rate(s, view)


def _restore_records(s: JobState, view: View) -> Iterator[Sample]:
    yield (s.job,), s.records


BACKUP, RESTORE, EVERY = ("backup",), ("restore",), None
BUILDERS: dict[cat.Metric, Builder] = {
    cat.LAG_RECORDS: PerJob(_lag_records),
    cat.LAG_BYTES: PerJob(_lag_bytes, time_key=_minute),
    cat.LAG_SECONDS: PerJob(_lag_seconds),
    cat.LAG_RECORDS_MAX: PerJob(_lag_records_max),
    cat.THROUGHPUT_RECORDS: PerJob(_throughput("records"), time_key=_rate_key),
    cat.THROUGHPUT_BYTES: PerJob(_throughput("bytes"), time_key=_rate_key),
    cat.FETCH_RATE: PerJob(_fetch_rate, time_key=_rate_key),
    cat.RECORDS_TOTAL: PerJob(_records_total),
    cat.BYTES_TOTAL: PerJob(_bytes_total),
    cat.CONSUMED_RECORDS_TOTAL: PerJob(_consumed("records")),
    cat.CONSUMED_BYTES_TOTAL: PerJob(_consumed("bytes")),
    cat.FETCHES_TOTAL: PerJob(_fetches_total),
    cat.BACKUP_DURATION: _duration("backup", cat.BACKUP_DURATION, lambda s: s.job),
    cat.RESTORE_DURATION: _duration("restore", cat.RESTORE_DURATION, lambda s: s.backup_id or s.job),
    cat.OFFSET_RESET_DURATION: _duration("offset_reset", cat.OFFSET_RESET_DURATION, lambda s: s.job),
    cat.STORAGE_WRITE_LATENCY: _storage_latency("write", cat.STORAGE_WRITE_LATENCY),
    cat.STORAGE_READ_LATENCY: _storage_latency("read", cat.STORAGE_READ_LATENCY),
    cat.STORAGE_WRITE_BYTES: _storage_bytes("write"),
    cat.STORAGE_READ_BYTES: _storage_bytes("read"),
    cat.STORAGE_CALL_DURATION: _shared_histogram(_storage_calls, cat.STORAGE_CALL_DURATION),
    cat.STORAGE_ERRORS: _shared_sum(_storage_errors),
    cat.COMPRESSION_RATIO: PerJob(_compression_ratio),
    cat.COMPRESSED_BYTES: PerJob(_compression_bytes("compressed")),
    cat.UNCOMPRESSED_BYTES: PerJob(_compression_bytes("uncompressed")),
    cat.ERRORS_TOTAL: _by_key("errors"),
    cat.PERMANENT_ERRORS_TOTAL: _by_key("permanent_errors"),
    cat.RETRIES_TOTAL: _by_key("retries", ("backup", "restore", "verify")),
    cat.LAST_SUCCESSFUL_COMMIT: PerJob(_last_commit),
    cat.JOB_INFO: PerJob(_job_info),
    cat.LAST_SUCCESS: PerJob(_last_success),
    cat.EXPECTED_INTERVAL: PerJob(_expected_interval),
    cat.NEWEST_STORED_RECORD: PerJob(_newest_stored),
    cat.RECOVERY_POINT_OBJECTIVE: PerJob(_rpo),
    cat.REBALANCES_TOTAL: PerJob(_rebalances),
    cat.TELEMETRY_DROPPED: PerJob(_dropped, EVERY),
    cat.TELEMETRY_INVALID: _pipeline_counts("invalid"),
    cat.TELEMETRY_FOLD_FAILURES: _pipeline_counts("failures"),
    cat.BACKUP_STATUS: PerJob(_status, time_key=_stopped),
    cat.WORKER_LAST_SEEN: PerJob(_last_seen, EVERY),
    cat.EXPORTER_DROPPED_SERIES: _dropped_series,
    cat.EXPORTER_EXPIRED_JOBS: _expired_jobs,
    cat.RESTORE_PROGRESS: PerJob(_restore_progress, RESTORE),
    cat.RESTORE_ETA: PerJob(_restore_eta, RESTORE, time_key=_rate_key),
    cat.RESTORE_THROUGHPUT: PerJob(_restore_throughput, RESTORE, time_key=_rate_key),
    cat.RESTORE_RECORDS_TOTAL: PerJob(_restore_records, RESTORE),
    cat.RESTORE_ERRORS_TOTAL: PerJob(_restore_errors, RESTORE),
}


# ---- 8. verification ------------------------------------------------------------------------


def _verifies(view: View) -> Iterator[JobState]:
    return (s for s in view.jobs if s.kind == "verify")


def _verify_gauge(attr: str) -> Builder:
    """The last complete verify run's verdict, per backup (the newest of its verify jobs); nothing
    before one has completed."""

    def build(view: View) -> Iterator[Sample]:
        newest: dict[str, tuple[float, JobState]] = {}
        for s in _verifies(view):
            bid = s.backup_id or s.job
            if s.verified_ts is not None and (bid not in newest or s.verified_ts > newest[bid][0]):
                newest[bid] = (s.verified_ts, s)
        return (((bid,), getattr(s, attr)) for bid, (_, s) in newest.items())

    return build


def _checked(attr: str, kinds: tuple[str, ...]) -> Builder:
    def contribution(s: JobState) -> Iterator[tuple[tuple[str, ...], float]]:
        if s.kind in kinds:
            yield (reader_id(s),), getattr(s, attr)

    return _shared_sum(contribution)


BUILDERS.update({
    cat.VERIFY_DURATION: _duration("verify", cat.VERIFY_DURATION, lambda s: s.backup_id or s.job),
    cat.LAST_VERIFIED: _verify_gauge("verified_ts"),
    cat.VERIFY_FAILED_SEGMENTS: _verify_gauge("verify_bad"),
    cat.VERIFY_GAPS: _verify_gauge("verify_gaps"),
    cat.VERIFY_SEGMENTS_TOTAL: _checked("checked_segments", ("verify",)),
    cat.UNVERIFIED_SEGMENTS_TOTAL: _checked("unverified_segments", ("verify", "restore")),
})

_FAMILIES = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily,
             "stateset": StateSetMetricFamily, "info": InfoMetricFamily}
_LAST = (cat.EXPORTER_DROPPED_SERIES, cat.EXPORTER_FAILED_BUILDS)  # built after the others: they report on them


Family = CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily | InfoMetricFamily | StateSetMetricFamily


def new_family(m: cat.Metric) -> Family:
    if m.type == "stateset":
        return StateSetMetricFamily(m.family_name, m.help, labels=m.labels)
    if m.type == "info":  # every label travels in the info value: see _build
        return InfoMetricFamily(m.family_name, m.help, labels=())
    return _FAMILIES[m.type](m.family_name, m.help, labels=m.labels, unit=m.om_unit)


class StateCollector(Collector):
    """Rebuilt on every collect: the snapshot is the only state, so there is nothing to keep in sync."""

    def __init__(
        self,
        snapshot: Callable[[], Mapping[str, Any]],
        throughput_window_s: int = 60,
        clock: Callable[[], float] = time.time,
        stop_after_s: float = 60.0,
        expire_after_s: float = 7 * 24 * 3600.0,
        max_series_per_family: int = 10_000,
        endpoint: EndpointCounters | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._snapshot = snapshot
        self._window = throughput_window_s
        self._clock = clock
        self._stop_after_s = stop_after_s
        self._expire_after_s = expire_after_s
        self._max_series = max_series_per_family
        self._failures = FirstOfEach(log)

    def describe(self) -> list:
        return []

    @property
    def max_series(self) -> int:
        return self._max_series

    def view(self) -> View:
        """This scrape's snapshot and "now"."""
        view = make_view(self._snapshot(), self._clock(), self._window, self._expire_after_s, self._stop_after_s)
        view.endpoint = self._endpoint
        return view

    def collect(self) -> Iterator[Family]:
        view = self.view()
        families: dict[cat.Metric, Family] = {}
        for m, builder in rendered():
            family = families[m] = new_family(m)
            for sample in self.family_samples(m, builder, view):
                if isinstance(family, InfoMetricFamily):
                    family.add_metric([], dict(zip(m.labels, sample[0], strict=True)))
                else:  # the builder's sample is the family's: (labels, value) or (labels, buckets, sum)
                    family.add_metric(*sample)
        return (families[m] for m in cat.CATALOGUE if m in families)

    def family_samples(self, m: cat.Metric, builder: Builder, view: View) -> list[Sample]:
        """One malformed state value must cost its family's samples, not the whole scrape; beyond
        ``max_series_per_family`` samples are counted in ``view.dropped_series``, not served."""
        out: list[Sample] = []
        # The families reporting on the others (one series per catalogue metric at most) are never
        # cut: with more than max_series families over the limit, the count of dropped series would
        # itself be dropped, silently.
        limit = self._max_series if m not in _LAST else len(cat.CATALOGUE)
        try:
            for n, sample in enumerate(builder(view)):
                if n >= limit:
                    view.dropped_series[m.name] = view.dropped_series.get(m.name, 0) + 1
                    continue
                if m.type == "info" and len(sample[0]) != len(m.labels):
                    raise ValueError(f"{m.name}: {len(sample[0])} label values for {len(m.labels)} labels")
                out.append(sample)
        except Exception as err:  # a bug, or a state value the builder did not expect: counted, logged once
            self._failures.exception(err, "cannot build %s", m.name, about=m.name)
            if view.endpoint is not None:
                view.endpoint.add(cat.EXPORTER_FAILED_BUILDS, m.name)
            return []
        return out


def frozen_collector(snapshot: Mapping[str, Any], now: float, throughput_window_s: int, stop_after_s: float,
                     max_series_per_family: int) -> StateCollector:
    """A collector over a state that no longer changes (a replayed log, one run's events).

    ``now`` is the state's own end, not the wall clock, and nothing expires: the same state
    renders the same bytes tomorrow.
    """
    return StateCollector(lambda: snapshot, throughput_window_s, clock=lambda: now, stop_after_s=stop_after_s,
                          expire_after_s=float("inf"), max_series_per_family=max_series_per_family)


def rendered() -> list[tuple[cat.Metric, Builder]]:
    """The families a scrape serves, in the order they are built (catalogue order, then ``_LAST``)."""
    first = [(m, b) for m in cat.CATALOGUE
             if (b := BUILDERS.get(m)) is not None and m.type in _FAMILIES and m not in _LAST]
    return first + [(m, BUILDERS[m]) for m in _LAST]


# ---- 8. the exporter's own endpoint ---------------------------------------------------------
# Appended last. Counted by exporter.server as requests arrive (they are not in the state topic),
# served through the same catalogue-driven builders as every other family.


class EndpointCounters:
    """Counters by reason for the catalogue's section 8, shared by the HTTP server's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[cat.Metric, dict[str, int]] = {}
        # set by exporter.server from the state reader, read at scrape time
        self.state_age: Callable[[float | None], float | None] | None = None
        self.undecodable: Callable[[], dict[str, int]] | None = None
        self.telemetry_lag: Callable[[float], dict[int, tuple[int, float]]] | None = None

    def add(self, metric: cat.Metric, reason: str, n: int = 1) -> None:
        with self._lock:
            by_reason = self._counts.setdefault(metric, {})
            by_reason[reason] = by_reason.get(reason, 0) + n

    def get(self, metric: cat.Metric) -> dict[str, int]:
        with self._lock:
            return dict(self._counts.get(metric, {}))


def _endpoint(metric: cat.Metric) -> Builder:
    def build(view: View) -> Iterator[Sample]:
        counts = view.endpoint.get(metric) if view.endpoint is not None else {}
        return iter([((reason,), n) for reason, n in sorted(counts.items())])

    return build


BUILDERS[cat.EXPORTER_AUTH_FAILURES] = _endpoint(cat.EXPORTER_AUTH_FAILURES)
BUILDERS[cat.EXPORTER_CONNECTIONS_CLOSED] = _endpoint(cat.EXPORTER_CONNECTIONS_CLOSED)


def _state_age(view: View) -> Iterator[Sample]:
    """Read at scrape time from the state reader (``EndpointCounters.state_age``, set by exporter.server)."""
    age_fn = view.endpoint.state_age if view.endpoint is not None else None
    age = age_fn(view.now) if age_fn is not None else None
    return iter([] if age is None else [((), age)])


BUILDERS[cat.EXPORTER_STATE_AGE] = _state_age


def _telemetry_lag(index: int) -> Builder:
    """Read at scrape time from the exporter's ``TelemetryLag`` (``EndpointCounters.telemetry_lag``)."""

    def build(view: View) -> Iterator[Sample]:
        lag_fn = view.endpoint.telemetry_lag if view.endpoint is not None else None
        lags = lag_fn(view.now) if lag_fn is not None else {}
        return iter([((str(p),), lag[index]) for p, lag in lags.items()])

    return build


BUILDERS[cat.TELEMETRY_LAG_RECORDS] = _telemetry_lag(0)
BUILDERS[cat.TELEMETRY_LAG_SECONDS] = _telemetry_lag(1)
BUILDERS[cat.EXPORTER_FAILED_BUILDS] = _endpoint(cat.EXPORTER_FAILED_BUILDS)


def _undecodable(view: View) -> Iterator[Sample]:
    """Read at scrape time from the state reader (``EndpointCounters.undecodable``, set by exporter.server)."""
    counts_fn = view.endpoint.undecodable if view.endpoint is not None else None
    counts = counts_fn() if counts_fn is not None else {}
    return iter([((reason,), n) for reason, n in sorted(counts.items())])


BUILDERS[cat.EXPORTER_UNDECODABLE_STATE] = _undecodable


def _build_info(view: View) -> Iterator[Sample]:
    """The live exporter's own build (a replay, which has no endpoint, reports none: its output
    must not depend on the machine it runs on)."""
    if view.endpoint is None:
        return iter([])
    info = build_info()
    return iter([(tuple(info[label] for label in cat.BUILD_INFO.labels), 1)])


BUILDERS[cat.BUILD_INFO] = _build_info
