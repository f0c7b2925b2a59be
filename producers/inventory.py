"""What a storage location holds: ``kafka-backup list`` and ``kafka-backup describe``.

Both read metadata only (manifests, checkpoints, sealed index chunks, the last verify verdict),
never a segment, and work on S3 as on the filesystem. Their JSON (``--format json``) is a
documented, stable contract (docs/inventory.md): fields are only ever added.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

from kafka_backup.producers import layout
from kafka_backup.producers.storage import Storage, StorageError
from kafka_backup.schemas.config import ConfigError

JSON_VERSION = 1


class Range(msgspec.Struct, array_like=True):
    """[start, end) offsets covered by consecutive segments with no gap."""

    start: int
    end: int


class PartitionInfo(msgspec.Struct):
    topic: str
    partition: int
    next_offset: int  # the next offset the backup would read
    segments: int
    records: int
    bytes: int  # key + value bytes of the records
    stored_bytes: int  # the segment objects' sizes
    ranges: list[Range]  # offsets covered
    gaps: list[Range]  # offsets between ranges that no segment covers (deleted by retention before backup)
    oldest_record_ts: int | None  # epoch ms
    newest_record_ts: int | None
    compression: list[str]
    unverifiable_segments: int  # without a digest (layout 1)


class RunInfo(msgspec.Struct):
    started_ts: float
    ended_ts: float | None
    status: str
    mode: str


class VerificationInfo(msgspec.Struct):
    ts: float
    segments: int
    bad: int
    gaps: int
    unverified: int
    bad_keys: list[str]


class BackupSummary(msgspec.Struct):
    """One line of ``kafka-backup list``."""

    backup_id: str
    topics: list[str]
    partitions: int
    records: int
    bytes: int
    stored_bytes: int
    oldest_record_ts: int | None
    newest_record_ts: int | None
    last_run: RunInfo | None
    layout_version: int


class BackupDescription(msgspec.Struct):
    """``kafka-backup describe``: the summary, and every partition."""

    summary: BackupSummary
    partitions: list[PartitionInfo]
    last_verification: VerificationInfo | None


def backup_ids(storage: Storage) -> list[str]:
    """Every directory of the storage root holding a manifest."""
    out = []
    for name in storage.children(""):
        if storage.get_optional(layout.manifest_key(name), "manifest") is not None:
            out.append(name)
    return out


def describe(storage: Storage, backup_id: str, where: str = "storage") -> BackupDescription:
    manifest = _manifest(storage, backup_id, where)
    parts = [_partition(storage, backup_id, topic, p)
             for topic, count in sorted(manifest.topics.items()) for p in range(count)]
    raw = storage.get_optional(layout.verification_key(backup_id), "manifest")
    verdict = None
    if raw is not None:
        v = layout.decode_verification(raw, layout.verification_key(backup_id))
        verdict = VerificationInfo(ts=v.ts, segments=v.segments, bad=v.bad, gaps=v.gaps, unverified=v.unverified,
                                   bad_keys=list(v.bad_keys))
    return BackupDescription(summary=_summary(manifest, parts), partitions=parts, last_verification=verdict)


def summaries(storage: Storage) -> Iterator[BackupSummary]:
    for bid in backup_ids(storage):
        yield describe(storage, bid).summary


def _manifest(storage: Storage, backup_id: str, where: str) -> layout.Manifest:
    key = layout.manifest_key(backup_id)
    raw = storage.get_optional(key, "manifest")
    if raw is None:
        raise ConfigError(f"backup.backup_id: no backup {backup_id!r} in this {where} (no {key}); "
                          "`kafka-backup list --storage URL` shows what is there")
    return layout.decode_manifest(raw, key)


def _partition(storage: Storage, backup_id: str, topic: str, partition: int) -> PartitionInfo:
    key = layout.checkpoint_key(backup_id, topic, partition)
    raw = storage.get_optional(key, "checkpoint")
    info = PartitionInfo(topic=topic, partition=partition, next_offset=0, segments=0, records=0, bytes=0,
                         stored_bytes=0, ranges=[], gaps=[], oldest_record_ts=None, newest_record_ts=None,
                         compression=[], unverifiable_segments=0)
    if raw is None:
        return info  # the partition was never backed up (no record yet)
    cp = layout.decode_checkpoint(raw, key)
    segs = layout.all_segments(cp, lambda k: storage.get(k, "checkpoint"), backup_id)
    info.next_offset = cp.next_offset
    info.segments = len(segs)
    algorithms: set[str] = set()
    previous_end = None
    for seg in segs:
        info.records += seg.records
        info.bytes += seg.bytes
        info.stored_bytes += seg.stored_bytes
        algorithms.add(seg.algorithm)
        if not seg.sha256:
            info.unverifiable_segments += 1
        if seg.min_ts is not None:
            info.oldest_record_ts = min(info.oldest_record_ts or seg.min_ts, seg.min_ts)
        if seg.max_ts is not None:
            info.newest_record_ts = max(info.newest_record_ts or seg.max_ts, seg.max_ts)
        # a segment's share begins where the previous one ended (covers_from): offsets in between
        # that held no record (transaction markers) are covered, offsets no segment covers are a gap
        # (layout 1 has no covers_from: there a marker between segments also shows as a gap)
        begins = seg.covers_from if seg.covers_from >= 0 else seg.start_offset
        if previous_end is None or begins > previous_end:
            if previous_end is not None:
                info.gaps.append(Range(previous_end, begins))
            info.ranges.append(Range(begins, seg.end_offset))
        else:
            info.ranges[-1].end = max(info.ranges[-1].end, seg.end_offset)
        previous_end = seg.end_offset
    info.compression = sorted(algorithms)
    return info


def _summary(manifest: layout.Manifest, parts: list[PartitionInfo]) -> BackupSummary:
    run = manifest.runs[-1] if manifest.runs else None
    oldest = [p.oldest_record_ts for p in parts if p.oldest_record_ts is not None]
    newest = [p.newest_record_ts for p in parts if p.newest_record_ts is not None]
    return BackupSummary(
        backup_id=manifest.backup_id, topics=sorted(manifest.topics), partitions=len(parts),
        records=sum(p.records for p in parts), bytes=sum(p.bytes for p in parts),
        stored_bytes=sum(p.stored_bytes for p in parts), oldest_record_ts=min(oldest, default=None),
        newest_record_ts=max(newest, default=None),
        last_run=RunInfo(started_ts=run.started_ts, ended_ts=run.ended_ts, status=run.status, mode=run.mode)
        if run else None,
        layout_version=manifest.version)


def as_json(doc: object) -> bytes:
    return msgspec.json.format(msgspec.json.encode({"version": JSON_VERSION, **msgspec.to_builtins(doc)}), indent=2)


def storage_failure(err: StorageError, where: str) -> ConfigError:
    return ConfigError(f"{where}: {err.error_type}: {err}")
