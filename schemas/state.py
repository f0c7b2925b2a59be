"""Aggregated state of one job: the value of the aggregator's table.

The aggregator folds events into a :class:`JobState` per ``kind:job`` key and
writes it, msgpack-encoded, to its table; the table's compacted changelog is
the *state topic* that the exporter reads. Keeping it here (the contract)
rather than in ``streams/`` lets the exporter decode it without importing the
aggregator.

The dedup high-water marks (``seen``) and the per-partition coverage
(``PartitionState.stored_next_offset`` and ``stored_holes``) live in the same value as the counters
they guard, so one changelog record always carries both: after a crash the
restored table can never hold a counter that includes an event while its
high-water mark does not (or the reverse).

Every value is a typed Struct (docs/architecture.md, "State values"). Small records
(a pair of counts, a dedup mark, a hole) are ``array_like`` Structs: msgpack encodes them
as the same arrays the ``list[int]`` pairs of earlier versions were, so values already on
a state topic decode unchanged, and older readers read what this version writes.
"""

from __future__ import annotations

import msgspec

STATE_VERSION = 1  # the newest JobState layout this code reads and writes (JobState.v)
SIZE_WINDOW_MINUTES = 60  # average record size for lag_bytes: the PRD's rolling hour
MAX_HOLES = 64  # per partition; a hole older than the last 64 is forgotten (a late report of it is not counted)


class Histogram(msgspec.Struct, array_like=True):
    """Non-cumulative bucket counts (len(buckets) + 1, the last is +Inf), sum and count."""

    counts: list[int]
    sum: float = 0.0
    count: int = 0

    @classmethod
    def empty(cls, buckets: tuple[float, ...]) -> Histogram:
        return cls(counts=[0] * (len(buckets) + 1))

    def fitted(self, buckets: tuple[float, ...], legacy: tuple[tuple[float, ...], ...] = ()) -> Histogram | None:
        """These counts laid out for ``buckets``; None when they cannot be, exactly.

        A histogram written with an older bucket layout (``legacy``, the catalogue's former
        buckets) is moved over when every old bound is also a new one: each old bucket's
        count goes to the new bucket with the same upper bound, so ``_count``, ``_sum`` and
        every ``le`` that existed before keep their values and nothing a scraper saw falls.
        """
        if len(self.counts) == len(buckets) + 1:
            return self
        index = {b: i for i, b in enumerate(buckets)}
        for old in legacy:
            if len(old) + 1 == len(self.counts) and all(b in index for b in old):
                counts = [0] * (len(buckets) + 1)
                for b, n in zip(old, self.counts, strict=False):
                    counts[index[b]] += n
                counts[-1] += self.counts[-1]
                return Histogram(counts=counts, sum=self.sum, count=self.count)
        return None

    def observe(self, value: float, buckets: tuple[float, ...]) -> None:
        i = 0
        while i < len(buckets) and value > buckets[i]:
            i += 1
        self.counts[i] += 1
        self.sum += value
        self.count += 1


class SizeSample(msgspec.Struct, array_like=True):
    """Records and bytes backed up in one minute (epoch minute), for the 1 h average record size."""

    minute: int
    records: int
    bytes: int


class Hole(msgspec.Struct, array_like=True):
    """Offsets ``[start, end)`` of a partition that no report has covered yet."""

    start: int
    end: int


class PartitionState(msgspec.Struct, omit_defaults=True):
    topic: str
    partition: int
    committed: int = -1
    high_watermark: int = -1
    newest_stored_ts: int | None = None
    newest_available_ts: int | None = None
    stored_next_offset: int = 0  # coverage: offsets below this are counted in records_total...
    stored_holes: list[Hole] = []  # ...except these ranges, reported by no one yet
    records: int = 0
    bytes: int = 0
    last_commit_ts: float | None = None
    sizes: list[SizeSample] = []

    def claim(self, covers_from: int, end_offset: int) -> bool:
        """Mark ``[covers_from, end_offset)`` as counted; False when all of it already was.

        Segments of one partition cover its offsets without gaps (``SegmentStored.covers_from``),
        so a range starting above the frontier means a report in between is missing: it is
        remembered as a hole that a later report (the worker's next run reports again what
        was never confirmed) fills. ``covers_from == -1`` (an older worker's event) only moves
        the frontier, as before. A range overlapping counted offsets only in part is counted:
        that takes two writers on one partition, and counting beats losing records.
        """
        frontier = self.stored_next_offset
        if covers_from < 0:
            if end_offset <= frontier:
                return False
            self.stored_next_offset = end_offset
            return True
        if covers_from >= frontier:
            if covers_from > frontier:
                self.stored_holes = [*self.stored_holes, Hole(frontier, covers_from)][-MAX_HOLES:]
            self.stored_next_offset = end_offset
            return True
        kept = []  # the holes minus [covers_from, end_offset)
        for h in self.stored_holes:
            if h.end <= covers_from or h.start >= end_offset:
                kept.append(h)
                continue
            if h.start < covers_from:
                kept.append(Hole(h.start, covers_from))
            if h.end > end_offset:
                kept.append(Hole(end_offset, h.end))
        if kept == self.stored_holes and end_offset <= frontier:
            return False  # no hole touched, nothing past the frontier: all of it was counted
        self.stored_holes = kept
        self.stored_next_offset = max(frontier, end_offset)
        return True


class StorageCalls(msgspec.Struct):
    """Every storage call of one kind and outcome: how long each took, and the bytes moved.

    ``outcome`` is ``success`` or the storage error type of a failed call (``timeout``,
    ``auth``, ...): a failed call is timed too, so a p99 shows the timeouts.
    """

    direction: str
    backend: str
    operation: str
    outcome: str
    latency: Histogram
    bytes: int = 0


class StorageErrors(msgspec.Struct, array_like=True):
    """Failed storage calls of one backend and error type."""

    backend: str
    error_type: str
    count: int


class RateSample(msgspec.Struct, array_like=True):
    """What was consumed from one topic in one second (epoch second) of event time."""

    second: int
    topic: str
    records: int
    bytes: int
    # Always 0: polls are the job's, not a topic's (``JobRate.fetches``). Kept as the fifth element
    # so a sample encodes as before, and so the job-level samples of older values can be read
    # (see ``_upgrade_legacy``).
    legacy_fetches: int = 0


class JobRate(msgspec.Struct, array_like=True):
    """The job's own counts in one second (epoch second) of event time, whatever the topic.

    A backup's ``fetches`` (consumer polls); a restore's ``records`` and ``bytes`` acknowledged
    by the target cluster.
    """

    second: int
    records: int = 0
    bytes: int = 0
    fetches: int = 0


class Consumed(msgspec.Struct, array_like=True):
    """Records and bytes consumed from one topic, all runs."""

    records: int = 0
    bytes: int = 0


class Compressed(msgspec.Struct, array_like=True):
    """Segment bytes of one compression algorithm: stored (after compression) and before it."""

    compressed: int = 0
    uncompressed: int = 0


class Seen(msgspec.Struct, array_like=True):
    """A worker's dedup mark: the highest ``seq`` folded in, and the time of its last event."""

    seq: int | float  # int; a float only as read from a value an older aggregator re-encoded (__post_init__)
    ts: float

    def __post_init__(self) -> None:
        # Older aggregators kept the mark in a ``list[float]``: once decoded and encoded again the
        # seq is a msgpack float (5.0). Taken back as the integer it always was; a fraction is no seq.
        if isinstance(self.seq, float):
            if not self.seq.is_integer():
                raise ValueError(f"dedup mark seq {self.seq} is not an integer")
            self.seq = int(self.seq)


STATUS_SAMPLES = 10  # Burrow-style window: the last 10 progress samples...
STATUS_SAMPLE_EVERY_S = 5.0  # ...at least 5 s apart, so the window spans 45 s or more


class StatusSample(msgspec.Struct, array_like=True):
    """Lag and committed offsets summed over the job's partitions at one progress report."""

    ts: float
    lag: int
    committed: int


class JobState(msgspec.Struct, omit_defaults=True):
    kind: str
    job: str
    # The layout version of this value. The default is the version of values written before ``v``
    # was ever put on the wire (omit_defaults leaves a default out), so it must stay 1 for good:
    # a later writer's ``v`` differs from it and is therefore always written, and read back.
    v: int = 1
    backup_id: str = ""
    status: str = "running"  # running | success | failure | interrupted
    mode: str = ""
    started_ts: float | None = None
    ended_ts: float | None = None
    last_success_ts: float | None = None  # end of the last run that succeeded
    expected_interval_s: float | None = None  # one-shot backups: a success is due at least this often
    recovery_point_objective_s: float | None = None  # newest stored record may be at most this old
    last_event_ts: float = 0.0
    runs: int = 0
    records: int = 0
    bytes: int = 0
    fetches: int = 0
    consumed: dict[str, Consumed] = {}  # topic
    partitions: dict[str, PartitionState] = {}  # "topic/partition"
    rates: list[RateSample] = []  # per topic and second, the throughput window
    job_rates: list[JobRate] = []  # per second, the throughput window
    durations: dict[str, Histogram] = {}  # status
    storage_calls: list[StorageCalls] = []
    storage_failures: list[StorageErrors] = []
    # Written by older aggregators with joined "a|b" keys (a "|" in a value shifted labels); read,
    # never written: storage_latency moves into storage_calls on the job's next storage event.
    storage_latency: dict[str, Histogram] = {}  # "direction|backend|operation"
    storage_bytes: dict[str, int] = {}  # "direction|backend", frozen
    storage_errors: dict[str, int] = {}  # "backend|error_type", frozen
    compression: dict[str, Compressed] = {}  # algorithm
    errors: dict[str, int] = {}  # error_type -> count, transient and permanent
    permanent_errors: dict[str, int] = {}  # error_type -> count of those a retry cannot fix
    retries: dict[str, int] = {}
    rebalances: int = 0
    window: list[StatusSample] = []  # for the worker status (OK/WARN/STALL/STOP/ERROR)
    total_records: int | None = None  # restore: records in scope
    restored_total: int = 0  # restore: cumulative, including resumed runs
    dropped: dict[str, int] = {}  # worker -> cumulative dropped events
    seen: dict[str, Seen] = {}  # worker
    checked_segments: int = 0  # verify/restore: segments read and checked, all runs
    unverified_segments: int = 0  # verify/restore: of those, without a digest (layout 1)
    verified_ts: float | None = None  # verify: event time of the last run that checked every segment
    verify_bad: int = 0  # verify: bad segments found by that run
    verify_gaps: int = 0  # verify: offset gaps found by that run

    def storage_bytes_by(self) -> list[tuple[str, str, int]]:
        """(direction, backend, bytes) of every storage call, legacy counts included."""
        return [(c.direction, c.backend, c.bytes) for c in self.storage_calls] + _split_keys(self.storage_bytes)

    def storage_errors_by(self) -> list[tuple[str, str, int]]:
        """(backend, error_type, count) of failed storage calls, legacy counts included."""
        return [(f.backend, f.error_type, f.count) for f in self.storage_failures] + _split_keys(self.storage_errors)

    def all_storage_calls(self) -> list[StorageCalls]:
        """Storage timings, legacy ``storage_latency`` entries (successful calls, joined keys) included."""
        if not self.storage_latency:
            return self.storage_calls
        legacy = []
        for key, h in self.storage_latency.items():
            parts = key.split("|", 2)
            if len(parts) == 3:
                legacy.append(StorageCalls(direction=parts[0], backend=parts[1], operation=parts[2],
                                           outcome="success", latency=h))
        return legacy + self.storage_calls


def _split_keys(joined: dict[str, int]) -> list[tuple[str, str, int]]:
    """An older aggregator's ``{"a|b": n}`` counts as ``(a, b, n)``."""
    out = []
    for key, n in joined.items():
        parts = key.split("|", 1)
        if len(parts) == 2:
            out.append((parts[0], parts[1], n))
    return out


class PipelineState(msgspec.Struct, omit_defaults=True):
    """Aggregator-side counts for one telemetry partition: events it had to skip."""

    partition: int
    invalid: dict[str, int] = {}  # reason -> records refused (the record's fault)
    failures: dict[str, int] = {}  # exception type -> records whose fold raised (the aggregator's fault)


PIPELINE_PREFIX = "pipeline:"


def pipeline_key(partition: int) -> str:
    """Table key for a telemetry partition's own counters (one writer per partition, no conflicts)."""
    return f"{PIPELINE_PREFIX}{partition}"


class NewerStateError(ValueError):
    """A state value written by a newer aggregator than this code: reading it would lose what it added."""

    def __init__(self, version: int) -> None:
        super().__init__(f"state layout version {version}, newer than this code reads ({STATE_VERSION})")
        self.version = version


class _Version(msgspec.Struct):
    v: int = 1


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(JobState)
_version_decoder = msgspec.msgpack.Decoder(_Version)
_pipeline_decoder = msgspec.msgpack.Decoder(PipelineState)


def encode_state(state: JobState | PipelineState) -> bytes:
    return _encoder.encode(state)


def decode_state(data: bytes) -> JobState:
    """A JobState; ``NewerStateError`` for a newer writer's value, ``msgspec.DecodeError`` for a bad one."""
    try:
        state = _decoder.decode(data)
    except msgspec.ValidationError:
        _refuse_newer(data)  # a newer layout may have changed a field's type: say so, not "invalid"
        raise
    if state.v > STATE_VERSION:
        raise NewerStateError(state.v)
    _upgrade_legacy(state)
    return state


def _refuse_newer(data: bytes) -> None:
    try:
        version = _version_decoder.decode(data).v
    except msgspec.DecodeError:
        return
    if version > STATE_VERSION:
        raise NewerStateError(version)


# ---- legacy: values written by aggregators before issue 13 ----------------------------------
# They kept a job's own per-second counts (a backup's fetches, a restore's acknowledged records
# and bytes) in ``rates`` under the topic "" (no Kafka topic has that name). Moved to ``job_rates``
# when read, so nothing else sees the old shape; such samples leave the window within
# ``aggregator.throughput_window_s`` of the upgrade, after which this never finds any.
LEGACY_JOB_RATE_TOPIC = ""


def _upgrade_legacy(state: JobState) -> None:
    if not any(r.topic == LEGACY_JOB_RATE_TOPIC for r in state.rates):
        return
    legacy = [JobRate(r.second, r.records, r.bytes, r.legacy_fetches)
              for r in state.rates if r.topic == LEGACY_JOB_RATE_TOPIC]
    state.job_rates = sorted([*state.job_rates, *legacy], key=lambda r: r.second)
    state.rates = [r for r in state.rates if r.topic != LEGACY_JOB_RATE_TOPIC]


def decode_pipeline(data: bytes) -> PipelineState:
    return _pipeline_decoder.decode(data)
