"""The aggregator's per-record loop: admit a telemetry record, fold its events, flush job states in batches.

``streams.app`` wires it to Faust (the agent hands each record to :meth:`Folder.record`, the
revocation signal calls :meth:`Folder.revoked`, a timer calls :meth:`Folder.flush_quiet`); this
module owns what those calls mean, so it can be driven without a broker in tests.

Ownership. A worker may fold and write only the partitions it owns. Faust does not wait for the
agent before revoking partitions (``stream_wait_empty`` is off, because waiting hung rebalances),
so a revocation can land while the agent is awaiting something for a record: the group's
committed offset, the earliest offset, a dead letter. The new owner then recovers the job's state
from the changelog and folds on; had this worker folded that record anyway, its next flush would
write the job's state as this worker knew it, over the new owner's, and the exported counters would
fall back (seen in CI as a finished backup whose end never showed). So every await is followed by
a check of :attr:`revocations`, and a record whose partition was revoked meanwhile is dropped
unfolded: it is not committed by this worker and its next owner reads it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from kafka_backup.schemas import events as ev
from kafka_backup.schemas import logs, signing
from kafka_backup.schemas.state import (
    NewerStateError,
    PipelineState,
    decode_pipeline,
    encode_state,
    pipeline_key,
)
from kafka_backup.streams import fold
from kafka_backup.streams.guards import OffsetGuard, write_outside_event
from kafka_backup.streams.working import WorkingSet

log = logging.getLogger("kafka_backup.aggregator")


class Offsets(Protocol):
    """Where folding a partition starts, its earliest offset, and whether offsets hold records (asked off
    the event loop)."""

    async def start(self, partition: int) -> int: ...

    async def earliest(self, partition: int) -> int: ...

    async def first_record(self, partition: int, start: int, before: int) -> int | None: ...


DeadLetter = Callable[[bytes | None, bytes | None, str], Awaitable[None]]


class Folder:
    """Telemetry records in, job states out to ``table`` (a Faust memory-store table, or a fake of one)."""

    def __init__(self, table: Any, guard: OffsetGuard, offsets: Offsets, settings: fold.Settings,
                 flush_interval_s: float, signing_key: bytes | None = None,
                 dead_letter: DeadLetter | None = None,
                 restart: Callable[[str], None] | None = None,
                 stop: Callable[[str], None] | None = None,
                 may_write: Callable[[], bool] = lambda: True,
                 write_states: Callable[[int, list[tuple[bytes, bytes]]], None] | None = None) -> None:
        self.table, self.guard, self.offsets, self.settings = table, guard, offsets, settings
        # production: guards.ChangelogWriter.write; else one write_outside_event a state
        self.write_states = write_states or self._write_each
        self.flush_interval_s = flush_interval_s
        self.signing_key = signing_key
        self.dead_letter = dead_letter
        self.restart = restart or _raise  # production: re-execute the worker in place (never returns)
        self.stop = stop or _raise  # production: exit non-zero (never returns)
        self.may_write = may_write  # production: not while Faust rebalances
        self.work = WorkingSet(settings)
        self.skips = SkipCounts()
        self.failures = SkipCounts()  # records whose fold raised (a bug), by exception type: not a record's fault
        self.revocations: dict[int, int] = {}  # telemetry partition -> times revoked from this worker
        self.next_flush = time.monotonic() + flush_interval_s
        self.delivered_at = time.monotonic()  # when the agent last received a record (the delivery watchdog's)
        self._first_of_each = logs.FirstOfEach(log)

    # -- ownership ---------------------------------------------------------------------------------

    def revoked(self, partitions: set[int]) -> None:
        """Partitions taken away: drop what was folded and not flushed (the next owner reads those events again)."""
        self.guard.forget(partitions)
        self.work.forget(partitions)
        for p in partitions:
            self.skips.take(p)
            self.failures.take(p)
            self.revocations[p] = self.revocations.get(p, 0) + 1

    # -- the per-record loop -----------------------------------------------------------------------

    async def record(self, partition: int, offset: int, timestamp_s: float | None, key: bytes | None,
                     value: bytes | None, headers: signing.Headers | None = None) -> None:
        """Fold one telemetry record (``timestamp_s``: the record's, in seconds), unless it was folded
        already or its partition was revoked meanwhile."""
        self.delivered_at = time.monotonic()
        owned = self.revocations.get(partition, 0)  # changes if the partition is revoked during an await below
        revocations = self.revocations
        guard = self.guard
        if partition not in guard.next:  # where folding starts, asked off the event loop
            start = await self.offsets.start(partition)
            if revocations.get(partition, 0) != owned:
                return
            guard.start(partition, start)
        verdict = guard.admit(partition, offset)
        if verdict == "duplicate":
            return
        if verdict == "gap" and guard.next[partition] < (earliest := await self.offsets.earliest(partition)):
            if revocations.get(partition, 0) != owned:
                return
            lost = earliest - guard.next[partition]
            self.skip(partition, guard.next[partition], "expired",  # written with the next flush
                      f"{lost} records deleted by retention before they were read", lost)
            guard.folded(partition, earliest - 1)
            verdict = guard.admit(partition, offset)
        if revocations.get(partition, 0) != owned:
            return
        if verdict == "gap":  # a skip by Faust, or offsets that hold no record (transaction markers)
            expected = guard.next[partition]
            try:
                first = await self.offsets.first_record(partition, expected, offset)
            except Exception as err:  # the broker cannot say: reading again from the commit is always safe
                first, why = expected, f"the broker could not say what they hold ({err})"
            else:
                why = f"offset {first} holds a record Faust skipped"
            if revocations.get(partition, 0) != owned:
                return
            if first is not None:
                self.restart(f"telemetry partition {partition}: offset {offset} arrived before offset {expected} "
                             f"was folded and {why}; they are read again")
                return
            log.debug("telemetry partition %d: offsets %d..%d hold no record (transaction markers); folding on",
                      partition, expected, offset - 1)
            guard.folded(partition, offset - 1)
        ts = timestamp_s if timestamp_s and timestamp_s > 0 else None
        try:
            skipped = self.handle(key, value, partition, offset, ts, headers)
        except NewerStateError as err:  # folding into it would drop what the newer aggregator added
            job = escaped(key.decode("utf-8", "replace") if key else "")
            self.stop(f"the stored state of {job} has {err}: a newer aggregator wrote it; upgrade this aggregator")
            return
        except Exception as err:  # a bug, not a bad record: never let one record kill the agent
            skipped = [(value, "internal_error")]  # counted by exception type, not as invalid
            self.failed(partition, offset, err)
        if self.dead_letter is not None:
            for payload, reason in skipped:
                await self.dead_letter(key, payload, reason)
            if revocations.get(partition, 0) != owned:  # revoked while sending: what was folded went with the partition
                return
        guard.folded(partition, offset)
        if time.monotonic() >= self.next_flush:
            self.flush_all()
        elif self.skips.due(partition, after_good=False) or self.failures.due(partition, after_good=False):
            self.flush_partition(partition)  # a flood of bad records: its counts in batches

    def handle(self, key: bytes | None, value: bytes | None, partition: int, offset: int,
               record_ts: float | None, headers: signing.Headers | None = None) -> list[tuple[bytes | None, str]]:
        """Fold one record's events (one, or a batch's, each as if it came alone); return the
        ``(event bytes, reason)`` of each one that had to be skipped (the whole record's value when
        the record itself was refused)."""
        skipped: list[tuple[bytes | None, str]] = []
        for payload, event in fold.admit(key, value, headers, record_ts, time.time(), self.settings, self.signing_key):
            if isinstance(event, ev.InvalidEvent):
                self.skip(partition, offset, event.reason, event)
                skipped.append((None if value is None else payload, event.reason))  # a null record stays null
                continue
            key = key or b""  # admitted: the key named the event's job
            try:
                changed, reason = self.work.apply(key, partition, event, len(payload), self.table.get)
            except NewerStateError:
                raise
            except Exception as err:  # a bug, not a bad event: the batch's other events are still folded
                self.failed(partition, offset, err)
                skipped.append((payload, "internal_error"))  # the dead letter's header; not counted as invalid
                continue
            if reason is not None:
                self.skip(partition, offset, reason, f"{event.kind}:{event.job}")
                skipped.append((payload, reason))
            elif changed:
                self.guard.hold(partition, offset)  # no commit past it before the job's new state is in the table
        return skipped

    def skip(self, partition: int, offset: int, reason: str, detail: object, n: int = 1) -> None:
        """Count a skipped record in memory; :meth:`flush_partition` writes the counts in one table write."""
        self.skips.add(partition, reason, n)
        self.guard.hold(partition, offset)  # no commit past it before its count is in the table
        self.skips.log(partition, reason, detail)

    def failed(self, partition: int, offset: int, err: Exception) -> None:
        """Count a record whose fold raised; its traceback is logged the first time this error is seen."""
        self.failures.add(partition, type(err).__qualname__, 1)
        self.guard.hold(partition, offset)
        self._first_of_each.exception(err, "telemetry partition %d offset %d: unexpected failure folding a record",
                                      partition, offset)

    # -- flushing ----------------------------------------------------------------------------------

    def flush_partition(self, partition: int) -> None:
        """Write the partition's changed job states and skip counts to the table, then let its commit pass.

        The commit still waits for the broker to acknowledge these writes (``ChangelogBarrier``).
        Nothing is written while a rebalance is under way (``may_write``): from its start until
        :meth:`revoked`, the partition may already be on its way to another worker, and a write
        landing after that worker recovered the changelog would overwrite what it folds next. The
        commit stays held instead; what was not written is dropped with the partition or written
        at the next flush after the rebalance.
        """
        if not self.may_write():
            return
        self.write_states(partition, self.work.flush(partition))
        pending, failed_now = self.skips.take(partition), self.failures.take(partition)
        if pending or failed_now:
            key = pipeline_key(partition).encode()
            raw = self.table.get(key)
            state = decode_pipeline(raw) if raw else PipelineState(partition=partition)
            for reason, n in pending.items():
                state.invalid[reason] = state.invalid.get(reason, 0) + n
            for exception, n in failed_now.items():
                state.failures[exception] = state.failures.get(exception, 0) + n
            write_outside_event(self.table, partition, key, encode_state(state))
        self.guard.release(partition)

    def _write_each(self, partition: int, states: list[tuple[bytes, bytes]]) -> None:
        for key, value in states:
            write_outside_event(self.table, partition, key, value)

    def flush_all(self) -> None:
        self.next_flush = time.monotonic() + self.flush_interval_s
        for partition in {*self.work.dirty_partitions(), *self.skips.pending(), *self.failures.pending()}:
            self.flush_partition(partition)

    def flush_quiet(self) -> None:
        """Events followed by silence: no later event would flush them (called by a timer)."""
        if time.monotonic() >= self.next_flush:
            self.flush_all()
        for partition in {*self.skips.stale(), *self.failures.stale()}:
            self.flush_partition(partition)


def _raise(why: str) -> None:
    raise RuntimeError(why)


class SkipCounts:
    """Skipped records counted in memory per telemetry partition, written to the table in batches.

    A flood of bad records (a broken or hostile producer) then costs one small table write per
    ``batch`` records or ``max_age_s``, not one per record; the offset guard holds the commit back
    until the counts are written, so a crash re-reads and counts them again, exactly once. Log
    lines are limited to one per reason and partition every ``log_every_s``, with the untrusted
    detail escaped and cut.
    """

    MAX_AGE_S = 0.5

    def __init__(self, batch: int = 500, max_age_s: float = MAX_AGE_S, log_every_s: float = 10.0) -> None:
        self.batch, self.max_age_s, self.log_every_s = batch, max_age_s, log_every_s
        self._pending: dict[int, dict[str, int]] = {}
        self._since: dict[int, float] = {}
        self._logged: dict[tuple[int, str], tuple[float, int]] = {}  # -> (last logged, suppressed since)

    def add(self, partition: int, reason: str, n: int) -> None:
        counts = self._pending.setdefault(partition, {})
        counts[reason] = counts.get(reason, 0) + n
        self._since.setdefault(partition, time.monotonic())

    def due(self, partition: int, after_good: bool) -> bool:
        counts = self._pending.get(partition)
        if not counts:
            return False
        return after_good or sum(counts.values()) >= self.batch or (
            time.monotonic() - self._since[partition] >= self.max_age_s)

    def stale(self) -> list[int]:
        """Partitions whose counts have waited ``max_age_s`` or longer."""
        now = time.monotonic()
        return [p for p, since in self._since.items() if now - since >= self.max_age_s]

    def pending(self) -> list[int]:
        return [p for p, counts in self._pending.items() if counts]

    def take(self, partition: int) -> dict[str, int]:
        self._since.pop(partition, None)
        return self._pending.pop(partition, {})

    def log(self, partition: int, reason: str, detail: object) -> None:
        now = time.monotonic()
        last, suppressed = self._logged.get((partition, reason), (-self.log_every_s, 0))
        if now - last < self.log_every_s:
            self._logged[(partition, reason)] = (last, suppressed + 1)
            return
        self._logged[(partition, reason)] = (now, 0)
        more = f"; {suppressed} more since the last line" if suppressed else ""
        log.warning("skipped telemetry record on partition %d: %s (%s)%s", partition, reason,
                    escaped(detail), more)


def escaped(value: object, limit: int = 200) -> str:
    """An untrusted value for a log line: one line, printable, cut to ``limit`` characters."""
    text = repr(str(value))[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."
