"""Folding events into job state: the whole aggregation, as plain functions.

Faust only moves bytes in and out of a table (``streams/app.py``); what an
event *means* is decided here, so the live aggregator, tests and an offline
replay run exactly the same code.

Exactness on an at-least-once log rests on two guards kept inside the state
value they protect:

* per-instance sequence high-water marks (``JobState.seen``): an event whose
  ``seq`` is not above its instance's mark is a duplicate and changes nothing;
* per-partition coverage (``PartitionState.claim``): a segment whose offset
  range was already counted is not counted again, whichever instance reports
  it; a range whose report is missing stays a hole that a later report fills.
"""

from __future__ import annotations

from schemas import catalogue as cat
from schemas import events as ev
from schemas.state import (
    FETCHES_TOPIC,
    SIZE_WINDOW_MINUTES,
    STATUS_SAMPLE_EVERY_S,
    STATUS_SAMPLES,
    Histogram,
    JobState,
    PartitionState,
    RateSample,
    SizeSample,
    StatusSample,
)

MAX_INSTANCES_PER_JOB = 64  # bound on dedup marks kept per job; oldest (by last event) go first


class Settings:
    """Aggregation parameters that shape state (not presentation)."""

    def __init__(self, throughput_window_s: int = 60) -> None:
        self.throughput_window_s = throughput_window_s


DEFAULT_SETTINGS = Settings()


MIN_EVENT_TS = 1_577_836_800.0  # 2020-01-01: older event times are a broken clock
MAX_FUTURE_S = 24 * 3600.0  # event time may lead the record's Kafka timestamp by at most a day
MAX_DELAY_S = 90 * 24 * 3600.0  # and trail it (spooled, buffered) by at most 90 days


def check(event: ev.Event, record_ts: float | None) -> None:
    """Reject absurd values before they touch any aggregate (raises ``InvalidEvent``).

    ``record_ts`` is the Kafka record timestamp in seconds: comparing with it,
    not with the aggregator's clock, keeps a replay's verdict identical.
    """
    if event.ts < MIN_EVENT_TS or event.seq < 0:
        raise ev.InvalidEvent("bad_timestamp" if event.ts < MIN_EVENT_TS else "bad_value", "envelope")
    if record_ts is not None and not (record_ts - MAX_DELAY_S <= event.ts <= record_ts + MAX_FUTURE_S):
        raise ev.InvalidEvent("bad_timestamp", f"event time {event.ts} vs record time {record_ts}")
    negative = False
    if isinstance(event, ev.Progress):
        negative = event.fetches < 0 or any(c.records < 0 or c.bytes < 0 for c in event.consumed) or any(
            p.committed < -1 or p.high_watermark < -1 or (p.high_watermark >= 0 and p.committed > p.high_watermark)
            for p in event.partitions
        )
    elif isinstance(event, ev.SegmentStored):
        negative = (
            min(event.records, event.bytes, event.uncompressed_bytes, event.stored_bytes, event.start_offset) < 0
            or event.end_offset < event.start_offset
        )
    elif isinstance(event, ev.StorageOp):
        negative = event.latency_s < 0 or event.bytes < 0
    elif isinstance(event, ev.JobEnded):
        negative = event.duration_s < 0
    elif isinstance(event, ev.RestoreProgress):
        negative = min(event.records, event.bytes, event.restored_total) < 0
    elif isinstance(event, ev.TelemetryDropped):
        negative = event.total < 0
    elif isinstance(event, ev.SegmentsChecked):
        negative = min(event.segments, event.bad, event.unverified, event.gaps) < 0
    if negative:
        raise ev.InvalidEvent("bad_value", type(event).__name__)


def new_state(event: ev.Event) -> JobState:
    return JobState(kind=event.kind, job=event.job)


def is_duplicate(state: JobState, event: ev.Event) -> bool:
    mark = state.seen.get(event.instance)
    return mark is not None and event.seq <= mark[0]


def apply(state: JobState | None, event: ev.Event, settings: Settings = DEFAULT_SETTINGS) -> JobState | None:
    """Return the new state, or ``None`` when the event is a duplicate and nothing changed."""
    if state is None:
        state = new_state(event)
    elif is_duplicate(state, event):
        return None
    _HANDLERS[type(event)](state, event, settings)
    state.seen[event.instance] = [event.seq, event.ts]
    if len(state.seen) > MAX_INSTANCES_PER_JOB:
        oldest = min(state.seen, key=lambda i: state.seen[i][1])
        del state.seen[oldest]
    state.last_event_ts = max(state.last_event_ts, event.ts)
    return state


def _partition(state: JobState, topic: str, partition: int) -> PartitionState:
    key = f"{topic}/{partition}"
    p = state.partitions.get(key)
    if p is None:
        p = state.partitions[key] = PartitionState(topic=topic, partition=partition)
    return p


def _observe(hists: dict[str, Histogram], key: str, value: float, buckets: tuple[float, ...]) -> None:
    h = hists.get(key)
    if h is None:
        h = hists[key] = Histogram.empty(buckets)
    h.observe(value, buckets)


def _add(counter: dict[str, int], key: str, n: int = 1) -> None:
    counter[key] = counter.get(key, 0) + n


def _job_started(state: JobState, e: ev.JobStarted, s: Settings) -> None:
    state.runs += 1
    state.status = "running"
    state.started_ts = e.ts
    state.ended_ts = None
    state.mode = e.mode
    if e.backup_id:
        state.backup_id = e.backup_id
    if e.total_records is not None:
        state.total_records = e.total_records
        _restored(state, e.restored_total, e.restored_bytes)


DURATION_METRIC = {"backup": cat.BACKUP_DURATION, "restore": cat.RESTORE_DURATION,
                   "offset_reset": cat.OFFSET_RESET_DURATION, "verify": cat.VERIFY_DURATION}


def _job_ended(state: JobState, e: ev.JobEnded, s: Settings) -> None:
    buckets = DURATION_METRIC[e.kind].buckets
    _observe(state.durations, e.status, e.duration_s, buckets)
    state.status = e.status
    state.ended_ts = e.ts


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
        state.window.append(StatusSample(ts=e.ts, lag=lag, committed=sum(max(0, p.committed) for p in e.partitions)))
        del state.window[:-STATUS_SAMPLES]
    second = int(e.ts)
    for c in e.consumed:
        totals = state.consumed.setdefault(c.topic, [0, 0])
        totals[0] += c.records
        totals[1] += c.bytes
        _rate(state, second, c.topic, c.records, c.bytes, 0)
    state.fetches += e.fetches
    if e.fetches:
        _rate(state, second, FETCHES_TOPIC, 0, 0, e.fetches)
    horizon = second - s.throughput_window_s
    state.rates = [r for r in state.rates if r.second > horizon]


def _rate(state: JobState, second: int, topic: str, records: int, nbytes: int, fetches: int) -> None:
    for r in reversed(state.rates):
        if r.second != second:
            break
        if r.topic == topic:
            r.records += records
            r.bytes += nbytes
            r.fetches += fetches
            return
    state.rates.append(RateSample(second=second, topic=topic, records=records, bytes=nbytes, fetches=fetches))


def _segment_stored(state: JobState, e: ev.SegmentStored, s: Settings) -> None:
    p = _partition(state, e.topic, e.partition)
    if not p.claim(e.covers_from, e.end_offset):
        return  # this offset range is already counted (reported again by another instance or run)
    p.committed = max(p.committed, e.end_offset)
    p.records += e.records
    p.bytes += e.bytes
    if e.max_ts is not None:
        p.newest_stored_ts = max(p.newest_stored_ts or 0, e.max_ts)
    state.records += e.records
    state.bytes += e.bytes
    comp = state.compression.setdefault(e.algorithm, [0, 0])
    comp[0] += e.stored_bytes
    comp[1] += e.uncompressed_bytes
    minute = int(e.ts // 60)
    if p.sizes and p.sizes[-1].minute == minute:
        p.sizes[-1].records += e.records
        p.sizes[-1].bytes += e.bytes
    else:
        p.sizes.append(SizeSample(minute=minute, records=e.records, bytes=e.bytes))
    p.sizes = [x for x in p.sizes if x.minute > minute - SIZE_WINDOW_MINUTES]


def _storage_op(state: JobState, e: ev.StorageOp, s: Settings) -> None:
    metric = cat.STORAGE_WRITE_LATENCY if e.direction == "write" else cat.STORAGE_READ_LATENCY
    _observe(state.storage_latency, f"{e.direction}|{e.backend}|{e.operation}", e.latency_s, metric.buckets)
    _add(state.storage_bytes, f"{e.direction}|{e.backend}", e.bytes)


def _error(state: JobState, e: ev.ErrorRaised, s: Settings) -> None:
    _add(state.errors, e.error_type)
    if e.storage_error:
        _add(state.storage_errors, f"{e.backend}|{e.storage_error}")


def _retry(state: JobState, e: ev.Retry, s: Settings) -> None:
    _add(state.retries, e.operation)


def _rebalance(state: JobState, e: ev.Rebalance, s: Settings) -> None:
    state.rebalances += 1


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
        state.bytes += e.bytes
    _restored(state, e.restored_total, e.restored_bytes)
    second = int(e.ts)
    _rate(state, second, FETCHES_TOPIC, e.records, e.bytes, 0)
    horizon = second - s.throughput_window_s
    state.rates = [r for r in state.rates if r.second > horizon]


def _telemetry_dropped(state: JobState, e: ev.TelemetryDropped, s: Settings) -> None:
    state.dropped[e.instance] = max(state.dropped.get(e.instance, 0), e.total)


def _segments_checked(state: JobState, e: ev.SegmentsChecked, s: Settings) -> None:
    """Counters add up over runs; a verify run that checked everything sets the backup's verdict."""
    if e.backup_id:
        state.backup_id = e.backup_id
    state.checked_segments += e.segments
    state.unverified_segments += e.unverified
    if e.complete:
        state.verified_ts = e.ts
        state.verify_bad = e.bad
        state.verify_gaps = e.gaps


_HANDLERS = {
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
