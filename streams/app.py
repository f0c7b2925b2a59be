"""The Faust aggregator: telemetry topic in, one state value per job out.

Kept thin on purpose: Faust moves raw bytes between the telemetry topic and
the ``jobs`` table (whose compacted changelog is the exporter's state topic);
``streams.fold`` decides what each event means.

Choices forced by measurements (see docs/architecture.md): memory store with
no standby replicas (standbys double-counted), agent concurrency 1 (offset
commit bug above 1), static membership (a killed member otherwise holds its
partitions forever on the dev broker), web server off (no ``/table/`` views),
two guards against Faust skipping events, and, with ``aggregator.eager_delivery``,
records delivered without four tasks each (all in ``streams.guards``).
The app is built by a function rather than at import time because its broker,
id and partition count come from the configuration.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import faust
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from faust.exceptions import PartitionsMismatch
from faust.types import TP
from faust.types.auth import CredentialsT

from kafka_backup.schemas import events as ev
from kafka_backup.schemas import logs, signing
from kafka_backup.schemas.collector import collect_rarely
from kafka_backup.schemas.config import Config, ConfigError
from kafka_backup.schemas.kafka_admin import (
    Security,
    client_config,
    ensure_telemetry_topic,
    security_for,
    serve_logs,
)
from kafka_backup.schemas.partition_reader import FirstRecords, first_record
from kafka_backup.schemas.topics import STATE_TABLE, state_topic
from kafka_backup.streams import fold
from kafka_backup.streams.folder import DeadLetter, Folder, SkipCounts
from kafka_backup.streams.guards import (
    ChangelogBarrier,
    ChangelogWriter,
    OffsetGuard,
    check_faust_version,
    deliver_eagerly,
    pace_empty_fetches,
    verify_copartitioned,
)

log = logging.getLogger("kafka_backup.aggregator")


def member_id(cfg: Config) -> str:
    """This worker's static group member id (also the ``instance`` of its log lines)."""
    return cfg.aggregator.instance_id or f"{cfg.aggregator.app_id}@{socket.gethostname()}"


def create_app(cfg: Config) -> faust.App:
    bootstrap = cfg.kafka.bootstrap_servers
    instance = member_id(cfg)
    datadir: dict[str, Any] = {}
    if cfg.aggregator.data_dir:  # beats Faust's own APP_DATADIR (Faust lets the environment win over kwargs)
        datadir = {"datadir": cfg.aggregator.data_dir, "env": {**os.environ, "APP_DATADIR": cfg.aggregator.data_dir}}
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
        broker_client_id=ev.AGGREGATOR_CLIENT_ID,  # workers on telemetry.batch_events auto look for its mark
        stream_wait_empty=False,
        **datadir,
    )
    topic = app.topic(cfg.telemetry.topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw", partitions=cfg.telemetry.partitions)
    # key_type/value_type bytes make Faust pick the raw serializer for the changelog too; a
    # Schema alone is not used when recovering, and recovery then fails to decode.
    table = app.Table(STATE_TABLE, default=None, key_type=bytes, value_type=bytes,
                      partitions=cfg.telemetry.partitions)
    barrier = ChangelogBarrier()
    barrier.guard_changelog(table)
    barrier.guard_flush(app.producer, on_failure=lambda err: restart_in_place(f"{err}"))
    offsets = GroupOffsets(bootstrap, cfg.aggregator.app_id, cfg.telemetry.topic)
    guard = OffsetGuard(cfg.telemetry.topic)
    guard.guard_commits(app.consumer)
    if cfg.aggregator.eager_delivery:
        deliver_eagerly(app.consumer)
    pace_empty_fetches(cfg.aggregator.empty_fetch_pause_ms / 1000)

    dead_letter: DeadLetter | None = None
    if cfg.aggregator.dead_letter_topic:
        dead_letters = app.topic(cfg.aggregator.dead_letter_topic, key_type=bytes, value_type=bytes,
                                 key_serializer="raw", value_serializer="raw")

        async def send_dead_letter(key: bytes | None, value: bytes | None, reason: str) -> None:
            await dead_letters.send(key=key, value=value, headers={"kafka-backup-reason": reason.encode()})

        dead_letter = send_dead_letter
    folder = Folder(table, guard, OffLoop(offsets), fold.Settings.of(cfg.aggregator),
                    cfg.aggregator.flush_interval_ms / 1000, signing.load_key(cfg.telemetry.signing_key_file),
                    dead_letter, restart=restart_in_place, stop=exit_now, may_write=lambda: not app.rebalancing,
                    write_states=ChangelogWriter(app, table, barrier).write)

    # Faust's signal type wants receivers of (sender, *args, signal=...); it calls this one with
    # (app, revoked, signal=...), which **kwargs takes
    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def forget_revoked(app: faust.App, revoked: set[TP], **kwargs: Any) -> None:
        folder.revoked({tp.partition for tp in revoked if tp.topic == cfg.telemetry.topic})

    @app.timer(min(folder.flush_interval_s, SkipCounts.MAX_AGE_S))
    async def flush_quiet_partitions() -> None:
        folder.flush_quiet()

    @app.task
    async def watch_delivery() -> None:  # once, when the worker starts
        delivery_watchdog(app, folder, offsets, cfg.aggregator.delivery_stall_s)

    verified = [False]

    @app.agent(topic, concurrency=1)
    async def aggregate(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            msg = event.message
            if not verified[0]:  # the check Faust's table[key] = value makes, once
                try:
                    verify_copartitioned(table, msg.topic)
                except PartitionsMismatch as err:  # the topics changed under us: folding cannot go on
                    exit_now(f"{' '.join(str(err).split())} (the telemetry topic's partitions changed while "
                             "running; start the aggregator again to check them)")
                    return
                verified[0] = True
            await folder.record(msg.partition, msg.offset, msg.timestamp, event.key, event.value, event.headers)

    return app


class GroupOffsets:
    """The aggregator group's committed offsets and the telemetry topic's earliest offsets, from the broker."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.topic, self._bootstrap, self._group = topic, bootstrap, group
        self._client = Consumer(client_config(bootstrap, **{"group.id": group, "enable.auto.commit": False}))

    def start(self, partition: int) -> int:
        """Where folding a partition starts: its committed offset, else its earliest offset."""
        committed = self._client.committed([TopicPartition(self.topic, partition)], timeout=15)[0].offset
        serve_logs(self._client)
        return committed if committed >= 0 else self.earliest(partition)

    def earliest(self, partition: int) -> int:
        return self._watermarks(partition)[0]

    def end(self, partition: int) -> int:
        return self._watermarks(partition)[1]

    def first_record(self, partition: int, start: int, before: int) -> int | None:
        """The first offset in [start, before) that holds a record; None: transaction markers only."""
        return first_record(self._bootstrap, self._group, self.topic, partition, start, before)

    def _watermarks(self, partition: int) -> tuple[int, int]:
        low, high = self._client.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=15, cached=False)
        serve_logs(self._client)
        return max(0, low), max(0, high)


class OffLoop:
    """``GroupOffsets`` for the agent: its blocking librdkafka calls run in a thread, not on the event loop."""

    def __init__(self, offsets: GroupOffsets) -> None:
        self.offsets = offsets

    async def start(self, partition: int) -> int:
        return await asyncio.get_running_loop().run_in_executor(None, self.offsets.start, partition)

    async def earliest(self, partition: int) -> int:
        return await asyncio.get_running_loop().run_in_executor(None, self.offsets.earliest, partition)

    async def first_record(self, partition: int, start: int, before: int) -> int | None:
        return await asyncio.get_running_loop().run_in_executor(None, self.offsets.first_record, partition, start,
                                                                before)


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
    serve_logs(admin)
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


# Raw librdkafka properties (kafka.properties) the aggregator maps to aiokafka; other security
# settings have no aiokafka equivalent and are refused, and the rest (tuning) apply to librdkafka only.
FAUST_MAPPED = frozenset({
    "security.protocol", "sasl.mechanism", "sasl.mechanisms", "sasl.username", "sasl.password",
    "sasl.kerberos.service.name", "sasl.kerberos.domain.name", "ssl.ca.location", "ssl.certificate.location",
    "ssl.key.location", "ssl.key.password", "ssl.endpoint.identification.algorithm",
})
SECURITY_PREFIXES = ("security.", "sasl.", "ssl.", "ssl_", "enable.ssl")
OIDC_MAPPED = frozenset({  # streams/oidc.py: OAUTHBEARER with the OIDC method
    "sasl.oauthbearer.method", "sasl.oauthbearer.token.endpoint.url", "sasl.oauthbearer.client.id",
    "sasl.oauthbearer.client.secret", "sasl.oauthbearer.scope", "sasl.oauthbearer.extensions",
})


def faust_credentials(sec: Security) -> CredentialsT | None:
    """The same cluster settings, in aiokafka's terms (Faust does not use librdkafka).

    Computed from the librdkafka settings in effect, raw ``kafka.properties`` included, so the
    aggregator authenticates as the workers do; a property it cannot honour stops it with one line.
    """
    import ssl

    conf = sec.librdkafka()
    props = dict(sec.properties)

    def setting(name: str) -> str | None:
        """A librdkafka setting in effect, as text (librdkafka reads every value as text); None if unset or empty."""
        value = conf.get(name)
        return str(value) if value else None

    mechanism = str(conf.get("sasl.mechanism") or conf.get("sasl.mechanisms") or sec.sasl_mechanism).upper()
    oauth = sec.sasl and mechanism == "OAUTHBEARER"
    if oauth and str(conf.get("sasl.oauthbearer.method", "default")).lower() != "oidc":
        raise ConfigError(f"{sec.properties_key}: sasl.mechanism=OAUTHBEARER is supported by the aggregator with "
                          "sasl.oauthbearer.method=oidc only (librdkafka's default method makes unsecured test "
                          "tokens, which aiokafka has no equivalent of); set sasl.oauthbearer.method=oidc and "
                          "sasl.oauthbearer.token.endpoint.url, .client.id, .client.secret")
    for name in sorted(props):
        if name in FAUST_MAPPED or (oauth and name in OIDC_MAPPED):
            continue
        if name.startswith(SECURITY_PREFIXES):
            raise ConfigError(f"{sec.properties_key}: {name} is not supported by the aggregator (Faust speaks "
                              f"Kafka through aiokafka, not librdkafka); remove it from the aggregator's "
                              f"configuration or use a mechanism it supports (PLAIN, SCRAM-SHA-256/512, GSSAPI)")
        log.info("%s: %s applies to librdkafka clients only, not to Faust's aiokafka", sec.properties_key, name)
    context = None
    if sec.tls:
        context = ssl.create_default_context(cafile=setting("ssl.ca.location"))
        certificate = setting("ssl.certificate.location")
        if certificate:
            context.load_cert_chain(certificate, setting("ssl.key.location"), setting("ssl.key.password"))
        if str(conf.get("ssl.endpoint.identification.algorithm", "https")).lower() == "none":
            context.check_hostname = False
    if oauth:
        from kafka_backup.streams.oidc import OidcTokenProvider, parse_extensions

        provider = OidcTokenProvider(str(conf.get("sasl.oauthbearer.token.endpoint.url", "")),
                                     str(conf.get("sasl.oauthbearer.client.id", "")),
                                     str(conf.get("sasl.oauthbearer.client.secret", "")),
                                     str(conf.get("sasl.oauthbearer.scope", "")),
                                     parse_extensions(str(conf.get("sasl.oauthbearer.extensions", ""))))
        return faust.OAuthCredentials(oauth_cb=provider, ssl_context=context)
    if sec.sasl and mechanism == "GSSAPI":
        return faust.GSSAPICredentials(kerberos_service_name=str(conf.get("sasl.kerberos.service.name", "kafka")),
                                       kerberos_domain_name=setting("sasl.kerberos.domain.name"),
                                       ssl_context=context)
    if sec.sasl:
        return faust.SASLCredentials(username=str(conf.get("sasl.username", "")),
                                     password=str(conf.get("sasl.password", "")),
                                     mechanism=mechanism, ssl_context=context)
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def restart_in_place(why: str) -> None:
    """Start this worker again from its committed offsets: same PID, same static member id, no supervisor."""
    log.error("%s; restarting this worker in place", why)
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def recovery_watchdog(app: faust.App, stall_s: float, restart: Callable[[str], None] = restart_in_place,
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
        last: int | None = None  # recovered offsets when last seen moving...
        since = 0.0  # ...at this time
        while True:
            time.sleep(interval_s)
            # faust's TableManagerT leaves out the TableManager's recovery
            recovery = app.tables.recovery if app.tables else None  # type: ignore[attr-defined]
            if recovery is None or not getattr(app, "in_recovery", False):
                last = None
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


class DeliveryStall:
    """Decides, from checks made every second or so, when records have waited ``stall_s`` in this
    worker's telemetry partitions while none was delivered to its agent.

    Faust 0.15.3 can come back from a restart "ready" and then fetch nothing (seen after a restart in
    place): the exporter's lag pages, but the worker would stay stuck. The clock starts when records
    are first seen waiting, and starts again at every delivery, so an idle worker whose first record
    just arrived is not judged by how long it was idle.
    """

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.since: float | None = None  # records seen waiting, none delivered since

    def check(self, now: float, delivered_at: float, positions: dict[int, tuple[int, int]]) -> str | None:
        """``positions``: per assigned partition, (next offset to fold, end offset). The reason to
        restart, or None."""
        waiting = {p: end - at for p, (at, end) in sorted(positions.items()) if end > at}
        if not waiting:
            self.since = None
            return None
        if self.since is None or delivered_at > self.since:
            self.since = now
            return None
        if now - self.since < self.stall_s:
            return None
        p, n = next(iter(waiting.items()))
        return (f"no telemetry record delivered for {now - self.since:.0f} s while telemetry partition {p} has {n} "
                f"waiting (a Faust fetch stall)")

    def pause(self) -> None:
        """Recovering or rebalancing: no judgement now."""
        self.since = None


class EmptyTails:
    """Offsets at a partition's end that hold no record (a transaction's commit or abort marker): the
    offset guard waits at them until a record arrives past them, and they are not records waiting."""

    def __init__(self, offsets: GroupOffsets) -> None:
        self.first = FirstRecords(offsets.first_record)
        self.told: set[int] = set()

    def past(self, partition: int, at: int, end: int) -> int:
        """The first offset in [at, end) that holds a record, else ``end`` (asks the broker once per range)."""
        first = self.first.first(partition, at, end)
        if first == end > at and partition not in self.told:
            log.info("telemetry partition %d: offsets %d..%d hold no record (transaction markers); not a stall",
                     partition, at, end - 1)
            self.told.add(partition)
        return first


def delivery_watchdog(app: faust.App, folder: Folder, offsets: GroupOffsets, stall_s: float,
                      restart: Callable[[str], None] = restart_in_place, interval_s: float = 1.0) -> threading.Thread:
    """Restart this worker in place when records wait in its telemetry partitions and none reaches the
    agent for ``stall_s`` (:class:`DeliveryStall`). Its broker calls run here, in a thread."""
    stall = DeliveryStall(stall_s)
    tails = EmptyTails(offsets)

    def watch() -> None:
        checked = time.monotonic()
        while True:
            time.sleep(interval_s)
            delivered_since, checked = folder.delivered_at > checked, time.monotonic()
            # recovering or rebalancing: no judgement; a record delivered since the last check: the clock
            # starts again at the next check without one, and the broker is not asked (a busy worker never is)
            if delivered_since or getattr(app, "in_recovery", False) or app.rebalancing:
                stall.pause()
                continue
            try:
                mine = sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == offsets.topic)
                positions = {}
                for p in mine:
                    at, end = folder.guard.next.get(p), offsets.end(p)
                    positions[p] = (tails.past(p, offsets.start(p) if at is None else at, end), end)
            except Exception as err:  # a broker that cannot say: no judgement this time
                log.debug("delivery watchdog: %s", err)
                stall.pause()
                continue
            reason = stall.check(time.monotonic(), folder.delivered_at, positions)
            if reason is not None:
                restart(reason)
                return

    thread = threading.Thread(target=watch, name="delivery-watchdog", daemon=True)
    thread.start()
    return thread


def run(cfg: Config, logging_config: dict[str, Any] | None = None) -> None:
    """Run the aggregator in the foreground until SIGINT/SIGTERM (graceful LeaveGroup on exit).

    ``logging_config`` (schemas.logs.dict_config) is the process's: mode's worker clears the root
    logger's handlers when it starts and applies its own dictConfig, so it is handed ours to apply.
    """
    logs.set_context(job=cfg.aggregator.app_id, instance=member_id(cfg))
    check_faust_version()
    faust_credentials(security_for(cfg.kafka.bootstrap_servers))  # refuse what aiokafka cannot do, first
    ensure_telemetry_topic(cfg.kafka.bootstrap_servers, cfg.telemetry)
    settle_partitions(cfg)
    app = create_app(cfg)
    if logging_config is None:
        logging_config = logs.dict_config(logs.LONG_RUNNING_LEVEL, "text")
    worker = faust.Worker(app, loglevel=logging_config["root"]["level"], quiet=True,
                          logging_config=copy.deepcopy(logging_config))  # dictConfig consumes it
    worker.spinner = None  # a terminal spinner's escape codes would garble the shared console of `up`
    recovery_watchdog(app, cfg.aggregator.recovery_stall_s)
    collect_rarely()  # events and Faust's envelopes by the thousand a second (schemas/collector.py)
    worker.execute_from_commandline()
