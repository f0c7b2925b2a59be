"""Where a backup lives in storage, and the JSON documents that describe it.

    {backup_id}/manifest.json                               backup-level: topics, partition counts, runs
    {backup_id}/topics/{topic}/{partition}/checkpoint.json  next offset to back up + its segments
    {backup_id}/topics/{topic}/{partition}/{start:020d}.seg.zst
    {backup_id}/restores/{restore_id}/checkpoint.json       a restore's scope and position (resume)

A segment counts as backed up only once the checkpoint naming it is written:
the checkpoint is the commit point, and what a resumed run starts from. A
segment written but not yet named (crash in between) is rewritten under the
same key by the next run, so no orphan accumulates.
"""

from __future__ import annotations

import msgspec

from producers.segments import SUFFIX

LAYOUT_VERSION = 1


class SegmentInfo(msgspec.Struct, omit_defaults=True):
    key: str
    start_offset: int
    end_offset: int  # exclusive
    records: int
    bytes: int
    uncompressed_bytes: int
    stored_bytes: int
    algorithm: str
    min_ts: int | None = None
    max_ts: int | None = None


class Checkpoint(msgspec.Struct):
    """``reported_offset``: the telemetry cluster acknowledged the ``SegmentStored``
    event of every segment ending at or below it. A worker that loads the checkpoint
    reports the segments above it again: their events may have died with a killed
    worker's in-memory queue (the aggregator counts an offset range once).
    """

    topic: str
    partition: int
    next_offset: int
    segments: list[SegmentInfo] = []
    version: int = LAYOUT_VERSION
    reported_offset: int = 0


class Run(msgspec.Struct, omit_defaults=True):
    instance: str
    started_ts: float
    ended_ts: float | None = None
    status: str = "running"
    mode: str = "one-shot"


class Manifest(msgspec.Struct):
    backup_id: str
    topics: dict[str, int] = {}  # topic -> partition count at the last run
    compression: str = "zstd"
    created_ts: float = 0.0
    updated_ts: float = 0.0
    runs: list[Run] = []
    version: int = LAYOUT_VERSION


class RestoreCursor(msgspec.Struct):
    """One source partition of a restore: its fixed scope and how far the restore got.

    ``target_base``/``target_next`` are the target partition's end offset when the
    restore began and after the last acknowledged batch: on resume, a target that
    ends beyond ``target_next`` holds records of a batch acknowledged after this
    checkpoint was written (see ``producers/restore.py``).
    """

    topic: str
    partition: int
    target_topic: str
    end_offset: int  # scope: source offsets below this, as backed up when the restore began
    records: int  # records of this partition inside the restore's time window
    next_offset: int = 0  # first source offset not yet restored
    restored: int = 0  # of ``records``, acknowledged by the target cluster
    target_base: int = 0
    target_next: int = 0


class RestoreCheckpoint(msgspec.Struct):
    """Written once before the first record is produced, then after every acknowledged batch."""

    restore_id: str
    backup_id: str
    topic_map: dict[str, str]  # source -> target, every topic of the backup
    total_records: int
    from_time: int | None = None
    to_time: int | None = None
    restored_total: int = 0
    partitions: list[RestoreCursor] = []
    restored_bytes: int = 0  # key+value bytes of the restored_total records
    created_ts: float = 0.0
    updated_ts: float = 0.0
    completed_ts: float | None = None
    version: int = LAYOUT_VERSION


def manifest_key(backup_id: str) -> str:
    return f"{backup_id}/manifest.json"


def partition_prefix(backup_id: str, topic: str, partition: int) -> str:
    return f"{backup_id}/topics/{topic}/{partition}/"


def checkpoint_key(backup_id: str, topic: str, partition: int) -> str:
    return partition_prefix(backup_id, topic, partition) + "checkpoint.json"


def segment_key(backup_id: str, topic: str, partition: int, start_offset: int, algorithm: str) -> str:
    return partition_prefix(backup_id, topic, partition) + f"{start_offset:020d}{SUFFIX[algorithm]}"


def restore_checkpoint_key(backup_id: str, restore_id: str) -> str:
    return f"{backup_id}/restores/{restore_id}/checkpoint.json"


def encode(doc: msgspec.Struct) -> bytes:
    return msgspec.json.format(msgspec.json.encode(doc), indent=1)


def decode_manifest(data: bytes) -> Manifest:
    return msgspec.json.decode(data, type=Manifest)


def decode_checkpoint(data: bytes) -> Checkpoint:
    return msgspec.json.decode(data, type=Checkpoint)


def decode_restore_checkpoint(data: bytes) -> RestoreCheckpoint:
    return msgspec.json.decode(data, type=RestoreCheckpoint)
