"""The aggregator's working set folds exactly what ``fold.apply_bytes`` folds, limits included.

Events are folded in place and written once per flush interval; whatever the flush points, the
value handed to the table, every refusal and its reason must be those of the one-write-per-event
path (``fold.apply_bytes``), which the other fold tests pin down.
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kafka_backup.schemas import events as ev
from kafka_backup.schemas.state import decode_state
from kafka_backup.streams import fold
from kafka_backup.streams.working import WorkingSet
from tests.test_fold_properties import T0, encodable, event_types

KEY = b"backup:j"
TIGHT = fold.Settings(max_keys_per_map=4, max_partitions_per_job=6, max_state_bytes=4096)
ROOMY = fold.Settings(max_keys_per_map=6, max_partitions_per_job=40, max_state_bytes=12_000)


def compare(batch: list[ev.Event], flush_every: list[bool], limits: fold.Settings) -> None:
    table: dict[bytes, bytes] = {}
    work = WorkingSet(limits)
    raw: bytes | None = None
    for n, (event, flush) in enumerate(zip(batch, flush_every, strict=False), start=1):
        if 0 <= event.seq <= 50:
            event = msgspec.structs.replace(event, seq=n)
        data = encodable(event)
        if data is None:
            continue
        try:
            decoded = ev.decode(data)
            fold.check(decoded, record_ts=T0, now=T0, settings=limits)
        except ev.InvalidEvent:
            continue
        if decoded.kind != "backup" or decoded.job != "j":
            continue
        new, want = fold.apply_bytes(raw, decoded, limits)
        changed, got = work.apply(KEY, 0, decoded, len(data), table.get)
        assert got == want
        assert changed == (new is not None)
        if new is not None:
            raw = new
        if flush:
            table.update(work.flush(0))
            same(table.get(KEY), raw)
    table.update(work.flush(0))
    same(table.get(KEY), raw)


def same(a: bytes | None, b: bytes | None) -> None:
    """Equal states (a dedup mark's seq may be encoded as 3 or 3.0: the Struct reads both as 3.0)."""
    assert (a is None) == (b is None)
    if a is not None:
        assert decode_state(a) == decode_state(b)


@given(st.lists(event_types(wild=False), min_size=30, max_size=120), st.lists(st.booleans(), min_size=120,
                                                                              max_size=120))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])
def test_the_working_set_folds_and_refuses_exactly_as_one_write_per_event(batch, flushes):
    compare(batch, flushes, TIGHT)
    compare(batch, flushes, ROOMY)


def test_a_refused_event_leaves_the_unflushed_state_as_it_was():
    limits = fold.Settings(max_keys_per_map=3)
    work = WorkingSet(limits)
    base = dict(worker="w", job="j", ts=T0)
    for i in range(5):  # no flush in between: the refusals rebuild from the events folded since
        changed, refused = work.apply(KEY, 0, ev.ErrorRaised(**base, seq=i + 1, error_type=f"e{i}", transient=True),
                                      100, {}.get)
        assert (changed, refused) == ((True, None) if i < 3 else (False, "too_many_keys"))
    [(key, value)] = work.flush(0)
    state = decode_state(value)
    assert sorted(state.errors) == ["e0", "e1", "e2"] and state.seen["w"].seq == 3


def test_a_state_growing_past_its_size_cap_is_refused_at_the_same_event():
    limits = fold.Settings(max_state_bytes=20_000, max_partitions_per_job=10_000)
    work = WorkingSet(limits)
    raw, base = None, dict(worker="w", job="j", ts=T0)
    for i in range(2000):
        event = ev.Progress(**base, seq=i + 1, partitions=[ev.PartitionProgress(f"topic-{i}", 0, 1, 2)])
        new, want = fold.apply_bytes(raw, event, limits)
        _, got = work.apply(KEY, 0, event, 40, {}.get)
        assert got == want
        if want:
            break
        raw = new
    assert want == "state_too_large"
    [(_, value)] = work.flush(0)
    same(value, raw)


def test_a_failing_fold_leaves_the_state_as_it_was(monkeypatch):
    work = WorkingSet()
    base = dict(worker="w", job="j", ts=T0)
    assert work.apply(KEY, 0, ev.Retry(**base, seq=1, operation="write"), 50, {}.get) == (True, None)
    assert work.apply(KEY, 0, ev.Retry(**base, seq=2, operation="read"), 50, {}.get) == (True, None)

    def broken(state, e, s):
        state.runs += 100  # half done, then fails
        raise RuntimeError("bug")

    monkeypatch.setitem(fold._HANDLERS, ev.JobStarted, broken)
    with pytest.raises(RuntimeError):
        work.apply(KEY, 0, ev.JobStarted(**base, seq=3), 50, {}.get)
    [(_, value)] = work.flush(0)
    state = decode_state(value)
    assert state.runs == 0 and state.retries == {"write": 1, "read": 1} and state.seen["w"].seq == 2


def test_a_newer_aggregators_value_is_not_folded_into():
    """Decoding it would drop what the newer layout added: the agent stops on NewerStateError."""
    from kafka_backup.schemas.state import STATE_VERSION, JobState, NewerStateError, encode_state

    newer = encode_state(JobState(kind="backup", job="j", v=STATE_VERSION + 1, records=7))
    work = WorkingSet()
    event = ev.Retry(worker="w", seq=1, ts=T0, job="j", operation="write")
    for _ in range(2):  # nothing half-loaded is kept: it refuses every time
        with pytest.raises(NewerStateError):
            work.apply(KEY, 0, event, 10, lambda key: newer)
    assert work.entries == {} and work.dirty_partitions() == []
