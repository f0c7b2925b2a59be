"""Freshness of /metrics as the fleet grows: event time to exposition, through the real pipeline.

Starts the real aggregator and exporter (default settings: ``aggregator.flush_interval_ms``
200, ``metrics.update_interval_ms`` 500) and simulates N backup workers emitting the real
event mix at the real cadence: per worker a ``Progress`` over its 8 partitions every 500 ms
(one poll cycle), and every 5 s (``backup.flush_interval_ms``) a ``SegmentStored`` per
partition and an ``OffsetsCommitted``. The workers are not in step, as independent processes
are not: worker k of N polls at k/N of each cycle and flushes in a cycle of its own (until this
stop all N polled at the same instant and flushed in the same cycle: bursts of N records, and of
10 N events every 5 s, that no real fleet sends). N grows step by step (each step ``seconds`` long).

Latency of an event: scraping /metrics every 100 ms (the fourth argument), the first scrape at which a worker's
``kafka_backup_worker_last_seen_timestamp_seconds`` shows a new event time T gives an upper
bound (scrape time - T, within the scrape period) of how long that event took to be
exposed. Prints, per N, p50 / p99 / max of those latencies and the aggregator's CPU per
worker (its CPU seconds over the step / step seconds / N), and the largest N whose p99 stays
at or under 2 s (the goal is 1 s at the default settings for the fleet one aggregator serves).

With ``batched`` as third argument each worker sends a poll cycle's events as one batch record
(``telemetry.batch_events``; a lone Progress stays a single-event record), else one record per event.

The fourth argument is the scrape period (default 0.1 s; latencies are upper bounds within it). At
thousands of workers a page is megabytes, and scraping it ten times a second (the exporter
rendering it, this process parsing it) takes more of the machine than the fleet itself does, while
Prometheus scrapes every 15 s or more: a longer period measures the pipeline rather than the probe.

With ``changelog`` as fourth argument no exporter runs: the probe reads the aggregator's state topic
instead, and an event's latency is from its time to the first state value holding it (the
aggregator's own freshness, what one aggregator worker is asked to keep for 2,000 workers; the
exporter's render of thousands of jobs is then not on this 2-core machine's bill). The probe reads in a burst every
0.1 s, its partitions assigned for the burst only: an idle assigned consumer busy-polls the dev broker.

    python bench/fleet.py [seconds per step] [N1,N2,...] [single|batched] [scrape period s|changelog]
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import deque

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from bench.common import ROOT, bootstrap_servers, cpu_seconds, ours  # noqa: E402
from kafka_backup.cli.devbroker import free_port  # noqa: E402
from kafka_backup.schemas import events as ev  # noqa: E402
from kafka_backup.schemas.kafka_admin import arrived  # noqa: E402
from kafka_backup.schemas.state import PIPELINE_PREFIX, decode_state  # noqa: E402
from kafka_backup.schemas.topics import TELEMETRY_TOPIC, state_topic  # noqa: E402

PARTS = 8
POLL_S = 0.5  # a worker's poll cycle (backup.poll_interval_ms)
PROBE_PERIOD_S = 0.1  # the state topic is read this often (changelog)


class Worker:
    def __init__(self, n: int) -> None:
        self.job, self.inst = f"fleet-{n}", f"fw-{n}-{uuid.uuid4().hex[:4]}"
        self.key = ev.event_key("backup", self.job).encode()
        self.seq = 0
        self.offsets = [0] * PARTS

    def events(self, now: float, flush: bool) -> list[bytes]:
        out = []

        def emit(cls, **fields) -> None:
            self.seq += 1
            out.append(ev.encode(cls(worker=self.inst, seq=self.seq, ts=now, job=self.job, **fields)))

        if self.seq == 0:
            emit(ev.JobStarted, mode="continuous", topics=["t"])
        if flush:
            for p in range(PARTS):
                start = self.offsets[p]
                emit(ev.SegmentStored, topic="t", partition=p, start_offset=start, end_offset=start + 500,
                     covers_from=start, records=500, bytes=50_000, uncompressed_bytes=60_000, stored_bytes=15_000,
                     algorithm="zstd")
                self.offsets[p] = start + 500
            emit(ev.OffsetsCommitted, offsets=[ev.TopicPartitionOffset("t", p, self.offsets[p]) for p in range(PARTS)])
        emit(ev.Progress, fetches=5, consumed=[ev.TopicConsumed("t", 1000, 100_000)],
             partitions=[ev.PartitionProgress("t", p, self.offsets[p], self.offsets[p] + 100) for p in range(PARTS)])
        return out


LAST_SEEN = re.compile(rb'^kafka_backup_worker_last_seen_timestamp_seconds\{[^}]*worker="([^"]*)"[^}]*\} (\S+)',
                       re.MULTILINE)


def scrape(url: str) -> dict[str, float]:
    """Each worker's last event time; a regex over the text, so the scraper keeps its 100 ms pace at large N."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read()
    return {m.group(1).decode(): float(m.group(2)) for m in LAST_SEEN.finditer(text)}


def sighted(seen: dict[str, float], fleet: set[str], latencies: list[float], worker: str, ts: float,
            at: float) -> None:
    """A worker's newest event time ``ts``, seen at ``at``: a newer one than before is one latency
    sample (a first sighting may be an old event, so it only sets the mark)."""
    if worker not in fleet:
        return
    if worker in seen and ts > seen[worker]:
        latencies.append(at - ts)
    seen[worker] = max(ts, seen.get(worker, ts))


class Scraper:
    """Latencies seen on /metrics: every ``period`` s, each worker's newest last-seen time."""

    def __init__(self, url: str, period: float) -> None:
        self.url, self.period = url, period
        self.next = time.monotonic()

    def start_step(self) -> None:
        self.next = time.monotonic()

    def ready(self) -> bool:
        try:
            scrape(self.url)
            return True
        except Exception:
            return False

    def observe(self, seen: dict[str, float], fleet: set[str], latencies: list[float]) -> None:
        if time.monotonic() < self.next:
            return
        t_scrape = time.time()
        for worker, ts in scrape(self.url).items():
            sighted(seen, fleet, latencies, worker, ts, t_scrape)
        self.next += self.period

    def close(self) -> None:
        """Nothing held between scrapes."""

    def describe(self) -> str:
        return f"a scrape every {self.period:g} s"


class ChangelogProbe:
    """Latencies seen in the aggregator's state topic: each state value's dedup marks carry every
    worker's newest folded event time (``JobState.seen``).

    Read in a thread of its own, a burst every ``PROBE_PERIOD_S``, the partitions assigned for the
    burst only: an assigned librdkafka consumer fetches back to back from the dev broker (it answers a
    fetch at once, ignoring the wait), which cost the broker 38% of a core and the probe 47% with
    nothing to read, taken from the pipeline being measured. (Pausing instead delays the first fetch
    after resuming by ~0.9 s here; assigning again at the next offsets fetches in ~11 ms.) Latencies stay
    upper bounds: an event is timed when its burst reads it, up to a period after it was written."""

    def __init__(self, bootstrap: str, app: str) -> None:
        self.topic = state_topic(app)
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "fleet-probe-" + uuid.uuid4().hex[:6],
                                  "enable.auto.commit": False, "receive.message.max.bytes": 1_000_000_000})
        self.positions: dict[int, int] = {}  # partition: the next offset to read
        self.sightings: deque[tuple[str, float, float]] = deque()  # (worker, event time, read at)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._read, name="probe", daemon=True)

    def start_step(self) -> None:
        """Nothing to align: every state value is read as it arrives."""

    def ready(self) -> bool:
        md = self.consumer.list_topics(self.topic, timeout=5).topics.get(self.topic)
        if md is None or md.error is not None or not md.partitions:
            return False
        self.positions = dict.fromkeys(md.partitions, 0)
        self.thread.start()
        return True

    def _read(self) -> None:
        while not self.stopping.is_set():
            self.consumer.assign([TopicPartition(self.topic, p, at) for p, at in self.positions.items()])
            wait = 0.2  # the first fetch of the burst
            while batch := arrived(self.consumer, 5000, wait):
                t_read = time.time()
                for m in batch:
                    if m.error():
                        continue
                    self.positions[m.partition()] = m.offset() + 1
                    if not m.value() or m.key().startswith(PIPELINE_PREFIX.encode()):
                        continue
                    for worker, mark in decode_state(m.value()).seen.items():
                        self.sightings.append((worker, mark.ts, t_read))
                wait = 0.02
            self.consumer.unassign()
            self.stopping.wait(PROBE_PERIOD_S)

    def observe(self, seen: dict[str, float], fleet: set[str], latencies: list[float]) -> None:
        while self.sightings:
            worker, ts, t_read = self.sightings.popleft()
            sighted(seen, fleet, latencies, worker, ts, t_read)

    def close(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(5)
        self.consumer.close()

    def describe(self) -> str:
        return f"read from the state topic every {PROBE_PERIOD_S:g} s (no exporter)"


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 20
    steps = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [50, 100, 200, 400, 800]
    batched = len(sys.argv) > 3 and sys.argv[3] == "batched"
    via_changelog = len(sys.argv) > 4 and sys.argv[4] == "changelog"
    scrape_s = float(sys.argv[4]) if len(sys.argv) > 4 and not via_changelog else 0.1
    logdir = tempfile.mkdtemp(prefix="bench-fleet-")
    with bootstrap_servers("fleet") as bootstrap:  # KAFKA_BOOTSTRAP_SERVERS, or a dev broker
        app, port = "fleet-" + uuid.uuid4().hex[:6], free_port()
        env = {**os.environ, "APP_DATADIR": os.path.join(logdir, "{conf.name}-data")}  # not the repository root
        procs = [subprocess.Popen(ours(*args), cwd=ROOT, stdin=subprocess.DEVNULL,
                                  stdout=open(os.path.join(logdir, f"{args[0]}.log"), "ab"), stderr=subprocess.STDOUT,
                                  env=env)
                 for args in (["aggregate", "--bootstrap-servers", bootstrap, "--app-id", app, "--instance-id", app],
                              ["exporter", "--bootstrap-servers", bootstrap, "--app-id", app, "--port", str(port)])
                 if not (via_changelog and args[0] == "exporter")]
        agg = procs[0]
        probe = ChangelogProbe(bootstrap, app) if via_changelog else Scraper(f"http://127.0.0.1:{port}/metrics",
                                                                             scrape_s)
        try:
            deadline = time.monotonic() + 90
            while not probe.ready():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the pipeline never became ready; logs in {logdir}") from None
                time.sleep(0.5)
            producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
            workers: list[Worker] = []
            print(f"freshness at default settings, {seconds:.0f} s per step, "
                  f"{'a batch record per poll cycle' if batched else 'a record per event'}, "
                  f"{probe.describe()} (logs in {logdir})")
            best = 0
            for n in steps:
                workers += [Worker(i) for i in range(len(workers), n)]
                seen: dict[str, float] = {}
                fleet = {w.inst for w in workers}
                latencies: list[float] = []
                cpu0, t0 = cpu_seconds(agg.pid), time.monotonic()
                cycle_start, cycle, k = t0, 0, 0  # k: the next worker to emit in this cycle
                sent_events = sent_records = 0
                probe.start_step()
                while time.monotonic() - t0 < seconds:
                    now = time.monotonic()
                    # workers are not in step: worker k polls at k/n of each 500 ms cycle, and flushes
                    # (every 10th cycle) in a cycle of its own, as independent processes would
                    due = n if now >= cycle_start + POLL_S else int((now - cycle_start) / POLL_S * n)
                    while k < due:
                        w = workers[k]
                        values = w.events(time.time(), flush=(cycle + k) % 10 == 9)
                        sent_events += len(values)
                        if batched and len(values) > 1:
                            values = [ev.encode_batch(values)]
                        for value in values:
                            producer.produce(TELEMETRY_TOPIC, key=w.key, value=value)
                        sent_records += len(values)
                        k += 1
                    if k >= n and now >= cycle_start + POLL_S:
                        cycle_start, cycle, k = cycle_start + POLL_S, cycle + 1, 0
                    probe.observe(seen, fleet, latencies)
                    producer.poll(0.01)
                elapsed = time.monotonic() - t0
                cpu = (cpu_seconds(agg.pid) - cpu0) / elapsed
                if not latencies:
                    print(f"  N={n:5d}: no event exposed within the step")
                    break
                latencies.sort()
                p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
                print(f"  N={n:5d}: {len(latencies):6d} samples, p50 {statistics.median(latencies):5.2f} s, "
                      f"p99 {p99:5.2f} s, max {latencies[-1]:5.2f} s; {sent_events / elapsed:6.0f} events/s in "
                      f"{sent_records / elapsed:6.0f} records/s; aggregator CPU {cpu * 100:5.1f}% of a core, "
                      f"{cpu / n * 1000:.2f} ms CPU/s per worker")
                if p99 <= 2.0:
                    best = n
                else:
                    break
            print(f"  largest N kept fresh (p99 <= 2 s) by one aggregator worker: {best}")
        finally:
            probe.close()
            for p in procs:
                p.terminate()
                p.wait(30)


if __name__ == "__main__":
    main()
