"""The Faust aggregator: telemetry topic in, one state value per job out.

Kept thin on purpose: Faust moves raw bytes between the telemetry topic and
the ``jobs`` table (whose compacted changelog is the exporter's state topic);
``streams.fold`` decides what each event means.

Choices forced by measurements (see docs/architecture.md): memory store with
no standby replicas (standbys double-counted), agent concurrency 1 (offset
commit bug above 1), static membership (a killed member otherwise holds its
partitions forever on the dev broker), web server off (no ``/table/`` views),
and two guards against Faust skipping events (``streams.guards``).
The app is built by a function rather than at import time because its broker,
id and partition count come from the configuration.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time

import faust
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from faust.exceptions import PartitionsMismatch

from schemas import events as ev
from schemas.config import Config, ConfigError
from schemas.kafka_admin import Security, client_config, ensure_telemetry_topic, security_for
from schemas.state import (
    PipelineState,
    decode_pipeline,
    decode_state,
    encode_state,
    pipeline_key,
)
from schemas.topics import STATE_TABLE, state_topic
from streams import fold
from streams.guards import ChangelogBarrier, OffsetGuard

log = logging.getLogger("kafka_backup.aggregator")


def create_app(cfg: Config) -> faust.App:
    bootstrap = cfg.kafka.bootstrap_servers
    instance = cfg.aggregator.instance_id or f"{cfg.aggregator.app_id}@{socket.gethostname()}"
    app = faust.App(
        cfg.aggregator.app_id,
        broker_credentials=faust_credentials(security_for(bootstrap)),
        broker=",".join(f"kafka://{b}" for b in bootstrap.split(",")),
        store="memory://",
        web_enabled=False,
        consumer_group_instance_id=instance,
        topic_partitions=cfg.telemetry.partitions,
        topic_replication_factor=cfg.telemetry.replication_factor,
        table_standby_replicas=0,
        producer_linger=0.05,
        stream_wait_empty=False,
    )
    settings = fold.Settings(throughput_window_s=cfg.aggregator.throughput_window_s)
    topic = app.topic(cfg.telemetry.topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw", partitions=cfg.telemetry.partitions)
    # key_type/value_type bytes make Faust pick the raw serializer for the changelog too; a
    # Schema alone is not used when recovering, and recovery then fails to decode.
    dead_letters = app.topic(cfg.aggregator.dead_letter_topic, key_type=bytes, value_type=bytes,
                             key_serializer="raw", value_serializer="raw") if cfg.aggregator.dead_letter_topic else None
    table = app.Table(STATE_TABLE, default=None, key_type=bytes, value_type=bytes,
                      partitions=cfg.telemetry.partitions)
    barrier = ChangelogBarrier()
    table.send_changelog = barrier.track(table.send_changelog)
    barrier.guard_flush(app.producer, on_failure=lambda err: restart_in_place(f"{err}"))
    offsets = GroupOffsets(bootstrap, cfg.aggregator.app_id, cfg.telemetry.topic)
    guard = OffsetGuard(cfg.telemetry.topic, offsets.start)
    guard.guard_commits(app.consumer)

    @app.on_partitions_revoked.connect
    async def forget_revoked(app, revoked, **kwargs) -> None:
        guard.forget({tp.partition for tp in revoked if tp.topic == cfg.telemetry.topic})

    async def dead_letter(key: bytes | None, value: bytes | None, reason: str) -> None:
        if dead_letters is not None:
            await dead_letters.send(key=key, value=value, headers={"kafka-backup-reason": reason.encode()})

    def skip(partition: int, reason: str, detail: object, n: int = 1) -> None:
        key = pipeline_key(partition).encode()
        raw = table.get(key)
        state = decode_pipeline(raw) if raw else PipelineState(partition=partition)
        state.invalid[reason] = state.invalid.get(reason, 0) + n
        table[key] = encode_state(state)
        log.warning("skipped telemetry record on partition %d: %s (%s)", partition, reason, detail)

    def handle(key: bytes | None, value: bytes | None, partition: int, record_ts: float | None) -> str | None:
        """Fold one record; return the reason when it had to be skipped."""
        try:
            event = ev.decode(value)
            fold.check(event, record_ts)
            if key is None or key.decode("utf-8", "replace") != ev.event_key(event.kind, event.job):
                raise ev.InvalidEvent("bad_key", repr(key))
        except ev.InvalidEvent as err:
            skip(partition, err.reason, err)
            return err.reason
        table_key = key
        raw = table.get(table_key)
        new = fold.apply(decode_state(raw) if raw else None, event, settings)
        if new is not None:
            table[table_key] = encode_state(new)
        return None

    @app.agent(topic, concurrency=1)
    async def aggregate(stream):
        async for event in stream.events():
            msg = event.message
            verdict = guard.admit(msg.partition, msg.offset)
            if verdict == "duplicate":
                continue
            if verdict == "gap" and guard.next[msg.partition] < (earliest := offsets.earliest(msg.partition)):
                lost = earliest - guard.next[msg.partition]
                skip(msg.partition, "expired", f"{lost} records deleted by retention before they were read", lost)
                guard.folded(msg.partition, earliest - 1)
                verdict = guard.admit(msg.partition, msg.offset)
            if verdict == "gap":
                restart_in_place(f"telemetry partition {msg.partition}: offset {msg.offset} arrived before offset "
                                 f"{guard.next[msg.partition]} was folded (Faust skipped events; they are read again)")
                return
            ts = msg.timestamp if msg.timestamp and msg.timestamp > 0 else None
            try:
                reason = handle(event.key, event.value, msg.partition, ts)
            except PartitionsMismatch as err:  # the topics changed under us: folding cannot go on
                exit_now(f"{' '.join(str(err).split())} (the telemetry topic's partitions changed while "
                         "running; start the aggregator again to check them)")
                return
            except Exception as err:  # never let one record kill the agent (Faust would skip it)
                reason = "internal_error"
                skip(msg.partition, reason, repr(err))
            if reason is not None:
                await dead_letter(event.key, event.value, reason)
            guard.folded(msg.partition, msg.offset)

    return app


class GroupOffsets:
    """The aggregator group's committed offsets and the telemetry topic's earliest offsets, from the broker."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.topic = topic
        self._client = Consumer(client_config(bootstrap, **{"group.id": group, "enable.auto.commit": False}))

    def start(self, partition: int) -> int:
        """Where folding a partition starts: its committed offset, else its earliest offset."""
        committed = self._client.committed([TopicPartition(self.topic, partition)], timeout=15)[0].offset
        return committed if committed >= 0 else self.earliest(partition)

    def earliest(self, partition: int) -> int:
        low, _ = self._client.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=15, cached=False)
        return max(0, low)


def settle_partitions(cfg: Config) -> None:
    """Take the telemetry topic's partition count as it is; refuse to start when it cannot work.

    The table is co-partitioned with the telemetry topic, so its changelog (the state topic) must
    have as many partitions. A telemetry topic that already exists with another count (created
    by hand, or auto-created by the broker with 1 partition) is adopted as it is. A state topic
    made for another count cannot be, and Faust would only fail at the first table write with
    PartitionsMismatch, killing the agent while the process stays up folding nothing: stop here
    instead, with one line saying what to do.
    """
    admin = AdminClient(client_config(cfg.kafka.bootstrap_servers))
    topics = admin.list_topics(timeout=15).topics
    meta = topics.get(cfg.telemetry.topic)
    if meta is None or meta.error is not None or not meta.partitions:
        return
    have = len(meta.partitions)
    changelog = state_topic(cfg.aggregator.app_id)
    state = topics.get(changelog)
    if state is not None and state.error is None and state.partitions and len(state.partitions) != have:
        raise ConfigError(
            f"telemetry.topic: {cfg.telemetry.topic} has {have} partitions but the state topic {changelog} "
            f"has {len(state.partitions)}; they must match: start the aggregator and the exporter with a new --app-id "
            f"(the state is rebuilt from the telemetry log), or recreate {cfg.telemetry.topic} with "
            f"{len(state.partitions)} partitions")
    if have != cfg.telemetry.partitions:
        log.warning("telemetry topic %s has %d partitions, not %d (telemetry.partitions); using %d",
                    cfg.telemetry.topic, have, cfg.telemetry.partitions, have)
        cfg.telemetry.partitions = have


def exit_now(why: str) -> None:
    """Stop the whole process, non-zero: an agent that died would leave it up doing nothing."""
    log.error("%s; exiting", why)
    sys.stderr.write(f"kafka-backup aggregate: failed: {why}\n")
    logging.shutdown()
    os._exit(1)


def faust_credentials(sec: Security):
    """The same cluster settings, in aiokafka's terms (Faust does not use librdkafka)."""
    import ssl

    context = None
    if sec.tls:
        context = ssl.create_default_context(cafile=sec.ssl_ca_location or None)
        if sec.ssl_certificate_location:
            context.load_cert_chain(sec.ssl_certificate_location, sec.ssl_key_location or None)
    if sec.sasl:
        return faust.SASLCredentials(username=sec.sasl_username, password=sec.sasl_password,
                                     mechanism=sec.sasl_mechanism, ssl_context=context)
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def restart_in_place(why: str) -> None:
    """Start this worker again from its committed offsets: same PID, same static member id, no supervisor."""
    log.error("%s; restarting this worker in place", why)
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def recovery_watchdog(app: faust.App, stall_s: float, restart=restart_in_place,
                      interval_s: float = 1.0) -> threading.Thread:
    """Restart this worker in place when table recovery stops making progress.

    Faust 0.15.3 can hang in recovery after a rebalance (it waits for changelog
    events that never come; seen here when a second worker joins). A fresh start
    with the same static member id recovers cleanly, as the kill -9 tests show, so
    after ``stall_s`` without progress the process re-executes itself: same PID,
    same arguments, no supervisor needed. Progress is judged by the recovered
    offsets, so a long but moving recovery is left alone.
    """

    def watch() -> None:
        last, since = None, None
        while True:
            time.sleep(interval_s)
            recovery = app.tables.recovery if app.tables else None
            if recovery is None or not getattr(app, "in_recovery", False):
                last, since = None, None
                continue
            now_offsets = sum(recovery.active_offsets.values()) + sum(recovery.standby_offsets.values())
            if now_offsets != last:
                last, since = now_offsets, time.monotonic()
            elif time.monotonic() - since > stall_s:
                restart(f"table recovery made no progress for {stall_s:.0f} s (a Faust rebalance hang)")
                return

    thread = threading.Thread(target=watch, name="recovery-watchdog", daemon=True)
    thread.start()
    return thread


def run(cfg: Config, loglevel: str = "WARNING") -> None:
    """Run the aggregator in the foreground until SIGINT/SIGTERM (graceful LeaveGroup on exit)."""
    ensure_telemetry_topic(cfg.kafka.bootstrap_servers, cfg.telemetry)
    settle_partitions(cfg)
    app = create_app(cfg)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.spinner = None  # a terminal spinner's escape codes would garble the shared console of `up`
    recovery_watchdog(app, cfg.aggregator.recovery_stall_s)
    worker.execute_from_commandline()
