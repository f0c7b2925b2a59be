"""The aggregator's per-record loop (``streams.folder``), driven without a broker.

The revocation tests reproduce a CI failure: a second aggregator worker joined, a finished backup's
``JobEnded`` never showed in the exported state, and it stayed that way. Faust revokes partitions
without waiting for the agent, so a revocation can land while the agent awaits something for a
record; folding that record anyway later wrote the job's state as this worker knew it, over the
state its new owner had written since. Each test fails on a folder that ignores the revocation.
"""

from __future__ import annotations

import asyncio
import time

from kafka_backup.schemas import events as ev
from kafka_backup.schemas.state import decode_pipeline, decode_state, pipeline_key
from kafka_backup.streams import fold
from kafka_backup.streams.folder import Folder
from kafka_backup.streams.guards import OffsetGuard

JOB = "j"
KEY = ev.event_key("backup", JOB).encode()


class FakeTable:
    """What ``write_outside_event`` and the working set use of a Faust memory-store table."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.writes: list[tuple[int, bytes, bytes]] = []  # (changelog partition, key, value), in order

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def send_changelog(self, partition: int, key: bytes, value: bytes) -> None:
        self.writes.append((partition, key, value))


class GatedOffsets:
    """Group offsets whose answers wait for the test to open a gate (``None``: answer at once)."""

    def __init__(self, start: int = 0, earliest: int = 0, empty: frozenset[int] = frozenset(),
                 probe_fails: bool = False) -> None:
        self._start, self._earliest = start, earliest
        self.empty = empty  # offsets that hold no record (transaction markers); every other one holds one
        self.probe_fails = probe_fails
        self.probed: list[tuple[int, int, int]] = []
        self.gate: asyncio.Event | None = None
        self.asked = asyncio.Event()

    async def start(self, partition: int) -> int:
        self.asked.set()
        if self.gate is not None:
            await self.gate.wait()
        return self._start

    async def earliest(self, partition: int) -> int:
        return self._earliest

    async def first_record(self, partition: int, start: int, before: int) -> int | None:
        self.probed.append((partition, start, before))
        if self.probe_fails:
            raise RuntimeError("broker down")
        return next((o for o in range(start, before) if o not in self.empty), None)


def segment(seq: int, start: int, records: int = 10) -> bytes:
    return ev.encode(ev.SegmentStored(worker="w1", seq=seq, ts=time.time(), job=JOB, topic="t", partition=0,
                                      start_offset=start, covers_from=start, end_offset=start + records,
                                      records=records, bytes=records * 100, uncompressed_bytes=records * 100,
                                      stored_bytes=records * 50, algorithm="zstd"))


def make_folder(offsets: GatedOffsets, **kwargs: object) -> tuple[Folder, FakeTable, list[str]]:
    table, restarts = FakeTable(), []
    folder = Folder(table, OffsetGuard("telemetry"), offsets, fold.DEFAULT_SETTINGS,
                    flush_interval_s=3600, restart=restarts.append, **kwargs)  # type: ignore[arg-type]
    return folder, table, restarts


def test_folds_in_order_skips_redeliveries_and_restarts_on_a_hole():
    async def scenario():
        folder, table, restarts = make_folder(GatedOffsets(start=0))
        await folder.record(0, 0, None, KEY, segment(1, 0))
        await folder.record(0, 1, None, KEY, segment(2, 10))
        await folder.record(0, 1, None, KEY, segment(2, 10))  # redelivered
        folder.flush_all()
        assert [(p, k) for p, k, _ in table.writes] == [(0, KEY)]
        assert decode_state(table.writes[-1][2]).records == 20
        await folder.record(0, 5, None, KEY, segment(3, 20))  # offsets 2..4 never arrived
        assert len(restarts) == 1 and "offset 5 arrived before offset 2" in restarts[0]
        assert "offset 2 holds a record Faust skipped" in restarts[0]

    asyncio.run(scenario())


def test_offsets_that_hold_no_record_are_stepped_over_and_a_record_in_a_hole_restarts():
    async def scenario():
        offsets = GatedOffsets(start=0, empty=frozenset({1, 2, 3, 6}))  # transaction markers
        folder, table, restarts = make_folder(offsets)
        await folder.record(0, 0, None, KEY, segment(1, 0))
        await folder.record(0, 4, None, KEY, segment(2, 10))  # 1..3 hold no record: folded on
        await folder.record(0, 5, None, KEY, segment(3, 20))
        await folder.record(0, 9, None, KEY, segment(4, 30))  # 6 holds none, 7 does: Faust skipped it
        assert offsets.probed == [(0, 1, 4), (0, 6, 9)]
        assert len(restarts) == 1 and "offset 7 holds a record Faust skipped" in restarts[0], restarts
        assert folder.guard.next[0] == 6  # the commit never passes the skipped record
        folder.flush_all()
        assert decode_state(table.writes[-1][2]).records == 30  # the three folded segments, not the fourth
        assert restarts == [restarts[0]]

    asyncio.run(scenario())


def test_a_hole_the_broker_cannot_explain_restarts_the_worker():
    async def scenario():
        folder, _table, restarts = make_folder(GatedOffsets(start=0, probe_fails=True))
        await folder.record(0, 0, None, KEY, segment(1, 0))
        await folder.record(0, 3, None, KEY, segment(2, 10))
        assert len(restarts) == 1 and "could not say what they hold (broker down)" in restarts[0]
        assert folder.guard.next[0] == 1

    asyncio.run(scenario())


def test_a_record_whose_partition_is_revoked_while_its_start_offset_is_asked_is_not_folded():
    async def scenario():
        offsets = GatedOffsets(start=0)
        offsets.gate = asyncio.Event()
        folder, table, restarts = make_folder(offsets)
        pending = asyncio.create_task(folder.record(0, 0, None, KEY, segment(1, 0)))
        await offsets.asked.wait()
        folder.revoked({0})  # the rebalance lands while the agent awaits the committed offset
        offsets.gate.set()
        await pending
        folder.flush_all()
        assert table.writes == []  # nothing written over the new owner's state
        assert 0 not in folder.guard.next  # a later assignment asks where to start again
        assert folder.work.entries == {}
        assert restarts == []

    asyncio.run(scenario())


def test_a_record_revoked_while_its_dead_letter_is_sent_leaves_no_frontier_or_count_behind():
    async def scenario():
        sent, gate = [], asyncio.Event()

        async def dead_letter(key: bytes | None, value: bytes | None, reason: str) -> None:
            sent.append(reason)
            await gate.wait()

        folder, table, _ = make_folder(GatedOffsets(start=0), dead_letter=dead_letter)
        await folder.record(0, 0, None, KEY, segment(1, 0))
        pending = asyncio.create_task(folder.record(0, 1, None, KEY, b"\xc1 not msgpack"))
        while not sent:
            await asyncio.sleep(0)  # not synchronisation on time: yields until the send has started
        folder.revoked({0})
        gate.set()
        await pending
        folder.flush_all()
        assert sent == ["malformed"]
        assert table.writes == []  # neither the job's state nor the skip count of a partition gone
        assert 0 not in folder.guard.next  # a stale frontier would skip the new owner's redelivery later

    asyncio.run(scenario())


def test_a_partition_assigned_again_after_a_revocation_folds_from_its_committed_offset():
    async def scenario():
        offsets = GatedOffsets(start=0)
        folder, table, _ = make_folder(offsets)
        await folder.record(0, 0, None, KEY, segment(1, 0))
        folder.revoked({0})  # unflushed: dropped, and read again by whoever owns the partition next
        await folder.record(0, 0, None, KEY, segment(1, 0))
        await folder.record(0, 1, None, KEY, segment(2, 10))
        folder.flush_all()
        assert decode_state(table.writes[-1][2]).records == 20

    asyncio.run(scenario())


def test_skipped_records_are_counted_in_the_partitions_pipeline_state():
    async def scenario():
        folder, table, _ = make_folder(GatedOffsets(start=0))
        await folder.record(0, 0, None, KEY, b"\xc1")
        await folder.record(0, 1, None, b"backup:other", segment(1, 0))  # the key names another job
        folder.flush_all()
        (partition, key, value), = table.writes
        assert (partition, key) == (0, pipeline_key(0).encode())
        assert decode_pipeline(value).invalid == {"malformed": 1, "bad_key": 1}

    asyncio.run(scenario())


def test_a_state_written_by_a_newer_aggregator_stops_the_worker():
    async def scenario():
        stops: list[str] = []
        folder, table, _ = make_folder(GatedOffsets(start=0), stop=stops.append)
        table.data[KEY] = b"\x81\xa1v\x63"  # {"v": 99}: a layout this aggregator does not know
        await folder.record(0, 0, None, KEY, segment(1, 0))
        assert len(stops) == 1 and "upgrade this aggregator" in stops[0]
        folder.flush_all()
        assert table.writes == []

    asyncio.run(scenario())


def test_nothing_is_written_while_a_rebalance_is_under_way_and_the_commit_stays_held():
    from faust.types import TP

    async def scenario():
        rebalancing = [False]
        folder, table, _ = make_folder(GatedOffsets(start=0), may_write=lambda: not rebalancing[0])
        await folder.record(0, 0, None, KEY, segment(1, 0))
        rebalancing[0] = True  # Faust's rebalance started: the partition may be on its way elsewhere
        folder.flush_all()
        folder.flush_quiet()
        assert table.writes == []
        assert folder.guard.allowed({TP("telemetry", 0): 1}) == {TP("telemetry", 0): 0}  # offset 0 not committed
        rebalancing[0] = False  # it stayed here after all: written at the next flush
        folder.flush_all()
        assert [decode_state(v).records for _, _, v in table.writes] == [10]
        assert folder.guard.allowed({TP("telemetry", 0): 1}) == {TP("telemetry", 0): 1}

    asyncio.run(scenario())
