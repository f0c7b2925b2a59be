"""Partitions' indexes read a group at a time, sized to a segment budget (producers/index_groups.py)."""

from __future__ import annotations

import pytest

from kafka_backup.producers import index_groups, layout
from kafka_backup.producers.storage import FileBackend, Storage


def backup(storage: Storage, segments_a_partition: list[int]) -> list[tuple[str, int]]:
    """Partition p of topic t gets ``segments_a_partition[p]`` segments (indexed, no data)."""
    for p, n in enumerate(segments_a_partition):
        infos = [layout.SegmentInfo(layout.segment_key("bk", "t", p, i, "none"), i, i + 1, 1, 1, 1, 1, "none")
                 for i in range(n)]
        storage.put(layout.checkpoint_key("bk", "t", p), layout.encode(layout.Checkpoint("t", p, n, infos)),
                    "checkpoint")
    return [("t", p) for p in range(len(segments_a_partition))]


def sizes(groups) -> list[int]:
    return [len(reads) for reads in groups]


def test_a_group_holds_at_most_half_the_budget_in_segments_or_one_partition(tmp_path, monkeypatch):
    """Concurrency 2, a budget of 16 segments (8 a group): 1-segment partitions come 8 a group (four
    times the concurrency), 3-segment ones 2 a group (3 would hold 9), a partition of 20 segments alone
    (its index is held whole), as its checkpoint says before any chunk is read; every partition once,
    in order, each with its read."""
    monkeypatch.setattr(index_groups, "INDEX_HELD_SEGMENTS", 16)
    storage = Storage(FileBackend(str(tmp_path), concurrency=2))
    storage.listener = lambda report: None
    small = backup(storage, [1] * 12)
    groups = list(index_groups.in_groups(storage, "bk", small, "test"))
    assert sizes(groups) == [8, 4]
    assert [tp for reads in groups for tp, _ in reads] == small
    assert [len(read.result()[1]) for reads in groups for _, read in reads] == [1] * 12
    assert sizes(index_groups.in_groups(storage, "bk", backup(storage, [3] * 7), "test")) == [2, 2, 2, 1]
    assert sizes(index_groups.in_groups(storage, "bk", backup(storage, [20, 20, 1, 1]), "test")) == [1, 1, 2]


def test_held_partitions_are_not_read_and_a_failed_read_raises_in_partition_order(tmp_path):
    """What the caller holds already comes with no read; a checkpoint that cannot be read raises when
    its own read is taken, after the partitions before it, not when the group is read."""
    storage = Storage(FileBackend(str(tmp_path), concurrency=2))
    storage.listener = lambda report: None
    partitions = backup(storage, [1, 1, 1, 1])
    storage.put(layout.checkpoint_key("bk", "t", 2), b"not a checkpoint", "checkpoint")
    reads = next(index_groups.in_groups(storage, "bk", partitions, "test", held=lambda tp: tp == ("t", 1)))
    assert [(tp, read is None) for tp, read in reads] == [(("t", p), p == 1) for p in range(4)]
    assert len(reads[0][1].result()[1]) == 1 and len(reads[3][1].result()[1]) == 1  # after the failed one too
    with pytest.raises(layout.MetadataError, match="checkpoint"):
        reads[2][1].result()
