"""The exporter's own renderer (exporter.renderer) against prometheus_client's encoders.

A render that reuses each job's lines must write exactly, byte for byte, what a fresh
``generate_latest`` over :meth:`StateCollector.collect` writes for the same snapshot and
clock, in both formats, whatever happened in between: random histories of events, clock
advances (minutes, the stop threshold, the rate window, expiry), deleted keys.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.exposition import generate_latest as text_latest
from prometheus_client.openmetrics.exposition import generate_latest as om_latest
from prometheus_client.utils import floatToGoString

from kafka_backup.exporter.collector import EndpointCounters, StateCollector
from kafka_backup.exporter.exposition import value
from kafka_backup.exporter.renderer import Renderer
from kafka_backup.exporter.server import MetricsServer
from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.state import JobState, PipelineState, decode_state, encode_state, pipeline_key
from kafka_backup.streams import fold
from tests.test_longrun_unit import EXPIRE_AFTER_S, simulate

T0 = 1_790_000_000.0
JOBS = [("backup", "a", ""), ("backup", "b", ""), ("backup", "q\"x\\y", ""), ("restore", "r1", "a"),
        ("restore", "r2", "a"), ("verify", "v1", "a"), ("offset_reset", "g", "")]
EXPIRE_S = 3 * 3600.0
STOP_S = 60.0
WINDOW = 60


class History:
    """The fleet's true states (folded in place, as the aggregator does) and what the exporter's
    state reader would hold: a new decoded value for a changed key, the same object otherwise."""

    def __init__(self) -> None:
        self.now = T0
        self.states: dict[str, JobState] = {}
        self.published: dict = {}
        self.seq = 0

    def emit(self, job: int, make) -> None:
        kind, name, backup_id = JOBS[job]
        self.seq += 1
        event = make(dict(worker=f"{name}-w", seq=self.seq, ts=self.now, kind=kind, job=name), backup_id)
        key = ev.event_key(kind, name)
        state = fold.apply(self.states.get(key), event)
        if state is not None:
            self.states[key] = state
            self.published[key] = decode_state(encode_state(state))

    def delete(self, job: int) -> None:
        key = ev.event_key(JOBS[job][0], JOBS[job][1])
        self.states.pop(key, None)
        self.published.pop(key, None)


def _partitions(p: int, committed: int, lag: int) -> list[ev.PartitionProgress]:
    ts = int(T0 * 1000)
    return [ev.PartitionProgress("t", p, committed, committed + lag, ts, ts + lag * 7)]


EVENTS = [
    lambda d, b, x: ev.JobStarted(**d, mode=("continuous", "one-shot")[x % 2], backup_id=b,
                                  total_records=(x * 10 if d["kind"] == "restore" else None),
                                  expected_interval_s=(600.0 if x % 3 == 0 else None)),
    lambda d, b, x: ev.JobEnded(**d, status=("success", "failure", "interrupted")[x % 3], duration_s=float(x)),
    lambda d, b, x: ev.Progress(**d, partitions=_partitions(x % 3, x * 10, x % 4 * 100),
                                consumed=[ev.TopicConsumed("t", x, x * 100)], fetches=x),
    lambda d, b, x: ev.SegmentStored(**d, topic="t", partition=x % 3, start_offset=x * 10, end_offset=x * 10 + 10,
                                     records=10, bytes=1000 + x, uncompressed_bytes=1200, stored_bytes=300 + x,
                                     algorithm=("zstd", "none")[x % 2], min_ts=int(T0 * 1000), max_ts=int(T0 * 1000)),
    lambda d, b, x: ev.StorageOp(**d, backend=("s3", "file")[x % 2], operation="segment",
                                 direction=("write", "read")[x % 2], latency_s=x / 7, bytes=x * 100,
                                 outcome=("success", "timeout")[x % 3 == 0]),
    lambda d, b, x: ev.ErrorRaised(**d, error_type=("storage_io", "codec")[x % 2], transient=bool(x % 2),
                                   backend="s3", storage_error="timeout"),
    lambda d, b, x: ev.Retry(**d, operation=("commit", "write")[x % 2]),
    lambda d, b, x: ev.Rebalance(**d, assigned=[f"t/{x % 3}"]),
    lambda d, b, x: ev.OffsetsCommitted(**d, offsets=[ev.TopicPartitionOffset("t", x % 3, x * 10)]),
    lambda d, b, x: ev.RestoreProgress(**d, records=x, restored_total=x * 3, bytes=x * 10),
    lambda d, b, x: ev.TelemetryDropped(**d, total=x),
    lambda d, b, x: ev.SegmentsChecked(**d, backup_id=b or "a", segments=x, bad=x % 2, unverified=x % 3, gaps=0,
                                       complete=bool(x % 2)),
]

EVENT = st.tuples(st.just("event"), st.integers(0, len(JOBS) - 1), st.integers(0, len(EVENTS) - 1), st.integers(1, 50))
ADVANCE = st.tuples(st.just("advance"), st.sampled_from([0.0, 0.4, 1.0, 7.5, 30.0, 59.0, 61.0, 600.0, 3600.0,
                                                          EXPIRE_S, 2 * 86400.0]))
STEPS = st.one_of(EVENT, EVENT, EVENT, EVENT, ADVANCE, ADVANCE, ADVANCE,
                  st.tuples(st.just("delete"), st.integers(0, len(JOBS) - 1)),
                  st.tuples(st.just("pipeline"), st.integers(0, 1), st.integers(0, 5)))


class _Collected:
    def __init__(self, families: list) -> None:
        self._families = families

    def collect(self) -> list:
        return self._families


def reference(snapshot: dict, now: float, **kwargs) -> tuple[bytes, bytes]:
    """prometheus_client's encoders over one collect() of a fresh collector."""
    collected = _Collected(list(StateCollector(lambda: snapshot, WINDOW, clock=lambda: now, **kwargs).collect()))
    return text_latest(collected), om_latest(collected)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEPS, min_size=10, max_size=40), max_series=st.sampled_from([3, 10_000]))
def test_a_reusing_render_equals_a_fresh_one_byte_for_byte(steps, max_series):
    history = History()
    endpoint = EndpointCounters()
    kwargs = dict(stop_after_s=STOP_S, expire_after_s=EXPIRE_S, max_series_per_family=max_series, endpoint=endpoint)
    renderer = Renderer(StateCollector(lambda: history.published, WINDOW, clock=lambda: history.now, **kwargs))
    for step in [("advance", 0.0), *steps]:
        if step[0] == "event":
            _, job, kind, x = step
            history.emit(job, lambda d, b, kind=kind, x=x: EVENTS[kind](d, b, x))
        elif step[0] == "advance":
            history.now += step[1]
        elif step[0] == "delete":
            history.delete(step[1])
        else:
            history.published[pipeline_key(step[1])] = PipelineState(partition=step[1], invalid={"bad_key": step[2]})
            endpoint.add(cat.EXPORTER_AUTH_FAILURES, "wrong_password")
        text, om = reference(history.published, history.now, **kwargs)
        assert renderer.render() == text
        assert renderer.render(openmetrics=True) == om


def test_a_deleted_or_expired_job_leaves_the_reused_render():
    history = History()
    kwargs = dict(stop_after_s=STOP_S, expire_after_s=EXPIRE_S)
    renderer = Renderer(StateCollector(lambda: history.published, WINDOW, clock=lambda: history.now, **kwargs))
    for job in (0, 1):
        history.emit(job, lambda d, b: EVENTS[0](d, b, 1))
        history.emit(job, lambda d, b: EVENTS[2](d, b, 5))
    assert b'backup_id="a"' in renderer.render() and b'backup_id="b"' in renderer.render()
    history.delete(0)
    after_delete = renderer.render(openmetrics=True)
    assert b'backup_id="a"' not in after_delete and b'backup_id="b"' in after_delete
    assert after_delete == reference(history.published, history.now, **kwargs)[1]
    history.now += 30
    history.emit(0, lambda d, b: EVENTS[0](d, b, 1))  # "a" again, newer than "b"
    history.now += EXPIRE_S - 15  # "b" silent past expiry, "a" not
    text = renderer.render()
    assert b'backup_id="b"' not in text and b'backup_id="a"' in text
    assert b"kafka_backup_exporter_expired_jobs 1.0\n" in text
    assert text == reference(history.published, history.now, **kwargs)[0]


def test_lag_bytes_follow_the_minute_without_a_state_change():
    """The last hour's record size moves as minutes pass: a segment leaving the hour changes lag_bytes."""
    history = History()
    kwargs = dict(stop_after_s=STOP_S, expire_after_s=EXPIRE_S)
    renderer = Renderer(StateCollector(lambda: history.published, WINDOW, clock=lambda: history.now, **kwargs))
    history.emit(0, lambda d, b: EVENTS[0](d, b, 1))
    history.emit(0, lambda d, b: EVENTS[3](d, b, 1))  # partition 1: 10 records, 1001 bytes
    history.now += 1800
    history.emit(0, lambda d, b: EVENTS[3](d, b, 4))  # partition 1: 10 records, 1004 bytes
    history.emit(0, lambda d, b: EVENTS[2](d, b, 1))  # partition 1: watermark 110, stored up to 50: lag 60
    seen = []
    for _ in range(3):  # both segments in the hour; the first one out; both out (the lifetime average)
        text = renderer.render()
        assert text == reference(history.published, history.now, **kwargs)[0]
        seen += [x for x in text.splitlines() if x.startswith(b"kafka_backup_lag_bytes{")]
        history.now += 1800
    line = 'kafka_backup_lag_bytes{{backup_id="a",partition="1",topic="t"}} {}'
    assert seen == [line.format(repr(60 * 2005 / 20)).encode(), line.format(repr(60 * (1004 / 10))).encode(),
                    line.format(repr(60 * 2005 / 20)).encode()]


def test_status_and_rates_follow_the_clock_without_a_state_change():
    """A running job silent past stop_after_s turns STOP; its rate window empties as seconds pass."""
    history = History()
    kwargs = dict(stop_after_s=STOP_S, expire_after_s=EXPIRE_S)
    renderer = Renderer(StateCollector(lambda: history.published, WINDOW, clock=lambda: history.now, **kwargs))
    history.emit(0, lambda d, b: EVENTS[0](d, b, 1))
    history.now += 100  # older than the window: the divisor is the window
    history.emit(0, lambda d, b: EVENTS[2](d, b, 30))  # 30 records in this second
    status, rate = [], []
    for step in (0.0, 30.0, 29.0, 2.0):  # at +0, +30, +59 (still in the window), +61 s: stopped, window empty
        history.now += step
        text = renderer.render()
        assert text == reference(history.published, history.now, **kwargs)[0]
        status += [x for x in text.splitlines() if x.startswith(b"kafka_backup_status{") and x.endswith(b" 1.0")]
        rate += [x.rpartition(b" ")[2] for x in text.splitlines()
                 if x.startswith(b"kafka_backup_throughput_records_per_sec{")]
    assert [x.split(b'kafka_backup_status="')[1][:4] for x in status] == [b"OK\"}", b"OK\"}", b"OK\"}", b"STOP"]
    assert rate == [repr(30 / WINDOW).encode()] * 3 + [b"0.0"]


def test_three_weeks_of_a_fleet_through_one_reusing_renderer():
    """The long-run simulation (jobs start, end, expire; shared series keep expired shares), rendered
    by one renderer that sees a new object only for a changed state, as the state reader hands them."""
    published: dict = {}
    encoded: dict[str, bytes] = {}
    clock = [T0]
    renderer = Renderer(StateCollector(lambda: published, clock=lambda: clock[0], expire_after_s=EXPIRE_AFTER_S))
    renders = 0
    for now, fleet in simulate(random.Random(11)):
        clock[0] = now
        for key, state in fleet.states.items():
            raw = encode_state(state)
            if encoded.get(key) != raw:
                encoded[key], published[key] = raw, decode_state(raw)
        if renders % 4 == 0:  # every 2 simulated hours: enough to cross every expiry
            registry = CollectorRegistry(auto_describe=False)
            registry.register(StateCollector(lambda: published, clock=lambda t=now: t, expire_after_s=EXPIRE_AFTER_S))
            assert renderer.render(openmetrics=True) == om_latest(registry), f"at +{now - T0:.0f} s"
        else:
            renderer.render(openmetrics=True)
        renders += 1


@given(st.one_of(st.integers(-(2**60), 2**60), st.floats(allow_nan=True, allow_infinity=True), st.booleans()))
def test_values_are_written_as_float_to_go_string_does(v):
    assert value(v) == floatToGoString(v)


def test_the_server_serves_the_renderers_bytes_and_prometheus_clients_for_dots_escaping():
    history = History()
    history.emit(0, lambda d, b: EVENTS[2](d, b, 5))
    collector = StateCollector(lambda: history.published, WINDOW, clock=lambda: history.now)
    server = MetricsServer("127.0.0.1", 0, "/metrics", collector, 0, lambda: True)
    try:
        text, om = reference(history.published, history.now)
        assert server.render("") == (text, CONTENT_TYPE_PLAIN_0_0_4)
        assert server.render("application/openmetrics-text")[0] == om
        dots = "application/openmetrics-text; version=1.0.0; escaping=dots"
        collected = _Collected(list(collector.collect()))
        assert server.render(dots)[0] == om_latest(collected, escaping="dots")
        assert b"kafka__backup__lag__records" in server.render(dots)[0]
    finally:
        server.shutdown()
