"""Folding events into job state: the whole aggregation, as plain functions.

Faust only moves bytes in and out of a table (``streams/app.py``); what an
event *means* is decided here, so the live aggregator, tests and an offline
replay run exactly the same code.

Exactness on an at-least-once log rests on two guards kept inside the state
value they protect:

* per-worker sequence high-water marks (``JobState.seen``): an event whose
  ``seq`` is not above its worker's mark is a duplicate and changes nothing;
* per-partition coverage (``PartitionState.claim``): a segment whose offset
  range was already counted is not counted again, whichever worker reports
  it; a range whose report is missing stays a hole that a later report fills.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas import events as ev
from kafka_backup.schemas import signing
from kafka_backup.schemas.state import (
    SIZE_WINDOW_MINUTES,
    STATE_VERSION,
    STATUS_SAMPLE_EVERY_S,
    STATUS_SAMPLES,
    Compressed,
    Consumed,
    Histogram,
    JobRate,
    JobState,
    PartitionState,
    RateSample,
    Seen,
    SizeSample,
    StatusSample,
    StorageCalls,
    StorageErrors,
    decode_state,
    encode_state,
)

if TYPE_CHECKING:  # the configuration is only read by Settings.of: the fold imports no YAML
    from kafka_backup.schemas.config import AggregatorConfig

MAX_INSTANCES_PER_JOB = 64  # bound on dedup marks kept per job; oldest (by last event) go first


class Settings:
    """Aggregation parameters that shape state (not presentation), and the limits that protect it."""

    def __init__(self, throughput_window_s: int = 60, max_future_s: float = 300.0,
                 max_keys_per_map: int = 256, max_partitions_per_job: int = 2000,
                 max_state_bytes: int = 900_000) -> None:
        self.throughput_window_s = throughput_window_s
        self.max_future_s = max_future_s
        self.max_keys_per_map = max_keys_per_map
        self.max_partitions_per_job = max_partitions_per_job
        self.max_state_bytes = max_state_bytes


    @classmethod
    def of(cls, aggregator: AggregatorConfig) -> Settings:
        """From the ``aggregator:`` configuration section."""
        return cls(throughput_window_s=aggregator.throughput_window_s, max_future_s=aggregator.max_future_s,
                   max_keys_per_map=aggregator.max_keys_per_map,
                   max_partitions_per_job=aggregator.max_partitions_per_job,
                   max_state_bytes=aggregator.max_state_bytes)


DEFAULT_SETTINGS = Settings()


MIN_EVENT_TS = 1_577_836_800.0  # 2020-01-01: older event times are a broken clock
MAX_DELAY_S = 90 * 24 * 3600.0  # event time may trail the record's Kafka timestamp (spooled, buffered) by 90 days


def check(event: ev.Event, record_ts: float | None, now: float | None = None,
          settings: Settings = DEFAULT_SETTINGS) -> None:
    """Reject what the Struct constraints cannot see, before it touches any aggregate (``InvalidEvent``).

    Single fields (finite, non-negative, in range, safe label characters) were checked while
    decoding. Here: event time against the record's Kafka timestamp and the aggregator's clock
    (``now``; a record timestamp of 0 bounds nothing), and fields that must agree with each other.
    An event time ahead of both by more than ``max_future_s`` is a bad clock: accepted, it would
    keep ``last_event_ts`` in the future and hide a dead worker's STOP for that long.
    """
    if event.ts < MIN_EVENT_TS:
        raise ev.InvalidEvent("bad_timestamp", f"event time {event.ts} before 2020")
    bounds = [t for t in (record_ts, now) if t is not None]
    if bounds and event.ts > min(bounds) + settings.max_future_s:
        raise ev.InvalidEvent("bad_timestamp", f"event time {event.ts} ahead of record/clock time {min(bounds)}")
    if record_ts is not None and event.ts < record_ts - MAX_DELAY_S:
        raise ev.InvalidEvent("bad_timestamp", f"event time {event.ts} vs record time {record_ts}")
    problem = ""
    if isinstance(event, ev.Progress):
        if any(p.high_watermark >= 0 and p.committed > p.high_watermark for p in event.partitions):
            problem = "committed offset above the high watermark"
    elif isinstance(event, ev.SegmentStored):
        if event.end_offset < event.start_offset:
            problem = "end_offset below start_offset"
        elif event.covers_from > event.start_offset:
            problem = "covers_from above start_offset"
        elif event.records > event.end_offset - event.start_offset:
            problem = "more records than offsets in the range"
        elif event.min_ts is not None and event.max_ts is not None and event.min_ts > event.max_ts:
            problem = "min_ts above max_ts"
    elif isinstance(event, ev.JobStarted):
        if event.total_records is not None and event.restored_total > event.total_records:
            problem = "restored_total above total_records"
    if problem:
        raise ev.InvalidEvent("bad_value", f"{type(event).__name__}: {problem}")


class Admitted(NamedTuple):
    """One event of a telemetry record as judged by :func:`admit`: decoded and checked, or refused."""

    payload: bytes  # the event's bytes (the whole record's value when the record was refused)
    event: ev.AnyEvent | ev.InvalidEvent  # the event, or why it was refused


def admit(key: bytes | None, value: bytes | None, headers: signing.Headers | None, record_ts: float | None,
          now: float | None, settings: Settings = DEFAULT_SETTINGS,
          signing_key: bytes | None = None) -> list[Admitted]:
    """The events a telemetry record carries, each decoded and checked, or the reason it is refused.

    The one judgement of a record, made alike by the live aggregator and by replay (``now`` is
    None there: a replay's output is a function of the log alone). A record refused as a whole
    (a missing or wrong signature with ``signing_key``, an unusable batch) is one item carrying
    the record's value; a batch's events are judged each as if it came alone.
    """
    try:
        if not signing.verified(signing_key, key, value, headers):
            raise ev.InvalidEvent("bad_signature", "missing or wrong kafka-backup-sig header")
        payloads = ev.unpack(value)
    except ev.InvalidEvent as err:
        return [Admitted(value or b"", err)]
    out = []
    for payload in payloads:
        try:
            event = ev.decode(payload)
            check(event, record_ts, now, settings)
            if key is None or key.decode("utf-8", "replace") != ev.event_key(event.kind, event.job):
                raise ev.InvalidEvent("bad_key", repr(key))
        except ev.InvalidEvent as err:
            out.append(Admitted(payload, err))
        else:
            out.append(Admitted(payload, event))
    return out


def new_state(event: ev.Event) -> JobState:
    return JobState(kind=event.kind, job=event.job, v=STATE_VERSION)


def is_duplicate(state: JobState, event: ev.Event) -> bool:
    mark = state.seen.get(event.worker)
    return mark is not None and event.seq <= mark.seq


def apply(state: JobState | None, event: ev.Event, settings: Settings = DEFAULT_SETTINGS) -> JobState | None:
    """Return the new state, or ``None`` when the event is a duplicate and nothing changed."""
    if state is None:
        state = new_state(event)
    elif is_duplicate(state, event):
        return None
    _HANDLERS[type(event)](state, event, settings)
    state.v = STATE_VERSION  # decoding moved an older layout over: it is written in this one
    state.seen[event.worker] = Seen(seq=event.seq, ts=event.ts)
    if len(state.seen) > MAX_INSTANCES_PER_JOB:
        oldest = min(state.seen, key=lambda i: state.seen[i].ts)
        del state.seen[oldest]
    state.last_event_ts = max(state.last_event_ts, event.ts)
    return state


def apply_bytes(raw: bytes | None, event: ev.Event,
                settings: Settings = DEFAULT_SETTINGS) -> tuple[bytes | None, str | None]:
    """Fold one event into an encoded state, within the limits.

    Returns ``(new value, None)``; ``(None, None)`` for a duplicate; or ``(None, reason)`` when
    the event is refused because the job's state would outgrow a limit (``too_many_keys``,
    ``state_too_large``). A refused event changes nothing: the old value stays, so a job that
    floods its own maps (say, 20,000 error types) loses only those events, and neither crashes
    the aggregator nor costs any other job a thing.
    """
    new = apply(decode_state(raw) if raw else None, event, settings)
    if new is None:
        return None, None
    reason = over_limit(new, settings)
    if reason is not None:
        return None, reason
    data = encode_state(new)
    if len(data) > settings.max_state_bytes:
        return None, "state_too_large"
    return data, None


def over_limit(state: JobState, settings: Settings) -> str | None:
    """Every map and list keyed by a value from events is capped (``aggregator.max_keys_per_map``)."""
    if len(state.partitions) > settings.max_partitions_per_job:
        return "too_many_keys"
    maps = (state.errors, state.permanent_errors, state.retries, state.storage_calls, state.storage_failures,
            state.compression, state.consumed, state.dropped)
    if any(len(m) > settings.max_keys_per_map for m in maps):
        return "too_many_keys"
    return None


def _partition(state: JobState, topic: str, partition: int) -> PartitionState:
    key = f"{topic}/{partition}"
    p = state.partitions.get(key)
    if p is None:
        p = state.partitions[key] = PartitionState(topic=topic, partition=partition)
    return p


def _observe(hists: dict[str, Histogram], key: str, value: float, metric: cat.Metric) -> None:
    h = hists.get(key)
    h = Histogram.empty(metric.buckets) if h is None else h.fitted(metric.buckets, metric.legacy_buckets)
    if h is None:
        return  # written with buckets that cannot be moved over exactly: the exporter skips it too
    h.observe(value, metric.buckets)
    hists[key] = h


def _sum(a: int, b: int) -> int:
    """Counters saturate at the largest signed 64-bit value instead of growing past what msgpack encodes."""
    return min(a + b, ev.MAX_INT)


def _add(counter: dict[str, int], key: str, n: int = 1) -> None:
    counter[key] = _sum(counter.get(key, 0), n)


def _job_started(state: JobState, e: ev.JobStarted, s: Settings) -> None:
    state.runs += 1
    state.status = "running"
    state.started_ts = e.ts
    state.ended_ts = None
    state.mode = e.mode
    state.expected_interval_s = e.expected_interval_s
    state.recovery_point_objective_s = e.recovery_point_objective_s
    if e.backup_id:
        state.backup_id = e.backup_id
    if e.total_records is not None:
        state.total_records = e.total_records
        _restored(state, e.restored_total, e.restored_bytes)


DURATION_METRIC = {"backup": cat.BACKUP_DURATION, "restore": cat.RESTORE_DURATION,
                   "offset_reset": cat.OFFSET_RESET_DURATION, "verify": cat.VERIFY_DURATION}


def _job_ended(state: JobState, e: ev.JobEnded, s: Settings) -> None:
    _observe(state.durations, e.status, e.duration_s, DURATION_METRIC[e.kind])
    state.status = e.status
    state.ended_ts = e.ts
    if e.status == "success":
        state.last_success_ts = e.ts


def _progress(state: JobState, e: ev.Progress, s: Settings) -> None:
    for pp in e.partitions:
        p = _partition(state, pp.topic, pp.partition)
        p.committed = max(p.committed, pp.committed)
        p.high_watermark = pp.high_watermark
        if pp.newest_stored_ts is not None:
            p.newest_stored_ts = pp.newest_stored_ts
        if pp.newest_available_ts is not None:
            p.newest_available_ts = pp.newest_available_ts
    if e.partitions and (not state.window or e.ts - state.window[-1].ts >= STATUS_SAMPLE_EVERY_S):
        lag = sum(max(0, p.high_watermark - p.committed) for p in e.partitions if p.high_watermark >= 0)
        committed = sum(max(0, p.committed) for p in e.partitions)
        # sums over partitions saturate like the counters: offsets near 2**63 on a few partitions
        # would otherwise grow past what msgpack encodes (found by the property tests)
        state.window.append(StatusSample(ts=e.ts, lag=min(lag, ev.MAX_INT), committed=min(committed, ev.MAX_INT)))
        del state.window[:-STATUS_SAMPLES]
    second = int(e.ts)
    for c in e.consumed:
        totals = state.consumed.get(c.topic)
        if totals is None:
            totals = state.consumed[c.topic] = Consumed()
        totals.records = _sum(totals.records, c.records)
        totals.bytes = _sum(totals.bytes, c.bytes)
        _topic_rate(state, second, c.topic, c.records, c.bytes)
    state.fetches = _sum(state.fetches, e.fetches)
    if e.fetches:
        _job_rate(state, second, 0, 0, e.fetches)
    _trim_rates(state, second, s)


def _topic_rate(state: JobState, second: int, topic: str, records: int, nbytes: int) -> None:
    for r in reversed(state.rates):
        if r.second != second:
            break
        if r.topic == topic:
            r.records = _sum(r.records, records)
            r.bytes = _sum(r.bytes, nbytes)
            return
    state.rates.append(RateSample(second=second, topic=topic, records=records, bytes=nbytes))


def _job_rate(state: JobState, second: int, records: int, nbytes: int, fetches: int) -> None:
    last = state.job_rates[-1] if state.job_rates else None
    if last is not None and last.second == second:
        last.records = _sum(last.records, records)
        last.bytes = _sum(last.bytes, nbytes)
        last.fetches = _sum(last.fetches, fetches)
        return
    state.job_rates.append(JobRate(second=second, records=records, bytes=nbytes, fetches=fetches))


def _trim_rates(state: JobState, second: int, s: Settings) -> None:
    """Samples of the throughput window only (the exporter derives the rates from them)."""
    horizon = second - s.throughput_window_s
    state.rates = [r for r in state.rates if r.second > horizon]
    state.job_rates = [r for r in state.job_rates if r.second > horizon]


def _segment_stored(state: JobState, e: ev.SegmentStored, s: Settings) -> None:
    p = _partition(state, e.topic, e.partition)
    if not p.claim(e.covers_from, e.end_offset):
        return  # this offset range is already counted (reported again by another instance or run)
    p.committed = max(p.committed, e.end_offset)
    p.records = _sum(p.records, e.records)
    p.bytes = _sum(p.bytes, e.bytes)
    if e.max_ts is not None:
        p.newest_stored_ts = max(p.newest_stored_ts or 0, e.max_ts)
    state.records = _sum(state.records, e.records)
    state.bytes = _sum(state.bytes, e.bytes)
    comp = state.compression.get(e.algorithm)
    if comp is None:
        comp = state.compression[e.algorithm] = Compressed()
    comp.compressed = _sum(comp.compressed, e.stored_bytes)
    comp.uncompressed = _sum(comp.uncompressed, e.uncompressed_bytes)
    minute = int(e.ts // 60)
    if p.sizes and p.sizes[-1].minute == minute:
        p.sizes[-1].records = _sum(p.sizes[-1].records, e.records)
        p.sizes[-1].bytes = _sum(p.sizes[-1].bytes, e.bytes)
    else:
        p.sizes.append(SizeSample(minute=minute, records=e.records, bytes=e.bytes))
    p.sizes = [x for x in p.sizes if x.minute > minute - SIZE_WINDOW_MINUTES]


STORAGE_LATENCY_METRIC = {"write": cat.STORAGE_WRITE_LATENCY, "read": cat.STORAGE_READ_LATENCY}


def _storage_op(state: JobState, e: ev.StorageOp, s: Settings) -> None:
    if state.storage_latency:  # state written by an older aggregator: move it over once
        state.storage_calls = state.all_storage_calls()
        state.storage_latency = {}
    metric = STORAGE_LATENCY_METRIC[e.direction]
    for c in state.storage_calls:
        if (c.direction, c.backend, c.operation, c.outcome) == (e.direction, e.backend, e.operation, e.outcome):
            calls = c
            break
    else:
        calls = StorageCalls(direction=e.direction, backend=e.backend, operation=e.operation, outcome=e.outcome,
                             latency=Histogram.empty(metric.buckets))
        state.storage_calls.append(calls)
    fitted = calls.latency.fitted(metric.buckets, metric.legacy_buckets)
    if fitted is not None:
        fitted.observe(e.latency_s, metric.buckets)
        calls.latency = fitted
    calls.bytes = _sum(calls.bytes, e.bytes)


def _error(state: JobState, e: ev.ErrorRaised, s: Settings) -> None:
    _add(state.errors, e.error_type)
    if not e.transient:
        _add(state.permanent_errors, e.error_type)
    if e.storage_error:
        for f in state.storage_failures:
            if (f.backend, f.error_type) == (e.backend, e.storage_error):
                f.count = _sum(f.count, 1)
                break
        else:
            state.storage_failures.append(StorageErrors(backend=e.backend, error_type=e.storage_error, count=1))


def _retry(state: JobState, e: ev.Retry, s: Settings) -> None:
    _add(state.retries, e.operation)


def _rebalance(state: JobState, e: ev.Rebalance, s: Settings) -> None:
    if not e.revoked:  # one rebalance revokes, then assigns: count the assignment only
        state.rebalances = _sum(state.rebalances, 1)


def _offsets_committed(state: JobState, e: ev.OffsetsCommitted, s: Settings) -> None:
    for o in e.offsets:
        p = _partition(state, o.topic, o.partition)
        p.committed = max(p.committed, o.offset)
        p.last_commit_ts = e.ts


def _restored(state: JobState, restored_total: int, restored_bytes: int) -> None:
    """A restore's records and bytes follow its checkpoint's cumulative counts, never a sum of batches.

    So a killed worker's lost progress events are made up by the next one that gets
    through, and a batch reported twice (sent, then adopted after a crash) counts once.
    """
    state.restored_total = max(state.restored_total, restored_total)
    state.records = max(state.records, restored_total)
    if restored_bytes >= 0:
        state.bytes = max(state.bytes, restored_bytes)


def _restore_progress(state: JobState, e: ev.RestoreProgress, s: Settings) -> None:
    if e.restored_bytes < 0:  # an older worker: only per-batch bytes
        state.bytes = _sum(state.bytes, e.bytes)
    _restored(state, e.restored_total, e.restored_bytes)
    second = int(e.ts)
    _job_rate(state, second, e.records, e.bytes, 0)
    _trim_rates(state, second, s)


def _telemetry_dropped(state: JobState, e: ev.TelemetryDropped, s: Settings) -> None:
    state.dropped[e.worker] = max(state.dropped.get(e.worker, 0), e.total)


def _segments_checked(state: JobState, e: ev.SegmentsChecked, s: Settings) -> None:
    """Counters add up over runs; a verify run that checked everything sets the backup's verdict."""
    if e.backup_id:
        state.backup_id = e.backup_id
    state.checked_segments = _sum(state.checked_segments, e.segments)
    state.unverified_segments = _sum(state.unverified_segments, e.unverified)
    if e.complete:
        state.verified_ts = e.ts
        state.verify_bad = e.bad
        state.verify_gaps = e.gaps


# each handler takes the event type its key names (Any: a dict cannot say so per key; the assert checks the keys)
_HANDLERS: dict[type[ev.Event], Callable[[JobState, Any, Settings], None]] = {
    ev.JobStarted: _job_started,
    ev.JobEnded: _job_ended,
    ev.Progress: _progress,
    ev.SegmentStored: _segment_stored,
    ev.StorageOp: _storage_op,
    ev.ErrorRaised: _error,
    ev.Retry: _retry,
    ev.Rebalance: _rebalance,
    ev.OffsetsCommitted: _offsets_committed,
    ev.RestoreProgress: _restore_progress,
    ev.TelemetryDropped: _telemetry_dropped,
    ev.SegmentsChecked: _segments_checked,
}
assert set(_HANDLERS) == set(ev.EVENT_TYPES), "every event type needs a handler"
