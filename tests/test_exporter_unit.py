"""Exporter without a broker: hand-made state in, parsed exposition out, numbers checked exactly."""

from __future__ import annotations

import gzip
import logging
import socket
import threading
import urllib.error
import urllib.request

import msgspec
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families as prom_parse
from prometheus_client.registry import CollectorRegistry

from kafka_backup.exporter import collector as col
from kafka_backup.exporter import server as server_module
from kafka_backup.exporter.collector import StateCollector
from kafka_backup.exporter.main import run
from kafka_backup.exporter.server import MetricsServer, serve
from kafka_backup.exporter.state_reader import CatchUp, RepeatFilter, StateReader
from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.config import Config, ConfigError, load
from kafka_backup.schemas.state import (
    STATE_VERSION,
    Compressed,
    Consumed,
    Histogram,
    JobRate,
    JobState,
    PartitionState,
    PipelineState,
    RateSample,
    SizeSample,
    encode_state,
    pipeline_key,
)
from kafka_backup.streams import fold
from tests.conftest import FakeMessage

NOW = 1_700_000_040.0  # a whole minute: now_minute = NOW // 60
NOW_MIN = int(NOW // 60)
SEC = int(NOW)
WINDOW = 60


# ---- fixtures -------------------------------------------------------------------------------


def hist(values, buckets):
    h = Histogram.empty(buckets)
    for v in values:
        h.observe(v, buckets)
    return h


def backup_b1() -> JobState:
    partitions = {
        # lag = 1400 - max(400, 500) = 900; last-hour avg size = (30000 + 20000) / (300 + 100) = 125
        "orders/0": PartitionState(
            topic="orders", partition=0, committed=400, high_watermark=1400, stored_next_offset=500,
            newest_stored_ts=1_000_000, newest_available_ts=1_004_500, records=500, bytes=1_000_000,
            last_commit_ts=NOW - 5,
            sizes=[SizeSample(NOW_MIN - 90, 100, 999_999), SizeSample(NOW_MIN - 30, 300, 30_000),
                   SizeSample(NOW_MIN - 1, 100, 20_000)],
        ),
        "orders/1": PartitionState(topic="orders", partition=1, committed=2000, high_watermark=2000),
        # never committed: lag = 300 - 0; no sample in the last hour, so lifetime avg 1000 / 10 = 100
        "orders/2": PartitionState(
            topic="orders", partition=2, high_watermark=300, records=10, bytes=1000,
            sizes=[SizeSample(NOW_MIN - 60, 10, 1000)],
        ),
        "payments/0": PartitionState(topic="payments", partition=0, committed=5),  # watermark unknown
    }
    return JobState(
        kind="backup", job="b1", started_ts=NOW - 30, records=510, bytes=1_001_000, fetches=40,
        consumed={"orders": Consumed(5000, 500_000), "payments": Consumed(7, 700)},
        partitions=partitions,
        rates=[
            RateSample(SEC - 70, "orders", 1000, 100_000),  # outside the window
            RateSample(SEC - 20, "orders", 90, 9000),
            RateSample(SEC - 5, "orders", 30, 3000),
        ],
        job_rates=[JobRate(SEC - 5, fetches=12)],
        durations={"success": hist([0.5, 10, 12, 5000], cat.BACKUP_DURATION.buckets)},
        storage_latency={"write|s3|segment": hist([0.02, 0.3], cat.STORAGE_WRITE_LATENCY.buckets)},
        storage_bytes={"write|s3": 5000},
        storage_errors={"s3|timeout": 2, "file|auth": 1},
        compression={"zstd": Compressed(1000, 4500), "none": Compressed(0, 0)},
        errors={"storage_io": 3},
        retries={"write": 2},
        rebalances=4,
        dropped={"i1": 5, "i2": 7},
    )


def snapshot() -> dict:
    return {
        "backup:b1": backup_b1(),
        "backup:b2": JobState(kind="backup", job="b2", started_ts=NOW - 3600, consumed={"t": Consumed(60, 600)},
                              rates=[RateSample(SEC - 10, "t", 60, 600)]),
        "restore:r1": JobState(
            kind="restore", job="r1", backup_id="b1",
            storage_latency={"write|s3|segment": hist([20], cat.STORAGE_WRITE_LATENCY.buckets),
                             "read|s3|segment": hist([0.07], cat.STORAGE_READ_LATENCY.buckets)},
            storage_bytes={"read|s3": 7000}, storage_errors={"s3|timeout": 1},
            errors={"codec": 9},  # a restore's errors are its own
        ),
        "restore:r2": JobState(kind="restore", job="r2", backup_id="b1", storage_bytes={"read|s3": 1000}),
        "restore:r3": JobState(kind="restore", job="r3", storage_bytes={"read|file": 10}),
        pipeline_key(0): PipelineState(partition=0, invalid={"bad_key": 2}),
        pipeline_key(1): PipelineState(partition=1, invalid={"bad_key": 1, "unknown_type": 4}),
    }


def registry_for(snap) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(lambda: snap, WINDOW, clock=lambda: NOW))
    return registry


def samples(text: str, parser) -> dict:
    out = {}
    for family in parser(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def both(snap) -> list[dict]:
    """Parse both formats (OpenMetrics strictly) so each assertion covers both."""
    registry = registry_for(snap)
    prom = samples(generate_latest(registry).decode(), prom_parse)
    om = samples(om_generate_latest(registry).decode(), om_parse)
    return [prom, om]


def get(values: dict, metric: cat.Metric, suffix: str = "", **labels):
    name = metric.name if metric.type != "counter" else metric.family_name + "_total"
    return values.get((name + suffix, tuple(sorted(labels.items()))))


@pytest.fixture(scope="module")
def parsed():
    return both(snapshot())


# ---- lag ------------------------------------------------------------------------------------


def test_lag_records_bytes_seconds(parsed):
    for v in parsed:
        assert get(v, cat.LAG_RECORDS, topic="orders", partition="0", backup_id="b1") == 1400 - 500
        assert get(v, cat.LAG_RECORDS, topic="orders", partition="1", backup_id="b1") == 0
        assert get(v, cat.LAG_RECORDS, topic="orders", partition="2", backup_id="b1") == 300
        assert get(v, cat.LAG_RECORDS, topic="payments", partition="0", backup_id="b1") is None
        assert get(v, cat.LAG_BYTES, topic="orders", partition="0", backup_id="b1") == 900 * 50_000 / 400
        assert get(v, cat.LAG_BYTES, topic="orders", partition="1", backup_id="b1") == 0
        assert get(v, cat.LAG_BYTES, topic="orders", partition="2", backup_id="b1") == 300 * 100
        assert get(v, cat.LAG_SECONDS, topic="orders", partition="0", backup_id="b1") == 4.5
        assert get(v, cat.LAG_SECONDS, topic="orders", partition="1", backup_id="b1") == 0
        assert get(v, cat.LAG_SECONDS, topic="orders", partition="2", backup_id="b1") is None
        assert get(v, cat.LAG_RECORDS_MAX, backup_id="b1") == 900
        assert get(v, cat.LAG_RECORDS_MAX, backup_id="b2") is None  # no partitions


def test_lag_with_no_records_at_all_has_zero_bytes():
    p = PartitionState(topic="t", partition=0, committed=0, high_watermark=10)
    assert col.avg_record_size(p, NOW) == 0.0


# ---- throughput and totals ------------------------------------------------------------------


def test_throughput_over_window_since_start(parsed):
    for v in parsed:
        # b1 started 30 s ago: two in-window samples / 30 s
        assert get(v, cat.THROUGHPUT_RECORDS, backup_id="b1", topic="orders") == (90 + 30) / 30
        assert get(v, cat.THROUGHPUT_BYTES, backup_id="b1", topic="orders") == (9000 + 3000) / 30
        assert get(v, cat.THROUGHPUT_RECORDS, backup_id="b1", topic="payments") == 0
        assert get(v, cat.FETCH_RATE, backup_id="b1") == 12 / 30
        # b2 started an hour ago: the full window
        assert get(v, cat.THROUGHPUT_RECORDS, backup_id="b2", topic="t") == 60 / WINDOW
        assert get(v, cat.FETCH_RATE, backup_id="b2") == 0


def test_rate_divisor_edges():
    view = col.View(now=NOW, window=WINDOW)
    assert col.rate_divisor(JobState(kind="backup", job="x"), view) == WINDOW
    assert col.rate_divisor(JobState(kind="backup", job="x", started_ts=NOW - 0.2), view) == 1.0


def test_counters(parsed):
    for v in parsed:
        assert get(v, cat.RECORDS_TOTAL, backup_id="b1") == 510
        assert get(v, cat.BYTES_TOTAL, backup_id="b1") == 1_001_000
        assert get(v, cat.CONSUMED_RECORDS_TOTAL, backup_id="b1", topic="orders") == 5000
        assert get(v, cat.CONSUMED_BYTES_TOTAL, backup_id="b1", topic="payments") == 700
        assert get(v, cat.FETCHES_TOTAL, backup_id="b1") == 40
        assert get(v, cat.ERRORS_TOTAL, backup_id="b1", error_type="storage_io") == 3
        assert get(v, cat.ERRORS_TOTAL, backup_id="r1", error_type="codec") is None
        assert get(v, cat.ERRORS_TOTAL, backup_id="b1", error_type="codec") is None  # the restore's, not b1's
        assert get(v, cat.RESTORE_ERRORS_TOTAL, restore_id="r1", error_type="codec") == 9
        assert get(v, cat.RETRIES_TOTAL, backup_id="b1", operation="write") == 2
        assert get(v, cat.REBALANCES_TOTAL, backup_id="b1") == 4
        assert get(v, cat.LAST_SUCCESSFUL_COMMIT, backup_id="b1", topic="orders", partition="0") == NOW - 5
        assert get(v, cat.LAST_SUCCESSFUL_COMMIT, backup_id="b1", topic="orders", partition="1") is None


def test_telemetry_counters(parsed):
    for v in parsed:
        assert get(v, cat.TELEMETRY_DROPPED, kind="backup", job_id="b1") == 12
        assert get(v, cat.TELEMETRY_DROPPED, kind="restore", job_id="r1") == 0
        assert get(v, cat.TELEMETRY_INVALID, reason="bad_key") == 3
        assert get(v, cat.TELEMETRY_INVALID, reason="unknown_type") == 4


# ---- histograms, storage, compression -------------------------------------------------------


def test_duration_histogram_is_cumulative(parsed):
    expected = {"1.0": 1, "5.0": 1, "15.0": 3, "30.0": 3, "60.0": 3, "120.0": 3, "300.0": 3,
                "600.0": 3, "1800.0": 3, "3600.0": 3, "+Inf": 4}
    for v in parsed:
        for le, n in expected.items():
            assert get(v, cat.BACKUP_DURATION, "_bucket", backup_id="b1", status="success", le=le) == n
        assert get(v, cat.BACKUP_DURATION, "_count", backup_id="b1", status="success") == 4
        assert get(v, cat.BACKUP_DURATION, "_sum", backup_id="b1", status="success") == 5022.5


def test_storage_latency_summed_over_all_jobs(parsed):
    # b1 wrote 0.02 and 0.3, restore r1 wrote 20 (+Inf)
    expected = {"0.01": 0, "0.05": 1, "0.1": 1, "0.25": 1, "0.5": 2, "1.0": 2, "2.5": 2, "5.0": 2,
                "10.0": 2, "+Inf": 3}
    for v in parsed:
        for le, n in expected.items():
            assert get(v, cat.STORAGE_WRITE_LATENCY, "_bucket", backend="s3", operation="segment", le=le) == n
        assert get(v, cat.STORAGE_WRITE_LATENCY, "_sum", backend="s3", operation="segment") == pytest.approx(20.32)
        assert get(v, cat.STORAGE_READ_LATENCY, "_bucket", backend="s3", operation="segment", le="0.05") == 0
        assert get(v, cat.STORAGE_READ_LATENCY, "_bucket", backend="s3", operation="segment", le="0.1") == 1


def test_storage_bytes_and_errors(parsed):
    for v in parsed:
        assert get(v, cat.STORAGE_WRITE_BYTES, backend="s3", backup_id="b1") == 5000
        assert get(v, cat.STORAGE_READ_BYTES, backend="s3", backup_id="b1") == 7000 + 1000  # two restores of b1
        assert get(v, cat.STORAGE_READ_BYTES, backend="file", backup_id="r3") == 10  # no backup_id: job id
        assert get(v, cat.STORAGE_ERRORS, backend="s3", error_type="timeout") == 3
        assert get(v, cat.STORAGE_ERRORS, backend="file", error_type="auth") == 1


def test_compression(parsed):
    for v in parsed:
        assert get(v, cat.COMPRESSION_RATIO, algorithm="zstd", backup_id="b1") == 4.5
        assert get(v, cat.COMPRESSION_RATIO, algorithm="none", backup_id="b1") is None
        assert get(v, cat.COMPRESSED_BYTES, algorithm="zstd", backup_id="b1") == 1000
        assert get(v, cat.UNCOMPRESSED_BYTES, algorithm="zstd", backup_id="b1") == 4500
        assert get(v, cat.COMPRESSED_BYTES, algorithm="none", backup_id="b1") == 0


def test_histogram_with_foreign_buckets_is_skipped():
    job = JobState(kind="backup", job="x", durations={"success": Histogram(counts=[1, 2], sum=3, count=3)})
    for v in both({"backup:x": job}):
        assert get(v, cat.BACKUP_DURATION, "_count", backup_id="x", status="success") is None


# ---- the exposition as a whole --------------------------------------------------------------


def test_every_handled_family_appears_even_when_empty():
    text = generate_latest(registry_for({})).decode()
    om_text = om_generate_latest(registry_for({})).decode()
    names = {f.name for f in prom_parse(text)}
    om_names = {f.name for f in om_parse(om_text)}
    for m in col.BUILDERS:
        assert (m.name if m.type == "info" else m.family_name) in names  # the text format has no info type
        assert m.family_name in om_names
        assert f"# HELP {m.family_name} " in om_text


def test_names_units_and_types_come_from_the_catalogue():
    om_text = om_generate_latest(registry_for(snapshot())).decode()
    assert "_total_total" not in om_text
    assert "_total_total" not in generate_latest(registry_for(snapshot())).decode()
    families = {f.name: f for f in om_parse(om_text)}
    for m in col.BUILDERS:
        family = families[m.family_name]
        assert family.type == m.type
        assert family.documentation == m.help
        assert family.unit == m.om_unit
    for s in (s for f in families.values() for s in f.samples):
        assert not s.name.endswith("_total_total")


def test_builders_cover_known_catalogue_and_skip_unknown(monkeypatch):
    assert set(col.BUILDERS) <= set(cat.CATALOGUE)
    future = cat.Metric("kafka_backup_restore_records_total", "counter", "records", "future", ("restore_id",))
    monkeypatch.setattr(cat, "CATALOGUE", [*cat.CATALOGUE, future])
    names = {f.name for f in prom_parse(generate_latest(registry_for(snapshot())).decode())}
    assert future.family_name not in names
    assert cat.LAG_RECORDS.family_name in names


def test_a_failing_builder_costs_only_its_family(monkeypatch, caplog):
    def broken(view):
        raise ZeroDivisionError

    monkeypatch.setitem(col.BUILDERS, cat.LAG_RECORDS, broken)
    counters = col.EndpointCounters()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(snapshot, WINDOW, clock=lambda: NOW, endpoint=counters))
    with caplog.at_level(logging.ERROR, logger="kafka_backup.exporter"):
        for scrape in (1, 2, 3):
            v = samples(generate_latest(registry).decode(), prom_parse)
            assert get(v, cat.LAG_RECORDS, topic="orders", partition="0", backup_id="b1") is None
            assert get(v, cat.RECORDS_TOTAL, backup_id="b1") == 510
            failed = v.get((cat.EXPORTER_FAILED_BUILDS.family_name + "_total", (("metric", cat.LAG_RECORDS.name),)))
            assert failed == scrape  # this scrape's failure too
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and cat.LAG_RECORDS.name in tracebacks[0].getMessage()
    assert tracebacks[0].exc_info[0] is ZeroDivisionError


def test_state_folded_from_events():
    """The same numbers when the state comes from the real fold rather than by hand."""
    base = dict(worker="w1", kind="backup", job="fb")
    events = [
        ev.JobStarted(seq=1, ts=NOW - 20, **base),
        ev.SegmentStored(seq=2, ts=NOW - 15, topic="t", partition=0, start_offset=0, end_offset=100,
                         records=100, bytes=4000, uncompressed_bytes=5000, stored_bytes=2000, algorithm="zstd",
                         max_ts=1_000_000, **base),
        ev.Progress(seq=3, ts=NOW - 10, partitions=[ev.PartitionProgress("t", 0, 100, 250, 1_000_000, 1_003_000)],
                    consumed=[ev.TopicConsumed("t", 250, 10_000)], fetches=5, **base),
    ]
    state = None
    for e in events:
        state = fold.apply(state, e)
    for v in both({ev.event_key("backup", "fb"): state}):
        assert get(v, cat.LAG_RECORDS, topic="t", partition="0", backup_id="fb") == 150
        assert get(v, cat.LAG_BYTES, topic="t", partition="0", backup_id="fb") == 150 * 40
        assert get(v, cat.LAG_SECONDS, topic="t", partition="0", backup_id="fb") == 3.0
        assert get(v, cat.THROUGHPUT_RECORDS, backup_id="fb", topic="t") == 250 / 20
        assert get(v, cat.FETCH_RATE, backup_id="fb") == 5 / 20
        assert get(v, cat.COMPRESSION_RATIO, algorithm="zstd", backup_id="fb") == 2.5
        assert get(v, cat.RECORDS_TOTAL, backup_id="fb") == 100


# ---- state reader (no broker: records are applied directly) ---------------------------------


def test_reader_keeps_latest_value_and_honours_tombstones():
    reader = StateReader("127.0.0.1:1", "unit")
    assert reader.changes() == 0
    reader.apply(b"backup:a", encode_state(JobState(kind="backup", job="a", records=1)))
    reader.apply(b"backup:a", encode_state(JobState(kind="backup", job="a", records=2)))
    reader.apply(b"backup:b", encode_state(JobState(kind="backup", job="b")))
    reader.apply(pipeline_key(3).encode(), encode_state(PipelineState(partition=3, invalid={"x": 1})))
    reader.apply(b"backup:b", None)
    assert reader.changes() == 5  # every record applied, a tombstone too: the endpoint re-renders
    snap = reader.snapshot()
    assert snap["backup:a"].records == 2
    assert "backup:b" not in snap
    assert snap[pipeline_key(3)] == PipelineState(partition=3, invalid={"x": 1})
    assert reader.topic == "unit-jobs-changelog"
    assert not reader.ready.is_set()


def test_reader_counts_undecodable_values_by_reason_and_keeps_going(caplog):
    reader = StateReader("127.0.0.1:1", "unit")
    newer = STATE_VERSION + 1
    with caplog.at_level(logging.WARNING, logger="kafka_backup.exporter"):
        reader.apply(b"backup:a", encode_state(JobState(kind="backup", job="a", records=1)))
        reader.apply(b"backup:a", b"\xc1not msgpack")
        reader.apply(b"backup:c", msgspec.msgpack.encode({"kind": 3}))
        reader.apply(None, b"")
        reader.apply(b"backup:a", encode_state(JobState(kind="backup", job="a", v=newer, records=9)))
        reader.apply(b"backup:d", encode_state(JobState(kind="backup", job="d", v=newer)))
    assert reader.undecodable_counts() == {"malformed": 2, "no_key": 1, "newer_version": 2}
    assert reader.undecodable == 5
    assert reader.snapshot()["backup:a"].records == 1  # the last value it could read
    assert "backup:c" not in reader.snapshot() and "backup:d" not in reader.snapshot()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # one per reason (and version), whatever the count
    [newer_line] = [line for line in lines if "newer_version" in line]
    assert f"version {newer}," in newer_line and "upgrade the exporter" in newer_line and "backup:a" in newer_line
    assert "\n" not in newer_line

    counters = col.EndpointCounters()
    counters.undecodable = reader.undecodable_counts
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(reader.snapshot, WINDOW, clock=lambda: NOW, endpoint=counters))
    v = samples(generate_latest(registry).decode(), prom_parse)
    assert get(v, cat.EXPORTER_UNDECODABLE_STATE, reason="newer_version") == 2
    assert get(v, cat.EXPORTER_UNDECODABLE_STATE, reason="malformed") == 2
    assert get(v, cat.EXPORTER_UNDECODABLE_STATE, reason="no_key") == 1


def test_a_consumer_that_goes_back_never_serves_an_older_state(caplog):
    """librdkafka resets a position the broker calls out of range to the partition's start: the records read
    again are older states of jobs the copy holds newer ones of. Applied, every counter of those jobs would
    fall until the newer state came round again (a reset to Prometheus). They are skipped, logged once."""
    reader = StateReader("127.0.0.1:1", "unit")
    catch_up = CatchUp({0: 3}, positions={})
    states = [encode_state(JobState(kind="backup", job="a", records=n)) for n in (1, 2, 3, 4)]
    topic = reader.topic
    for offset in range(3):
        reader._handle(FakeMessage(topic, 0, offset, b"backup:a", states[offset]), catch_up)
    assert catch_up.done and reader.snapshot()["backup:a"].records == 3
    with caplog.at_level(logging.WARNING, logger="kafka_backup.exporter"):
        for offset in range(3):  # read again from the start
            reader._handle(FakeMessage(topic, 0, offset, b"backup:a", states[offset]), catch_up)
            assert reader.snapshot()["backup:a"].records == 3
    assert [r.getMessage() for r in caplog.records] == [
        "state topic unit-jobs-changelog: partition 0 read again from offset 0, behind the 3 records the copy "
        "holds; skipping what it holds (a consumer position reset)"]
    reader._handle(FakeMessage(topic, 0, 3, b"backup:a", states[3]), catch_up)  # then on, as before
    assert reader.snapshot()["backup:a"].records == 4 and reader.changes() == 4


def test_a_state_topic_made_again_is_read_again_from_its_start(caplog):
    """A partition now ending before what the copy read (the topic deleted and made again): the copy is
    dropped (/metrics answers 503 until it is read again), and the next session starts from the beginning."""

    class Ends:
        def get_watermark_offsets(self, tp, timeout, cached):
            return 0, {0: 2, 1: 9}[tp.partition]

    reader = StateReader("127.0.0.1:1", "unit")
    catch_up = CatchUp({0: 5, 1: 9}, positions={})
    state = encode_state(JobState(kind="backup", job="a"))
    for offset in range(5):
        reader._handle(FakeMessage(reader.topic, 0, offset, b"backup:a", state), catch_up)
    reader._positions[1] = 9
    reader.ready.set()
    reader.current_at = 1.0
    with caplog.at_level(logging.WARNING, logger="kafka_backup.exporter"):
        assert reader._check_current(Ends(), [0, 1]) is False
    assert reader.snapshot() == {} and reader._positions == {} and not reader.ready.is_set()
    assert reader.current_at is None
    assert [r.getMessage() for r in caplog.records] == [
        "state topic unit-jobs-changelog: partition 0 ends at offset 2, before the 5 records read from it (the "
        "topic was deleted and made again, or truncated); reading it again from the start"]
    reader._positions.update({0: 2, 1: 9})
    assert reader._check_current(Ends(), [0, 1]) is True and reader.current_at is not None


def test_fold_failures_are_their_own_metric_not_invalid_telemetry():
    snap = {pipeline_key(0): PipelineState(partition=0, invalid={"bad_key": 2}, failures={"KeyError": 3}),
            pipeline_key(1): PipelineState(partition=1, failures={"KeyError": 1, "TypeError": 1})}
    for v in both(snap):
        assert get(v, cat.TELEMETRY_FOLD_FAILURES, exception="KeyError") == 4
        assert get(v, cat.TELEMETRY_FOLD_FAILURES, exception="TypeError") == 1
        assert get(v, cat.TELEMETRY_INVALID, reason="bad_key") == 2
        assert [k for k in v if k[0].startswith(cat.TELEMETRY_INVALID.family_name)] == [
            (cat.TELEMETRY_INVALID.family_name + "_total", (("reason", "bad_key"),))]


def test_catch_up_tracks_start_time_ends():
    c = CatchUp({0: 10, 1: 0, 2: 5}, positions={2: 5})
    assert not c.done
    c.advance(0, 9)
    assert not c.done
    c.advance(0, 10)
    assert c.done
    c = CatchUp({0: 10}, positions={})
    c.eof(0)
    assert c.done
    assert CatchUp({}, positions={}).done


def test_repeated_librdkafka_lines_are_throttled():
    f = RepeatFilter(every_s=3600)

    def rec(msg):
        return logging.LogRecord("x", logging.ERROR, "", 0, msg, (), None)

    assert f.filter(rec("connect failed"))
    assert not f.filter(rec("connect failed"))
    assert f.filter(rec("something else"))


# ---- HTTP server ----------------------------------------------------------------------------


class FakeReader:
    def __init__(self, snap):
        self.ready = threading.Event()
        self._snap = snap

    def snapshot(self):
        return self._snap


def http_get(url: str, accept: str | None = None):
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


@pytest.fixture
def server():
    reader = FakeReader(snapshot())
    cfg = load(overrides={"metrics.port": 0, "metrics.bind": "127.0.0.1"})
    srv = serve(cfg, reader)
    reader.ready.set()
    yield srv, reader, f"http://127.0.0.1:{srv.port}"
    srv.shutdown()


def test_server_negotiates_openmetrics(server):
    _, _, base = server
    status, ctype, body = http_get(base + "/metrics", "application/openmetrics-text;version=1.0.0")
    assert status == 200
    assert ctype.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    assert {f.name for f in om_parse(body)} >= {m.family_name for m in col.BUILDERS}


def test_server_defaults_to_prometheus_text(server):
    _, _, base = server
    for accept in (None, "text/plain", "*/*"):
        status, ctype, body = http_get(base + "/metrics", accept)
        assert status == 200
        assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
        assert "# EOF" not in body
        values = samples(body, prom_parse)
        assert get(values, cat.RECORDS_TOTAL, backup_id="b1") == 510


def test_server_health_and_404(server):
    _, reader, base = server
    reader.ready.clear()
    assert http_get(base + "/health")[0::2] == (503, "catching up\n")
    reader.ready.set()
    assert http_get(base + "/health")[0::2] == (200, "ok\n")
    assert http_get(base + "/nope")[0] == 404


def test_metrics_answer_503_until_the_state_is_caught_up(server):
    """A half re-read state topic can hold older values of a key than a previous scrape saw."""
    _, reader, base = server
    reader.ready.clear()
    status, _, body = http_get(base + "/metrics")
    assert (status, body) == (503, "catching up with the state topic\n")
    reader.ready.set()
    assert http_get(base + "/metrics")[0] == 200


def test_render_is_cached_for_the_update_interval():
    snap = {}
    server = MetricsServer("127.0.0.1", 0, "/metrics", StateCollector(lambda: snap), 60_000, lambda: True)
    try:
        first, _ = server.render("")
        snap["backup:z"] = JobState(kind="backup", job="z", records=7)
        assert server.render("")[0] == first
        om_body, om_type = server.render("application/openmetrics-text")
        assert om_type.startswith("application/openmetrics-text") and b'backup_id="z"' in om_body
    finally:
        server.shutdown()


def test_a_changed_state_is_rendered_at_the_next_scrape(monkeypatch):
    """The cache holds a body for the interval only while the state reader has applied nothing new:
    otherwise a changelog write would show up to ``metrics.update_interval_ms`` late."""
    monkeypatch.setattr(server_module, "CHANGED_RENDER_S", 0.0)
    snap: dict = {}
    changes = [0]
    server = MetricsServer("127.0.0.1", 0, "/metrics", StateCollector(lambda: snap), 60_000, lambda: True,
                           changes_fn=lambda: changes[0])
    try:
        first = server.render("", gzipped=True)[0]
        snap["backup:z"] = JobState(kind="backup", job="z", records=7)
        assert server.render("", gzipped=True)[0] == first, "no change counted: the cached body"
        changes[0] += 1
        body = server.render("")[0]
        assert b'kafka_backup_records_total{backup_id="z"} 7.0' in body
        assert gzip.decompress(server.render("", gzipped=True)[0]) == body, "gzip of the new body, not the old"
    finally:
        server.shutdown()


def test_busy_port_is_a_config_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = load(overrides={"metrics.port": port, "kafka.bootstrap_servers": "127.0.0.1:1"})
        with pytest.raises(ConfigError, match=f"metrics.port: {port} is in use on 127.0.0.1"):
            run(cfg)


def test_missing_bootstrap_is_a_config_error():
    with pytest.raises(ConfigError, match="kafka.bootstrap_servers"):
        run(Config())


@pytest.mark.parametrize("settings,needle", [
    ({"metrics.tls_cert_file": "/x.pem"}, "metrics.tls_key_file: TLS needs both"),
    ({"metrics.tls_cert_file": "/nope.pem", "metrics.tls_key_file": "/nope.key"}, "metrics.tls_cert_file: cannot load"),
    ({"metrics.basic_auth_password_sha256": "ab" * 32}, "metrics.basic_auth_username: required"),
    ({"metrics.basic_auth_username": "u", "metrics.basic_auth_password_sha256": "xyz"}, "expected 64 hex digits"),
])
def test_endpoint_security_mistakes_are_one_line_config_errors(settings, needle):
    from kafka_backup.exporter.server import serve
    from kafka_backup.schemas.config import ConfigError, load

    class Reader:
        ready = threading.Event()

        def snapshot(self):
            return {}

    with pytest.raises(ConfigError) as err:
        serve(load(None, {"metrics.port": 0, **settings}), Reader())
    assert needle in str(err.value) and "\n" not in str(err.value)
