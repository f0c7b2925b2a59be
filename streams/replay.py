"""Offline replay: the telemetry log folded again, by the live aggregator's own code.

An auditor's question ("was this topic fully backed up last quarter?") must
get the same answer from anyone, at any time. So replay is made independent
of arrival order: the events of each job are deduplicated on
``(worker, seq)`` and folded in a canonical order (event time, worker,
sequence), then summarised. Two replays of the same events, duplicated or
shuffled however the log happened to hold them, give byte-identical output.

Replay reads a consumer-group-free copy of the log: it never commits, so it
never disturbs the live aggregator.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import msgspec
from confluent_kafka import Consumer, KafkaError, TopicPartition

from kafka_backup.schemas import events as ev
from kafka_backup.schemas.kafka_admin import client_config
from kafka_backup.schemas.state import JobState, PipelineState, decode_state
from kafka_backup.streams import fold


class LogRecord(msgspec.Struct, array_like=True):
    """One telemetry record as the topic held it (also the format of recorded logs on disk)."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = []  # recorded since signing; older logs have none


def read_topic(bootstrap: str, topic: str, timeout_s: float = 60.0) -> Iterator[LogRecord]:
    """Every record of every partition, from the beginning to the end it had when reading started."""
    consumer = Consumer(client_config(bootstrap, **{
        "group.id": f"kafka-backup-replay-{time.time_ns()}", "enable.auto.commit": False,
        "enable.partition.eof": True, "auto.offset.reset": "earliest"}))
    try:
        md = consumer.list_topics(topic, timeout=15).topics.get(topic)
        if md is None or md.error is not None:
            raise FileNotFoundError(f"telemetry topic {topic} not found on {bootstrap}")
        ends = {}
        for p in md.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in ends] or [])
        deadline = time.monotonic() + timeout_s
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        ends.pop(msg.partition(), None)
                    continue
                partition, offset = msg.partition(), msg.offset()
                if partition is None or offset is None:  # only error events lack them
                    continue
                if offset >= ends.get(partition, -1):
                    ends.pop(partition, None)
                    continue
                ts_type, ts = msg.timestamp()
                yield LogRecord(partition, offset, ts, msg.key(), msg.value(), _headers(msg.headers()))
                if offset + 1 >= ends.get(partition, 0):
                    ends.pop(partition, None)
        if ends:
            raise TimeoutError(f"telemetry topic {topic}: partitions {sorted(ends)} not read to the end")
    finally:
        consumer.close()


def _headers(raw: Mapping[str, str | bytes | None] | Iterable[tuple[str, str | bytes | None]] | None
             ) -> list[tuple[str, bytes]]:
    """A consumed record's headers as recorded: confluent-kafka hands over (str, bytes or None) pairs
    (its type also admits a mapping and text values, which producing accepts)."""
    items = raw.items() if isinstance(raw, Mapping) else raw or []
    return [(k, v.encode() if isinstance(v, str) else v or b"") for k, v in items]


_log_encoder = msgspec.msgpack.Encoder()
_log_decoder = msgspec.msgpack.Decoder(list[LogRecord])


def write_log(records: Iterable[LogRecord]) -> bytes:
    return _log_encoder.encode(list(records))


def read_log(data: bytes) -> list[LogRecord]:
    return _log_decoder.decode(data)


@dataclass
class Replay:
    """Everything a replay learned: the state of each job at ``until``, the events, the skips."""

    until: float
    jobs: dict[str, JobState] = field(default_factory=dict)
    events: dict[str, list[ev.AnyEvent]] = field(default_factory=dict)  # canonical order, deduplicated
    invalid: PipelineState = field(default_factory=lambda: PipelineState(partition=-1))


def replay(records: Iterable[LogRecord], until: float | None = None,
           settings: fold.Settings = fold.DEFAULT_SETTINGS, signing_key: bytes | None = None) -> Replay:
    """Fold every valid event with event time before ``until`` (default: all).

    With ``signing_key``, records not signed with it are refused (``bad_signature``), as live.
    """
    result = Replay(until=until if until is not None else float("inf"))
    unique: dict[str, dict[tuple[str, int], ev.AnyEvent]] = {}
    skipped: set[tuple[str, bytes | None, bytes | None]] = set()  # a duplicate of a bad record is one bad record
    def refuse(err: ev.InvalidEvent, key: bytes | None, value: bytes | None) -> None:
        if (err.reason, key, value) not in skipped:
            skipped.add((err.reason, key, value))
            result.invalid.invalid[err.reason] = result.invalid.invalid.get(err.reason, 0) + 1

    for rec in records:
        # no clock here: the report is a function of the log alone (``until`` bounds event time)
        ts = rec.timestamp_ms / 1000 if rec.timestamp_ms > 0 else None
        for payload, event in fold.admit(rec.key, rec.value, rec.headers, ts, None, settings, signing_key):
            if isinstance(event, ev.InvalidEvent):
                refuse(event, rec.key, rec.value if rec.value is None else payload)
                continue
            key = ev.event_key(event.kind, event.job)
            if event.ts >= result.until:
                continue
            unique.setdefault(key, {}).setdefault((event.worker, event.seq), event)
    for key in sorted(unique):
        ordered = sorted(unique[key].values(), key=lambda e: (e.ts, e.worker, e.seq))
        raw, kept = None, []
        for event in ordered:
            new, refused = fold.apply_bytes(raw, event, settings)
            if refused is not None:
                result.invalid.invalid[refused] = result.invalid.invalid.get(refused, 0) + 1
                continue
            raw = new if new is not None else raw
            kept.append(event)
        if raw is None:
            continue
        result.jobs[key] = decode_state(raw)
        result.events[key] = kept
    return result


def snapshot(result: Replay) -> dict[str, object]:
    """The replayed state in the exporter's snapshot shape, so the same collector renders it."""
    out: dict[str, object] = dict(result.jobs)
    if result.invalid.invalid:
        out["pipeline:replay"] = result.invalid
    return out
