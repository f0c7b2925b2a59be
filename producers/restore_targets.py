"""The restore's target side: topics checked, created and read back, and records adopted on resume.

Source partition p goes to target partition p. A target with fewer partitions
is refused; a missing one is created with the source's recorded configuration.
A target whose age limits would delete or reject records in scope is refused
(or, with ``allow_retention_loss``, reported). On resume, records the target
acknowledged after the last checkpoint are read back, checked against the
backup and adopted (see ``producers/restore.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from itertools import islice

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from kafka_backup.producers import layout, segments, topic_configs
from kafka_backup.producers.restore_scope import RestoreFailed
from kafka_backup.producers.run import Reporter
from kafka_backup.producers.watermarks import high_watermarks
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.config import ConfigError, RestoreConfig
from kafka_backup.schemas.kafka_admin import client_config, close_admin
from kafka_backup.schemas.partition_reader import PartitionReader, ReadTimedOut
from kafka_backup.schemas.signing import ProducedHeaders

log = logging.getLogger("kafka_backup.restore")

Headers = Callable[[segments.StoredRecord], ProducedHeaders]

READ_TIMEOUT_S = 30  # reading back what the target holds after the last checkpoint


class TargetLimits:
    """One target topic's age limits and, once scoped, how many records in scope they would hit."""

    def __init__(self, target: str, created: bool, deletes: tuple[int, str] | None,
                 refuses: tuple[int, str] | None) -> None:
        self.target = target
        self.created = created  # created by this restore, with the source's recorded configuration
        self.deletes = deletes  # (cutoff ms, setting): retention deletes records older than the cutoff
        self.refuses = refuses  # (cutoff ms, setting): the broker rejects records older than the cutoff
        self.deleted = 0
        self.refused = 0
        self.oldest: int | None = None



class Targets:
    """The target cluster as a restore sees it: its topics, their limits, their ends."""

    def __init__(self, bootstrap: str, cfg: RestoreConfig, emitter: Reporter) -> None:
        self.bootstrap = bootstrap
        self.cfg = cfg
        self.emitter = emitter
        self.reader = PartitionReader(bootstrap, f"kafka-backup-restore.{cfg.restore_id}")
        self.admin: AdminClient | None = None  # made when first needed (_admin)

    def _error(self, error_type: str, message: str) -> None:
        self.emitter.emit(ev.ErrorRaised, error_type=error_type, transient=False, operation="produce",
                          backend="", message=message[:500])

    def check(self, mapping: dict[str, str], counts: dict[str, int]) -> dict[str, int]:
        """Refuse a target with fewer partitions (source partition p goes to target partition p).

        Returns the missing targets with the partition count to create them with.
        """
        md = self._admin().list_topics(timeout=15)
        missing: dict[str, int] = {}
        for source, target in mapping.items():
            topic = md.topics.get(target)
            if topic is None or topic.error is not None:
                if not self.cfg.create_topics:
                    self._error("offset_invalid", f"target topic {target} does not exist")
                    raise ConfigError(f"restore.create_topics: target topic {target!r} does not exist and "
                                      "creating topics is off; create it or set restore.create_topics: true")
                missing[target] = counts[source]
                continue
            have, need = len(topic.partitions), counts[source]
            if have < need:
                self._error("offset_invalid", f"target topic {target} has {have} partitions, source {source} "
                                              f"has {need}")
                raise ConfigError(
                    f"restore.topic_map: target topic {target!r} has {have} partitions, fewer than the {need} "
                    f"of {source!r} in the backup; map it to a new topic (--topic-map {source}:NEW_NAME) or "
                    f"add partitions to {target!r}")
        return missing

    def limits(self, mapping: dict[str, str], missing: dict[str, int],
                       manifest: layout.Manifest, create: bool = True) -> dict[str, TargetLimits]:
        """Per source topic: its target, and below which record timestamp the target deletes or refuses.

        An existing target's configuration is read from the cluster; a missing one will be created
        with the source's recorded configuration, which is what counts. A backup too old to have
        recorded it (layout 1) gets its missing targets created now, with the broker's defaults,
        and those are read back and checked like any existing topic.
        """
        now_ms = int(time.time() * 1000)
        unknown = {t: missing.pop(t) for s, t in mapping.items() if t in missing and s not in manifest.topic_configs}
        if create:
            self.create(unknown, mapping, manifest)
        else:  # a dry run: the broker's defaults are unknown until the topic exists
            missing.update(unknown)
        existing = [t for t in mapping.values() if t not in missing]
        try:
            described = topic_configs.describe(self._admin(), existing)
        except KafkaException as err:
            message = f"cannot read the configuration of target topics {', '.join(existing)}: {err.args[0].str()}"
            self._error("retention", message)
            if not self.cfg.allow_retention_loss:
                raise ConfigError(f"restore.allow_retention_loss: {message}, so records the targets would delete "
                                  "cannot be counted; grant DescribeConfigs on them or pass "
                                  "--allow-retention-loss") from None
            log.warning("%s; going on without the retention check (--allow-retention-loss)", message)
            described = {t: layout.TopicSnapshot(0) for t in existing}
        limits = {}
        for source, target in mapping.items():
            snap = described.get(target) or manifest.topic_configs.get(source) or layout.TopicSnapshot(0)
            limits[source] = TargetLimits(target, target in missing,
                                          topic_configs.deletes_before(snap.configs, now_ms),
                                          topic_configs.refuses_before(snap.configs, now_ms))
        return limits

    def check_limits(self, cp: layout.RestoreCheckpoint, limits: dict[str, TargetLimits]) -> None:
        """Refuse, in one line, a restore whose target would delete (or reject) records in scope."""
        for source, lim in limits.items():
            scope = sum(c.records for c in cp.partitions if c.topic == source)
            how = "will be created with" if lim.created else "has"
            when = (f"the oldest is {topic_configs.iso(lim.oldest)}" if lim.oldest is not None else "")
            if lim.refused:
                assert lim.refuses is not None
                message = (f"target topic {lim.target!r} {how} {lim.refuses[1]}: {lim.refused} of {scope} records "
                           f"in scope are older ({when}) and the broker would reject them")
                self._error("retention", message)
                raise ConfigError(f"restore.topic_map: {message}; raise that setting on the target (create it "
                                  "yourself first) or map it to a topic without the limit")
            if lim.deleted:
                assert lim.deletes is not None
                message = (f"target topic {lim.target!r} {how} {lim.deletes[1]}: {lim.deleted} of {scope} records "
                           f"in scope are older ({when}) and the broker would delete them soon after the restore")
                self._error("retention", message)
                if not self.cfg.allow_retention_loss:
                    raise ConfigError(f"restore.allow_retention_loss: {message}; raise the target's retention.ms "
                                      "(-1 keeps records forever; create the topic yourself first if it does not "
                                      "exist) or pass --allow-retention-loss to accept the loss")
                log.warning("%s; going on: --allow-retention-loss", message)

    def create(self, missing: dict[str, int], mapping: dict[str, str] | None = None,
                       manifest: layout.Manifest | None = None) -> None:
        """Missing targets get the source's partition count and recorded configuration (retention, cleanup
        policy, compaction, message size, timestamp type ...), and the broker's default replication.
        A backup too old to have recorded the configuration gives the broker's defaults."""
        if not missing:
            return
        source_of = {t: s for s, t in (mapping or {}).items()}
        recorded = manifest.topic_configs if manifest is not None else {}

        def new_topic(target: str, partitions: int) -> NewTopic:
            snap = recorded.get(source_of.get(target, ""))
            return NewTopic(target, partitions, config=dict(snap.configs) if snap else {})

        admin = self._admin()
        futures = admin.create_topics([new_topic(t, n) for t, n in missing.items()], operation_timeout=15)
        for name, fut in futures.items():
            try:
                fut.result(15)
                log.info("created target topic %s", name)
            except KafkaException as err:
                if err.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # metadata of new topics can lag their creation
            md = admin.list_topics(timeout=5).topics
            if all(name in md and md[name].error is None and md[name].partitions for name in missing):
                return
            time.sleep(0.2)

    def high_watermarks(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The target partitions' ends, in one request a broker (a round trip a partition before: 128
        partitions, 128 round trips in a row at a restore's start and again at a resume). A just-created
        topic may not be served yet: asked again, up to five times."""
        last: Exception | None = None
        for attempt in range(5):
            try:
                return high_watermarks(self._admin(), partitions)
            except KafkaException as err:
                last = err
                time.sleep(0.2 * (attempt + 1))
        assert last is not None
        raise last

    def _admin(self) -> AdminClient:
        """One admin client for the run's every question to the target cluster (each new client is new
        connections, and a TLS and SASL handshake on a secured cluster); closed by :meth:`close`."""
        if self.admin is None:
            self.admin = AdminClient(client_config(self.bootstrap))
        return self.admin

    def reconcile(self, cur: layout.RestoreCursor, records: Iterator[segments.StoredRecord],
                  headers: Headers, hwm: int) -> list[segments.StoredRecord]:
        """Adopt the records acknowledged after the last checkpoint: the target's surplus beyond
        ``target_next`` up to its end ``hwm`` must be the next of ``records`` (the cursor's, from its next
        offset), else the restore stops. Advances the cursor; returns the adopted records."""
        if hwm == cur.target_next:
            return []
        where = f"{cur.target_topic}/{cur.partition}"
        if hwm < cur.target_next:
            self._error("offset_invalid", f"target {where} ends at {hwm}, before {cur.target_next}")
            raise RestoreFailed(f"target partition {where} ends at offset {hwm}, before the {cur.target_next} "
                                "this restore had written: it was truncated or recreated; restore with a new "
                                "--restore-id into a new topic")
        extra = hwm - cur.target_next
        expected = list(islice(records, extra))
        actual = self._read(cur.target_topic, cur.partition, cur.target_next, extra)
        if len(expected) != extra or [(r.key, r.value, headers(r)) for r in expected] != actual:
            self._error("offset_invalid", f"target {where} has {extra} records after {cur.target_next} "
                                          "that this restore did not write")
            raise RestoreFailed(f"target partition {where} has {extra} records after offset {cur.target_next} "
                                "that this restore did not write; stop other producers to it, or restore "
                                "into a new topic with a new --restore-id")
        log.warning("restore %s: adopting %d records in %s acknowledged after the last checkpoint",
                    self.cfg.restore_id, extra, where)
        cur.next_offset = expected[-1].offset + 1
        cur.restored += extra
        cur.target_next = hwm
        return expected

    def _read(self, topic: str, partition: int, start: int, n: int) -> list[tuple]:
        """(key, value, headers) of the ``n`` records from ``start``, or of all there are if fewer."""
        out: list[tuple] = []
        try:
            with closing(self.reader.read(topic, partition, start, READ_TIMEOUT_S, batch=min(n, 1000))) as records:
                for msg in records:
                    out.append((msg.key(), msg.value(), list(msg.headers() or [])))
                    if len(out) == n:
                        break
        except ReadTimedOut as err:
            self.emitter.emit(ev.ErrorRaised, error_type="consumer_timeout", transient=True, operation="fetch",
                              backend="", message=str(err)[:500])
            raise RestoreFailed(f"could not read back what the target holds after the last checkpoint: {err}; "
                                "run the restore again") from None
        return out

    def close(self) -> None:
        self.reader.close()
        close_admin(self.admin)
        self.admin = None
