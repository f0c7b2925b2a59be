"""The aggregator's working set: decoded job states, folded in place, written to the table in batches.

Decoding, folding and encoding a job's whole state for every event, and one Faust table write
per event, were what capped the aggregator (about 1,800 events/s). Here each job's state stays
decoded in memory; an event is folded into it in place, and :meth:`WorkingSet.flush` hands out
each changed job's encoded state at most once per call (the aggregator calls it every
``aggregator.flush_interval_ms``). The offset guard holds the commit back until those values
are written and acknowledged, so a crash re-reads the events since and the dedup marks
(``JobState.seen``, in the same value as the counters) keep the totals exact.

The per-job limits keep their meaning: an event that would take a job's state past
``max_keys_per_map`` / ``max_partitions_per_job`` / ``max_state_bytes`` is refused and the
state is as it was before it. Folding happens in place, so "as before" is rebuilt from the
last encoded value (``base``) and the events folded since (``log``); that is exact because the
fold is deterministic, and rare (a refusal, or an unexpected failure inside a handler). The
encoded size is only computed when it could be over the cap: each event can grow a state by
at most ``GROWTH_PER_EVENT + GROWTH_PER_BYTE * len(payload)`` bytes (a generous bound: a new
partition, a histogram, a sample), and the exact size is measured once the sum of those bounds
since the last measurement could cross ``max_state_bytes``.
"""

from __future__ import annotations

from collections.abc import Callable

from kafka_backup.schemas import events as ev
from kafka_backup.schemas.state import JobState, decode_state, encode_state
from kafka_backup.streams import fold

GROWTH_PER_EVENT = 4096
GROWTH_PER_BYTE = 16

Load = Callable[[bytes], "bytes | None"]  # a job's encoded state from the table (None: no state yet)


class Entry:
    __slots__ = ("state", "base", "log", "size", "growth", "partition")

    def __init__(self, base: bytes | None, partition: int) -> None:
        self.base = base  # the encoded state as of the last flush (or as read from the table)
        self.state: JobState | None = decode_state(base) if base else None
        self.log: list[ev.Event] = []  # events folded into ``state`` since ``base``
        self.size = len(base) if base else 0  # exact encoded size of ``base``
        self.growth = 0  # upper bound of what ``log`` added to it
        self.partition = partition


class WorkingSet:
    def __init__(self, settings: fold.Settings = fold.DEFAULT_SETTINGS) -> None:
        self.settings = settings
        self.entries: dict[bytes, Entry] = {}
        self.dirty: dict[int, set[bytes]] = {}  # telemetry partition -> keys changed since the last flush

    def entry(self, key: bytes, partition: int, load: Load) -> Entry:
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = Entry(load(key), partition)
        return e

    def apply(self, key: bytes, partition: int, event: ev.Event, payload_len: int, load: Load) -> tuple[bool, str | None]:
        """Fold ``event`` into the job's working state (``load(key)`` reads it from the table the first time).

        Returns ``(changed, refused_reason)``; a duplicate is ``(False, None)``. An exception from
        the fold leaves the state as it was before the event and propagates.
        """
        e = self.entry(key, partition, load)
        try:
            new = fold.apply(e.state, event, self.settings)
        except Exception:
            self._rebuild(e)
            raise
        if new is None:  # a duplicate after all: nothing changed
            return False, None
        reason = fold.over_limit(new, self.settings)
        if reason is None:
            e.growth += GROWTH_PER_EVENT + GROWTH_PER_BYTE * payload_len
            if e.size + e.growth > self.settings.max_state_bytes:  # could be over: measure
                data = encode_state(new)
                if len(data) > self.settings.max_state_bytes:
                    reason = "state_too_large"
                else:
                    e.state = new
                    self._rebase(e, data)
                    self.dirty.setdefault(partition, set()).add(key)
                    return True, None
        if reason is not None:
            self._rebuild(e)
            return False, reason
        e.state = new
        e.log.append(event)
        self.dirty.setdefault(partition, set()).add(key)
        return True, None

    def _rebase(self, e: Entry, data: bytes) -> None:
        e.base, e.size, e.growth, e.log = data, len(data), 0, []

    def _rebuild(self, e: Entry) -> None:
        """The state before the event being folded: ``base`` with ``log`` folded in again."""
        state = decode_state(e.base) if e.base else None
        for event in e.log:
            state = fold.apply(state, event, self.settings) or state
        e.state = state
        if state is None:
            e.base, e.size, e.growth, e.log = None, 0, 0, []
        else:
            self._rebase(e, encode_state(state))

    def dirty_partitions(self) -> list[int]:
        return [p for p, keys in self.dirty.items() if keys]

    def flush(self, partition: int) -> list[tuple[bytes, bytes]]:
        """The encoded state of every job of ``partition`` changed since the last flush, for the table."""
        out = []
        for key in self.dirty.pop(partition, ()):
            e = self.entries[key]
            if e.state is None:
                continue
            data = encode_state(e.state)
            self._rebase(e, data)
            out.append((key, data))
        return out

    def forget(self, partitions: set[int]) -> None:
        """Revoked partitions: drop their unflushed changes (the next owner reads those events again)."""
        for p in partitions:
            self.dirty.pop(p, None)
        for key in [k for k, e in self.entries.items() if e.partition in partitions]:
            del self.entries[key]
