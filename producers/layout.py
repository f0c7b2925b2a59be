"""Where a backup lives in storage, and the JSON documents that describe it.

    {backup_id}/manifest.json                               backup-level: topics, partition counts, runs
    {backup_id}/topics/{topic}/{partition}/checkpoint.json  next offset to back up + its segments
    {backup_id}/topics/{topic}/{partition}/{start:020d}.seg.zst

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
    topic: str
    partition: int
    next_offset: int
    segments: list[SegmentInfo] = []
    version: int = LAYOUT_VERSION


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


def manifest_key(backup_id: str) -> str:
    return f"{backup_id}/manifest.json"


def partition_prefix(backup_id: str, topic: str, partition: int) -> str:
    return f"{backup_id}/topics/{topic}/{partition}/"


def checkpoint_key(backup_id: str, topic: str, partition: int) -> str:
    return partition_prefix(backup_id, topic, partition) + "checkpoint.json"


def segment_key(backup_id: str, topic: str, partition: int, start_offset: int, algorithm: str) -> str:
    return partition_prefix(backup_id, topic, partition) + f"{start_offset:020d}{SUFFIX[algorithm]}"


def encode(doc: msgspec.Struct) -> bytes:
    return msgspec.json.format(msgspec.json.encode(doc), indent=1)


def decode_manifest(data: bytes) -> Manifest:
    return msgspec.json.decode(data, type=Manifest)


def decode_checkpoint(data: bytes) -> Checkpoint:
    return msgspec.json.decode(data, type=Checkpoint)
