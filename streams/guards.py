"""Guards that keep Faust 0.15.3 from losing telemetry events, and every other reach into its internals.

The fold makes redelivery harmless (``streams.fold``: dedup marks travel with
the counters), so the aggregator can afford to read too much, never too little.
Faust can read too little; the kill -9 test found it about once in ten runs, a
restarted aggregator coming back past events it had never folded and thousands
of backed-up records missing from ``kafka_backup_records_total``:

* Faust drops fetched records during rebalances and recovery and relies on
  seeking back to the committed offset afterwards; a partition with no commit
  yet (a worker killed within its first commit interval, a new group) has
  nothing to seek back to, and its position has already moved past them.
* A single record can vanish mid-stream right after a seek.
* Its pre-commit flush gives up after 0.1 s without a send, so a commit can
  cover events whose new table values are still queued in the process.

So the aggregator checks the one thing that matters instead of trusting each
path: ``OffsetGuard`` follows, per telemetry partition, the next offset it
must fold. An offset below it is a redelivery and is skipped; an offset above
it is a hole, and the worker restarts in place, resuming from its committed
offset, which the guard never lets pass an event not yet folded.
``ChangelogBarrier`` makes every commit wait until the table writes it covers
are acknowledged. (Seeking uncommitted partitions back to their start from
here was tried: it made Faust drop single records right after the seek.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from kafka_backup.schemas.config import ConfigError

log = logging.getLogger("kafka_backup.aggregator")


FAUST_VERSION = "0.15.3"  # every workaround in this module was written for, and tested with, this version
AIOKAFKA_VERSION = "0.14.0"  # Faust's Kafka client, reached into by pace_empty_fetches


def check_faust_version() -> None:
    """The workarounds below reach into Faust's and aiokafka's internals: refuse to run on versions
    they were not tested with."""
    import aiokafka
    import faust

    if faust.__version__ != FAUST_VERSION:
        raise ConfigError(f"faust-streaming {faust.__version__} is installed; the aggregator's guards were "
                           f"written for {FAUST_VERSION}: pip install faust-streaming=={FAUST_VERSION}")
    if aiokafka.__version__ != AIOKAFKA_VERSION:
        raise ConfigError(f"aiokafka {aiokafka.__version__} is installed; the aggregator's guards were "
                           f"written for {AIOKAFKA_VERSION}: pip install aiokafka=={AIOKAFKA_VERSION}")


def pace_empty_fetches(pause_s: float) -> None:
    """A fetch answered without new records in less than ``pause_s``: the next fetch to that broker
    waits out the rest of ``pause_s`` (``aggregator.empty_fetch_pause_ms``; 0 leaves aiokafka as it is).

    A Kafka broker holds a fetch with nothing to return for the fetch's wait (Faust asks 1.5 s) and
    answers as soon as records arrive, so there an empty answer is never quicker than this and nothing
    pauses. A broker that answers at once (noida-db, the dev broker, ignores the wait) made aiokafka
    fetch back to back: 1,700-2,800 empty fetches a second, 85% of a core for an aggregator
    of 300 idle-ish workers, and as much of the broker's answering them (docs/performance.md).
    Records arriving during a pause wait for it: at most ``pause_s`` more latency.

    aiokafka's fetch routine sends a broker's next fetch when the task of its previous one ends, so
    the pause is taken at the end of that task (``Fetcher._proc_fetch_request``, aiokafka 0.14.0).
    """
    from aiokafka.consumer.fetcher import Fetcher

    fetch = getattr(Fetcher._proc_fetch_request, "__wrapped__", Fetcher._proc_fetch_request)
    if not pause_s:
        Fetcher._proc_fetch_request = fetch
        return

    async def fetch_then_pause_if_empty(self: Any, assignment: Any, node_id: int, request: Any) -> bool:
        asked = time.monotonic()
        has_new_data: bool = await fetch(self, assignment, node_id, request)
        rest = pause_s - (time.monotonic() - asked)
        if not has_new_data and rest > 0 and not self._closed:
            try:
                await asyncio.sleep(rest)
            except asyncio.CancelledError:  # closing or unassigned: as aiokafka's own fetch task ends then
                return False
        return has_new_data

    fetch_then_pause_if_empty.__wrapped__ = fetch  # type: ignore[attr-defined]
    Fetcher._proc_fetch_request = fetch_then_pause_if_empty


def write_outside_event(table: Any, partition: int, key: bytes, value: bytes) -> None:
    """Set a table value from a timer, where Faust's ``table[key] = value`` refuses (no current event).

    It does what ``__setitem__`` does for a memory-store table: the local value, then the changelog
    record on ``partition`` (through ``send_changelog``, so the barrier still tracks it). The agent
    uses it too: its batched writes name the telemetry partition of their job, not the current event's.
    """
    table.data[key] = value
    table.send_changelog(partition, key, value)


class ChangelogWriter:
    """A partition's changed job states written to the table: each into the local store, and all of
    them to the changelog through Faust's own aiokafka producer, without Faust's message per write.

    ``write_outside_event`` costs a Faust ``FutureMessage``, a pass through its producer buffer and its
    ``publish_message`` per state: at 1,500 simulated workers (3,000 states a second) the aggregator's
    event loop spent ~19% in them (docs/performance.md). Here a flush of a partition is one task that
    hands its states to aiokafka's ``send`` in order; the task of a partition's next flush starts
    sending only when this one has handed all its states over, so a job's states reach the changelog
    in the order written, as through Faust's single buffer. Each task is held by the
    ``ChangelogBarrier`` until the broker acknowledged every state: commits wait for it as before.
    (The memory store keeps no changelog offsets, so Faust's ``_on_changelog_sent`` has nothing to do.)
    """

    def __init__(self, app: Any, table: Any, barrier: ChangelogBarrier) -> None:
        self.app, self.table, self.barrier = app, table, barrier
        self.topic = table.changelog_topic.get_topic_name()
        self.handing: dict[int, asyncio.Future] = {}  # partition: its last flush's states being handed over

    def write(self, partition: int, states: list[tuple[bytes, bytes]]) -> None:
        if not states:
            return
        data = self.table.data
        for key, value in states:
            data[key] = value
        before = self.handing.get(partition)
        handed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.handing[partition] = handed
        self.barrier.hold(asyncio.ensure_future(self._send(partition, states, before, handed)))

    async def _send(self, partition: int, states: list[tuple[bytes, bytes]], before: asyncio.Future | None,
                    handed: asyncio.Future) -> None:
        try:
            if before is not None:
                await asyncio.shield(before)
            producer = self.app.producer._ensure_producer()  # Faust 0.15.3's aiokafka producer
            acks = [await producer.send(self.topic, value=value, key=key, partition=partition)
                    for key, value in states]
        finally:
            if not handed.done():
                handed.set_result(None)
        await asyncio.gather(*acks)


def verify_copartitioned(table: Any, source_topic: str) -> None:
    """The check ``table[key] = value`` makes before its first write (``PartitionsMismatch`` when the
    source topic and the changelog differ), for a table written only through :class:`ChangelogWriter` and
    :func:`write_outside_event`."""
    table._verify_source_topic_partitions(source_topic)


class OffsetGuard:
    """The folded frontier of each telemetry partition, and the commits it allows.

    A partition's frontier starts where :meth:`start` puts it (its committed offset, else its
    earliest offset, asked by the aggregator when it first sees the partition, and again after
    the partition was revoked and :meth:`forget` dropped it).
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.next: dict[int, int] = {}  # partition -> next offset to fold
        self.held: dict[int, int] = {}  # partition -> first offset whose effect is not yet in the table

    def start(self, partition: int, offset: int) -> None:
        self.next[partition] = offset

    def admit(self, partition: int, offset: int) -> str:
        """``"fold"``, ``"duplicate"`` (already folded) or ``"gap"`` (events before it were skipped).

        Only for a started partition (a ``KeyError`` otherwise: where folding starts is not guessed)."""
        expected = self.next[partition]
        if offset < expected:
            return "duplicate"
        return "fold" if offset == expected else "gap"

    def folded(self, partition: int, offset: int) -> None:
        self.next[partition] = offset + 1

    def hold(self, partition: int, offset: int) -> None:
        """Commit nothing of ``partition`` from ``offset`` on until :meth:`release` (its effect is still in memory)."""
        self.held.setdefault(partition, offset)

    def release(self, partition: int) -> None:
        self.held.pop(partition, None)

    def forget(self, partitions: set[int]) -> None:
        for p in partitions:
            self.next.pop(p, None)
            self.held.pop(p, None)

    def allowed(self, offsets: dict[Any, int]) -> dict[Any, int]:
        """Offsets Faust wants to commit, each held back to the folded frontier of its partition."""
        out = {}
        for tp, offset in offsets.items():
            if tp.topic != self.topic:
                out[tp] = offset
            elif tp.partition in self.next:
                out[tp] = min(offset, self.next[tp.partition], self.held.get(tp.partition, offset))
        return out

    def guard_commits(self, consumer: Any) -> None:
        """Wrap Faust's ``Consumer._commit_offsets`` so no commit passes the frontier.

        Faust hands over offsets it has already struck from its acked list (``Consumer._new_offset``),
        and afterwards refuses to commit a partition whose oldest acked offset lies more than one past
        its committed offset. So the offsets held back are put back on that list: else a commit held
        back by two or more offsets (a fold not flushed yet when Faust commits, every few seconds)
        stopped the partition's commits for good, while folding went on (the exporter's lag grew until
        ``KafkaBackupAggregatorBehind`` paged, and a restart re-read everything since).
        """
        commit_offsets = consumer._commit_offsets

        async def commit_folded_only(offsets: Mapping[Any, int], *args: Any, **kwargs: Any) -> bool:
            committed = consumer._committed_offset
            safe = {tp: o for tp, o in self.allowed(dict(offsets)).items()
                    if committed.get(tp) is None or o > committed[tp]}
            for tp, wanted in offsets.items():
                kept = safe.get(tp, committed.get(tp))
                if tp.topic == self.topic and tp.partition in self.next and kept is not None and kept < wanted:
                    _ack_again(consumer, tp, kept, wanted)  # a partition still ours (Faust drops a revoked one's)
            if not safe:
                return False
            return await commit_offsets(safe, *args, **kwargs)

        consumer._commit_offsets = commit_folded_only


def _ack_again(consumer: Any, tp: Any, start: int, end: int) -> None:
    """Put offsets [start, end) back on Faust's acked list of ``tp`` (they are committed later)."""
    acked, index = consumer._acked[tp], consumer._acked_index[tp]
    back = [o for o in range(start, end) if o not in index]
    if back:
        acked.extend(back)
        acked.sort()
        index.update(back)


class ChangelogWriteFailed(RuntimeError):
    """A table write never reached the broker: committing past it would lose it."""


class ChangelogBarrier:
    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self.pending: set[asyncio.Future] = set()
        self.failure: BaseException | None = None  # sticky: a lost write poisons every later commit

    def _done(self, fut: asyncio.Future) -> None:
        self.pending.discard(fut)
        if fut.cancelled():
            self.failure = self.failure or asyncio.CancelledError("table write cancelled")
        elif fut.exception() is not None:
            self.failure = self.failure or fut.exception()

    def hold(self, fut: asyncio.Future) -> None:
        """Hold the commit until ``fut`` (a table write) is done."""
        if fut.done():
            self._done(fut)
        else:
            self.pending.add(fut)
            fut.add_done_callback(self._done)

    def track(self, send: Callable[..., asyncio.Future]) -> Callable[..., asyncio.Future]:
        """Wrap a ``send_changelog`` so each write's future is held until it is done."""

        def send_tracked(*args: Any, **kwargs: Any) -> asyncio.Future:
            fut = send(*args, **kwargs)
            self.hold(fut)
            return fut

        return send_tracked

    async def wait(self) -> None:
        """Return once every write made so far is acknowledged; raise if one failed.

        A broker that does not answer holds the commit back (with a warning every
        ``timeout_s``) rather than crash the worker: the commit happens when it is back.
        """
        while waiting := list(self.pending):
            _, not_done = await asyncio.wait(waiting, timeout=self.timeout_s)
            if not_done:
                log.warning("%d table writes not acknowledged after %.0f s; holding the offset commit",
                            len(not_done), self.timeout_s)
        if self.failure is not None:
            raise ChangelogWriteFailed(f"a table write failed ({self.failure!r}); not committing past it")

    def guard_changelog(self, table: Any) -> None:
        """Track every changelog write of ``table`` (its ``send_changelog``, which Faust offers no hook around)."""
        table.send_changelog = self.track(table.send_changelog)

    def guard_flush(self, producer: Any, on_failure: Callable[[ChangelogWriteFailed], None]) -> None:
        """Make ``producer.flush()`` (called by Faust right before each commit) wait for the barrier.

        ``on_failure`` runs instead of the commit when a write failed (the aggregator
        restarts in place: its events are read again from the committed offset).
        """
        flush = producer.flush

        async def flush_then_wait() -> None:
            await flush()
            try:
                await self.wait()
            except ChangelogWriteFailed as err:
                on_failure(err)
                raise

        producer.flush = flush_then_wait


class _Resumed:
    """A coroutine already started by hand, awaitable from where it stopped.

    It hands the task that awaits it the very future the coroutine is blocked on, and resumes the
    coroutine (``send``, or ``throw`` when the task is cancelled) exactly as a task would have: the
    coroutine cannot tell it was started outside a task.
    """

    __slots__ = ("coro", "blocked_on")

    def __init__(self, coro: Any, blocked_on: Any) -> None:
        self.coro, self.blocked_on = coro, blocked_on

    def __await__(self) -> Any:
        coro, step = self.coro, self.blocked_on
        while True:
            try:
                sent = yield step
            except BaseException as err:  # a cancelled task throws into its awaitable: pass it on
                try:
                    step = coro.throw(err)
                except StopIteration as done:
                    return done.value
                continue
            try:
                step = coro.send(sent)
            except StopIteration as done:
                return done.value


def deliver_eagerly(consumer: Any) -> None:
    """Run each fetched record's delivery at once, not as a task raced by three others.

    Faust 0.15.3's fetch loop (``Consumer._drain_messages``) hands each record to the streams with
    ``await self.wait_first(callback(message), self.suspend_flow.wait())``: four tasks per record
    (the delivery, the flow suspension, the service's stop and crash) and an ``asyncio.wait``, so
    that a rebalance can abandon a delivery blocked on a full stream buffer. Almost every delivery
    finishes without blocking: it is now started in place, and only one that blocks goes on through
    ``wait_first`` from where it stopped, as before. A suspended flow takes Faust's own path, and
    so does every record from the moment a rebalance starts: ``app.rebalancing`` is set by the
    consumer thread's rebalance listener at once, while the flow is suspended only once the event
    loop runs the revocation, which records delivered in place (no task, no yield to the loop) would
    keep waiting for; on Faust's path each delivery yields, and the revocation runs before the next.
    """
    wait_first = consumer.wait_first
    app = consumer.app

    async def wait_first_unless_done(*coros: Any, timeout: Any = None) -> Any:
        if (len(coros) != 2 or consumer.suspend_flow.is_set() or app.rebalancing
                or not asyncio.iscoroutine(coros[0])):
            return await wait_first(*coros, timeout=timeout)
        delivery, flow = coros
        try:
            blocked_on = delivery.send(None)
        except StopIteration:  # delivered: the fetch loop ignores what wait_first returns
            flow.close()
            return None
        except BaseException:
            flow.close()
            raise
        return await wait_first(_Resumed(delivery, blocked_on), flow, timeout=timeout)

    consumer.wait_first = wait_first_unless_done
