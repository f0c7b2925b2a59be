"""Backup throughput against a bare confluent-kafka consume loop, measured side by side in one run.

Fills a topic, then alternates, ``repeats`` times:

* ``bare``: a consumer (new group, from the earliest offset) calling ``consume(1000)`` until it
  has seen every record, touching each record's key and value: the ceiling of any Python backup;
* ``ours``: ``python -m kafka_backup.cli.main backup`` (one-shot, zstd, telemetry on to the same broker, file
  storage in a temp dir).

Each runs in its own process; wall time and CPU time (user + system, from ``wait4``) cover the
whole process, start-up included for both. Prints records/s, MB/s and CPU seconds, and the ratios
ours/bare (rate) and ours/bare (CPU); min/median over the repeats.

    python bench/backup.py [records] [partitions] [repeats]
    BENCH_PYSPY=/tmp/backup.txt python bench/backup.py ...   # also py-spy's collapsed stacks of ours

Starts its own dev broker unless KAFKA_BOOTSTRAP_SERVERS is set. The dev broker ignores fetch
size limits: keep records x ~250 B / partitions under ~100 MB.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BARE = r'''
import sys, time
from confluent_kafka import Consumer, TopicPartition
bootstrap, topic, n, partitions = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[5])
c = Consumer({"bootstrap.servers": bootstrap, "group.id": sys.argv[4], "enable.auto.commit": False})
c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])  # as a one-shot backup does
seen = size = 0
while seen < n:
    for m in c.consume(1000, 1.0):
        if m.error():
            continue
        seen += 1
        size += len(m.key() or b"") + len(m.value() or b"")
c.close()
'''


def fill(bootstrap: str, topic: str, partitions: int, records: int) -> int:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(15)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4"})
    payload = 0
    for i in range(records):
        key = b"key-%d" % i
        value = b"value-%d-" % i + b"x" * (150 + i % 100)
        p.produce(topic, key=key, value=value, partition=i % partitions, headers=[("h", b"%d" % (i % 7))])
        payload += len(key) + len(value)
        if i % 10_000 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    return payload


def timed(cmd: list[str], log_path: str) -> dict:
    with open(log_path, "ab") as log:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}; see {log_path}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime}


def main() -> None:
    records = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    partitions = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    broker = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        from kafka_backup.cli.devbroker import DevBroker

        broker = DevBroker(log_path=os.path.join(tempfile.gettempdir(), "bench-backup-broker.log")).start()
        bootstrap = broker.bootstrap
    work = tempfile.mkdtemp(prefix="bench-backup-")
    try:
        topic = "bench-src-" + uuid.uuid4().hex[:6]
        payload = fill(bootstrap, topic, partitions, records)
        empty = "bench-empty-" + uuid.uuid4().hex[:6]
        fill(bootstrap, empty, partitions, 0)
        bare_py = os.path.join(work, "bare.py")
        with open(bare_py, "w") as fh:
            fh.write(BARE)
        runs: dict[str, list[dict]] = {"bare": [], "ours": [], "bare-empty": [], "ours-empty": []}

        def bare(source: str, n: int, log: str) -> dict:
            return timed([sys.executable, bare_py, bootstrap, source, str(n), "bench-bare-" + uuid.uuid4().hex[:6],
                          str(partitions)], os.path.join(work, log))

        def ours(source: str, log: str, spy: list[str]) -> dict:
            store = os.path.join(work, "store")
            try:
                return timed([*spy, sys.executable, "-m", "kafka_backup.cli.main", "backup", "--bootstrap-servers", bootstrap,
                              "--topics", source, "--backup-id", "bench-" + uuid.uuid4().hex[:6],
                              "--storage", f"file://{store}", "--compression", "zstd"], os.path.join(work, log))
            finally:
                shutil.rmtree(store, ignore_errors=True)

        for r in range(repeats):  # interleaved: a noisy neighbour hits both
            runs["bare"].append(bare(topic, records, f"bare-{r}.log"))
            spy = (["py-spy", "record", "-r", "200", "-f", "raw", "-o", os.environ["BENCH_PYSPY"], "--"]
                   if os.environ.get("BENCH_PYSPY") and r == 0 else [])  # where the time goes (first run)
            runs["ours"].append(ours(topic, f"ours-{r}.log", spy))
            runs["bare-empty"].append(bare(empty, 0, f"bare-empty-{r}.log"))  # start-up and shut-down alone
            runs["ours-empty"].append(ours(empty, f"ours-empty-{r}.log", []))
        print(f"{records} records ({payload / records:.0f} B key+value, 1 header) on {partitions} partitions, "
              f"{repeats} runs each, whole process (start-up included)")
        med = {}
        for name in ("bare", "ours"):
            xs = runs[name]
            rates = [records / x["wall"] for x in xs]
            med[name] = (statistics.median(rates), statistics.median(x["cpu"] for x in xs))
            print(f"  {name:4s}: {min(rates):8.0f} min / {med[name][0]:8.0f} median records/s "
                  f"({med[name][0] * payload / records / 1e6:5.1f} MB/s); CPU {med[name][1]:5.2f} s median")
        print(f"  ratio ours/bare, whole process: rate {med['ours'][0] / med['bare'][0]:.2f}x, "
              f"CPU {med['ours'][1] / med['bare'][1]:.2f}x")
        steady = {}
        for name in ("bare", "ours"):  # the same process on an empty topic, subtracted: the consume loop alone
            wall0 = statistics.median(x["wall"] for x in runs[f"{name}-empty"])
            cpu0 = statistics.median(x["cpu"] for x in runs[f"{name}-empty"])
            steady[name] = (records / (statistics.median(x["wall"] for x in runs[name]) - wall0),
                            statistics.median(x["cpu"] for x in runs[name]) - cpu0)
            print(f"  {name:4s} without start-up ({wall0:.2f} s, {cpu0:.2f} s CPU on an empty topic): "
                  f"{steady[name][0]:8.0f} records/s, CPU {steady[name][1]:5.2f} s")
        print(f"  ratio ours/bare, consume loop: rate {steady['ours'][0] / steady['bare'][0]:.2f}x, "
              f"CPU {steady['ours'][1] / steady['bare'][1]:.2f}x")
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
