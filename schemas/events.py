"""Telemetry events: the contract between workers (emit) and the aggregator (fold).

Every event is a msgspec Struct in one tagged union, encoded as msgpack. The
envelope fields on :class:`Event` are what make an at-least-once log usable as
a source of truth:

* ``v``        schema version of the writer, so readers can skip what they do
               not understand instead of misreading it;
* ``worker``   the emitting worker process (unique per process start; ``instance`` on the wire);
* ``seq``      a per-worker sequence number, strictly increasing, so a
               reader can drop duplicates and replays with one integer per
               worker;
* ``ts``       event time (epoch seconds) taken by the worker, never the
               aggregator's clock, so a replay computes the same values.

Events are keyed by ``kind:job`` (see :func:`event_key`) so all events of one
job land in one partition, in order.

Evolution rules (see docs/events.md): new fields are optional with defaults;
new event types get new tags; a reader skips unknown tags and counts them.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, get_args

import msgspec

SCHEMA_VERSION = 1

# Constraints every decoded event meets (msgspec checks them while decoding; a violation is
# refused as ``bad_value``). Numbers are finite and non-negative where a negative means nothing,
# and fit a signed 64-bit integer, so no sum of them can poison or overflow an aggregate.
# Strings that become label values or state keys keep to a safe character set and length.
MAX_INT = 2**63 - 1
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT, description="a count")]
Offset = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT, description="a Kafka offset")]
OffsetOrUnknown = Annotated[int, msgspec.Meta(ge=-1, le=MAX_INT)]  # -1: not known (yet)
PartitionId = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=10 * 365 * 86400.0)]  # a duration: finite, up to 10 years
EpochSeconds = Annotated[float, msgspec.Meta(ge=0.0, le=4_102_444_800.0)]  # finite, before 2100
EpochMillis = Annotated[int, msgspec.Meta(ge=0, le=4_102_444_800_000)]
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{0,64}$")]  # a label value from a short vocabulary
TopicName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,249}$")]  # Kafka's own rule
JobId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")]  # config.SAFE_ID
JobIdOrNone = Annotated[str, msgspec.Meta(pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,199})?$")]
WorkerId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$")]
TopicPartitionName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,249}/[0-9]{1,10}$")]
Text = Annotated[str, msgspec.Meta(max_length=2000)]  # free text for people, never a label
MAX_LIST = 100_000
MAX_BATCH_EVENTS = 500  # events in one batch record; more are refused as ``batch_too_large``
MAX_BATCH_BYTES = 512 * 1024  # an emitter's batch record stays under this (the topic's record limit is 1 MB)

JobKind = Literal["backup", "restore", "offset_reset", "verify"]
# interrupted: stopped (SIGTERM, SIGINT) before the run's work was done; not a success, resumed by the next run
Status = Literal["success", "failure", "interrupted"]
Direction = Literal["write", "read"]


class Event(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    """Envelope shared by every event."""

    v: int = SCHEMA_VERSION
    worker: WorkerId = msgspec.field(name="instance")  # the wire keeps schema v1's name
    seq: Count
    ts: EpochSeconds
    kind: JobKind = "backup"
    job: JobId


class JobStarted(Event, tag="job_started"):
    """A run of a job began. ``mode`` is ``one-shot`` or ``continuous``."""

    mode: Name = "one-shot"
    topics: Annotated[list[TopicName], msgspec.Meta(max_length=MAX_LIST)] = []
    backend: Name = ""
    compression: Name = ""
    backup_id: JobIdOrNone = ""  # for restores: the backup being restored
    total_records: Count | None = None  # for restores: records in the restore's scope (whole window, all runs)
    restored_total: Count = 0  # for restores: records already restored by earlier runs (resumed)
    restored_bytes: OffsetOrUnknown = -1  # for restores: their key+value bytes (-1: an older worker, unknown)
    expected_interval_s: Seconds | None = None  # one-shot backups: a successful run is due at least this often
    recovery_point_objective_s: Seconds | None = None  # backups: the newest stored record may be this old at most


class JobEnded(Event, tag="job_ended"):
    """A run ended; ``duration_s`` is measured by the worker's monotonic clock.

    ``status`` ``interrupted`` (a run stopped by a signal before its work was done) and the job
    kind ``verify`` were added after the first release: an aggregator older than them skips such
    events as ``invalid_field`` (counted), so upgrade aggregators before workers.
    """

    status: Status
    duration_s: Seconds
    reason: Text = ""


class PartitionProgress(msgspec.Struct, array_like=True, omit_defaults=True):
    """One partition's position, sent every poll cycle.

    ``committed`` is the next offset that is durably stored (segment and
    checkpoint written), the same offset the worker commits to the group.
    Timestamps are record timestamps in epoch milliseconds.
    """

    topic: TopicName
    partition: PartitionId
    committed: OffsetOrUnknown
    high_watermark: OffsetOrUnknown
    newest_stored_ts: EpochMillis | None = None
    newest_available_ts: EpochMillis | None = None


class TopicConsumed(msgspec.Struct, array_like=True):
    """Records and key+value bytes fetched from one topic since the last Progress."""

    topic: TopicName
    records: Count
    bytes: Count


class Progress(Event, tag="progress"):
    """One per poll cycle, carrying every assigned partition (few, dense events)."""

    partitions: Annotated[list[PartitionProgress], msgspec.Meta(max_length=MAX_LIST)] = []
    consumed: Annotated[list[TopicConsumed], msgspec.Meta(max_length=MAX_LIST)] = []
    fetches: Count = 0


class SegmentStored(Event, tag="segment_stored"):
    """A segment and the checkpoint naming it are durable: these records are backed up.

    ``bytes`` is key plus value bytes of the records; ``uncompressed_bytes``
    the encoded segment before compression; ``stored_bytes`` the object's size.
    The offset range lets the aggregator count each range once even when the
    same segment is reported twice, or again by a later run of the worker
    because the first report was not acknowledged when its checkpoint was
    written (routinely a partition's last segment of a run; or a killed
    worker's queue).

    ``covers_from`` is where the segment's share of the partition's offset
    space begins: the checkpoint's next offset before it. It is at or below
    ``start_offset`` (offsets in between held no record: transaction markers,
    compacted records), so consecutive segments cover the partition without
    gaps and a lost report shows as a hole the aggregator can fill later.
    ``-1`` (older workers) means ``start_offset``.
    """

    topic: TopicName
    partition: PartitionId
    start_offset: Offset
    end_offset: Offset  # exclusive: the next offset to back up
    records: Count
    bytes: Count
    uncompressed_bytes: Count
    stored_bytes: Count
    algorithm: Name
    min_ts: EpochMillis | None = None
    max_ts: EpochMillis | None = None
    covers_from: OffsetOrUnknown = -1


class StorageOp(Event, tag="storage_op"):
    """One storage call, timed from request to response, whatever its outcome.

    ``outcome`` is ``success`` or, for a failed call, its storage error type
    (``timeout``, ``auth``, ``not_found``, ``quota``, ``unknown``); a failed
    call also sends an ``error`` event. Older workers sent successful calls only.
    """

    backend: Name
    operation: Name  # segment | manifest | checkpoint
    direction: Direction
    latency_s: Seconds
    bytes: Count
    outcome: Name = "success"


class ErrorRaised(Event, tag="error"):
    """A classified failure. ``backend`` and ``storage_error`` are set for storage failures."""

    error_type: Name
    transient: bool
    operation: Name = ""
    backend: Name = ""
    storage_error: Name = ""
    message: Text = ""


class Retry(Event, tag="retry"):
    operation: Name  # commit | write | read


class Rebalance(Event, tag="rebalance"):
    """Partitions assigned to (one event per rebalance) or revoked from the worker.

    The aggregator counts the assignments: a rebalance revokes and then assigns, and
    counting both would count it twice. Workers send a revocation only when it
    names partitions.
    """

    assigned: Annotated[list[TopicPartitionName], msgspec.Meta(max_length=MAX_LIST)] = []  # "topic/partition"
    revoked: Annotated[list[TopicPartitionName], msgspec.Meta(max_length=MAX_LIST)] = []


class TopicPartitionOffset(msgspec.Struct, array_like=True):
    topic: TopicName
    partition: PartitionId
    offset: Offset


class OffsetsCommitted(Event, tag="offsets_committed"):
    """The group commit succeeded for these offsets (at ``ts``)."""

    offsets: Annotated[list[TopicPartitionOffset], msgspec.Meta(max_length=MAX_LIST)] = []


class RestoreProgress(Event, tag="restore_progress"):
    """Sent after each produced batch is acknowledged by the target cluster.

    ``records`` and ``bytes`` are what this batch added (for the rates);
    ``restored_total`` and ``restored_bytes`` are the restore's cumulative
    counts from its checkpoint, including earlier runs. The totals are what
    the aggregator counts: a later event or the next run's ``JobStarted``
    carries whatever a killed worker's lost events had, and a batch reported
    twice (written, then adopted after a crash) is not counted twice.
    """

    records: Count
    restored_total: Count
    bytes: Count = 0
    restored_bytes: OffsetOrUnknown = -1  # cumulative like restored_total; -1 from older workers (count ``bytes``)


class TelemetryDropped(Event, tag="telemetry_dropped"):
    """Cumulative count of events this worker could not deliver; max() is idempotent."""

    total: Count


class SegmentsChecked(Event, tag="segments_checked"):
    """Segments a ``verify`` or ``restore`` run read and checked, sent once at the end of the run.

    ``segments`` were read and checked (size, SHA-256, decoding, records against the index);
    ``bad`` failed a check (missing, altered, undecodable, not the records claimed); ``unverified``
    had no digest to check (written by layout 1); ``gaps`` are holes or overlaps in a partition's
    offset coverage. ``complete``: every segment the backup's index names was checked (a verify
    run that got to the end), so ``bad`` and ``gaps`` are the backup's whole count.
    """

    backup_id: JobIdOrNone = ""
    segments: Count = 0
    bad: Count = 0
    unverified: Count = 0
    gaps: Count = 0
    complete: bool = False


AnyEvent = (
    JobStarted
    | JobEnded
    | Progress
    | SegmentStored
    | StorageOp
    | ErrorRaised
    | Retry
    | Rebalance
    | OffsetsCommitted
    | RestoreProgress
    | TelemetryDropped
    | SegmentsChecked
)

EVENT_TYPES: tuple[type[Event], ...] = get_args(AnyEvent)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[AnyEvent] = msgspec.msgpack.Decoder(AnyEvent)


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


class InvalidEvent(ValueError):
    """A telemetry record that cannot be used; ``reason`` becomes a metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class _Envelope(msgspec.Struct):
    type: str = ""
    v: int = 0


_CONSTRAINT = re.compile(r"Expected `[^`]+` (>=|<=|>|<|matching regex|of length)")
_KNOWN_TAGS = frozenset(t.__struct_config__.tag for t in EVENT_TYPES)
_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)


class Batch(msgspec.Struct, tag="batch", tag_field="type", kw_only=True):
    """Several events of ONE job in one telemetry record, in emission order (``telemetry.batch_events``).

    Each element of ``events`` is a whole event exactly as it would be sent alone (embedded, not
    wrapped), and is checked, refused and counted on its own: a bad event inside a batch is
    skipped by its reason and the others are folded. The record's key is the job's ``kind:job``
    like any single event's, so partitioning and per-job order are unchanged. A batch record
    whose envelope is unusable is refused once, as a whole: ``malformed`` (not a batch of events),
    ``future_version`` (a newer batch layout), ``batch_too_large`` (more than
    ``MAX_BATCH_EVENTS`` events). Batches do not nest. An aggregator older than this
    envelope refuses the whole record as ``unknown_type``; so by default
    (``telemetry.batch_events: auto``) a worker sends batch records only while every member of the
    aggregator's consumer group carries ``BATCH_READER_MARK`` in its Kafka client id
    (docs/architecture.md, "Batch records").
    """

    v: int = SCHEMA_VERSION
    events: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=MAX_BATCH_EVENTS)]


BATCH_TAG = "batch"
BATCH_READER_MARK = "reads-batch-v1"  # in the client id of every aggregator that folds batch records
AGGREGATOR_CLIENT_ID = f"kafka-backup-aggregator+{BATCH_READER_MARK}"  # what the aggregator tells the broker


def reads_batches(client_id: str) -> bool:
    """Whether a member of the aggregator group, known by its Kafka client id, folds batch records."""
    return BATCH_READER_MARK in client_id.split("+")[1:]


_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(Batch)


def encode_batch(payloads: list[bytes]) -> bytes:
    """One batch record carrying ``payloads`` (each an encoded event of the same job), in order."""
    if not 1 <= len(payloads) <= MAX_BATCH_EVENTS:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH_EVENTS} events, not {len(payloads)}")
    return _batch_encoder.encode(Batch(events=[msgspec.Raw(p) for p in payloads]))


def unpack(data: bytes | None) -> list[bytes]:
    """The events a telemetry record carries, each to be decoded on its own: the record
    itself for a single event (whatever it holds: :func:`decode` judges it), a batch's events in order.

    Raises :class:`InvalidEvent` for a batch record that cannot be used as a whole (see :class:`Batch`).
    """
    if not data:
        return [b""]
    try:
        env = _envelope_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return [data]
    if env.type != BATCH_TAG:
        return [data]
    if env.v > SCHEMA_VERSION:
        raise InvalidEvent("future_version", f"batch v={env.v}")
    try:
        batch = _batch_decoder.decode(data)
    except msgspec.ValidationError as err:  # the length is checked before any element is read
        too_many = "of length <=" in str(err)
        raise InvalidEvent("batch_too_large" if too_many else "malformed", f"batch: {err}") from None
    except msgspec.DecodeError as err:
        raise InvalidEvent("malformed", f"batch: {err}") from None
    return [bytes(raw) for raw in batch.events]


def decode(data: bytes | None) -> AnyEvent:
    """Decode one event, or raise :class:`InvalidEvent` with a reason.

    Reasons: ``malformed`` (not msgpack of our shape), ``unknown_type`` (a tag
    this reader does not know, e.g. written by a newer worker),
    ``future_version`` (an incompatible schema version), ``invalid_field``
    (a known type with a field of the wrong type or missing), ``bad_value``
    (a field outside its constraints: not finite, negative, too large, a label
    value with characters outside its set).
    """
    if not data:
        raise InvalidEvent("malformed", "empty record")
    try:
        env = _envelope_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise InvalidEvent("malformed", str(err)) from None
    if env.v > SCHEMA_VERSION:
        raise InvalidEvent("future_version", f"v={env.v}")
    if env.type not in _KNOWN_TAGS:
        raise InvalidEvent("unknown_type", env.type or "(none)")
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as err:
        raise InvalidEvent("bad_value" if _CONSTRAINT.search(str(err)) else "invalid_field", str(err)) from None
    except msgspec.DecodeError as err:
        raise InvalidEvent("invalid_field", str(err)) from None


def event_key(kind: str, job: str) -> str:
    """Partition and table key: all events of one job stay in order together."""
    return f"{kind}:{job}"


def render_markdown() -> str:
    """docs/events.md, generated from the Structs: ``python -m kafka_backup.schemas.events > docs/events.md``."""
    import inspect

    def fields(cls: type) -> str:
        rows = []
        for f in msgspec.structs.fields(cls):
            default = "" if f.required else f" = {f.default!r}" if f.default is not msgspec.NODEFAULT else " = []"
            wire = f" (`{f.encode_name}` on the wire)" if f.encode_name != f.name else ""
            rows.append(f"`{f.name}: {_type_name(f.type)}{default}`{wire}")
        return ", ".join(rows)

    out = [
        "# Telemetry events",
        "",
        "<!-- Generated by `python -m kafka_backup.schemas.events > docs/events.md`; do not edit. -->",
        "",
        f"Schema version **{SCHEMA_VERSION}**. Each event is a msgpack map with a `type` tag,",
        "keyed `kind:job` on the telemetry topic. Source: `schemas/events.py`.",
        "",
        "## Envelope (every event)",
        "",
        inspect.cleandoc(Event.__doc__ or ""),
        "",
        fields(Event),
        "",
        "## Constrained types",
        "",
        "Checked while decoding; an event breaking one is refused and counted as",
        "`kafka_backup_telemetry_invalid_events_total{reason=\"bad_value\"}`. Numbers are",
        "finite and fit a signed 64-bit integer, so no sum of them can poison or overflow an",
        "aggregate; strings that become label values or state keys keep to a safe set.",
        "",
        "| type | values |",
        "|---|---|",
        *[f"| `{name}` | {text} |" for name, (_, text) in CONSTRAINED.items()],
        "",
        "## Evolution rules",
        "",
        "- A new field is added with a default; readers of older versions ignore it, and",
        "  older events decode with the default. `v` does not change.",
        "- A new event type gets a new tag. Older readers skip it and count it in",
        "  `kafka_backup_telemetry_invalid_events_total{reason=\"unknown_type\"}`.",
        "- An incompatible change (a field's meaning or type) bumps `v`; readers skip",
        "  events with a higher `v` than theirs (`reason=\"future_version\"`).",
        "- A field is never renamed on the wire. Code may call it differently, keeping the",
        "  wire name with `msgspec.field(name=...)` (shown above as \"on the wire\"): the",
        "  envelope's `worker` is `instance` in every record.",
        "",
        "## Batch records",
        "",
        inspect.cleandoc(Batch.__doc__ or ""),
        "",
        f"Fields: `type: \"{BATCH_TAG}\"`, `v: int = {SCHEMA_VERSION}`, "
        f"`events: list[event] (1 to {MAX_BATCH_EVENTS})`. A refused batch record counts once in",
        "`kafka_backup_telemetry_invalid_events_total`, whatever it held; a refused event inside",
        "a batch counts once by its own reason. Single-event records stay valid for ever.",
        "",
        "## Event types",
        "",
    ]
    for cls in EVENT_TYPES:
        out += [f"### `{cls.__struct_config__.tag}` ({cls.__name__})", ""]
        doc = inspect.cleandoc(cls.__doc__ or "")
        if doc:
            out += [doc, ""]
        own = [f for f in msgspec.structs.fields(cls) if f.name not in {g.name for g in msgspec.structs.fields(Event)}]
        out += ["Fields: " + (", ".join(
            f"`{f.name}: {_type_name(f.type)}`" + ("" if f.required else " (optional)") for f in own) or "none"), ""]
    nested = [PartitionProgress, TopicConsumed, TopicPartitionOffset]
    out += ["## Nested structs (encoded as arrays)", ""]
    for struct in nested:
        out += [f"- `{struct.__name__}`: [{fields(struct)}]"]
    out.append("")
    return "\n".join(out)


CONSTRAINED = {
    "Count": (Count, "integer, 0 to 2^63-1"),
    "Offset": (Offset, "integer, 0 to 2^63-1"),
    "OffsetOrUnknown": (OffsetOrUnknown, "integer, -1 (unknown) to 2^63-1"),
    "PartitionId": (PartitionId, "integer, 0 to 2^31-1"),
    "Seconds": (Seconds, "finite float, 0 to 10 years"),
    "EpochSeconds": (EpochSeconds, "finite float, Unix seconds before 2100"),
    "EpochMillis": (EpochMillis, "integer, Unix milliseconds before 2100"),
    "Name": (Name, "label value: 0-64 of `A-Z a-z 0-9 _ . -`"),
    "TopicName": (TopicName, "Kafka topic name: 1-249 of `A-Z a-z 0-9 . _ -`"),
    "JobId": (JobId, "job id: 1-200 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit"),
    "JobIdOrNone": (JobIdOrNone, "a job id or empty"),
    "WorkerId": (WorkerId, "worker process id: 1-200 of `A-Z a-z 0-9 . _ : @ -`"),
    "TopicPartitionName": (TopicPartitionName, "`topic/partition`"),
    "Text": (Text, "free text for people, at most 2,000 characters"),
}
_ALIAS = {id(t): name for name, (t, _) in CONSTRAINED.items()}


def _type_name(t: object) -> str:
    import typing

    if id(t) in _ALIAS:
        return _ALIAS[id(t)]
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is typing.Annotated:
        return f"{_type_name(args[0])} (max {args[1].max_length})" if args[1].max_length else _type_name(args[0])
    if origin is typing.Union or type(t).__name__ == "UnionType":
        return " | ".join(_type_name(a) for a in args)
    if isinstance(t, type):
        return "None" if t is type(None) else t.__name__
    return str(t).replace("typing.", "").replace("kafka_backup.schemas.events.", "").replace("__main__.", "")


if __name__ == "__main__":
    import sys

    sys.stdout.write(render_markdown())
