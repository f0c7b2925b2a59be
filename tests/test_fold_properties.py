"""Property tests over decode -> check -> fold: whatever arrives, a counted refusal or a sane state.

For any byte string, and for any event of a known type with wild values (NaN, infinities,
huge or negative numbers, any text in labels), the aggregator's path either refuses the record
with a reason (``InvalidEvent``) or folds it into a state that keeps every invariant: numbers
finite, counters non-negative and never lower than before, the encoded state within its cap.
"""

from __future__ import annotations

import math

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kafka_backup.schemas import events as ev
from kafka_backup.schemas.state import JobState, decode_state
from kafka_backup.streams import fold

T0 = 1_790_000_000.0
SETTINGS = fold.Settings(max_keys_per_map=4, max_partitions_per_job=6, max_state_bytes=4096)
REASONS = {"malformed", "unknown_type", "future_version", "invalid_field", "bad_value", "bad_timestamp", "bad_key"}

wild_int = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1]))
wild_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([T0, T0 + 1e6, -0.0]))
wild_text = st.one_of(st.text(max_size=80), st.sampled_from(["s3", "a|b", "t", "x" * 300, "", "\n", "é"]))
event_time = st.one_of(st.floats(T0 - 100, T0 + 400), wild_float)


sane_int = st.one_of(st.integers(0, 1000), st.integers(ev.MAX_INT - 5, ev.MAX_INT))  # near the cap: saturation
sane_float = st.floats(0, 1e6)
sane_label = st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True)  # many distinct keys: the caps are hit


def kinds(wild: bool) -> tuple:
    """(int, float, label, time) strategies: valid values, or wild ones most of which must be refused."""
    if wild:
        return wild_int, wild_float, wild_text, event_time
    return sane_int, sane_float, sane_label, st.floats(T0 - 100, T0 + 290)


def event_types(wild: bool) -> st.SearchStrategy[ev.Event]:
    i, f, label, ts = kinds(wild)
    envelope = dict(worker=st.sampled_from(["w1", "w2"]) | (wild_text if wild else st.nothing()),
                    seq=st.integers(0, 50) | (wild_int if wild else st.nothing()), ts=ts,
                    job=st.just("j") | (wild_text if wild else st.nothing()))
    pp = st.builds(ev.PartitionProgress, topic=st.sampled_from(["t", "u"]) | label, partition=i, committed=i,
                   high_watermark=i, newest_stored_ts=st.none() | i, newest_available_ts=st.none() | i)
    tc = st.builds(ev.TopicConsumed, topic=st.sampled_from(["t", "u"]) | label, records=i, bytes=i)
    return st.one_of(
        st.builds(ev.JobStarted, **envelope, total_records=st.none() | i, restored_total=i,
                  expected_interval_s=st.none() | f),
        st.builds(ev.JobEnded, **envelope, status=st.sampled_from(["success", "failure"]), duration_s=f),
        st.builds(ev.Progress, **envelope, partitions=st.lists(pp, max_size=3), consumed=st.lists(tc, max_size=3),
                  fetches=i),
        st.builds(ev.SegmentStored, **envelope, topic=st.just("t") | label, partition=st.integers(0, 3),
                  start_offset=i, end_offset=i, records=i, bytes=i, uncompressed_bytes=i, stored_bytes=i,
                  algorithm=st.just("zstd") | label, covers_from=st.just(-1) | i, max_ts=st.none() | i),
        segments(envelope, i, label),
        st.builds(ev.StorageOp, **envelope, backend=st.just("s3") | label, operation=label,
                  direction=st.sampled_from(["write", "read"]), latency_s=f, bytes=i,
                  outcome=st.just("success") | label),
        st.builds(ev.ErrorRaised, **envelope, error_type=label, transient=st.booleans(), backend=label,
                  storage_error=label),
        st.builds(ev.Retry, **envelope, operation=label),
        st.builds(ev.RestoreProgress, **envelope, records=i, restored_total=i, bytes=i, restored_bytes=i),
        st.builds(ev.TelemetryDropped, **envelope, total=i),
    )


@st.composite
def segments(draw, envelope: dict, i, label) -> ev.SegmentStored:
    """Ranges that fit together (covers_from <= start <= end, records <= end - start), in any order."""
    start = draw(st.integers(0, 10_000))
    length = draw(st.integers(0, 500))
    return ev.SegmentStored(
        worker=draw(envelope["worker"]), seq=draw(envelope["seq"]), ts=draw(envelope["ts"]),
        job=draw(envelope["job"]), topic=draw(st.just("t") | label), partition=draw(st.integers(0, 3)),
        start_offset=start, end_offset=start + length, records=draw(st.integers(0, length)), bytes=draw(i),
        uncompressed_bytes=draw(i), stored_bytes=draw(i), algorithm=draw(st.just("zstd") | label),
        covers_from=draw(st.just(-1) | st.integers(0, start)), max_ts=draw(st.none() | st.integers(0, 2**40)))


def events() -> st.SearchStrategy[ev.Event]:
    return st.one_of(event_types(wild=False), event_types(wild=True))


def encodable(event: ev.Event) -> bytes | None:
    try:
        return ev.encode(event)
    except (OverflowError, msgspec.EncodeError):
        return None  # not even msgpack: a producer cannot send it


def counters(s: JobState) -> dict[str, float]:
    """Every counter-like number of a state, by a stable name."""
    out: dict[str, float] = {"records": s.records, "bytes": s.bytes, "fetches": s.fetches, "runs": s.runs,
                             "rebalances": s.rebalances, "restored_total": s.restored_total}
    for name in ("errors", "permanent_errors", "retries", "dropped"):
        for k, v in getattr(s, name).items():
            out[f"{name}/{k}"] = v
    for k, c in s.compression.items():
        out[f"compression/{k}/compressed"], out[f"compression/{k}/uncompressed"] = c.compressed, c.uncompressed
    for k, c in s.consumed.items():
        out[f"consumed/{k}/records"], out[f"consumed/{k}/bytes"] = c.records, c.bytes
    for c in s.storage_calls:
        key = f"calls/{c.direction}/{c.backend}/{c.operation}/{c.outcome}"
        out[key + "/count"], out[key + "/sum"], out[key + "/bytes"] = c.latency.count, c.latency.sum, c.bytes
    for f in s.storage_failures:
        out[f"failures/{f.backend}/{f.error_type}"] = f.count
    for status, h in s.durations.items():
        out[f"durations/{status}/count"], out[f"durations/{status}/sum"] = h.count, h.sum
    for key, p in s.partitions.items():
        out[f"p/{key}/records"], out[f"p/{key}/bytes"] = p.records, p.bytes
    return out


def assert_sane(raw: bytes, before: dict[str, float]) -> dict[str, float]:
    assert len(raw) <= SETTINGS.max_state_bytes
    state = decode_state(raw)
    now = counters(state)
    for name, value in now.items():
        assert math.isfinite(value) and 0 <= value <= ev.MAX_INT, (name, value)
        assert value >= before.get(name, 0), (name, before.get(name), value)
    assert math.isfinite(state.last_event_ts)
    return now


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_bytes_are_refused_with_a_reason_or_decode(data):
    try:
        event = ev.decode(data)
    except ev.InvalidEvent as err:
        assert err.reason in REASONS
        return
    assert isinstance(event, ev.EVENT_TYPES)


@given(st.lists(events(), min_size=1, max_size=60))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_wild_events_are_refused_or_keep_every_invariant(batch):
    fold_checked(batch)


@given(st.lists(event_types(wild=False), min_size=30, max_size=120))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])
def test_floods_of_valid_events_stay_within_the_caps(batch):
    """Many distinct label values and partitions: maps and the encoded state hit their caps."""
    fold_checked(batch)


def fold_checked(batch: list[ev.Event]) -> None:
    raw: bytes | None = None
    before: dict[str, float] = {}
    for n, event in enumerate(batch, start=1):
        if 0 <= event.seq <= 50:  # most events in order, as a worker sends them; the rest duplicates or wild
            event = msgspec.structs.replace(event, seq=n)
        data = encodable(event)
        if data is None:
            continue
        try:
            decoded = ev.decode(data)
            fold.check(decoded, record_ts=T0, now=T0, settings=SETTINGS)
        except ev.InvalidEvent as err:
            assert err.reason in REASONS
            continue
        if decoded.kind != "backup" or decoded.job != "j":
            continue  # another job's key: its own state, not this one's
        new, refused = fold.apply_bytes(raw, decoded, SETTINGS)
        if refused is not None:
            assert refused in {"too_many_keys", "state_too_large"} and new is None
            continue
        if new is not None:
            before = assert_sane(new, before)
            raw = new
