"""Three simulated weeks of a fleet through the real fold and the real collector.

Jobs start, end and expire (``metrics.expire_after_s``), scheduled backups run nightly,
restores of a backup come and go, storage calls fail, the exporter restarts (a new
collector over state decoded from bytes, as the state reader rebuilds it). Prometheus
reads any decrease of a counter-like sample (``_total``, ``_count``, ``_sum``, ``_bucket``)
as a reset, so ``rate()`` and ``increase()`` spike and alerts fire: none may ever fall.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from kafka_backup.exporter.collector import StateCollector
from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.state import JobState, decode_state, encode_state
from kafka_backup.streams import fold

T0 = 1_790_000_000.0
HOUR = 3600.0
DAY = 24 * HOUR
EXPIRE_AFTER_S = 2 * DAY
COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")


class Fleet:
    """Folds events the way the aggregator does and remembers the ground truth it can check."""

    def __init__(self) -> None:
        self.states: dict[str, JobState] = {}
        self.seq: dict[str, int] = {}
        self.write_calls = 0  # storage write calls of every job, ever: the exported _count must equal it
        self.storage_errors = 0
        self.write_bytes_of_c = 0  # storage bytes of "c" and of its restores, ever

    def emit(self, cls: type[ev.Event], ts: float, kind: str, job: str, instance: str, **fields) -> None:
        self.seq[instance] = self.seq.get(instance, 0) + 1
        event = cls(worker=instance, seq=self.seq[instance], ts=ts, kind=kind, job=job, **fields)
        key = ev.event_key(kind, job)
        state = fold.apply(self.states.get(key), event)
        if state is not None:
            self.states[key] = state

    def storage_write(self, ts: float, kind: str, job: str, instance: str, ok: bool) -> None:
        self.write_calls += 1
        if ok and (job == "c" or kind == "restore"):
            self.write_bytes_of_c += 1000
        outcome = "success" if ok else "timeout"
        self.emit(ev.StorageOp, ts, kind, job, instance, backend="s3", operation="segment", direction="write",
                  latency_s=0.2 if ok else 31.0, bytes=1000 if ok else 0, outcome=outcome)
        if not ok:
            self.storage_errors += 1
            self.emit(ev.ErrorRaised, ts, kind, job, instance, error_type="storage_io", transient=True,
                      backend="s3", storage_error="timeout")

    def run(self, ts: float, kind: str, job: str, instance: str, hours: float, status: str = "success",
            **started) -> None:
        """One run of a job: start, some storage traffic, end ``hours`` later."""
        self.emit(ev.JobStarted, ts, kind, job, instance, **started)
        for i in range(3):
            self.storage_write(ts + (i + 1) * hours * HOUR / 4, kind, job, instance, ok=i != 1)
        self.emit(ev.JobEnded, ts + hours * HOUR, kind, job, instance, status=status, duration_s=hours * HOUR)

    def snapshot(self) -> dict[str, JobState]:
        """What a (re)started exporter rebuilds from the state topic: the states' bytes, decoded."""
        return {key: decode_state(encode_state(s)) for key, s in self.states.items()}


def simulate(rng: random.Random) -> Iterator[tuple[float, Fleet]]:
    """Yield (now, fleet) every 30 simulated minutes over three weeks."""
    fleet = Fleet()
    end = T0 + 21 * DAY
    schedule: list[tuple[float, callable]] = []
    # a continuous backup "c" that lives throughout, reporting hourly
    fleet.emit(ev.JobStarted, T0, "backup", "c", "c-1", mode="continuous", recovery_point_objective_s=3600.0)
    for h in range(int(21 * 24)):
        ts = T0 + h * HOUR + 1
        schedule.append((ts, lambda ts=ts: fleet.storage_write(ts, "backup", "c", "c-1", ok=True)))
    # a nightly one-shot backup "n": one run a day, one failure among them
    for d in range(21):
        ts = T0 + d * DAY + 2 * HOUR
        status = "failure" if d == 9 else "success"
        schedule.append((ts, lambda ts=ts, d=d, status=status: fleet.run(
            ts, "backup", "n", f"n-{d}", 1.5, status, mode="one-shot", expected_interval_s=26 * HOUR)))
    # one-off jobs that end and expire: backups, restores of "c" (their storage traffic counts under "c")
    for i in range(12):
        ts = T0 + rng.uniform(0, 18 * DAY)
        schedule.append((ts, lambda ts=ts, i=i: fleet.run(ts, "backup", f"once-{i}", f"o-{i}", 0.5)))
        rts = T0 + (20.5 * DAY if i == 11 else rng.uniform(0, 18 * DAY))  # the last one is live at the end

        def restore(ts=rts, i=i) -> None:
            fleet.run(ts, "restore", f"r-{i}", f"r-{i}", 2.0, backup_id="c", total_records=10)
            fleet.emit(ev.ErrorRaised, ts + 60, "restore", f"r-{i}", f"r-{i}", error_type="codec", transient=False)

        schedule.append((rts, restore))
    # offset resets of one group, a job each time, expiring in between
    for i in range(5):
        ts = T0 + i * 4 * DAY + 5 * HOUR
        schedule.append((ts, lambda ts=ts, i=i: fleet.run(ts, "offset_reset", "g1", f"g1-{i}", 0.01)))
    schedule.sort(key=lambda item: item[0])
    now, k = T0, 0
    while now <= end:
        while k < len(schedule) and schedule[k][0] <= now:
            schedule[k][1]()
            k += 1
        yield now, fleet
        now += 1800


def render(snapshot: dict, now: float) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(lambda: snapshot, clock=lambda: now, expire_after_s=EXPIRE_AFTER_S))
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def counter_like(name: str) -> bool:
    return name.endswith(COUNTER_SUFFIXES)


def test_no_counter_ever_falls_over_three_weeks_of_jobs_expiring_and_exporter_restarts():
    previous: dict[tuple[str, tuple], float] = {}
    expired_seen = vanished = 0
    fleet = None
    for now, fleet in simulate(random.Random(11)):
        current = render(fleet.snapshot(), now)  # every render is a restarted exporter: no memory
        for key, value in current.items():
            if counter_like(key[0]) and key in previous:
                assert value >= previous[key], f"{key} fell from {previous[key]} to {value} at +{now - T0:.0f} s"
        vanished += sum(1 for key in previous if counter_like(key[0]) and key not in current)
        expired_seen = max(expired_seen, current[(cat.EXPORTER_EXPIRED_JOBS.name, ())])
        previous = current
    assert expired_seen >= 10, "the simulation must expire jobs, or it proves nothing"
    assert vanished > 0, "expired jobs' own series disappear (allowed)"
    # the shared series hold every job's share, expired ones included: exact ground truth
    write_count = previous[("kafka_backup_storage_write_latency_seconds_count",
                            (("backend", "s3"), ("operation", "segment")))]
    assert write_count == fleet.write_calls
    assert previous[("kafka_backup_storage_errors_total", (("backend", "s3"), ("error_type", "timeout")))] == (
        fleet.storage_errors)
    assert previous[("kafka_restore_errors_total", (("error_type", "codec"), ("restore_id", "r-11")))] == 1
    assert ("kafka_backup_errors_total", (("backup_id", "c"), ("error_type", "codec"))) not in previous
    read_bytes = previous[("kafka_backup_storage_write_bytes_total", (("backend", "s3"), ("backup_id", "c")))]
    assert read_bytes == fleet.write_bytes_of_c
    timeouts = previous[("kafka_backup_storage_call_duration_seconds_count", (
        ("backend", "s3"), ("direction", "write"), ("operation", "segment"), ("outcome", "timeout")))]
    assert timeouts == fleet.storage_errors


def test_a_shared_series_keeps_an_expired_jobs_share_and_disappears_with_its_last_live_job():
    fleet = Fleet()
    fleet.run(T0, "restore", "r1", "r1", 1.0, backup_id="b")
    fleet.run(T0 + 10 * HOUR, "restore", "r2", "r2", 1.0, backup_id="b")
    key = ("kafka_backup_storage_write_bytes_total", (("backend", "s3"), ("backup_id", "b")))
    both_live = render(fleet.snapshot(), T0 + 11 * HOUR)
    assert both_live[key] == 4000  # 2 successful writes of 1000 bytes per run
    r1_expired = render(fleet.snapshot(), T0 + 1 * HOUR + EXPIRE_AFTER_S + 1)
    assert r1_expired[(cat.EXPORTER_EXPIRED_JOBS.name, ())] == 1
    assert r1_expired[key] == 4000  # not 2000: that would be a counter reset
    all_expired = render(fleet.snapshot(), T0 + 11 * HOUR + EXPIRE_AFTER_S + 1)
    assert key not in all_expired
