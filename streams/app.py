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
from kafka_backup.schemas.config import Config, ConfigError
from kafka_backup.schemas.kafka_admin import (
    Security,
    client_config,
    ensure_telemetry_topic,
    security_for,
    serve_logs,
)
from kafka_backup.schemas.state import (
    NewerStateError,
    PipelineState,
    decode_pipeline,
    encode_state,
    pipeline_key,
)
from kafka_backup.schemas.topics import STATE_TABLE, state_topic
from kafka_backup.streams import fold
from kafka_backup.streams.guards import (
    ChangelogBarrier,
    OffsetGuard,
    check_faust_version,
    verify_copartitioned,
    write_outside_event,
)
from kafka_backup.streams.working import WorkingSet

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
        stream_wait_empty=False,
        **datadir,
    )
    settings = fold.Settings.of(cfg.aggregator)
    topic = app.topic(cfg.telemetry.topic, key_type=bytes, value_type=bytes, key_serializer="raw",
                      value_serializer="raw", partitions=cfg.telemetry.partitions)
    # key_type/value_type bytes make Faust pick the raw serializer for the changelog too; a
    # Schema alone is not used when recovering, and recovery then fails to decode.
    dead_letters = app.topic(cfg.aggregator.dead_letter_topic, key_type=bytes, value_type=bytes,
                             key_serializer="raw", value_serializer="raw") if cfg.aggregator.dead_letter_topic else None
    table = app.Table(STATE_TABLE, default=None, key_type=bytes, value_type=bytes,
                      partitions=cfg.telemetry.partitions)
    barrier = ChangelogBarrier()
    barrier.guard_changelog(table)
    barrier.guard_flush(app.producer, on_failure=lambda err: restart_in_place(f"{err}"))
    offsets = GroupOffsets(bootstrap, cfg.aggregator.app_id, cfg.telemetry.topic)
    guard = OffsetGuard(cfg.telemetry.topic, offsets.start)
    guard.guard_commits(app.consumer)
    work = WorkingSet(settings)
    flush_every_s = cfg.aggregator.flush_interval_ms / 1000
    next_flush = [time.monotonic() + flush_every_s]

    # Faust's signal type wants receivers of (sender, *args, signal=...); it calls this one with
    # (app, revoked, signal=...), which **kwargs takes
    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def forget_revoked(app: faust.App, revoked: set[TP], **kwargs: Any) -> None:
        partitions = {tp.partition for tp in revoked if tp.topic == cfg.telemetry.topic}
        guard.forget(partitions)
        work.forget(partitions)  # unflushed, uncommitted: the next owner reads those events again
        for p in partitions:
            skips.take(p)
            failures.take(p)

    async def dead_letter(key: bytes | None, value: bytes | None, reason: str) -> None:
        if dead_letters is not None:
            await dead_letters.send(key=key, value=value, headers={"kafka-backup-reason": reason.encode()})

    skips = SkipCounts()
    failures = SkipCounts()  # records whose fold raised (a bug), by exception type: not a record's fault
    first_of_each = logs.FirstOfEach(log)

    def skip(partition: int, offset: int, reason: str, detail: object, n: int = 1) -> None:
        """Count a skipped record in memory; :func:`flush_partition` writes the counts in one table write."""
        skips.add(partition, reason, n)
        guard.hold(partition, offset)  # no commit past it before its count is in the table
        skips.log(partition, reason, detail)

    def failed(partition: int, offset: int, err: Exception) -> None:
        """Count a record whose fold raised; its traceback is logged the first time this error is seen."""
        failures.add(partition, type(err).__qualname__, 1)
        guard.hold(partition, offset)
        first_of_each.exception(err, "telemetry partition %d offset %d: unexpected failure folding a record",
                                partition, offset)

    def flush_partition(partition: int) -> None:
        """Write the partition's changed job states and skip counts to the table, then let its commit pass.

        The commit still waits for the broker to acknowledge these writes (``ChangelogBarrier``).
        """
        for key, value in work.flush(partition):
            write_outside_event(table, partition, key, value)
        pending, failed_now = skips.take(partition), failures.take(partition)
        if pending or failed_now:
            key = pipeline_key(partition).encode()
            raw = table.get(key)
            state = decode_pipeline(raw) if raw else PipelineState(partition=partition)
            for reason, n in pending.items():
                state.invalid[reason] = state.invalid.get(reason, 0) + n
            for exception, n in failed_now.items():
                state.failures[exception] = state.failures.get(exception, 0) + n
            write_outside_event(table, partition, key, encode_state(state))
        guard.release(partition)

    def flush_all() -> None:
        next_flush[0] = time.monotonic() + flush_every_s
        for partition in {*work.dirty_partitions(), *skips.pending(), *failures.pending()}:
            flush_partition(partition)

    @app.timer(min(flush_every_s, SkipCounts.MAX_AGE_S))
    async def flush_quiet_partitions() -> None:
        """Events followed by silence: no later event would flush them."""
        if time.monotonic() >= next_flush[0]:
            flush_all()
        for partition in {*skips.stale(), *failures.stale()}:
            flush_partition(partition)

    signing_key = signing.load_key(cfg.telemetry.signing_key_file)

    def handle(key: bytes | None, value: bytes | None, partition: int, offset: int,
               record_ts: float | None, headers: signing.Headers | None = None) -> list[tuple[bytes | None, str]]:
        """Fold one record's events (one, or a batch's, each as if it came alone); return the
        ``(event bytes, reason)`` of each one that had to be skipped (the whole record's value when
        the record itself was refused)."""
        try:
            if not signing.verified(signing_key, key, value, headers):
                raise ev.InvalidEvent("bad_signature", "missing or wrong kafka-backup-sig header")
            payloads = ev.unpack(value)
        except ev.InvalidEvent as err:
            skip(partition, offset, err.reason, err)
            return [(value, err.reason)]
        skipped: list[tuple[bytes | None, str]] = []
        for payload in payloads:
            try:
                reason = handle_event(key, payload, partition, offset, record_ts)
            except NewerStateError:
                raise
            except Exception as err:  # a bug, not a bad event: the batch's other events are still folded
                reason = "internal_error"  # the dead letter's header; counted by exception type, not as invalid
                failed(partition, offset, err)
            if reason is not None:
                skipped.append((payload, reason))
        return skipped

    def handle_event(key: bytes | None, payload: bytes, partition: int, offset: int,
                     record_ts: float | None) -> str | None:
        """Fold one event; return the reason when it had to be skipped."""
        try:
            event = ev.decode(payload)
            fold.check(event, record_ts, time.time(), settings)
            if key is None or key.decode("utf-8", "replace") != ev.event_key(event.kind, event.job):
                raise ev.InvalidEvent("bad_key", repr(key))
        except ev.InvalidEvent as err:
            skip(partition, offset, err.reason, err)
            return err.reason
        changed, refused = work.apply(key, partition, event, len(payload), table.get)
        if refused is not None:
            skip(partition, offset, refused, f"{event.kind}:{event.job}")
            return refused
        if changed:
            guard.hold(partition, offset)  # no commit past it before the job's new state is in the table
        return None

    loop_offsets = OffLoop(offsets)
    verified = [False]

    @app.agent(topic, concurrency=1)
    async def aggregate(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            msg = event.message
            if msg.partition not in guard.next:  # where folding starts, asked off the event loop
                guard.next[msg.partition] = await loop_offsets.start(msg.partition)
            if not verified[0]:  # the check Faust's table[key] = value makes, once
                try:
                    verify_copartitioned(table, msg.topic)
                except PartitionsMismatch as err:  # the topics changed under us: folding cannot go on
                    exit_now(f"{' '.join(str(err).split())} (the telemetry topic's partitions changed while "
                             "running; start the aggregator again to check them)")
                    return
                verified[0] = True
            verdict = guard.admit(msg.partition, msg.offset)
            if verdict == "duplicate":
                continue
            if verdict == "gap" and guard.next[msg.partition] < (
                    earliest := await loop_offsets.earliest(msg.partition)):
                lost = earliest - guard.next[msg.partition]
                skip(msg.partition, guard.next[msg.partition], "expired",  # written with the next flush
                     f"{lost} records deleted by retention before they were read", lost)
                guard.folded(msg.partition, earliest - 1)
                verdict = guard.admit(msg.partition, msg.offset)
            if verdict == "gap":
                restart_in_place(f"telemetry partition {msg.partition}: offset {msg.offset} arrived before offset "
                                 f"{guard.next[msg.partition]} was folded (Faust skipped events; they are read again)")
                return
            ts = msg.timestamp if msg.timestamp and msg.timestamp > 0 else None
            try:
                skipped = handle(event.key, event.value, msg.partition, msg.offset, ts, event.headers)
            except NewerStateError as err:  # folding into it would drop what the newer aggregator added
                job = escaped(event.key.decode("utf-8", "replace") if event.key else "")
                exit_now(f"the stored state of {job} has {err}: a newer aggregator wrote it; upgrade this aggregator")
                return
            except Exception as err:  # a bug, not a bad record: never let one record kill the agent
                skipped = [(event.value, "internal_error")]  # counted by exception type, not as invalid
                failed(msg.partition, msg.offset, err)
            for value, reason in skipped:
                await dead_letter(event.key, value, reason)
            guard.folded(msg.partition, msg.offset)
            if time.monotonic() >= next_flush[0]:
                flush_all()
            elif skips.due(msg.partition, after_good=False) or failures.due(msg.partition, after_good=False):
                # a flood of bad records: its counts in batches
                flush_partition(msg.partition)

    return app


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


class GroupOffsets:
    """The aggregator group's committed offsets and the telemetry topic's earliest offsets, from the broker."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.topic = topic
        self._client = Consumer(client_config(bootstrap, **{"group.id": group, "enable.auto.commit": False}))

    def start(self, partition: int) -> int:
        """Where folding a partition starts: its committed offset, else its earliest offset."""
        committed = self._client.committed([TopicPartition(self.topic, partition)], timeout=15)[0].offset
        serve_logs(self._client)
        return committed if committed >= 0 else self.earliest(partition)

    def earliest(self, partition: int) -> int:
        low, _ = self._client.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=15, cached=False)
        serve_logs(self._client)
        return max(0, low)


class OffLoop:
    """``GroupOffsets`` for the agent: its blocking librdkafka calls run in a thread, not on the event loop."""

    def __init__(self, offsets: GroupOffsets) -> None:
        self.offsets = offsets

    async def start(self, partition: int) -> int:
        return await asyncio.get_running_loop().run_in_executor(None, self.offsets.start, partition)

    async def earliest(self, partition: int) -> int:
        return await asyncio.get_running_loop().run_in_executor(None, self.offsets.earliest, partition)


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
    worker.execute_from_commandline()
