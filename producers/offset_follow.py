"""``offset-reset --from-backup``: consumer groups follow the data into the restored topics.

The backup recorded each group's committed offsets on the backed-up topics
(``{backup_id}/groups.json``, ``producers/group_offsets.py``); the restore gave
every record a ``kafka-backup.offset`` header, its offset in the source
(``producers/restore.py``). For each group, source partition and recorded
offset ``R`` (the next record the group would have read), the group's new
offset on the target partition is the target offset of **the first restored
record whose original offset is at or after R**, so its consumers resume where
they were: not at the beginning, not at the end.

* ``R`` before the first restored record (a point-in-time restore starting
  later) maps to the first restored record; ``R`` after the last restored
  record maps to the end of the restored records (the offset after the last).
* The restored records of one partition carry increasing original offsets, so
  the target offset is found by binary search over the target partition,
  reading one record per probe. With ``--restore-id`` the search covers exactly
  the offsets that restore wrote (its checkpoint's ``target_base`` to
  ``target_next``) and the topic map is the restore's own. With ``--topic-map``
  (or none: same names) it covers the whole target partition; records without
  the header (written by others before or after the restore) are stepped over,
  which assumes one restore's records in the partition: prefer ``--restore-id``.
* Preview by default: the plan is printed and nothing changes. ``--execute``
  changes the offsets; a group with active members is refused (one line, exit
  2) before any group is changed. Partitions for which the backup recorded no
  offset of the group are left as they are (the group's ``auto.offset.reset``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass
from typing import TextIO

from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from kafka_backup.producers import layout
from kafka_backup.producers.offset_reset import UNSUPPORTED, OffsetResetFailed, write_offsets
from kafka_backup.producers.restore_scope import parse_topic_map, resolve_topic_map
from kafka_backup.producers.run import Job, run_reporting
from kafka_backup.producers.storage import Storage, StorageError
from kafka_backup.producers.telemetry import Emitter
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.config import ConfigError, OffsetResetConfig, TelemetryConfig, require_safe_id
from kafka_backup.schemas.kafka_admin import client_config, close_admin
from kafka_backup.schemas.partition_reader import PartitionReader, ReadTimedOut

log = logging.getLogger("kafka_backup.offset_follow")

PROBE_TIMEOUT_S = 30

# probe(m) -> (target offset, original offset) of the first restored record at target offset >= m, or None
Probe = Callable[[int], "tuple[int, int] | None"]


def first_at_or_after(probe: Probe, lo: int, hi: int, recorded: int) -> int | None:
    """Target offset in ``[lo, hi]`` of the first restored record whose original offset is >= ``recorded``;
    ``hi``-side end (the offset after the last restored record) if there is none; ``None`` if no restored
    record lies in ``[lo, hi)``.

    Binary search for the smallest ``m`` with ``probe(m)`` absent or at/after ``recorded`` (monotone:
    original offsets increase with target offsets). If ``probe(m)`` is absent and ``m > lo``, the
    record found by ``probe(m - 1)`` sits at ``m - 1`` and is the last restored one, so ``m`` is the end.
    """
    seen: dict[int, tuple[int, int] | None] = {}

    def at(m: int) -> tuple[int, int] | None:
        if m >= hi:
            return None
        if m not in seen:
            seen[m] = probe(m)
        return seen[m]

    a, b = lo, hi
    while a < b:
        mid = (a + b) // 2
        found = at(mid)
        if found is None or found[1] >= recorded:
            b = mid
        else:
            a = mid + 1
    found = at(a)
    if found is not None:
        return found[0]
    return None if a == lo else a


@dataclass
class Move:
    group: str
    topic: str  # source
    partition: int
    recorded: int
    read_ts: float
    target_topic: str
    target: int | None = None  # new committed offset; None: nothing restored to follow
    note: str = ""


def validate(cfg: OffsetResetConfig) -> None:
    """User mistakes, before anything connects."""
    require_safe_id("offset_reset.from_backup", cfg.from_backup)
    if not cfg.storage:
        raise ConfigError("offset_reset.storage: no storage given; use --storage URL (the one the backup wrote to)")
    if not cfg.groups:
        raise ConfigError("offset_reset.groups: no groups given; use --groups g1,g2 (groups the backup recorded)")
    for group in cfg.groups:  # a group is a job id of the telemetry, as for --group
        require_safe_id("offset_reset.groups", group)
    others = [flag for flag, on in (("--group", cfg.group), ("--topics", cfg.topics),
                                    ("--to-timestamp", cfg.to_timestamp is not None),
                                    ("--to-earliest", cfg.to_earliest), ("--to-latest", cfg.to_latest)) if on]
    if others:
        raise ConfigError(f"offset_reset.from_backup: --from-backup moves --groups to the restored records; "
                          f"drop {', '.join(others)}")
    if cfg.restore_id and cfg.topic_map:
        raise ConfigError("offset_reset.topic_map: give --restore-id (its own topic map, exact) or --topic-map, "
                          "not both")
    if cfg.restore_id:
        require_safe_id("offset_reset.restore_id", cfg.restore_id)
    _parse_map(cfg.topic_map)


def _parse_map(entries: list[str]) -> dict[str, str]:
    try:
        return parse_topic_map(entries)
    except ConfigError as err:
        raise ConfigError(str(err).replace("restore.topic_map", "offset_reset.topic_map")) from None


class OffsetFollow:
    def __init__(self, bootstrap: str, cfg: OffsetResetConfig, storage: Storage, out: TextIO | None = None) -> None:
        validate(cfg)
        self.bootstrap = bootstrap
        self.cfg = cfg
        self.id = cfg.from_backup
        self.storage = storage
        self.out = out
        self.admin = AdminClient(client_config(bootstrap))
        # a probe below the log start (retention deleted the restore's first records) reads the first
        # record left, which is the first at or after the probe: never jump to the end
        self.reader = PartitionReader(bootstrap, f"kafka-backup-offset-follow.{self.id}", **{"auto.offset.reset": "earliest"})

    # -- the plan ---------------------------------------------------------

    def _read(self, key: str, what: str) -> bytes | None:
        try:
            return self.storage.get_optional(key, what)
        except StorageError as err:
            raise OffsetResetFailed(f"cannot read {key}: {err}") from None

    def plan(self) -> list[Move]:
        manifest_raw = self._read(layout.manifest_key(self.id), "manifest")
        if manifest_raw is None:
            raise ConfigError(f"offset_reset.from_backup: no backup {self.id!r} in {self.cfg.storage} "
                              f"(no {layout.manifest_key(self.id)}); check --from-backup and --storage")
        manifest = layout.decode_manifest(manifest_raw, layout.manifest_key(self.id))
        raw = self._read(layout.groups_key(self.id), "manifest")
        doc = layout.decode_groups(raw, layout.groups_key(self.id)) if raw else layout.GroupsDocument(self.id)
        unknown = [g for g in self.cfg.groups if g not in doc.groups]
        if unknown:
            have = ", ".join(sorted(doc.groups)) or "none (backup made before offsets were recorded, or with "\
                "backup.consumer_groups empty)"
            raise ConfigError(f"offset_reset.groups: backup {self.id!r} recorded no offsets of group {unknown[0]!r} "
                              f"on its topics; groups recorded: {have}")
        ranges: dict[tuple[str, int], tuple[int, int]] = {}  # source (topic, partition) -> target [lo, hi)
        if self.cfg.restore_id:
            cp = self._restore_checkpoint()
            mapping = cp.topic_map
            ranges = {(c.topic, c.partition): (c.target_base, c.target_next) for c in cp.partitions}
        else:
            try:
                mapping = resolve_topic_map(_parse_map(self.cfg.topic_map), manifest.topics, self.id)
            except ConfigError as err:
                raise ConfigError(str(err).replace("restore.topic_map", "offset_reset.topic_map")) from None
        moves = []
        for group in self.cfg.groups:
            snap = doc.groups[group]
            for o in snap.offsets:
                if o.topic not in mapping:
                    continue  # recorded by a run of a topic no longer in this restore's scope
                move = Move(group, o.topic, o.partition, o.offset, snap.read_ts, mapping[o.topic])
                lo_hi = ranges.get((o.topic, o.partition)) if self.cfg.restore_id else self._watermarks(move)
                if lo_hi is None:
                    move.note = ("partition not in the restore" if self.cfg.restore_id
                                 else "target partition does not exist")
                else:
                    self._locate(move, *lo_hi)
                moves.append(move)
        return moves

    def _restore_checkpoint(self) -> layout.RestoreCheckpoint:
        key = layout.restore_checkpoint_key(self.id, self.cfg.restore_id)
        raw = self._read(key, "checkpoint")
        if raw is None:
            raise ConfigError(f"offset_reset.restore_id: no restore {self.cfg.restore_id!r} of backup {self.id!r} "
                              f"(no {key}); check --restore-id, or give --topic-map instead")
        cp = layout.decode_restore_checkpoint(raw, key)
        if cp.completed_ts is None:
            raise ConfigError(f"offset_reset.restore_id: restore {self.cfg.restore_id!r} is not complete "
                              f"({cp.restored_total} of {cp.total_records} records); finish it first (run it "
                              "again with the same --restore-id)")
        if not cp.offset_header:
            raise ConfigError(f"offset_reset.restore_id: restore {self.cfg.restore_id!r} was made without the "
                              f"{layout.OFFSET_HEADER} header (restore.offset_header off, or an older kafka-backup); "
                              "restore again with it, or use --to-timestamp")
        return cp

    def _watermarks(self, move: Move) -> tuple[int, int] | None:
        md = self.admin.list_topics(move.target_topic, timeout=15).topics.get(move.target_topic)
        if md is None or md.error is not None or move.partition not in md.partitions:
            return None
        return self.reader.consumer.get_watermark_offsets(TopicPartition(move.target_topic, move.partition), timeout=10)

    def _locate(self, move: Move, lo: int, hi: int) -> None:
        cache: dict[int, tuple[int, int] | None] = {}

        def probe(m: int) -> tuple[int, int] | None:
            if m not in cache:
                cache[m] = self._probe(move.target_topic, move.partition, m, hi)
            return cache[m]

        move.target = first_at_or_after(probe, lo, hi, move.recorded)
        if move.target is None:
            if self.cfg.restore_id:  # this restore wrote nothing here (a window without its records): its end
                move.target, move.note = lo, "nothing restored: the end"
            else:
                move.note = f"no record with a {layout.OFFSET_HEADER} header"
            return
        found = probe(move.target) if move.target < hi else None
        if found is None:
            move.note = "after the last restored record: the end"
        elif found[1] != move.recorded:
            first = probe(lo)
            move.note = ("before the first restored record: the first" if first is not None
                         and first[0] == move.target else "not restored: the next restored record")

    def _probe(self, topic: str, partition: int, start: int, hi: int) -> tuple[int, int] | None:
        """(target offset, original offset) of the first record at or after ``start`` (below ``hi``)
        carrying the header; records without it are stepped over."""
        try:
            with closing(self.reader.read(topic, partition, start, PROBE_TIMEOUT_S, batch=100)) as records:
                for msg in records:
                    offset = msg.offset()
                    if offset is None:  # no position to move a group to: stepped over like an unmarked record
                        continue
                    if offset >= hi:
                        return None
                    original = _original_offset(msg.headers())
                    if original is not None:
                        return offset, original
        except ReadTimedOut:
            raise OffsetResetFailed(f"reading {topic}/{partition} from offset {start} timed out after "
                                    f"{PROBE_TIMEOUT_S}s") from None
        return None

    # -- applying --------------------------------------------------------

    def print_plan(self, moves: list[Move]) -> None:
        if self.out is None:
            return
        print("group\ttopic\tpartition\trecorded\ttarget_topic\ttarget_offset\tnote", file=self.out)
        for m in moves:
            print(f"{m.group}\t{m.topic}\t{m.partition}\t{m.recorded}\t{m.target_topic}\t"
                  f"{'-' if m.target is None else m.target}\t{m.note}", file=self.out)

    def refuse_active(self) -> None:
        for group in self.cfg.groups:
            try:
                desc = self.admin.describe_consumer_groups([group])[group].result(15)
            except KafkaException as err:
                if err.args[0].code() in UNSUPPORTED:
                    continue  # the broker's own check applies when the offsets are written
                raise
            if desc.members:
                raise ConfigError(f"offset_reset.groups: group {group!r} has {len(desc.members)} active member(s) "
                                  f"(state {desc.state.name.lower()}); stop its consumers first, nothing was changed")

    def write(self, group: str, offsets: list[TopicPartition]) -> None:
        write_offsets(self.admin, self.bootstrap, group, offsets, "offset_reset.groups")

    def close(self) -> None:
        self.reader.close()
        close_admin(self.admin)


def _original_offset(headers: Mapping[str, str | bytes | None] | Iterable[tuple[str, str | bytes | None]] | None
                     ) -> int | None:
    """The last ``kafka-backup.offset`` header's value (a restore of a restore appends its own last)."""
    value = None
    for name, raw in headers.items() if isinstance(headers, Mapping) else headers or []:
        if name == layout.OFFSET_HEADER:
            value = raw
    if value is None:
        return None
    try:
        text = value if isinstance(value, str) else value.decode("ascii")
    except UnicodeDecodeError:
        return None
    return int(text) if text.isdigit() else None


def run_offset_follow(bootstrap: str, telemetry_bootstrap: str, cfg: OffsetResetConfig, tcfg: TelemetryConfig,
                      storage: Storage, out: TextIO | None = None) -> int:
    validate(cfg)
    follow = OffsetFollow(bootstrap, cfg, storage, out)
    try:
        try:
            moves = follow.plan()
        except KafkaException as err:
            raise OffsetResetFailed(f"kafka: {err.args[0].str()}") from None
        except layout.MetadataError as err:
            raise OffsetResetFailed(str(err)) from None
        follow.print_plan(moves)
        if not cfg.execute:
            if out is not None:
                print("preview: nothing changed; run again with --execute to apply", file=out)
            return 0
        try:
            follow.refuse_active()
        except KafkaException as err:
            raise OffsetResetFailed(f"kafka: {err.args[0].str()}") from None
        for group in cfg.groups:
            offsets = [TopicPartition(m.target_topic, m.partition, m.target) for m in moves
                       if m.group == group and m.target is not None]
            _apply(follow, group, offsets, telemetry_bootstrap or bootstrap, tcfg)
        if out is not None:
            print(f"applied: {sum(m.target is not None for m in moves)} offset(s) of {len(cfg.groups)} group(s)",
                  file=out)
        return 0
    finally:
        follow.close()


class GroupMove(Job):
    """One group's offsets, reported like any offset reset (``JobStarted``/``JobEnded``, job = the group)."""

    failed = OffsetResetFailed

    def __init__(self, follow: OffsetFollow, group: str, offsets: list[TopicPartition], emitter: Emitter) -> None:
        self.follow = follow
        self.group = group
        self.offsets = offsets
        self.emitter = emitter

    def begin(self) -> None:
        self.emitter.emit(ev.JobStarted, mode="from-backup", topics=sorted({tp.topic for tp in self.offsets}))

    def work(self) -> None:
        if self.offsets:
            self.follow.write(self.group, self.offsets)


def _apply(follow: OffsetFollow, group: str, offsets: list[TopicPartition], telemetry: str,
           tcfg: TelemetryConfig) -> None:
    emitter = Emitter(telemetry, tcfg, "offset_reset", group)
    run_reporting(GroupMove(follow, group, offsets, emitter), emitter, signals=False)
