"""How tests/data/state-v1-*.msgpack were made (kept for the record; the tests read the stored files).

Three fixed histories folded with the state code as it was before issue 13 (commit d85ab4f:
``list[int]`` pairs, ``list[float]`` dedup marks, job-level rate samples under the topic ``""``),
so the files hold state values exactly as aggregators of that version wrote them to the state
topic. tests/test_state_wire.py folds the same histories with the current code and compares.

    git archive d85ab4f | tar -x -C /tmp/old   # plus a kafka_backup/ directory of symlinks to it
    PYTHONPATH=/tmp/old-shim python tests/data/make_state_v1.py tests/data

Since the event's ``instance`` field is called ``worker`` in Python (the wire name is unchanged),
running this against d85ab4f needs ``worker=`` read back as ``instance=`` in the histories below.
"""

from __future__ import annotations

import sys

from kafka_backup.schemas import events as ev
from kafka_backup.schemas.state import decode_state, encode_state
from kafka_backup.streams import fold

T0 = 1_790_000_000.0


def backup() -> bytes:
    seq = {"w1": 0, "w2": 0}
    def e(cls, inst, dt, **f):
        seq[inst] += 1
        return cls(worker=inst, seq=seq[inst], ts=T0 + dt, kind="backup", job="orders-bk", **f)
    s = None
    def do(x):
        nonlocal s
        s = fold.apply(s, x) or s
    do(e(ev.JobStarted, "w1", 0, mode="continuous", backup_id="orders-bk"))
    do(e(ev.Progress, "w1", 1, partitions=[ev.PartitionProgress("orders", 0, 10, 50)],
         consumed=[ev.TopicConsumed("orders", 10, 1000), ev.TopicConsumed("pay", 3, 300)], fetches=4))
    do(e(ev.SegmentStored, "w1", 2, topic="orders", partition=0, start_offset=0, end_offset=10, records=10,
         bytes=1000, uncompressed_bytes=1100, stored_bytes=400, algorithm="zstd", covers_from=0))
    do(e(ev.SegmentStored, "w1", 3, topic="orders", partition=0, start_offset=20, end_offset=30, records=10,
         bytes=1000, uncompressed_bytes=1100, stored_bytes=500, algorithm="lz4", covers_from=20))
    s = decode_state(encode_state(s))  # a restart: every list[float] mark now holds floats
    do(e(ev.Progress, "w2", 4, partitions=[ev.PartitionProgress("orders", 0, 30, 60)],
         consumed=[ev.TopicConsumed("orders", 20, 2000)], fetches=2))
    do(e(ev.ErrorRaised, "w2", 5, error_type="storage_io", transient=True, backend="s3", storage_error="timeout"))
    do(e(ev.StorageOp, "w2", 6, backend="s3", operation="segment", direction="write", latency_s=0.03, bytes=400))
    return encode_state(s)


def restore() -> bytes:
    s = None
    n = 0
    def e(cls, dt, **f):
        nonlocal n
        n += 1
        return cls(worker="r1", seq=n, ts=T0 + dt, kind="restore", job="orders-rs", **f)
    for x in (e(ev.JobStarted, 0, backup_id="orders-bk", total_records=1000, restored_total=100, restored_bytes=10_000),
              e(ev.RestoreProgress, 1, records=50, restored_total=150, bytes=5000, restored_bytes=15_000),
              e(ev.RestoreProgress, 1.5, records=25, restored_total=175, bytes=2500, restored_bytes=17_500)):
        s = fold.apply(s, x) or s
    return encode_state(s)


def plain() -> bytes:
    """A backup without fetches and without a restart: nothing the current code writes differently."""
    s = None
    for n, x in enumerate((
            ev.JobStarted(worker="p1", seq=1, ts=T0, kind="backup", job="plain", mode="one-shot"),
            ev.Progress(worker="p1", seq=2, ts=T0 + 1, kind="backup", job="plain",
                        partitions=[ev.PartitionProgress("t", 0, 5, 9)], consumed=[ev.TopicConsumed("t", 5, 50)]),
            ev.SegmentStored(worker="p1", seq=3, ts=T0 + 2, kind="backup", job="plain", topic="t", partition=0,
                             start_offset=3, end_offset=5, records=2, bytes=20, uncompressed_bytes=30,
                             stored_bytes=10, algorithm="zstd", covers_from=3),
            ev.JobEnded(worker="p1", seq=4, ts=T0 + 3, kind="backup", job="plain", status="success",
                        duration_s=3.0))):
        assert x.seq == n + 1
        s = fold.apply(s, x) or s
    return encode_state(s)


HISTORIES = {"backup": backup, "restore": restore, "plain": plain}

if __name__ == "__main__":
    for name, history in HISTORIES.items():
        with open(f"{sys.argv[1]}/state-v1-{name}.msgpack", "wb") as fh:
            fh.write(history())
