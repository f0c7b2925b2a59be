"""Reset a consumer group's committed offsets on given topics: to a timestamp, the earliest or the latest.

The usual step after a restore: point the applications' group at where they
should start reading the restored topics. Telemetry is a ``JobStarted`` and a
``JobEnded`` (kind ``offset_reset``, job = the group), which give
``kafka_offset_reset_duration_seconds{consumer_group,status}``.

Active members. Offsets of a group whose consumers are running would be
overwritten by their next commit, so a group with members is refused unless
``--force``. Membership comes from ``AdminClient.describe_consumer_groups``
(DescribeGroups; Apache Kafka and the noida-db dev broker both answer it).
Where a broker does not support it, the check falls back to the broker itself:
Apache Kafka, and noida-db 0.2.3 likewise (tested), reject an offset change
from outside a group that has members (AlterConsumerGroupOffsets and a plain
OffsetCommit both fail with UNKNOWN_MEMBER_ID), and that refusal is reported
as the same one-line error. So ``--force`` skips this tool's check only (for a
membership answer known to be stale, or a broker that allows the change); on
those brokers the group's consumers must still be stopped first.

Preview first. Without ``--execute`` nothing is changed: the offsets a reset would
set are printed (``topic, partition, committed -> target``) and no telemetry is
sent, as ``kafka-consumer-groups --reset-offsets`` does without ``--execute``.

Target offsets. ``--to-timestamp`` (epoch milliseconds or ISO 8601, as ``replay``
takes) uses ``offsets_for_times``: the first
offset whose record timestamp is at or after the time; a partition with no
such record goes to its end (the high watermark), as
``kafka-consumer-groups --reset-offsets --to-datetime`` does.
"""

from __future__ import annotations

import logging
from typing import TextIO

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from kafka_backup.producers.run import Job, JobFailed, NullEmitter, Outcome, Reporter, run_reporting
from kafka_backup.producers.telemetry import Emitter
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.config import ConfigError, OffsetResetConfig, TelemetryConfig
from kafka_backup.schemas.kafka_admin import client_config, close_admin, serve_logs
from kafka_backup.schemas.times import parse_time

log = logging.getLogger("kafka_backup.offset_reset")

UNSUPPORTED = frozenset({KafkaError._UNSUPPORTED_FEATURE, KafkaError.UNSUPPORTED_VERSION, KafkaError._NOT_IMPLEMENTED})
NOT_EMPTY = frozenset({KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION,
                       KafkaError.REBALANCE_IN_PROGRESS, KafkaError.NON_EMPTY_GROUP})


class OffsetResetFailed(JobFailed):
    """The cluster failed the reset (not a user mistake): one line, exit status 1."""


def target_of(cfg: OffsetResetConfig) -> str:
    """Which of the three targets was asked for; exactly one must be. An empty ``to_timestamp`` is no
    time (as an empty environment variable is no value): ``to_timestamp`` is the target only with a time."""
    given = [name for name, on in (("to_timestamp", timestamp_ms(cfg) is not None),
                                   ("to_earliest", cfg.to_earliest), ("to_latest", cfg.to_latest)) if on]
    if len(given) != 1:
        what = "none" if not given else " and ".join("--" + g.replace("_", "-") for g in given)
        raise ConfigError(f"offset_reset.to_timestamp|to_earliest|to_latest: give exactly one of --to-timestamp TIME, "
                          f"--to-earliest or --to-latest (got {what})")
    return given[0]


def validate(cfg: OffsetResetConfig) -> str:
    if not cfg.topics:
        raise ConfigError("offset_reset.topics: no topics given; use --topics t1,t2")
    target = target_of(cfg)
    to_ms = timestamp_ms(cfg)
    if to_ms is not None and to_ms < 0:
        raise ConfigError(f"offset_reset.to_timestamp: {cfg.to_timestamp} is before 1970; give epoch milliseconds "
                          "or an ISO 8601 time (--to-timestamp 2026-01-31T00:00:00Z)")
    return target


def timestamp_ms(cfg: OffsetResetConfig) -> int | None:
    """``--to-timestamp`` in epoch milliseconds (it takes those or ISO 8601)."""
    seconds = parse_time("offset_reset.to_timestamp", cfg.to_timestamp)
    return None if seconds is None else round(seconds * 1000)


class OffsetReset(Job):
    failed = OffsetResetFailed

    def __init__(self, bootstrap: str, cfg: OffsetResetConfig, emitter: Reporter, out: TextIO | None = None) -> None:
        self.bootstrap = bootstrap
        self.cfg = cfg
        self.group = cfg.group
        self.target = validate(cfg)
        self.to_ms = timestamp_ms(cfg)
        self.emitter = emitter
        self.out = out
        self.admin = AdminClient(client_config(bootstrap))

    def preview(self) -> int:
        """What ``run`` would set, changing nothing (the same checks, so a refusal shows here too)."""
        try:
            counts = self._partitions()
            if not self.cfg.force:
                self._refuse_if_active()
            offsets = self._targets(counts)
            self._report(offsets, self._committed(offsets))
        except KafkaException as err:
            raise OffsetResetFailed(f"kafka: {err.args[0].str()}") from None
        finally:
            close_admin(self.admin)  # a preview is all this object does
        return 0

    def begin(self) -> None:
        self.emitter.emit(ev.JobStarted, mode=self.target.replace("_", "-"), topics=list(self.cfg.topics))

    def work(self) -> None:
        counts = self._partitions()
        if not self.cfg.force:
            self._refuse_if_active()
        offsets = self._targets(counts)
        self._write(offsets)

    def before_end(self, outcome: Outcome) -> None:
        serve_logs(self.admin)

    def after_end(self, outcome: Outcome) -> None:
        close_admin(self.admin)

    def _partitions(self) -> dict[str, int]:
        md = self.admin.list_topics(timeout=15)
        counts = {}
        for topic in self.cfg.topics:
            t = md.topics.get(topic)
            if t is None or t.error is not None:
                raise ConfigError(f"offset_reset.topics: topic {topic!r} does not exist on {self.bootstrap}")
            counts[topic] = len(t.partitions)
        return counts

    def _refuse_if_active(self) -> None:
        try:
            desc = self.admin.describe_consumer_groups([self.group])[self.group].result(15)
        except KafkaException as err:
            if err.args[0].code() in UNSUPPORTED:
                log.info("describe_consumer_groups unsupported (%s): the broker's own check applies",
                         err.args[0].str())
                return
            raise
        if desc.members:
            raise ConfigError(
                f"offset_reset.group: group {self.group!r} has {len(desc.members)} active member(s) "
                f"(state {desc.state.name.lower()}); stop its consumers first, or pass --force")

    def _targets(self, counts: dict[str, int]) -> list[TopicPartition]:
        consumer = Consumer(client_config(self.bootstrap, **{"group.id": self.group, "enable.auto.commit": False}))
        try:
            tps = [TopicPartition(t, p) for t, n in counts.items() for p in range(n)]
            ends = {(tp.topic, tp.partition): consumer.get_watermark_offsets(tp, timeout=10) for tp in tps}
            if self.target == "to_earliest":
                return [TopicPartition(tp.topic, tp.partition, ends[(tp.topic, tp.partition)][0]) for tp in tps]
            if self.target == "to_latest":
                return [TopicPartition(tp.topic, tp.partition, ends[(tp.topic, tp.partition)][1]) for tp in tps]
            assert self.to_ms is not None, "target_of: to_timestamp is the target only with a time"
            found = consumer.offsets_for_times(
                [TopicPartition(tp.topic, tp.partition, self.to_ms) for tp in tps], timeout=15)
            out = []
            for tp in found:
                if tp.error is not None:
                    raise KafkaException(tp.error)
                offset = tp.offset if tp.offset >= 0 else ends[(tp.topic, tp.partition)][1]
                out.append(TopicPartition(tp.topic, tp.partition, offset))
            return out
        finally:
            consumer.close()

    def _write(self, offsets: list[TopicPartition]) -> None:
        before = self._committed(offsets)
        write_offsets(self.admin, self.bootstrap, self.group, offsets, "offset_reset.group")
        self._report(offsets, before)

    def _report(self, offsets: list[TopicPartition], before: dict[tuple[str, int], int]) -> None:
        """One line per partition: ``topic<TAB>partition<TAB>committed -> target``."""
        for tp in offsets:
            old = before.get((tp.topic, tp.partition))
            line = f"{tp.topic}\t{tp.partition}\t{'-' if old is None or old < 0 else old} -> {tp.offset}"
            log.info("offset reset %s%s: %s", self.group, "" if self.cfg.execute else " (preview)", line)
            if self.out is not None:
                print(line, file=self.out)


    def _committed(self, offsets: list[TopicPartition]) -> dict[tuple[str, int], int]:
        consumer = Consumer(client_config(self.bootstrap, **{"group.id": self.group, "enable.auto.commit": False}))
        try:
            got = consumer.committed([TopicPartition(tp.topic, tp.partition) for tp in offsets], timeout=10)
            return {(tp.topic, tp.partition): tp.offset for tp in got}
        except KafkaException:
            return {}
        finally:
            consumer.close()


def run_offset_reset(bootstrap: str, telemetry_bootstrap: str, cfg: OffsetResetConfig, tcfg: TelemetryConfig,
                     out: TextIO | None = None, err: TextIO | None = None) -> int:
    validate(cfg)  # user mistakes fail before anything is emitted
    if not cfg.execute:  # a preview changes nothing, so it is no job: no telemetry
        code = OffsetReset(bootstrap, cfg, NullEmitter(), out).preview()
        if err is not None:
            print("offset-reset: preview only, no offset was changed; add --execute to set them", file=err)
        return code
    emitter = Emitter(telemetry_bootstrap or bootstrap, tcfg, "offset_reset", cfg.group)
    return run_reporting(OffsetReset(bootstrap, cfg, emitter, out), emitter, signals=False)


def write_offsets(admin: AdminClient, bootstrap: str, group: str, offsets: list[TopicPartition], field: str) -> None:
    """Set a group's committed offsets: AlterConsumerGroupOffsets, or on brokers without it a commit
    from a consumer that never joins. The broker refusing because the group has members is the
    one-line error naming ``field`` (the setting that named the group)."""
    refused = ConfigError(f"{field}: the broker refused to change the offsets of group {group!r} because it "
                          f"has active members; stop its consumers first")
    try:
        result = admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, offsets)])[group].result(15)
        failed = [tp for tp in result.topic_partitions if tp.error is not None]
        if failed:
            raise KafkaException(failed[0].error)
        return
    except KafkaException as err:
        code = err.args[0].code()
        if code in NOT_EMPTY:
            raise refused from None
        if code not in UNSUPPORTED:
            raise
    consumer = Consumer(client_config(bootstrap, **{"group.id": group, "enable.auto.commit": False}))
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    except KafkaException as err:
        if err.args[0].code() in NOT_EMPTY:
            raise refused from None
        raise
    finally:
        consumer.close()
