"""A restore's peak memory for a long backup's indexes: a group of partitions at a time against all at once.

Writes the indexes of a backup of ``partitions`` partitions of ``segments`` segments each, as the backup
writes them (``producers.layout.append``: sealed index chunks and a checkpoint head; no segment data),
then scopes a restore of it in a process of its own, twice, the same hour:

* ``grouped``: as the restore does (``INDEX_HELD_SEGMENTS``, its default);
* ``all``: every index held at once, as the restore did before (the budget raised beyond the backup).

Prints each process's peak resident memory (``ru_maxrss``, interpreter and modules included), the time
the scope took, the index reads it made and the records it counted (the two must agree), and the ratio
grouped/all of the peak. Memory is deterministic enough here; the times are for scale only.

    python bench/restore_memory.py [partitions] [segments per partition]
    python bench/restore_memory.py 32 20000     # 640,000 segments: about 37 days of a partition at one a 5 s
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import int_args, precompiled  # noqa: E402
from kafka_backup.producers import layout  # noqa: E402
from kafka_backup.producers.storage import FileBackend, Storage  # noqa: E402

BACKUP, TOPIC = "bench-memory", "orders"

SCOPE = r'''
import resource, sys, time
from kafka_backup.producers import index_groups
from kafka_backup.producers.restore import RestoreWorker
from kafka_backup.producers.run import NullEmitter
from kafka_backup.producers.storage import FileBackend, Storage
from kafka_backup.schemas.config import RestoreConfig
root, backup, topic, partitions, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
if mode == "all":
    index_groups.INDEX_HELD_SEGMENTS = 10 ** 12
storage = Storage(FileBackend(root))
worker = RestoreWorker("127.0.0.1:1", RestoreConfig(restore_id="r", backup_id=backup), storage, NullEmitter())
reads = []
storage.listener = lambda report: reads.append(report.operation)
start = time.perf_counter()
cp = worker.scope({topic: topic}, {topic: partitions})
took = time.perf_counter() - start
print(cp.total_records, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, round(took, 2),
      reads.count("checkpoint"), reads.count("index"))
'''


def write_indexes(root: str, partitions: int, segments: int) -> None:
    storage = Storage(FileBackend(root))
    storage.listener = lambda report: None
    for p in range(partitions):
        cp = layout.Checkpoint(TOPIC, p, 0)
        for i in range(segments):
            start = i * 10
            info = layout.SegmentInfo(
                key=layout.segment_key(BACKUP, TOPIC, p, start, "zstd"), start_offset=start, end_offset=start + 10,
                records=10, bytes=2_000, uncompressed_bytes=2_200, stored_bytes=600, algorithm="zstd",
                min_ts=1_700_000_000_000 + i * 5_000, max_ts=1_700_000_004_999 + i * 5_000, sha256="ab" * 32,
                covers_from=start)
            cp, writes = layout.append(BACKUP, cp, info, 0)
            for key, data in writes:
                storage.put(key, data, "index")
        storage.put(layout.checkpoint_key(BACKUP, TOPIC, p), layout.encode(cp), "checkpoint")
    storage.put(layout.manifest_key(BACKUP), b"{}", "manifest")  # not read by the scope


def main() -> None:
    partitions, segments = int_args(sys.argv[1:], 32, 20_000)
    precompiled()
    root = tempfile.mkdtemp(prefix="bench-restore-memory-")
    try:
        write_indexes(root, partitions, segments)
        peaks = {}
        print(f"{partitions} partitions x {segments} segments = {partitions * segments:,} segments indexed")
        for mode in ("grouped", "all"):
            out = subprocess.run([sys.executable, "-c", SCOPE, root, BACKUP, TOPIC, str(partitions), mode],
                                 check=True, capture_output=True, text=True).stdout.split()
            records, peak, took, checkpoints, chunks = out
            peaks[mode] = int(peak)
            print(f"  {mode:8s}: peak RSS {int(peak):5d} MB, scope {took} s, {checkpoints} checkpoint and "
                  f"{chunks} index chunk reads, {int(records):,} records counted")
        print(f"  ratio grouped/all, peak RSS: {peaks['grouped'] / peaks['all']:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
