"""``restore --dry-run``: what a restore would do, found the way the restore finds it, with nothing written.

Reads the backup's metadata (and the segments a time window cuts, as the restore
counts them) and the target cluster's metadata and topic configurations; creates,
produces, checkpoints and emits nothing.
"""

from __future__ import annotations

import sys
from typing import TextIO

from kafka_backup.producers import layout
from kafka_backup.producers.restore import RestoreWorker
from kafka_backup.producers.restore_scope import resolve_topic_map
from kafka_backup.producers.run import NullEmitter
from kafka_backup.producers.storage import Storage
from kafka_backup.schemas.config import ConfigError, RestoreConfig


class Plan:
    """What a restore would do, found the way the restore finds it, with nothing written."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, str, int, int]] = []  # source topic, partition, target, records, bytes
        self.targets: list[tuple[str, str]] = []  # target, what happens to it
        self.refusals: list[str] = []
        self.resume: str = ""
        self.estimate: str = ""


def plan_restore(worker: RestoreWorker) -> Plan:
    """A dry run: the scope, the targets, the retention verdict and an estimate; no write anywhere.

    Reads the backup's metadata (and the segments a time window cuts, as the restore counts them)
    and the target cluster's metadata and topic configurations; creates, produces, checkpoints and
    emits nothing.
    """
    plan = Plan()
    manifest = worker.read_manifest()
    key = layout.restore_checkpoint_key(worker.backup_id, worker.id)
    raw = worker.storage.get_optional(key, "checkpoint")
    if raw is not None:
        cp = layout.decode_restore_checkpoint(raw, key)
        plan.resume = (f"restore {worker.id!r} exists: the run would resume at {cp.restored_total:,} of "
                       f"{cp.total_records:,} records")
        mapping = resolve_topic_map(worker.requested_map, dict.fromkeys(cp.topic_map, 0), worker.backup_id)
        try:
            worker.check_same_restore(cp, mapping)
        except ConfigError as err:
            plan.refusals.append(str(err))
        for cur in cp.partitions:
            plan.rows.append((cur.topic, cur.partition, cur.target_topic, cur.records - cur.restored, -1))
        remaining = cp.total_records - cp.restored_total
    else:
        mapping = resolve_topic_map(worker.requested_map, manifest.topics, worker.backup_id)
        counts = {t: manifest.topics[t] for t in mapping}
        try:
            missing = worker.targets.check(mapping, counts)
        except ConfigError as err:
            plan.refusals.append(str(err))
            missing = {}
        created = dict(missing)
        limits = worker.targets.limits(mapping, missing, manifest, create=False)
        cp = worker.scope(mapping, counts, limits)
        try:
            worker.targets.check_limits(cp, limits)
        except ConfigError as err:
            plan.refusals.append(str(err))
        for source, target in sorted(mapping.items()):
            if target in created:
                snap = manifest.topic_configs.get(source)
                configs = ", ".join(f"{k}={v}" for k, v in sorted(snap.configs.items())) if snap else ""
                what = (f"would be created with {created[target]} partitions and the source's configuration"
                        f"{': ' + configs if configs else ''}" if snap else
                        f"would be created with {created[target]} partitions and the broker's defaults "
                        "(this backup recorded no topic configuration)")
            else:
                what = "exists"
            lim = limits[source]
            verdict = ("retention: keeps every record in scope" if not (lim.deleted or lim.refused) else
                       f"retention: would delete {lim.deleted:,} and reject {lim.refused:,} of the records in scope")
            plan.targets.append((target, f"{what}; {verdict}"))
        for group in worker.reader.cursors_in_groups(cp.partitions):
            for cur in group:
                plan.rows.append((cur.topic, cur.partition, cur.target_topic, cur.records,
                                  sum(_bytes_in(worker, seg) for seg in worker.reader.segments(cur))))
        remaining = cp.total_records
    plan.estimate = _estimate(worker, remaining)
    return plan


def _bytes_in(worker: RestoreWorker, seg: layout.SegmentInfo) -> int:
    """Key + value bytes of the segment's records inside the window, as the restore reports them."""
    if worker.window.misses(seg):
        return 0
    if worker.window.covers(seg):
        return seg.bytes
    return sum(len(r.key or b"") + len(r.value or b"") for r in worker.reader.load(seg)
               if worker.window.contains(r.timestamp))


def _estimate(worker: RestoreWorker, remaining: int) -> str:
    """From the rate limit, else from the fastest earlier restore of this backup that completed."""
    if remaining == 0:
        return "nothing to restore"
    if worker.cfg.rate_limit:
        return f"about {remaining / worker.cfg.rate_limit:,.0f} s at the rate limit of {worker.cfg.rate_limit:,}/s"
    best = None
    for rid in worker.storage.children(f"{worker.backup_id}/restores/"):
        raw = worker.storage.get_optional(layout.restore_checkpoint_key(worker.backup_id, rid), "checkpoint")
        if raw is None:
            continue
        try:
            cp = layout.decode_restore_checkpoint(raw, rid)
        except layout.MetadataError:
            continue
        if cp.completed_ts and cp.completed_ts > cp.created_ts and cp.restored_total:
            rate = cp.restored_total / (cp.completed_ts - cp.created_ts)
            best = max(best or 0.0, rate)
    if best:
        return f"about {remaining / best:,.0f} s at {best:,.0f} records/s, measured by an earlier restore of this backup"
    return "unknown: no rate limit, and no earlier restore of this backup to measure one"


def run_dry(bootstrap: str, rcfg: RestoreConfig, storage: Storage, out: TextIO | None = None) -> int:
    """``restore --dry-run``: print the plan; exit 1 when the real restore would refuse to start."""
    out = out or sys.stdout
    worker = RestoreWorker(bootstrap, rcfg, storage, NullEmitter())
    try:
        plan = plan_restore(worker)
    finally:
        worker.targets.close()  # its clients, while the interpreter is whole
    w = out.write
    w(f"dry run of restore {worker.id!r} of backup {worker.backup_id!r}: nothing is written\n")
    if plan.resume:
        w(plan.resume + "\n")
    window = worker.window
    if window.from_time is not None or window.to_time is not None:
        w(f"time window: [{window.from_time}, {window.to_time}) ms\n")
    w(f"{'SOURCE':<30} {'PART':>4}  {'TARGET':<30} {'RECORDS':>12} {'BYTES':>14}\n")
    for topic, p, target, records, nbytes in plan.rows:
        w(f"{topic:<30} {p:>4}  {target:<30} {records:>12,} {(f'{nbytes:,}' if nbytes >= 0 else '-'):>14}\n")
    total = sum(r[3] for r in plan.rows)
    total_bytes = sum(r[4] for r in plan.rows if r[4] >= 0)
    w(f"{'total':<30} {'':>4}  {'':<30} {total:>12,} {total_bytes:>14,}\n")
    for target, what in plan.targets:
        w(f"target {target}: {what}\n")
    w(f"estimated duration: {plan.estimate}\n")
    for refusal in plan.refusals:
        w(f"WOULD REFUSE: {refusal}\n")
    w("verdict: " + ("the restore would refuse to start\n" if plan.refusals else "the restore would start\n"))
    return 1 if plan.refusals else 0
