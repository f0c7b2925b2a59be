"""How far the aggregator is behind the telemetry topic: how late everything the exporter serves is.

``kafka_backup_exporter_state_age_seconds`` proves the exporter's copy of the state topic current.
A current copy of a state the aggregator stopped updating is still wrong: with the aggregator down
or stuck, every job's series freeze, and a while later every running backup looks silent (STOP),
paging as if the backups had stopped. So the exporter also asks the broker, every ``CHECK_S``, for
the telemetry topic's ends and the aggregator group's committed offsets. The aggregator commits a
record only once the state it changed is written, so end minus committed is what the served
numbers do not include yet (``kafka_backup_telemetry_lag_records``).

How long the oldest of those records has waited (``kafka_backup_telemetry_lag_seconds``) is read
from when each end was first seen, as Burrow and kafka-lag-exporter do: record ``c`` existed at the
first check whose end was past ``c``. That time is a lower bound (the record may have arrived up to
a check earlier), so an alert on it never fires early. The samples kept per partition are bounded:
when full, the newest is overwritten by the next one, which keeps every answer a lower bound.

The answers are served while the last check is recent (``SERVE_FOR_S``); when the broker cannot be
asked, the series disappear rather than age on their own (the exporter's state age says why).

Offsets are not contiguous: a transactional producer (MirrorMaker 2 with exactly-once, say) leaves
its commit and abort markers at offsets no consumer is handed, and the aggregator's commit stops one
short of a marker at the end of a partition until a record arrives past it. Counted as waiting, that
marker would page ``KafkaBackupAggregatorBehind`` for nothing. So when a partition's commit has not
moved since the last check and stands short of the end, the check asks the broker whether anything
between holds a record (once per range; a consumer reads from the commit), and offsets holding none
count as folded.

An exporter told another telemetry topic than its aggregator reads would see every record of that
topic as never folded, page ``KafkaBackupAggregatorBehind`` for nothing and hold the alerts that
judge silence. So when the group has committed nothing on the topic but has commits on others, the
check says so in one log line naming the setting, and serves no lag until the two agree.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from kafka_backup.exporter.background import Background
from kafka_backup.schemas.kafka_admin import client_config, close_admin, serve_logs
from kafka_backup.schemas.partition_reader import FirstRecords, first_record

log = logging.getLogger("kafka_backup.exporter")

CHECK_S = 2.0
TIMEOUT_S = 10.0
SERVE_FOR_S = 10 * CHECK_S
PROBE_GROUP = "kafka-backup-exporter-probe"  # assigned, never joined nor committed; within the exporter's ACL prefix
PROBE_RETRY_S = 60.0  # a range the broker did not answer about is asked again after this (or a new commit)
MAX_SAMPLES = 4096  # per partition: 2.3 hours of checks when the end moves at every one


class PartitionLag:
    """One telemetry partition: the ends seen (with when each was first seen) and what was folded."""

    __slots__ = ("folded", "records", "samples")

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()  # (first seen at, end), ends increasing
        self.records = 0
        self.folded = 0

    def observe(self, now: float, earliest: int, end: int, committed: int | None) -> None:
        """``committed`` None: the aggregator never committed (it has folded nothing that is kept)."""
        if self.samples and end < self.samples[-1][1]:
            self.samples.clear()  # the topic was recreated: what was seen says nothing any more
        if not self.samples or end > self.samples[-1][1]:
            if len(self.samples) < MAX_SAMPLES:
                self.samples.append((now, end))
            else:
                self.samples[-1] = (now, end)
        # records deleted by retention before the aggregator read them are not waiting any more
        self.folded = max(earliest, committed if committed is not None else earliest)
        while self.samples and self.samples[0][1] <= self.folded:
            self.samples.popleft()
        self.records = max(0, end - self.folded)

    def waiting_since(self) -> float | None:
        """When the oldest record not folded was known to exist (None: nothing waits)."""
        if not self.records or not self.samples:
            return None
        return self.samples[0][0]


class TelemetryLag(Background):
    """Asks the broker in a thread; :meth:`lags` is read at scrape time."""

    thread_name = "telemetry-lag"

    def __init__(self, bootstrap_servers: str, group: str, topic: str,
                 clock: Callable[[], float] = time.time,
                 probe: Callable[[int, int, int], int | None] | None = None) -> None:
        """``probe(partition, start, before)``: the first offset in [start, before) holding a record, or
        None (:func:`schemas.partition_reader.first_record` by default; tests hand in their own)."""
        super().__init__()
        self.group, self.topic = group, topic
        self._clock = clock
        self._probe = probe or (lambda p, start, before: first_record(bootstrap_servers, PROBE_GROUP, topic, p,
                                                                        start, before, TIMEOUT_S))
        self._probe_failing = False
        self._failed: dict[int, tuple[int, float]] = {}  # partition -> (commit, when to ask again about it)
        self._first = FirstRecords(self._asked)
        self._last_committed: dict[int, int | None] = {}
        self._conf = client_config(bootstrap_servers)
        self._partitions: dict[int, PartitionLag] = {}
        self._checked_at: float | None = None
        self._mismatch: set[str] | None = None  # the group's topics, when it commits on others only
        self._lock = threading.Lock()

    def lags(self, now: float) -> dict[int, tuple[int, float]]:
        """Per partition: records not folded and seconds the oldest has waited; empty when unknown."""
        with self._lock:
            if self._checked_at is None or now - self._checked_at > SERVE_FOR_S:
                return {}
            out = {}
            for p, lag in sorted(self._partitions.items()):
                since = lag.waiting_since()
                out[p] = (lag.records, 0.0 if since is None else max(0.0, now - since))
            return out

    def past_empty(self, ends: dict[int, int], committed: dict[int, int | None]) -> dict[int, int | None]:
        """``committed``, with each commit that stands still short of the end moved past the offsets after
        it that hold no record (transaction markers), as far as the first that holds one."""
        out, last, self._last_committed = dict(committed), self._last_committed, dict(committed)
        for p, c in committed.items():
            end = ends.get(p)
            if c is None or end is None or c >= end:
                continue
            failed = self._failed.get(p)
            # asked only once the commit stood still since the last check: a moving one waits for no marker
            ask = last.get(p) == c and (failed is None or failed[0] != c or self._clock() >= failed[1])
            try:
                out[p] = self._first.first(p, c, end, ask)
            except KafkaException as err:  # counted as waiting, as before: the lag may page for nothing
                self._failed[p] = (c, self._clock() + PROBE_RETRY_S)
                if not self._probe_failing:
                    code = err.args[0].code() if err.args and isinstance(err.args[0], KafkaError) else None
                    fix = (": allow the exporter Read on the telemetry topic (docs/security.md)"
                           if code == KafkaError.TOPIC_AUTHORIZATION_FAILED else "")
                    log.warning("telemetry lag: cannot read %s partition %d to tell transaction markers from "
                                "records (%s); offsets after the aggregator's commit count as waiting%s",
                                self.topic, p, err, fix)
                self._probe_failing = True
                out[p] = self._first.first(p, c, end, ask=False)
        return out

    def _asked(self, partition: int, start: int, before: int) -> int | None:
        """The probe, through :class:`FirstRecords`: an answer ends a failing spell."""
        first = self._probe(partition, start, before)
        self._probe_failing = False
        self._failed.clear()
        return first

    def observe(self, now: float, earliest: dict[int, int], ends: dict[int, int],
                committed: dict[int, int | None]) -> None:
        """One check's answers (the thread's, or a test's)."""
        with self._lock:
            for p in list(self._partitions):
                if p not in ends:
                    del self._partitions[p]
            for p, end in ends.items():
                self._partitions.setdefault(p, PartitionLag()).observe(
                    now, earliest.get(p, 0), end, committed.get(p))
            self._checked_at = now

    def forget(self) -> None:
        """Serve nothing until the next check that is answered and counts."""
        with self._lock:
            self._partitions.clear()
            self._checked_at = None

    # ---- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        admin = AdminClient(self._conf)
        failing = False
        try:
            while not self._stop.is_set():
                try:
                    self._check(admin)
                    failing = False
                except KafkaException as err:
                    if not failing:  # once per outage; the series disappear after SERVE_FOR_S
                        log.warning("telemetry lag: cannot ask the broker about %s (%s); retrying every %.0f s",
                                    self.topic, err, CHECK_S)
                    failing = True
                serve_logs(admin)
                self._stop.wait(CHECK_S)
        finally:
            close_admin(admin)  # stopped: destroyed before the interpreter goes (stop() waits for it)

    def _check(self, admin: AdminClient) -> None:
        meta = admin.list_topics(self.topic, timeout=TIMEOUT_S).topics.get(self.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return  # no telemetry topic yet: nothing waits
        tps = [TopicPartition(self.topic, p) for p in sorted(meta.partitions)]
        earliest = _offsets(admin, tps, OffsetSpec.earliest())
        ends = _offsets(admin, tps, OffsetSpec.latest())
        seen = self._clock()  # every record below these ends existed by now (a lower bound of its wait)
        group_commits = _committed(admin, self.group)  # every topic's: a group reading another says so
        committed: dict[int, int | None] = {p: offset for (topic, p), offset in group_commits.items()
                                            if topic == self.topic}
        others = set() if committed else {topic for topic, _ in group_commits}
        if others:
            if others != self._mismatch:  # once, and again if what the group reads changes
                log.error("telemetry lag: the aggregator group %r has committed offsets on %s but none on %r: "
                          "set telemetry.topic (--telemetry-topic) to the topic the aggregator reads; no "
                          "telemetry lag is served until then", self.group, ", ".join(sorted(others)),
                          self.topic)
            self._mismatch = others
            self.forget()
            return
        if self._mismatch is not None:
            log.info("telemetry lag: the aggregator group %r now commits on %r", self.group, self.topic)
            self._mismatch = None
        self.observe(seen, earliest, ends, self.past_empty(ends, committed))


def _committed(admin: AdminClient, group: str) -> dict[tuple[str, int], int]:
    """``group``'s committed offsets, on every topic: (topic, partition) -> offset."""
    answer = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)], request_timeout=TIMEOUT_S)
    return {(tp.topic, tp.partition): tp.offset for tp in answer[group].result(TIMEOUT_S).topic_partitions or []
            if tp.error is None and tp.offset >= 0}


def _offsets(admin: AdminClient, tps: list[TopicPartition], spec: OffsetSpec) -> dict[int, int]:
    futures = admin.list_offsets({tp: spec for tp in tps}, request_timeout=TIMEOUT_S)
    return {tp.partition: future.result(TIMEOUT_S).offset for tp, future in futures.items()}
