"""Where a backup lives in storage, and the JSON documents that describe it.

    {backup_id}/manifest.json                               backup-level: topics, their configs, runs
    {backup_id}/topics/{topic}/{partition}/checkpoint.json  the head: next offset, newest segments, index
    {backup_id}/topics/{topic}/{partition}/index/{start:020d}-{end:020d}.json   sealed index chunk
    {backup_id}/topics/{topic}/{partition}/{start:020d}.seg.zst
    {backup_id}/restores/{restore_id}/checkpoint.json       a restore's scope and position (resume)
    {backup_id}/groups.json                                 consumer groups' committed offsets (optional)

A segment counts as backed up only once the checkpoint naming it is written:
the checkpoint is the commit point, and what a resumed run starts from. A
segment written but not yet named (crash in between) is rewritten under the
same key by the next run, so no orphan accumulates.

Layout version 2 (see docs/architecture.md, "Storage layout"):

* every segment's ``SegmentInfo`` carries the SHA-256 of the stored object and
  ``covers_from`` (the partition's next offset before it), so a reader proves
  each object intact and the index gap-free before using it;
* the checkpoint (the *head*) keeps at most ``CHUNK_SEGMENTS - 1`` segments;
  when a flush fills it, those segments are sealed into an immutable *index
  chunk* written before the head, and the head names only the newest chunk
  (``index``: key, size, SHA-256), each chunk naming the one before it. A
  flush therefore writes a bounded amount of metadata however old the backup
  is, and one digest in the head authenticates the whole chain;
* readers refuse documents of a newer version with one line, and keys read
  from metadata must stay under the backup's own prefix.

Version 1 checkpoints (every segment in one list, no digests) are still read;
a backup run that loads one moves its segments into chunks at its first flush.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import Annotated, Literal, Protocol, TypeVar

import msgspec

from kafka_backup.producers import segments
from kafka_backup.producers.segments import SUFFIX
from kafka_backup.producers.storage import Missing, Storage
from kafka_backup.schemas.config import ConfigError

LAYOUT_VERSION = 2
CHUNK_SEGMENTS = 64  # segments per sealed index chunk; the head holds fewer

# Constraints checked when a document is decoded: values that become storage keys or offsets must be sane.
TopicName = Annotated[str, msgspec.Meta(pattern=r"^(?!\.{1,2}$)[A-Za-z0-9._-]{1,249}$")]  # Kafka's rule
Count = Annotated[int, msgspec.Meta(ge=0)]
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{64})?$")]
Algorithm = Literal["zstd", "lz4", "snappy", "gzip", "none"]


class MetadataError(Exception):
    """A checkpoint, index chunk or manifest that cannot be used: garbled, truncated, from a newer
    writer, or naming a key outside the backup. One line naming the object; ``error_type`` is the
    ``kafka_backup_errors_total`` category."""

    def __init__(self, key: str, problem: str, error_type: str = "corrupt_metadata") -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.error_type = error_type


class SegmentDamaged(Exception):
    """A segment that fails its checks (missing, size, digest, decoding, or records not as claimed)."""

    def __init__(self, key: str, problem: str, error_type: str = "integrity") -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.error_type = error_type


class SegmentInfo(msgspec.Struct, omit_defaults=True):
    key: str
    start_offset: Count
    end_offset: Count  # exclusive
    records: Count
    bytes: Count
    uncompressed_bytes: Count
    stored_bytes: Count
    algorithm: Algorithm
    min_ts: int | None = None
    max_ts: int | None = None
    sha256: Sha256 = ""  # of the stored object; "" in layout 1: integrity cannot be checked
    covers_from: Annotated[int, msgspec.Meta(ge=-1)] = -1  # the partition's next offset before it; -1 in layout 1


class IndexRef(msgspec.Struct, omit_defaults=True):
    """Names one sealed index chunk: where it is, its exact size and digest, what it covers."""

    key: str
    bytes: Count
    sha256: Sha256
    segments: Count  # in this chunk and every chunk before it
    end_offset: Count  # the last segment's end
    max_ts: int | None = None  # newest record timestamp in this chunk and before


class IndexChunk(msgspec.Struct):
    """Immutable: ``CHUNK_SEGMENTS`` consecutive segments of one partition, and the chunk before them."""

    topic: TopicName
    partition: Count
    segments: list[SegmentInfo]
    previous: IndexRef | None = None
    version: int = LAYOUT_VERSION


class Checkpoint(msgspec.Struct):
    """The head of a partition's index.

    ``segments`` are the newest segments, not yet sealed into a chunk; ``index`` names the
    newest sealed chunk (``None`` before the first). In layout 1 ``segments`` held every segment.

    ``reported_offset``: the telemetry cluster acknowledged the ``SegmentStored``
    event of every segment ending at or below it, when the checkpoint was written. A
    worker that loads the checkpoint reports the segments above it again: their events
    may have died with a killed worker's in-memory queue, or (routinely: a run does not
    rewrite the checkpoints it stored segments in) been acknowledged after it was written.
    The aggregator counts an offset range once.
    """

    topic: TopicName
    partition: Count
    next_offset: Count
    segments: list[SegmentInfo] = []
    version: int = LAYOUT_VERSION
    reported_offset: Count = 0
    index: IndexRef | None = None

    @property
    def segment_count(self) -> int:
        return (self.index.segments if self.index else 0) + len(self.segments)

    @property
    def max_ts(self) -> int | None:
        known = [s.max_ts for s in self.segments if s.max_ts is not None]
        if self.index is not None and self.index.max_ts is not None:
            known.append(self.index.max_ts)
        return max(known, default=None)


class TopicSnapshot(msgspec.Struct, omit_defaults=True):
    """A source topic as the backup last saw it: partitions and the configs a faithful copy needs.

    ``configs`` holds every key of ``TOPIC_CONFIG_KEYS`` the source broker reported, with its
    value (defaults included: the target cluster's defaults may differ); ``explicit`` the keys
    set on the topic itself. ``read_ts``: when they were read (epoch seconds).
    """

    partitions: Count
    configs: dict[str, str] = {}
    explicit: list[str] = []
    read_ts: float = 0.0


# Topic-level configs that decide whether a restored copy keeps, deletes, compacts or refuses records.
TOPIC_CONFIG_KEYS = (
    "cleanup.policy", "retention.ms", "retention.bytes", "delete.retention.ms", "min.compaction.lag.ms",
    "max.compaction.lag.ms", "min.cleanable.dirty.ratio", "segment.ms", "segment.bytes", "max.message.bytes",
    "message.timestamp.type", "message.timestamp.difference.max.ms", "message.timestamp.before.max.ms",
    "message.timestamp.after.max.ms", "compression.type",
)


class Run(msgspec.Struct, omit_defaults=True):
    worker: str = msgspec.field(name="instance")  # the manifest keeps layout 1's name
    started_ts: float
    ended_ts: float | None = None
    status: str = "running"
    mode: str = "one-shot"


class Manifest(msgspec.Struct):
    backup_id: str
    topics: dict[TopicName, Count] = {}  # topic -> partition count at the last run
    compression: str = "zstd"
    created_ts: float = 0.0
    updated_ts: float = 0.0
    runs: list[Run] = []
    version: int = LAYOUT_VERSION
    topic_configs: dict[TopicName, TopicSnapshot] = {}  # topic -> its configuration at the last run (layout 2)


class GroupOffset(msgspec.Struct):
    topic: TopicName
    partition: Count
    offset: Count  # the group's committed offset: the next record it would read


class GroupSnapshot(msgspec.Struct):
    """One consumer group's committed offsets on the backed-up topics, as read at ``read_ts``."""

    read_ts: float
    offsets: list[GroupOffset] = []


class GroupsDocument(msgspec.Struct):
    """``{backup_id}/groups.json`` (layout 2, optional: older backups have none).

    Written by the backup at the end of each run (and every ``consumer_groups_interval_s``
    of a continuous one): each group read replaces its previous entry; a group that no
    longer exists keeps the entry of its last read. ``offset-reset --from-backup`` moves a
    group to the restored record whose original offset (its ``kafka-backup.offset``
    header) is the first at or after the recorded one.
    """

    backup_id: str
    groups: dict[str, GroupSnapshot] = {}
    updated_ts: float = 0.0
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
    # each restored record carries OFFSET_HEADER (its source offset); False for restores made before it
    offset_header: bool = False


OFFSET_HEADER = "kafka-backup.offset"  # restored records' source offset, decimal ASCII


class Verification(msgspec.Struct, omit_defaults=True):
    """What the last ``kafka-backup verify`` run that got to the end found (``{backup_id}/verification.json``)."""

    ts: float  # when it ended (epoch seconds)
    segments: Count
    bad: Count
    gaps: Count
    unverified: Count = 0  # segments without a digest (layout 1)
    bad_keys: list[str] = []  # the first 100 bad segments' storage keys
    version: int = LAYOUT_VERSION


def verification_key(backup_id: str) -> str:
    return f"{backup_id}/verification.json"


def decode_verification(data: bytes, key: str) -> Verification:
    return _decode(data, Verification, key)


def manifest_key(backup_id: str) -> str:
    return f"{backup_id}/manifest.json"


def groups_key(backup_id: str) -> str:
    return f"{backup_id}/groups.json"


def partition_prefix(backup_id: str, topic: str, partition: int) -> str:
    return f"{backup_id}/topics/{topic}/{partition}/"


def checkpoint_key(backup_id: str, topic: str, partition: int) -> str:
    return partition_prefix(backup_id, topic, partition) + "checkpoint.json"


def segment_key(backup_id: str, topic: str, partition: int, start_offset: int, algorithm: str) -> str:
    return partition_prefix(backup_id, topic, partition) + f"{start_offset:020d}{SUFFIX[algorithm]}"


def restore_checkpoint_key(backup_id: str, restore_id: str) -> str:
    return f"{backup_id}/restores/{restore_id}/checkpoint.json"


def chunk_key(backup_id: str, topic: str, partition: int, start_offset: int, end_offset: int) -> str:
    return partition_prefix(backup_id, topic, partition) + f"index/{start_offset:020d}-{end_offset:020d}.json"


def contained(key: str, prefix: str) -> bool:
    """``key`` is a plain relative key under ``prefix``: no ``..``, ``.``, empty part, backslash or absolute path."""
    parts = key.split("/")
    return (key.startswith(prefix) and not key.startswith("/") and "\\" not in key
            and posixpath.normpath(key) == key and not any(p in ("", ".", "..") for p in parts))


def check_key(key: str, prefix: str, where: str) -> None:
    if not contained(key, prefix):
        raise MetadataError(where, f"names the key {key!r}, outside {prefix!r}; refusing to read it "
                                   "(tampered or corrupt metadata)", "integrity")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(doc: msgspec.Struct) -> bytes:
    return msgspec.json.format(msgspec.json.encode(doc), indent=1)


class _Version(msgspec.Struct):
    version: int = 0


class _Versioned(Protocol):
    version: int


Doc = TypeVar("Doc", bound=_Versioned)


def _decode(data: bytes, type_: type[Doc], key: str) -> Doc:
    try:
        doc = msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as err:
        _refuse_newer(data, key)  # a newer layout may have changed a field: say so, not "invalid"
        raise MetadataError(key, f"holds an invalid value ({str(err)[:200]}); restore it from a storage "
                                 "version/replica") from None
    except msgspec.DecodeError as err:
        raise MetadataError(key, f"is corrupt or truncated ({str(err)[:200]}); restore it from a storage "
                                 "version/replica") from None
    _refuse_newer_version(doc.version, key)
    return doc


def _refuse_newer(data: bytes, key: str) -> None:
    try:
        version = msgspec.json.decode(data, type=_Version).version
    except msgspec.DecodeError:
        return
    _refuse_newer_version(version, key)


def _refuse_newer_version(version: int, key: str) -> None:
    if version > LAYOUT_VERSION:
        raise MetadataError(key, f"has layout version {version}, newer than this kafka-backup reads "
                                 f"({LAYOUT_VERSION}); upgrade kafka-backup", "layout_version")


def decode_manifest(data: bytes, key: str = "manifest.json") -> Manifest:
    return _decode(data, Manifest, key)


def read_manifest(storage: Storage, backup_id: str, field: str, url: str) -> Manifest:
    """The backup's manifest; a missing one is a user mistake named in one line (``field``: ``restore``,
    ``verify``; ``url``: the ``--storage`` given): the wrong storage root, or no such backup in it."""
    key = manifest_key(backup_id)
    try:
        raw = storage.get(key, "manifest")
    except Missing as err:
        if err.root:
            raise ConfigError(f"{field}.storage: {err.root} does not exist; give the --storage the backup "
                              "wrote to") from None
        raise ConfigError(f"{field}.backup_id: no backup {backup_id!r} in {url} (no {key}); check --backup-id "
                          "and --storage") from None
    return decode_manifest(raw, key)


def read_checkpoint(storage: Storage, backup_id: str, topic: str, partition: int,
                    report: bool = False) -> Checkpoint | None:
    """A partition's checkpoint, checked to be that partition's; ``None``: it never had a record."""
    key = checkpoint_key(backup_id, topic, partition)
    raw = storage.get_optional(key, "checkpoint", report=report)
    if raw is None:
        return None
    cp = decode_checkpoint(raw, key)
    if (cp.topic, cp.partition) != (topic, partition):
        raise MetadataError(key, f"belongs to {cp.topic}/{cp.partition}, not {topic}/{partition}", "integrity")
    return cp


def decode_checkpoint(data: bytes, key: str = "checkpoint.json") -> Checkpoint:
    return _decode(data, Checkpoint, key)


def decode_restore_checkpoint(data: bytes, key: str = "checkpoint.json") -> RestoreCheckpoint:
    return _decode(data, RestoreCheckpoint, key)


def decode_groups(data: bytes, key: str = "groups.json") -> GroupsDocument:
    return _decode(data, GroupsDocument, key)


def decode_chunk(data: bytes, ref: IndexRef, topic: str, partition: int) -> IndexChunk:
    if len(data) != ref.bytes or digest(data) != ref.sha256:
        raise MetadataError(ref.key, f"does not match the digest and size ({ref.bytes} bytes) the index "
                                     "names; restore it from a storage version/replica", "integrity")
    chunk = _decode(data, IndexChunk, ref.key)
    if (chunk.topic, chunk.partition) != (topic, partition):
        raise MetadataError(ref.key, f"belongs to {chunk.topic}/{chunk.partition}, not {topic}/{partition}",
                            "integrity")
    return chunk


# ---- the index: appending (the backup) and reading (restore, verify) ---------------------------


def append(backup_id: str, cp: Checkpoint, info: SegmentInfo,
           reported_offset: int) -> tuple[Checkpoint, list[tuple[str, bytes]]]:
    """The new head naming ``info``, and the sealed chunks to write before it (key, bytes).

    The head keeps fewer than ``CHUNK_SEGMENTS`` segments, so a flush writes a bounded
    amount of metadata; a layout 1 head's long list is sealed here, chunk by chunk (migration).
    """
    tail = [*cp.segments, info]
    ref = cp.index
    writes: list[tuple[str, bytes]] = []
    while len(tail) >= CHUNK_SEGMENTS:
        sealed, tail = tail[:CHUNK_SEGMENTS], tail[CHUNK_SEGMENTS:]
        data = encode(IndexChunk(cp.topic, cp.partition, sealed, ref))
        key = chunk_key(backup_id, cp.topic, cp.partition, sealed[0].start_offset, sealed[-1].end_offset)
        known = [s.max_ts for s in sealed if s.max_ts is not None]
        if ref is not None and ref.max_ts is not None:
            known.append(ref.max_ts)
        ref = IndexRef(key, len(data), digest(data), (ref.segments if ref else 0) + len(sealed),
                       sealed[-1].end_offset, max(known, default=None))
        writes.append((key, data))
    head = Checkpoint(cp.topic, cp.partition, info.end_offset, tail, reported_offset=reported_offset, index=ref)
    return head, writes


def chunks(cp: Checkpoint, read: Callable[[str], bytes], backup_id: str, stop_below: int = -1) -> Iterator[IndexChunk]:
    """Yield the sealed chunks, newest first, each checked against the digest naming it.

    ``read(key) -> bytes``. Stops once a chunk ends at or below ``stop_below``.
    """
    prefix = partition_prefix(backup_id, cp.topic, cp.partition)
    ref, where = cp.index, checkpoint_key(backup_id, cp.topic, cp.partition)
    while ref is not None and ref.end_offset > stop_below:
        check_key(ref.key, prefix + "index/", where)
        chunk = decode_chunk(read(ref.key), ref, cp.topic, cp.partition)
        yield chunk
        where, ref = ref.key, chunk.previous


def all_segments(cp: Checkpoint, read: Callable[[str], bytes], backup_id: str) -> list[SegmentInfo]:
    """Every segment of the partition in offset order: the chunks' and the head's, keys checked."""
    newest_first = [chunk.segments for chunk in chunks(cp, read, backup_id)]
    out = [seg for listed in reversed(newest_first) for seg in listed]  # not prepended chunk by chunk: quadratic
    out += cp.segments
    prefix = partition_prefix(backup_id, cp.topic, cp.partition)
    where = checkpoint_key(backup_id, cp.topic, cp.partition)
    for seg in out:
        check_key(seg.key, prefix, where)
        if seg.algorithm not in SUFFIX:
            raise MetadataError(where, f"names an unknown compression {seg.algorithm!r} for {seg.key}")
    return out



def read_index(storage: Storage, backup_id: str, topic: str, partition: int) -> tuple[Checkpoint | None, list[SegmentInfo]]:
    """A partition's checkpoint and every segment its index names, in offset order, both reads reported (as
    a restore and ``verify`` read them); ``(None, [])``: the partition never had a record."""
    cp = read_checkpoint(storage, backup_id, topic, partition, report=True)
    if cp is None:
        return None, []
    return cp, indexed_segments(storage, backup_id, cp)


def indexed_segments(storage: Storage, backup_id: str, cp: Checkpoint) -> list[SegmentInfo]:
    """Every segment ``cp`` names, its sealed index chunks read (reported as ``index``): :func:`all_segments`."""
    return all_segments(cp, lambda key: storage.get(key, "index"), backup_id)

def read_segment(data: bytes, seg: SegmentInfo, topic: str, partition: int) -> list[segments.StoredRecord]:
    """The segment's records, after proving the object is the one the index names.

    Size, then SHA-256 (when recorded) before anything is decoded; decompression bounded by
    the recorded uncompressed size; then the records must be the partition's, as many as
    recorded, in strictly increasing offsets from ``start_offset`` to ``end_offset - 1``.
    """
    if len(data) != seg.stored_bytes:
        raise SegmentDamaged(seg.key, f"is {len(data)} bytes, the index recorded {seg.stored_bytes}")
    if seg.sha256 and digest(data) != seg.sha256:
        raise SegmentDamaged(seg.key, "does not match its SHA-256 digest: the object was altered or damaged")
    try:
        decoded = segments.decode(data, seg.algorithm, seg.uncompressed_bytes)
    except segments.CorruptSegment as err:
        raise SegmentDamaged(seg.key, f"is corrupt ({err})", "codec") from None
    records = decoded.records
    offsets = [r.offset for r in records]
    if (decoded.topic, decoded.partition) != (topic, partition):
        raise SegmentDamaged(seg.key, f"holds records of {decoded.topic}/{decoded.partition}, "
                                      f"not {topic}/{partition}")
    if (len(records) != seg.records or not records or offsets[0] != seg.start_offset
            or offsets[-1] != seg.end_offset - 1 or any(b <= a for a, b in pairwise(offsets))):
        raise SegmentDamaged(seg.key, f"holds {len(records)} records at offsets "
                                      f"{offsets[0] if offsets else '-'}..{offsets[-1] if offsets else '-'}, "
                                      f"the index claims {seg.records} at {seg.start_offset}..{seg.end_offset - 1}")
    return records
