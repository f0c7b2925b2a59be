"""What a restore covers, and how it fails: the time window, the topic map, the restore's errors.

Pure parts, checked before anything connects: a user mistake here is one line (exit status 2).
"""

from __future__ import annotations

import re

from kafka_backup.producers import layout
from kafka_backup.producers.run import JobFailed, JobInterrupted
from kafka_backup.schemas.config import ConfigError

TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class RestoreFailed(JobFailed):
    """A failure that ends the restore (already reported as an error event): exit status 1."""


class RestoreInterrupted(RestoreFailed, JobInterrupted):
    """Stopped by SIGTERM/SIGINT between batches: nothing is lost, a run with the same id resumes."""


class Window:
    """Record timestamps (epoch ms) in ``[from_time, to_time)``; ``None`` leaves a side open."""

    def __init__(self, from_time: int | None, to_time: int | None) -> None:
        if from_time is not None and to_time is not None and from_time >= to_time:
            raise ConfigError(f"restore.from_time: {from_time} is not before restore.to_time {to_time}; "
                              "the window is [--from-time, --to-time) in epoch milliseconds")
        self.from_time = from_time
        self.to_time = to_time

    def contains(self, ts: int) -> bool:
        return (self.from_time is None or ts >= self.from_time) and (self.to_time is None or ts < self.to_time)

    def covers(self, seg: layout.SegmentInfo) -> bool:
        """Every record of the segment is inside: count it from the checkpoint, unread."""
        if self.from_time is None and self.to_time is None:
            return True
        return seg.min_ts is not None and seg.max_ts is not None and self.contains(seg.min_ts) and self.contains(
            seg.max_ts)

    def misses(self, seg: layout.SegmentInfo) -> bool:
        """No record of the segment is inside: never read it."""
        if seg.min_ts is None or seg.max_ts is None:
            return False
        return ((self.to_time is not None and seg.min_ts >= self.to_time)
                or (self.from_time is not None and seg.max_ts < self.from_time))


def parse_topic_map(entries: list[str]) -> dict[str, str]:
    """``["a:b", ...]`` -> ``{"a": "b"}``; syntax only (the backup's topics are checked later)."""
    mapping: dict[str, str] = {}
    for entry in entries:
        source, sep, target = entry.partition(":")
        source, target = source.strip(), target.strip()
        if not sep or not source or not target:
            raise ConfigError(f"restore.topic_map: {entry!r} is not source:target; write --topic-map a:b,c:d")
        if not TOPIC_NAME.match(target):
            raise ConfigError(f"restore.topic_map: {target!r} is not a valid topic name "
                              "(1-249 letters, digits, '.', '_' or '-')")
        if source in mapping:
            raise ConfigError(f"restore.topic_map: {source!r} is mapped twice; give each source topic once")
        mapping[source] = target
    return mapping


def resolve_topic_map(mapping: dict[str, str], backup_topics: dict[str, int], backup_id: str) -> dict[str, str]:
    """Every topic of the backup to its target; unmapped topics keep their name.

    Two sources into one target would interleave two partitions' records in one
    target partition, which breaks ordering and the resume check: refused.
    """
    unknown = sorted(set(mapping) - set(backup_topics))
    if unknown:
        raise ConfigError(f"restore.topic_map: {unknown[0]!r} is not in backup {backup_id!r} "
                          f"(its topics: {', '.join(sorted(backup_topics))})")
    resolved = {t: mapping.get(t, t) for t in sorted(backup_topics)}
    seen: dict[str, str] = {}
    for source, target in resolved.items():
        if target in seen:
            raise ConfigError(f"restore.topic_map: {seen[target]!r} and {source!r} would both restore into "
                              f"{target!r}; map them to different topics")
        seen[target] = source
    return resolved
