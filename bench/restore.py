"""Restore throughput against a bare idempotent producer, measured side by side in one run.

Fills a topic and backs it up (zstd, file storage), then alternates, ``repeats`` times:

* ``bare``: one process producing the same records (key, value, one header, same
  partitions) from memory with an idempotent producer (``linger.ms`` 5, as the restore), one
  ``flush()`` at the end: the ceiling of any restore;
* ``ours``: ``python -m kafka_backup.cli.main restore`` of the backup into a new topic (segments read,
  checked and decoded, checkpoints written, telemetry on).

Whole processes are timed (wall, and CPU from ``wait4``); the same two commands on an empty
topic and its empty backup give start-up and shut-down, subtracted in the second line.

    python bench/restore.py [records] [partitions] [repeats]
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.backup import fill, timed  # noqa: E402

BARE = r'''
import sys
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
bootstrap, topic, n, partitions = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
admin = AdminClient({"bootstrap.servers": bootstrap})
admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(15)
records = [(b"key-%d" % i, b"value-%d-" % i + b"x" * (150 + i % 100), i % partitions, [("h", b"%d" % (i % 7))])
           for i in range(n)]  # what bench.backup.fill wrote
p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
for key, value, part, headers in records:
    while True:
        try:
            p.produce(topic, key=key, value=value, partition=part, headers=headers)
            break
        except BufferError:
            p.poll(0.1)
assert p.flush(120) == 0
'''


def main() -> None:
    records = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    partitions = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    broker = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        from kafka_backup.cli.devbroker import DevBroker

        broker = DevBroker(log_path=os.path.join(tempfile.gettempdir(), "bench-restore-broker.log")).start()
        bootstrap = broker.bootstrap
    work = tempfile.mkdtemp(prefix="bench-restore-")
    try:
        sources = {}
        for name, n in (("full", records), ("empty", 0)):
            topic = f"bench-src-{name}-" + uuid.uuid4().hex[:6]
            fill(bootstrap, topic, partitions, n)
            bid = f"bench-{name}-" + uuid.uuid4().hex[:6]
            timed([sys.executable, "-m", "kafka_backup.cli.main", "backup", "--bootstrap-servers", bootstrap, "--topics", topic,
                   "--backup-id", bid, "--storage", f"file://{work}/store", "--compression", "zstd"],
                  os.path.join(work, f"backup-{name}.log"))
            sources[name] = (topic, bid, n)
        bare_py = os.path.join(work, "bare.py")
        with open(bare_py, "w") as fh:
            fh.write(BARE)
        runs: dict[str, list[dict]] = {"bare": [], "ours": [], "bare-empty": [], "ours-empty": []}
        for r in range(repeats):  # interleaved: a noisy neighbour hits both
            for name, suffix in (("full", ""), ("empty", "-empty")):
                topic, bid, n = sources[name]
                target = f"{topic}-bare-{r}"
                runs["bare" + suffix].append(timed([sys.executable, bare_py, bootstrap, target, str(n),
                                                    str(partitions)], os.path.join(work, f"bare{suffix}-{r}.log")))
                spy = (["py-spy", "record", "-r", "200", "-f", "raw", "-o", os.environ["BENCH_PYSPY"], "--"]
                       if os.environ.get("BENCH_PYSPY") and r == 0 and not suffix else [])
                runs["ours" + suffix].append(timed(
                    [*spy, sys.executable, "-m", "kafka_backup.cli.main", "restore", "--bootstrap-servers", bootstrap,
                     "--backup-id", bid, "--storage", f"file://{work}/store", "--restore-id", f"r{r}",
                     "--topic-map", f"{topic}:{topic}-ours-{r}"], os.path.join(work, f"ours{suffix}-{r}.log")))
        print(f"{records} records on {partitions} partitions, {repeats} runs each, whole process "
              "(start-up included)")
        med, steady = {}, {}
        for name in ("bare", "ours"):
            xs = runs[name]
            rates = [records / x["wall"] for x in xs]
            med[name] = (statistics.median(rates), statistics.median(x["cpu"] for x in xs))
            print(f"  {name:4s}: {min(rates):8.0f} min / {med[name][0]:8.0f} median records/s; "
                  f"CPU {med[name][1]:5.2f} s median")
            wall0 = statistics.median(x["wall"] for x in runs[f"{name}-empty"])
            cpu0 = statistics.median(x["cpu"] for x in runs[f"{name}-empty"])
            steady[name] = (records / (statistics.median(x["wall"] for x in xs) - wall0),
                            statistics.median(x["cpu"] for x in xs) - cpu0)
        print(f"  ratio ours/bare, whole process: rate {med['ours'][0] / med['bare'][0]:.2f}x, "
              f"CPU {med['ours'][1] / med['bare'][1]:.2f}x")
        for name in ("bare", "ours"):
            print(f"  {name:4s} without start-up: {steady[name][0]:8.0f} records/s, CPU {steady[name][1]:5.2f} s")
        print(f"  ratio ours/bare, start-up subtracted: rate {steady['ours'][0] / steady['bare'][0]:.2f}x, "
              f"CPU {steady['ours'][1] / steady['bare'][1]:.2f}x")
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
