"""Restore throughput against a bare idempotent producer, measured side by side in one run.

Fills a topic and backs it up (zstd, file storage), then alternates, ``repeats`` times:

* ``bare``: one process producing the same records (key, value, one header, same
  partitions) from memory with an idempotent producer (``linger.ms`` 5, as the restore), one
  ``flush()`` at the end: the ceiling of any restore. Like ours, it is connected to a named broker
  before its first send (two metadata requests): made and sent to at once, an idempotent producer
  holds its records until its producer-id timer fires, 0.5-1.0 s later;
* ``bare-dr``: the same producer with a delivery report per record that keeps its offset (what a
  restore that resumes exactly once needs: which records landed, and where): librdkafka then
  hands Python a message object per record, a cost no such restore can skip;
* ``ours``: ``python -m kafka_backup.cli.main restore`` of the backup into a new topic (segments read,
  checked and decoded, checkpoints written, telemetry on).

Whole processes are timed (wall, and CPU from ``wait4``); the same two commands on an empty
topic and its empty backup give start-up and shut-down, subtracted in the second line.

    python bench/restore.py [records] [partitions] [repeats] [file|s3|s3:<ms>]

With ``s3`` the backup is stored in, and restored from, an S3 bucket served over HTTP by moto's
server in its own process (each segment a GET: what reading ahead hides); ``s3:30`` holds every
request 30 ms on its way (bench/backup.py's proxy), the round trip moto on the loopback lacks.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.backup import backups  # noqa: E402
from bench.common import compare, int_args, ours, pyspy, timed  # noqa: E402

BARE = r'''
import sys
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
bootstrap, topic, n, partitions = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
admin = AdminClient({"bootstrap.servers": bootstrap})
admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(15)
records = [(b"key-%d" % i, b"value-%d-" % i + b"x" * (150 + i % 100), i % partitions, [("h", b"%d" % (i % 7))])
           for i in range(n)]  # what bench.backup.fill wrote
p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5,
              "reconnect.backoff.ms": 20})
for _ in range(2):  # connected to a named broker before the first send, as ours is (kafka_admin.connect_producer)
    p.list_topics(topic, timeout=10)
offsets = []
report = (lambda err, msg: offsets.append(msg.offset())) if sys.argv[5] == "dr" else None
for key, value, part, headers in records:
    while True:
        try:
            p.produce(topic, key=key, value=value, partition=part, headers=headers, on_delivery=report)
            break
        except BufferError:
            p.poll(0.1)
assert p.flush(120) == 0
assert report is None or len(offsets) == n
'''


def main() -> None:
    records, partitions, repeats = int_args(sys.argv[1:], 200_000, 4, 3)
    storage = sys.argv[4] if len(sys.argv) > 4 else "file"
    with backups("restore", records, partitions, storage) as (work, bootstrap, where, sources):
        bare_py = os.path.join(work, "bare.py")
        with open(bare_py, "w") as fh:
            fh.write(BARE)
        runs: dict[str, list[dict[str, float]]] = {k + s: [] for k in ("bare", "bare-dr", "ours")
                                                   for s in ("", "-empty")}
        for r in range(repeats):  # interleaved: a noisy neighbour hits both
            for name, suffix in (("full", ""), ("empty", "-empty")):
                topic, bid, n = sources[name]
                for base, mode in (("bare", "plain"), ("bare-dr", "dr")):
                    runs[base + suffix].append(timed(
                        [sys.executable, bare_py, bootstrap, f"{topic}-{base}-{r}", str(n), str(partitions), mode],
                        os.path.join(work, f"{base}{suffix}-{r}.log")))
                runs["ours" + suffix].append(timed(
                    [*pyspy(r == 0 and not suffix),
                     *ours("restore", "--bootstrap-servers", bootstrap, "--backup-id", bid,
                           *where, "--restore-id", f"r{r}",
                           "--topic-map", f"{topic}:{topic}-ours-{r}")],
                    os.path.join(work, f"ours{suffix}-{r}.log")))
        print(f"{records} records on {partitions} partitions, {repeats} runs each, whole process "
              f"(start-up included); ours restores from {storage}")
        compare(runs, records, baselines=("bare", "bare-dr"))


if __name__ == "__main__":
    main()
