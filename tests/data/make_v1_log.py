"""How tests/data/telemetry-v1.log was made (kept for the record; the test reads the stored file).

A fixed, hand-written history in schema version 1: two runs of backup "orders-bk"
(the first fails mid-way, the second resumes), duplicated and reordered records
as at-least-once delivery leaves them, one restore, one record of an event type
from a later version, and one event with a field a later version added.

    python tests/data/make_v1_log.py  # rewrites telemetry-v1.log and the expected reports
"""

from __future__ import annotations

import os
import sys

import msgspec

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from kafka_backup.schemas import events as ev  # noqa: E402
from kafka_backup.streams.replay import LogRecord, write_log  # noqa: E402

T = 1_785_000_000.0  # 2026-07-25T17:20:00Z


def history() -> list[LogRecord]:
    key = b"backup:orders-bk"
    out: list[LogRecord] = []

    def put(e: ev.Event, k: bytes = key, partition: int = 3) -> None:
        out.append(LogRecord(partition, len(out), int(e.ts * 1000), k, ev.encode(e)))

    a = dict(worker="host-a-1", job="orders-bk")
    put(ev.JobStarted(**a, seq=1, ts=T, mode="one-shot", topics=["orders"], backend="s3", compression="zstd"))
    put(ev.Progress(**a, seq=2, ts=T + 0.5, partitions=[ev.PartitionProgress("orders", 0, 0, 300, None, 1_784_999_990_000),
                                                        ev.PartitionProgress("orders", 1, 0, 200, None, 1_784_999_991_000)],
                    consumed=[ev.TopicConsumed("orders", 500, 40_000)], fetches=3))
    seg0 = ev.SegmentStored(**a, seq=3, ts=T + 1, topic="orders", partition=0, start_offset=0, end_offset=150,
                            records=150, bytes=12_000, uncompressed_bytes=15_000, stored_bytes=3_000,
                            algorithm="zstd", min_ts=1_784_999_980_000, max_ts=1_784_999_985_000)
    put(seg0)
    put(ev.StorageOp(**a, seq=4, ts=T + 1, backend="s3", operation="segment", direction="write", latency_s=0.042,
                     bytes=3_000))
    put(ev.ErrorRaised(**a, seq=5, ts=T + 2, error_type="storage_io", transient=False, operation="segment",
                       backend="s3", storage_error="auth", message="AccessDenied"))
    put(ev.JobEnded(**a, seq=6, ts=T + 2.5, status="failure", duration_s=2.5, reason="storage auth"))
    put(seg0)  # redelivered
    b = dict(worker="host-b-1", job="orders-bk")
    put(ev.JobStarted(**b, seq=1, ts=T + 3600, mode="one-shot", topics=["orders"], backend="s3", compression="zstd"))
    put(ev.Progress(**b, seq=2, ts=T + 3600.5, partitions=[
        ev.PartitionProgress("orders", 0, 150, 320, 1_784_999_985_000, 1_785_003_590_000),
        ev.PartitionProgress("orders", 1, 0, 210, None, 1_785_003_595_000)], fetches=2))
    put(ev.SegmentStored(**b, seq=3, ts=T + 3601, topic="orders", partition=0, start_offset=150, end_offset=320,
                         records=170, bytes=13_600, uncompressed_bytes=17_000, stored_bytes=3_400, algorithm="zstd",
                         min_ts=1_784_999_986_000, max_ts=1_785_003_590_000))
    seg1 = ev.SegmentStored(**b, seq=4, ts=T + 3601.2, topic="orders", partition=1, start_offset=10, end_offset=210,
                            records=200, bytes=16_000, uncompressed_bytes=20_000, stored_bytes=4_100,
                            algorithm="zstd", min_ts=1_784_999_991_000, max_ts=1_785_003_595_000)
    put(seg1)
    put(seg1)  # a producer retry that slipped through
    put(ev.JobEnded(**b, seq=5, ts=T + 3602, status="success", duration_s=2.0))
    # an event written by a later version: an unknown type, and a known type with a new field
    out.append(LogRecord(3, len(out), int((T + 3603) * 1000), key, msgspec.msgpack.encode(
        {"type": "segment_verified", "v": 1, "instance": "host-b-2", "seq": 1, "ts": T + 3603, "job": "orders-bk"})))
    out.append(LogRecord(3, len(out), int((T + 3604) * 1000), key, msgspec.msgpack.encode(
        {"type": "retry", "v": 1, "instance": "host-b-2", "seq": 2, "ts": T + 3604, "kind": "backup",
         "job": "orders-bk", "operation": "commit", "attempt": 2})))
    r = dict(worker="host-c-1", kind="restore", job="orders-dr")
    rk = b"restore:orders-dr"
    put(ev.JobStarted(**r, seq=1, ts=T + 7200, backup_id="orders-bk", total_records=520), rk, 1)
    put(ev.RestoreProgress(**r, seq=2, ts=T + 7201, records=300, restored_total=300, bytes=24_000), rk, 1)
    put(ev.RestoreProgress(**r, seq=3, ts=T + 7202, records=220, restored_total=520, bytes=17_600), rk, 1)
    put(ev.JobEnded(**r, seq=4, ts=T + 7202.5, status="success", duration_s=2.5), rk, 1)
    return out


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "telemetry-v1.log"), "wb") as fh:
        fh.write(write_log(history()))
    from argparse import Namespace  # noqa: E402

    from kafka_backup.cli.replay import run_replay  # noqa: E402
    from kafka_backup.schemas.config import load  # noqa: E402

    run_replay(load(), Namespace(replay_from="2026-07-25T17:00:00Z", replay_to="2026-07-26T00:00:00Z",
                                 format="prometheus", output=os.path.join(here, "telemetry-v1.metrics.prom"),
                                 report_json=os.path.join(here, "telemetry-v1.report.json"),
                                 report_md=os.path.join(here, "telemetry-v1.report.md"),
                                 input=os.path.join(here, "telemetry-v1.log"), record=None))
