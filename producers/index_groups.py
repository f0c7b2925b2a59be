"""Partitions' checkpoints and indexes read a group at a time, the groups bounded in segments.

A restore and ``verify`` need every partition's index (its checkpoint and sealed index chunks,
``layout.read_index``), about half a kilobyte a segment once decoded. A continuous backup of 100 busy
partitions cuts 1.7 million segments a day at its 5 s flush interval, so a backup's every index at once
can outgrow any memory limit. :func:`in_groups` reads them the storage's concurrency at once (one after
the other, a run over 128 partitions on S3 waited 128 round trips before its first segment), the next
group while one is used. A group is cut where its checkpoints (each says how many segments its index
names) add up to more than half of ``INDEX_HELD_SEGMENTS``, so the group in use and the next one fit
in it, whatever the backup's length; only a single partition's index is held whole, however large.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from kafka_backup.producers import layout
from kafka_backup.producers.storage import Storage
from kafka_backup.producers.threads import in_daemon_thread

# partitions a group, at most: this many per storage call at once
PARTITIONS_AHEAD_PER_CALL = 4
# segments of index the group in use and the next one hold together, at most (about 50 MB decoded)
INDEX_HELD_SEGMENTS = 100_000

Partition = tuple[str, int]
Index = tuple[layout.Checkpoint | None, list[layout.SegmentInfo]]  # checkpoint (None: never had a record), segments
Reads = list[tuple[Partition, Future[Index] | None]]


def in_groups(storage: Storage, backup_id: str, partitions: list[Partition], name: str,
              held: Callable[[Partition], bool] = lambda tp: False) -> Iterator[Reads]:
    """``partitions`` a group at a time, in order, each with the read of its index (None for those
    ``held`` says the caller has already: not read again), the next group's reads under way meanwhile.

    Take each read's ``result()`` in order: a failed read (a garbled checkpoint, storage trouble) raises
    there, the first in partition order. A group is up to ``PARTITIONS_AHEAD_PER_CALL`` times the
    storage's concurrency, fewer where its indexes would hold more than half of ``INDEX_HELD_SEGMENTS``
    (one partition at the least).
    """
    most = PARTITIONS_AHEAD_PER_CALL * storage.concurrency

    def group_from(position: int, heads: Heads) -> Future[tuple[Reads, Heads]]:
        return in_daemon_thread(lambda: _group(storage, backup_id, partitions[position:position + most], name, held,
                                               heads), name)

    position = 0
    reading = group_from(position, {}) if partitions else None
    while reading is not None:
        reads, heads = reading.result()
        position += len(reads)
        reading = group_from(position, heads) if position < len(partitions) else None  # while this one is used
        yield reads


Heads = dict[Partition, Future[layout.Checkpoint | None]]  # checkpoints read, their chunks not yet


def _group(storage: Storage, backup_id: str, candidates: list[Partition], name: str,
           held: Callable[[Partition], bool], heads: Heads) -> tuple[Reads, Heads]:
    """The first of ``candidates`` whose indexes fit in half of ``INDEX_HELD_SEGMENTS`` (one at the least),
    each read: the candidates' checkpoints first, all at once (each names its segment count; ``heads``
    has those read for an earlier group and left out of it), then the chosen ones' index chunks. Also
    the checkpoints read and left out, for the next group."""
    todo = [tp for tp in candidates if not held(tp) and tp not in heads]
    checkpoints = storage.at_once(layout.read_checkpoint, [(storage, backup_id, *tp, True) for tp in todo], name)
    heads = {**heads, **dict(zip(todo, checkpoints, strict=True))}
    chosen: list[Partition] = []
    total = 0
    for tp in candidates:
        head = heads.get(tp)
        cp = _value(head) if head is not None else None
        count = cp.segment_count if cp is not None else 0  # held, failed or never had a record: nothing to hold
        if chosen and total + count > INDEX_HELD_SEGMENTS // 2:
            break
        chosen.append(tp)
        total += count
    indexed = [tp for tp in chosen if tp in heads and _value(heads[tp]) is not None]
    listed = dict(zip(indexed, storage.at_once(layout.indexed_segments, [(storage, backup_id, heads[tp].result())
                                                                         for tp in indexed], name), strict=True))
    reads: Reads = [(tp, None if tp not in heads else _index(heads.pop(tp), listed.get(tp))) for tp in chosen]
    return reads, heads


def _value(read: Future[Any]) -> Any:
    """What a finished read returned; None if it raised (its error is met where its index is taken)."""
    return None if read.exception() is not None else read.result()


def _index(head: Future[layout.Checkpoint | None], listed: Future[list[layout.SegmentInfo]] | None) -> Future[Index]:
    """A partition's read as one future: its checkpoint and its segments, or the first error of the two."""
    index: Future[Index] = Future()
    if (err := head.exception()) is not None or (listed is not None and (err := listed.exception()) is not None):
        index.set_exception(err)
    else:
        index.set_result((head.result(), listed.result() if listed is not None else []))
    return index
