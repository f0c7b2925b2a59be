"""Aggregator throughput against bare Faust, measured side by side in one run.

Fills a telemetry topic with the real event mix of a fleet of backup jobs (per
job: a ``Progress`` over its partitions, a ``SegmentStored`` and an
``OffsetsCommitted`` per flush), then runs, one after the other on the same
topic and broker:

* ``bare``: a minimal Faust 0.15.3 app whose agent writes each event's value
  into a bytes table (one table write per event, nothing else): the baseline;
* ``read``: the same app without the table write (two marks, first and last event):
  what Faust's own per-event path costs, the ceiling of any agent;
* ``ours``: the real aggregator (``python -m kafka_backup.cli.main aggregate``).

The same events are written twice, to two topics: one record per event (every worker today),
and one batch record per poll cycle of a job (``telemetry.batch_events``, records made as
``Emitter.send_batch`` makes them). ``bare`` reads the first only (the baseline of the goal: Faust
with one table write per event); ``read`` and ``ours`` read both. Prints events/s and records/s.

Each is timed from its first changelog record to the changelog showing every
event folded (for ``ours``: every job's dedup mark at its last ``seq``), so
Faust's start-up is not counted; the flush interval (200 ms by default) is.
Prints events/s, records/s, the ratios, changelog bytes per event and the
aggregator's CPU seconds per 1,000 events; min/median over the repeats.

    python bench/aggregator.py [events] [jobs] [repeats] [-- extra aggregate flags]

Starts its own dev broker unless KAFKA_BOOTSTRAP_SERVERS is set. Keep
``events`` x ~300 B under ~100 MB per partition (the dev broker ignores fetch
size limits).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

from bench.common import ROOT, bootstrap_servers, cpu_seconds, int_args, ours  # noqa: E402
from kafka_backup.schemas import events as ev  # noqa: E402
from kafka_backup.schemas.kafka_admin import arrived  # noqa: E402
from kafka_backup.schemas.state import PIPELINE_PREFIX, decode_state  # noqa: E402

PARTITIONS = 4  # telemetry partitions
JOB_PARTITIONS = 8  # source partitions per backup job


def fleet_events(events: int, jobs: int) -> list[tuple[bytes, list[bytes]]]:
    """(key, the events of one poll cycle of one job) in emission order: jobs interleaved, each
    job's events in seq order; ``events`` events in all."""
    now = time.time()
    out: list[tuple[bytes, list[bytes]]] = []
    total = 0
    seqs = [0] * jobs
    offsets = [[0] * JOB_PARTITIONS for _ in range(jobs)]
    cycle = 0
    while total < events:
        for j in range(jobs):
            job, inst = f"bench-{j}", f"w-{j}"
            key = ev.event_key("backup", job).encode()
            cycle_events: list[bytes] = []
            out.append((key, cycle_events))

            def emit(e: ev.Event, cycle_events: list[bytes] = cycle_events) -> None:
                nonlocal total
                if total < events:
                    cycle_events.append(ev.encode(e))
                    total += 1

            def nxt(j: int = j) -> int:
                seqs[j] += 1
                return seqs[j]

            ts = now - 60 + cycle * 0.001
            if cycle == 0:
                emit(ev.JobStarted(worker=inst, seq=nxt(), ts=ts, job=job, mode="continuous", topics=["t"]))
            p = cycle % JOB_PARTITIONS
            emit(ev.Progress(worker=inst, seq=nxt(), ts=ts, job=job, fetches=3,
                             partitions=[ev.PartitionProgress("t", q, offsets[j][q], offsets[j][q] + 50,
                                                              int(ts * 1000), int(ts * 1000) + 5)
                                         for q in range(JOB_PARTITIONS)],
                             consumed=[ev.TopicConsumed("t", 100, 10_000)]))
            start = offsets[j][p]
            emit(ev.SegmentStored(worker=inst, seq=nxt(), ts=ts, job=job, topic="t", partition=p,
                                  start_offset=start, end_offset=start + 100, covers_from=start, records=100,
                                  bytes=10_000, uncompressed_bytes=12_000, stored_bytes=3_000, algorithm="zstd"))
            offsets[j][p] = start + 100
            emit(ev.OffsetsCommitted(worker=inst, seq=nxt(), ts=ts, job=job,
                                     offsets=[ev.TopicPartitionOffset("t", p, start + 100)]))
        cycle += 1
    return [(key, cycle_events) for key, cycle_events in out if cycle_events]


def records_of(cycles: list[tuple[bytes, list[bytes]]], batched: bool) -> list[tuple[bytes, bytes]]:
    """The telemetry records an emitter sends: one per event, or (``telemetry.batch_events``) one
    per poll cycle of a job, a lone event as a single-event record (``Emitter.send_batch``)."""
    if not batched:
        return [(key, value) for key, values in cycles for value in values]
    return [(key, values[0] if len(values) == 1 else ev.encode_batch(values)) for key, values in cycles]


def fill(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> dict[str, int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(15)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    last: dict[str, int] = {}
    for key, value in records:
        p.produce(topic, key=key, value=value)
        p.poll(0)
        for payload in ev.unpack(value):
            e = ev.decode(payload)
            last[e.worker] = e.seq
    assert p.flush(60) == 0
    return last


BARE = '''
import sys, faust
bootstrap, topic, app_id = sys.argv[1:4]
app = faust.App(app_id, broker=f"kafka://{bootstrap}", store="memory://", web_enabled=False,
                topic_partitions={partitions}, table_standby_replicas=0, producer_linger=0.05, stream_wait_empty=False)
src = app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
table = app.Table("jobs", default=None, key_type=bytes, value_type=bytes, partitions={partitions})

n = [0]
write_each = sys.argv[4] == "write"
last = int(sys.argv[5])

@app.agent(src, concurrency=1)
async def fold(stream):
    async for event in stream.events():
        n[0] += 1
        if write_each:
            table[event.key] = event.value
        elif n[0] in (1, last):  # no work per event: Faust's own ceiling, timed by two writes
            table[b"mark"] = b"%d" % n[0]

worker = faust.Worker(app, loglevel="WARNING", quiet=True)
worker.spinner = None
worker.execute_from_commandline()
'''.replace("{partitions}", str(PARTITIONS))


def measure(bootstrap: str, changelog: str, cmd: list[str], done, log_path: str) -> dict:
    """Run ``cmd``; time from the first changelog record to ``done(records, bytes, value)`` holding."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-" + uuid.uuid4().hex[:6],
                  "enable.auto.commit": False, "receive.message.max.bytes": 1_000_000_000})
    with open(log_path, "ab") as log:
        # Faust's data dir (APP_DATADIR, "<app>-data" in the working directory by default) with the logs
        datadir = os.path.join(os.path.dirname(log_path), "{conf.name}-data")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "APP_DATADIR": datadir})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the changelog topic is created by the app
            md = c.list_topics(changelog, timeout=5).topics.get(changelog)
            if md is not None and md.error is None and md.partitions:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{changelog} never appeared; see {log_path}")
        c.assign([TopicPartition(changelog, p, 0) for p in md.partitions])
        if os.environ.get("BENCH_PYSPY") and "kafka_backup.cli.main" in cmd:  # where the time goes: py-spy's collapsed stacks
            subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "-d", "10", "-r", "250", "-f", "raw",
                              "-o", os.environ["BENCH_PYSPY"]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = end = None
        records = nbytes = 0
        finished = False
        deadline = time.monotonic() + 600
        while not finished and time.monotonic() < deadline:
            for m in arrived(c, 1000, 1.0):  # consume(1000, 1.0) would sit out the second: timings in 1 s steps
                if m.error():
                    continue
                now = time.monotonic()
                first = first or now
                records += 1
                nbytes += len(m.value() or b"") + len(m.key() or b"")
                if done(m.key(), m.value(), records):
                    finished, end = True, now
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited; see {log_path}")
        if not finished:
            raise RuntimeError(f"timed out; see {log_path}")
        return {"seconds": end - first, "records": records, "bytes": nbytes, "cpu": cpu_seconds(proc.pid)}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        c.close()


def main() -> None:
    args = sys.argv[1:]
    extra: list[str] = []
    if "--" in args:
        extra = args[args.index("--") + 1:]
        args = args[:args.index("--")]
    events, jobs, repeats = int_args(args, 30_000, 40, 3)
    logdir = tempfile.mkdtemp(prefix="bench-aggregator-")
    with bootstrap_servers("aggregator") as bootstrap:
        cycles = fleet_events(events, jobs)
        topics, counts = {}, {}
        for batched in (False, True):
            topics[batched] = "bench-telemetry-" + uuid.uuid4().hex[:6]
            records = records_of(cycles, batched)
            counts[batched] = len(records)
            last = fill(bootstrap, topics[batched], records)
        in_bytes = sum(len(k) + len(v) for k, vs in cycles for v in vs)
        runs = [("bare", False), ("read", False), ("ours", False), ("read", True), ("ours", True)]
        results: dict[tuple[str, bool], list[dict]] = {run: [] for run in runs}
        for r in range(repeats):  # interleaved: a noisy neighbour hits all
            with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
                fh.write(BARE)
            for name, batched in runs:
                topic, n = topics[batched], counts[batched]
                tag = f"{name}-{'batched' if batched else 'single'}-{r}"
                app = f"bench-{name}-{uuid.uuid4().hex[:6]}"
                if name == "bare":
                    results[(name, batched)].append(measure(
                        bootstrap, f"{app}-jobs-changelog",
                        [sys.executable, fh.name, bootstrap, topic, app, "write", str(n)],
                        lambda k, v, seen, n=n: seen >= n, os.path.join(logdir, f"{tag}.log")))
                elif name == "read":
                    results[(name, batched)].append(measure(
                        bootstrap, f"{app}-jobs-changelog",
                        [sys.executable, fh.name, bootstrap, topic, app, "read", str(n)],
                        lambda k, v, seen, n=n: v == str(n).encode(), os.path.join(logdir, f"{tag}.log")))
                else:
                    marks: dict[str, int] = {}

                    def folded(key: bytes, value: bytes, seen: int, marks: dict[str, int] = marks) -> bool:
                        if value and not key.startswith(PIPELINE_PREFIX.encode()):
                            for inst, mark in decode_state(value).seen.items():
                                marks[inst] = mark.seq
                        return len(marks) == len(last) and all(marks.get(i) == s for i, s in last.items())

                    results[(name, batched)].append(measure(
                        bootstrap, f"{app}-jobs-changelog",
                        ours("aggregate", "--bootstrap-servers", bootstrap, "--app-id", app, "--instance-id", app,
                             "--telemetry-topic", topic, "--telemetry-partitions", str(PARTITIONS), *extra),
                        folded, os.path.join(logdir, f"{tag}.log")))
            os.unlink(fh.name)
        print(f"{events} events of {jobs} jobs ({in_bytes / events:.0f} B/event) on {PARTITIONS} telemetry "
              f"partitions: {counts[False]} single-event records, or {counts[True]} records batched per poll "
              f"cycle ({events / counts[True]:.2f} events/record); {repeats} runs each (logs in {logdir})")
        rate: dict[tuple[str, bool], float] = {}
        for (name, batched), xs in results.items():
            rates = [events / x["seconds"] for x in xs]
            rate[(name, batched)] = statistics.median(rates)
            per_record = counts[batched] / events
            cl = statistics.median(x["bytes"] / events for x in xs)
            cpu = statistics.median(x["cpu"] for x in xs)
            label = f"{name} {'batched' if batched else 'single '}"
            if name == "read":  # it reads records, whatever they carry
                print(f"  {label}: {min(rates) * per_record:8.0f} min / {rate[(name, batched)] * per_record:8.0f} "
                      f"median records/s (Faust's ceiling, nothing done per record)")
                continue
            print(f"  {label}: {min(rates):8.0f} min / {rate[(name, batched)]:8.0f} median events/s, "
                  f"{rate[(name, batched)] * per_record:8.0f} records/s; changelog {cl:7.1f} B/event; "
                  f"process CPU {cpu * 1000 / events:.2f} s per 1,000 events (start-up included)")
        bare = rate[("bare", False)]
        print(f"  ratio to bare (one table write per event), median events/s: ours single "
              f"{rate[('ours', False)] / bare:.2f}x, ours batched {rate[('ours', True)] / bare:.2f}x")
        for batched in (False, True):
            read_records = rate[("read", batched)] * counts[batched] / events
            ours_records = rate[("ours", batched)] * counts[batched] / events
            print(f"  ours/read in records/s (Faust's ceiling), {'batched' if batched else 'single'}: "
                  f"{ours_records / read_records:.2f}x")

if __name__ == "__main__":
    main()
