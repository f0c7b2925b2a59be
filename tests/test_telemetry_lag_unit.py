"""How far the aggregator is behind, from the broker's answers (no broker: answers are handed in)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kafka_backup.exporter import telemetry_lag
from kafka_backup.exporter.collector import EndpointCounters, StateCollector
from kafka_backup.exporter.renderer import Renderer
from kafka_backup.exporter.telemetry_lag import PartitionLag, TelemetryLag
from kafka_backup.schemas import catalogue as cat


def test_records_are_end_minus_committed_and_seconds_the_oldest_wait():
    lag = TelemetryLag("127.0.0.1:1", "agg", "telemetry")
    lag.observe(100.0, {0: 0, 1: 0}, {0: 10, 1: 5}, {0: 10, 1: 5})
    assert lag.lags(100.0) == {0: (0, 0.0), 1: (0, 0.0)}
    lag.observe(102.0, {0: 0, 1: 0}, {0: 14, 1: 5}, {0: 10, 1: 5})  # offsets 10-13 arrived by 102
    lag.observe(104.0, {0: 0, 1: 0}, {0: 20, 1: 5}, {0: 12, 1: 5})  # 12 and 13 still wait
    assert lag.lags(105.0) == {0: (8, 3.0), 1: (0, 0.0)}
    lag.observe(106.0, {0: 0, 1: 0}, {0: 20, 1: 5}, {0: 14, 1: 5})  # the oldest waiting now arrived by 104
    assert lag.lags(106.0) == {0: (6, 2.0), 1: (0, 0.0)}
    lag.observe(108.0, {0: 0, 1: 0}, {0: 20, 1: 5}, {0: 20, 1: 5})
    assert lag.lags(108.0) == {0: (0, 0.0), 1: (0, 0.0)}


def test_a_stopped_aggregator_waits_longer_at_every_scrape():
    lag = TelemetryLag("127.0.0.1:1", "agg", "telemetry")
    lag.observe(100.0, {0: 0}, {0: 3}, {0: 3})
    for t in (102.0, 104.0, 106.0):
        lag.observe(t, {0: 0}, {0: 3 + int(t - 100)}, {0: 3})
    assert lag.lags(107.0) == {0: (6, 5.0)}  # offset 3 was first seen at 102
    assert lag.lags(110.0) == {0: (6, 8.0)}  # computed at the scrape, between checks too


def test_never_committed_and_deleted_by_retention_count_from_the_earliest_offset():
    part = PartitionLag()
    part.observe(10.0, earliest=0, end=7, committed=None)
    assert (part.records, part.waiting_since()) == (7, 10.0)
    part.observe(12.0, earliest=5, end=9, committed=2)  # 2-4 deleted before the aggregator read them
    assert part.records == 4


def test_a_recreated_topic_forgets_what_was_seen():
    part = PartitionLag()
    part.observe(10.0, 0, 100, 50)
    part.observe(12.0, 0, 3, None)
    assert (part.records, part.waiting_since()) == (3, 12.0)


def test_when_the_samples_are_full_the_answers_stay_lower_bounds(monkeypatch):
    monkeypatch.setattr(telemetry_lag, "MAX_SAMPLES", 3)
    part = PartitionLag()
    for t, end in ((1.0, 10), (2.0, 20), (3.0, 30), (4.0, 40), (5.0, 50)):
        part.observe(t, 0, end, 0)
    assert list(part.samples) == [(1.0, 10), (2.0, 20), (5.0, 50)]
    part.observe(6.0, 0, 50, 25)  # offset 25 existed by 3.0: the answer says 5.0, never earlier
    assert part.waiting_since() == 5.0


def test_partitions_gone_are_dropped_and_an_old_check_is_not_served():
    lag = TelemetryLag("127.0.0.1:1", "agg", "telemetry")
    assert lag.lags(0.0) == {}  # never asked
    lag.observe(100.0, {0: 0, 1: 0}, {0: 1, 1: 1}, {0: 0, 1: 1})
    lag.observe(102.0, {0: 0}, {0: 1}, {0: 0})
    assert lag.lags(102.0) == {0: (1, 2.0)}
    assert lag.lags(102.0 + telemetry_lag.SERVE_FOR_S) == {0: (1, 2.0 + telemetry_lag.SERVE_FOR_S)}
    assert lag.lags(102.1 + telemetry_lag.SERVE_FOR_S) == {}, "the broker cannot be asked: unknown, not aging"


def test_served_per_partition_in_both_formats_as_prometheus_client_would():
    lag = TelemetryLag("127.0.0.1:1", "agg", "telemetry")
    lag.observe(100.0, {0: 0, 1: 0}, {0: 4, 1: 2}, {0: 1, 1: 2})
    counters = EndpointCounters()
    counters.telemetry_lag = lag.lags
    collector = StateCollector(lambda: {}, clock=lambda: 101.5, endpoint=counters)
    text = Renderer(collector).render().decode()
    samples = {(s.name, s.labels.get("partition")): s.value
               for f in text_string_to_metric_families(text) for s in f.samples
               if s.name.startswith("kafka_backup_telemetry_lag")}
    assert samples == {
        (cat.TELEMETRY_LAG_RECORDS.name, "0"): 3, (cat.TELEMETRY_LAG_RECORDS.name, "1"): 0,
        (cat.TELEMETRY_LAG_SECONDS.name, "0"): 1.5, (cat.TELEMETRY_LAG_SECONDS.name, "1"): 0,
    }
    assert "kafka_backup_telemetry_lag_seconds" in Renderer(collector).render(openmetrics=True).decode()


class FakeAdmin:
    """What ``TelemetryLag._check`` asks an AdminClient, answered from dicts (``commits``: the group's
    committed offsets, ``{(topic, partition): offset}``)."""

    def __init__(self, ends: dict[str, dict[int, int]], commits: dict[tuple[str, int], int]) -> None:
        self.ends, self.commits = ends, commits

    @staticmethod
    def _done(value: object) -> object:
        from concurrent.futures import Future

        future: Future = Future()
        future.set_result(value)
        return future

    def list_topics(self, topic: str, timeout: float) -> object:
        from types import SimpleNamespace

        topics = {t: SimpleNamespace(error=None, partitions=dict.fromkeys(parts)) for t, parts in self.ends.items()}
        return SimpleNamespace(topics=topics)

    def list_offsets(self, specs: dict, request_timeout: float) -> dict:
        from types import SimpleNamespace

        latest = type(next(iter(specs.values()))).__name__ == "LatestSpec"
        return {tp: self._done(SimpleNamespace(offset=self.ends[tp.topic][tp.partition] if latest else 0))
                for tp in specs}

    def list_consumer_group_offsets(self, requests: list, request_timeout: float) -> dict:
        from types import SimpleNamespace

        from confluent_kafka import TopicPartition

        request = requests[0]
        asked = request.topic_partitions
        found = [TopicPartition(t, p, o) for (t, p), o in sorted(self.commits.items())
                 if asked is None or any((a.topic, a.partition) == (t, p) for a in asked)]
        return {request.group_id: self._done(SimpleNamespace(topic_partitions=found))}


def test_an_exporter_told_another_topic_than_the_aggregator_reads_serves_no_lag_and_says_so(caplog):
    """The aggregator group commits on ``kafka-backup.telemetry``; the exporter was told ``telemetry``:
    every record there would look unfolded and page for nothing. One error line naming the setting,
    no lag served; once the group commits on the topic, the lag is served again."""
    import logging

    lag = TelemetryLag("127.0.0.1:1", "agg", "telemetry", clock=lambda: 100.0)
    admin = FakeAdmin({"telemetry": {0: 7, 1: 3}}, {("kafka-backup.telemetry", 0): 40})
    with caplog.at_level(logging.INFO, logger="kafka_backup.exporter"):
        lag._check(admin)  # type: ignore[arg-type]
        lag._check(admin)  # type: ignore[arg-type]
    assert lag.lags(100.0) == {}
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "set telemetry.topic (--telemetry-topic)" in said[0]
    assert "'agg'" in said[0] and "kafka-backup.telemetry" in said[0] and "'telemetry'" in said[0]
    admin.commits[("telemetry", 0)] = 5  # the aggregator now reads the topic (or the exporter was fixed)
    lag._check(admin)  # type: ignore[arg-type]
    assert lag.lags(100.0) == {0: (2, 0.0), 1: (3, 0.0)}


def test_a_group_that_never_committed_anything_is_behind_by_every_record():
    """No commit anywhere: an aggregator that has not folded anything yet (or is not running), not a
    mismatch: every record waits, and the lag says so."""
    lag = TelemetryLag("127.0.0.1:1", "agg", "telemetry", clock=lambda: 100.0)
    lag._check(FakeAdmin({"telemetry": {0: 7}}, {}))  # type: ignore[arg-type]
    assert lag.lags(100.0) == {0: (7, 0.0)}


def test_offsets_after_a_standing_commit_that_hold_no_record_are_not_waiting():
    """A transaction's marker at the end: the commit stops one short of it until a record comes past it."""
    probed: list[tuple[int, int, int]] = []
    empty = {5, 6, 9}  # offsets that hold no record (markers); every other one holds one

    def probe(p: int, start: int, before: int) -> int | None:
        probed.append((p, start, before))
        return next((o for o in range(start, before) if o not in empty), None)

    lag = TelemetryLag("127.0.0.1:1", "agg", "telemetry", probe=probe)

    def check(t: float, end: int, commit: int) -> dict[int, tuple[int, float]]:
        lag.observe(t, {0: 0}, {0: end}, lag.past_empty({0: end}, {0: commit}))
        return lag.lags(t)

    assert check(100.0, 7, 5) == {0: (2, 0.0)}  # first sight of this commit: no question asked yet
    assert check(102.0, 7, 5) == {0: (0, 0.0)}  # it stood still: 5 and 6 hold no record
    assert check(104.0, 7, 5) == {0: (0, 0.0)}  # known: not asked again
    assert probed == [(0, 5, 7)]
    assert check(106.0, 9, 5) == {0: (2, 0.0)}  # 7 and 8 arrived, the commit did not move: 7 holds a record
    assert check(108.0, 9, 5) == {0: (2, 2.0)}  # a record waits: nothing asked while it does
    assert check(110.0, 10, 5) == {0: (3, 4.0)}
    assert probed == [(0, 5, 7), (0, 7, 9)]
    assert check(112.0, 10, 9) == {0: (1, 2.0)}  # folded up to the marker at 9, which arrived by 110
    assert check(114.0, 10, 9) == {0: (0, 0.0)}
    assert probed[-1] == (0, 9, 10)


def test_a_commit_that_keeps_moving_is_never_asked_about_and_a_failing_probe_leaves_the_lag_as_it_was():
    asked: list[int] = []

    def probe(p: int, start: int, before: int) -> int | None:
        asked.append(start)
        raise telemetry_lag.KafkaException("TOPIC_AUTHORIZATION_FAILED")

    now = [0.0]
    lag = TelemetryLag("127.0.0.1:1", "agg", "telemetry", clock=lambda: now[0], probe=probe)
    for t, commit in ((100.0, 1), (102.0, 2), (104.0, 3)):
        lag.observe(t, {0: 0}, {0: 10}, lag.past_empty({0: 10}, {0: commit}))
    assert asked == []
    lag.observe(106.0, {0: 0}, {0: 10}, lag.past_empty({0: 10}, {0: 3}))
    assert asked == [3] and lag.lags(106.0) == {0: (7, 6.0)}  # as without the question
    lag.observe(108.0, {0: 0}, {0: 10}, lag.past_empty({0: 10}, {0: 3}))
    assert asked == [3]  # not asked at every check: the probe reads, and may wait out its timeout
    for t in (110.0, 112.0):  # a new commit that stands still is asked about at once
        lag.observe(t, {0: 0}, {0: 10}, lag.past_empty({0: 10}, {0: 4}))
    assert asked == [3, 4]
    assert lag._failed == {0: (4, 60.0)}  # one entry per partition, however many commits failed
