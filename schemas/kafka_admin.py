"""Kafka plumbing every stage shares: client settings, reading without waiting out a timeout, and the
telemetry topic's creation.

A cluster is named by its bootstrap list. The command line registers the
security settings (SASL, TLS) of each cluster it talks to once, at start;
every client built with :func:`client_config` for that bootstrap list then
gets them, so no code path can forget them: the raw librdkafka ``kafka.properties``
(OAUTHBEARER, GSSAPI, cloud IAM) over the named keys, and the ``logger`` that sends
librdkafka's own log lines through Python logging (one format for the whole process).
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from kafka_backup.schemas.config import ConfigError, KafkaConfig, TelemetryConfig


class Security(msgspec.Struct, frozen=True):
    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_ca_location: str = ""
    ssl_certificate_location: str = ""
    ssl_key_location: str = ""
    receive_message_max_bytes: int = 0  # not security, but per cluster like it: 0 keeps librdkafka's default
    properties: tuple[tuple[str, Any], ...] = ()  # raw librdkafka settings, applied last
    properties_key: str = "kafka.properties"  # the configuration key they came from, for error messages

    @property
    def effective_protocol(self) -> str:
        """The security protocol in effect (a raw property wins), upper case."""
        return str(dict(self.properties).get("security.protocol", self.protocol)).upper()

    @property
    def sasl(self) -> bool:
        return self.effective_protocol.startswith("SASL")

    @property
    def tls(self) -> bool:
        return self.effective_protocol.endswith("SSL")

    def librdkafka(self) -> dict[str, object]:
        conf: dict[str, object] = {"security.protocol": self.protocol.lower()}
        if self.sasl:
            conf |= {"sasl.mechanism": self.sasl_mechanism, "sasl.username": self.sasl_username,
                     "sasl.password": self.sasl_password}
        for key, value in (("ssl.ca.location", self.ssl_ca_location),
                           ("ssl.certificate.location", self.ssl_certificate_location),
                           ("ssl.key.location", self.ssl_key_location)):
            if value and self.tls:
                conf[key] = value
        if self.receive_message_max_bytes:
            conf["receive.message.max.bytes"] = self.receive_message_max_bytes
        return conf | dict(self.properties)

    @property
    def mechanism(self) -> str:
        """The SASL mechanism in effect (a raw property wins), upper case."""
        return str(dict(self.properties).get("sasl.mechanism", self.sasl_mechanism)).upper()


# librdkafka's own log lines (connection failures, ...) go through this logger, so they get the
# process's log format (text or JSON) instead of librdkafka's own lines on stderr.
LIBRDKAFKA_LOGGER = logging.getLogger("librdkafka")
log = logging.getLogger("kafka_backup.kafka")


_REGISTRY: dict[str, Security] = {}


def source_security(k: KafkaConfig, prefix: str = "kafka") -> Security:
    sec = Security(k.security_protocol or "PLAINTEXT", k.sasl_mechanism or "PLAIN", k.sasl_username,
                   k.sasl_password, k.ssl_ca_location, k.ssl_certificate_location, k.ssl_key_location,
                   k.receive_message_max_bytes, tuple(k.properties.items()))
    _check(sec, prefix, "")
    return sec


def telemetry_security(k: KafkaConfig) -> Security:
    """Unset telemetry keys inherit the source's only when telemetry goes to the source cluster."""
    base = source_security(k) if not k.telemetry_bootstrap_servers else Security()
    sec = Security(
        k.telemetry_security_protocol or base.protocol,
        k.telemetry_sasl_mechanism or base.sasl_mechanism,
        k.telemetry_sasl_username or base.sasl_username,
        k.telemetry_sasl_password or base.sasl_password,
        k.telemetry_ssl_ca_location or base.ssl_ca_location,
        base.ssl_certificate_location, base.ssl_key_location,
        k.receive_message_max_bytes,
        tuple(k.telemetry_properties.items()) or base.properties,
        "kafka.telemetry_properties" if k.telemetry_properties else base.properties_key,
    )
    _check(sec, "kafka", "telemetry_")
    return sec


_QUIET = logging.getLogger("kafka_backup.config_check")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def _check_properties(sec: Security) -> None:
    """librdkafka's own verdict on the raw properties, before any client is made: an unknown name
    or a bad value is one line naming it, not a traceback from the first client."""
    if not sec.properties:
        return
    from confluent_kafka import Producer

    try:  # no bootstrap servers: the client is built (and the settings checked) but connects nowhere
        Producer({**sec.librdkafka(), "logger": _QUIET})
    except KafkaException as err:
        raise ConfigError(f"{sec.properties_key}: {err.args[0].str().removeprefix('Failed to create producer: ')}"
                          ) from None


def _check(sec: Security, section: str, prefix: str) -> None:
    """Username and password for the mechanisms that use them (GSSAPI and OAUTHBEARER, set in
    ``kafka.properties``, bring their own credentials); the raw properties as librdkafka sees them."""
    _check_properties(sec)
    props = dict(sec.properties)
    if sec.mechanism not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        return
    if sec.sasl and not ((sec.sasl_username or props.get("sasl.username"))
                         and (sec.sasl_password or props.get("sasl.password"))):
        raise ConfigError(f"{section}.{prefix}sasl_username: {sec.protocol} needs a username and a password "
                          f"({section}.{prefix}sasl_username, {section}.{prefix}sasl_password)")


def register(bootstrap_servers: str, security: Security) -> None:
    """Remember how to reach this cluster; called once per cluster by the command line."""
    if bootstrap_servers:
        _REGISTRY[bootstrap_servers] = security


def security_for(bootstrap_servers: str) -> Security:
    return _REGISTRY.get(bootstrap_servers, Security())


# librdkafka connects a client to a broker named by metadata (its bootstrap connection is dropped once
# metadata names the brokers) at most once every reconnect.backoff.ms / 2: 50 ms by default. A request
# made a few milliseconds after a client was created, or while other clients of the process connect,
# waited out that interval: an AdminClient's first metadata took 54 ms instead of 2-3 in about half of
# the runs, and a telemetry producer got its producer id 54 ms after it was made instead of 14 (a short
# run waited for it at its end). At 20 ms the interval is librdkafka's floor (11 ms); reconnections
# after a failure still back off exponentially to reconnect.backoff.max.ms (10 s). A raw property wins.
RECONNECT_BACKOFF_MS = 20


def client_config(bootstrap_servers: str, **extra: object) -> dict[str, Any]:
    """Settings of every confluent-kafka client: ours (``RECONNECT_BACKOFF_MS``), the cluster's
    registered settings, its raw properties, then the caller's own (which the code needs: group.id,
    idempotence, ...).

    Values are Any: librdkafka takes objects too (the ``logger``, callbacks), which AdminClient's
    annotation (str, int, float or bool) does not admit although it accepts them."""
    return {"bootstrap.servers": bootstrap_servers, "reconnect.backoff.ms": RECONNECT_BACKOFF_MS,
            **security_for(bootstrap_servers).librdkafka(), "logger": LIBRDKAFKA_LOGGER, **extra}


def arrived(consumer: Any, most: int, timeout: float) -> list[Any]:
    """What a confluent-kafka consumer holds now, up to ``most`` messages, or else the first to arrive
    within ``timeout``. ``Consumer.consume(most, timeout)`` alone returns early only once ``most``
    messages arrived: with fewer, it sits out the whole ``timeout`` while they wait."""
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(most - 1, 0)] if most > 1 else [first]


def connect_producer(producer: Any, topic: str, timeout: float = 10.0) -> bool:
    """Connect an idempotent producer to a broker now, so its producer id is there by its first send;
    whether it answered.

    The idempotent producer sends nothing before it holds a producer id, and asks for one only of a
    broker it is connected to. It connects first to the bootstrap address and drops that connection
    once metadata names the brokers; with sparse connections it then connects to a named broker only
    on its id timer, 0.5-1.0 s after it was made (a record produced at once was acknowledged after
    503 ms). A second metadata request connects a named broker at once, and the id follows within
    milliseconds (14 ms in all with ``RECONNECT_BACKOFF_MS``). A cluster that does not answer is no
    failure here: the producer's own retries take over."""
    for _ in range(2):
        try:
            producer.list_topics(topic, timeout=timeout)
        except KafkaException as err:
            log.debug("producer: no early connection (%s)", err)
            return False
    return True


def serve_logs(client: Any) -> None:
    """Deliver the log lines librdkafka queued for a client nobody polls (an AdminClient, a consumer
    used only for offsets): with ``logger`` set they wait in its queue until a poll serves them."""
    try:
        client.poll(0)
    except Exception:  # a closed client: nothing to serve
        pass


def close_admin(admin: AdminClient | None) -> None:
    """Destroy an AdminClient now, while the interpreter is whole.

    An AdminClient's results arrive on librdkafka's background thread, which takes the GIL to hand
    them over. One still alive when the interpreter finalizes (held by a daemon thread, or by an
    object ``gc.freeze()`` put out of the collector's reach) can be handed an event after the GIL
    is gone: a segfault at exit, after a run that succeeded. Destroyed here, its pending requests
    are dropped and its threads joined first. Closing a closed client again does nothing.
    """
    if admin is None:
        return
    serve_logs(admin)
    try:
        admin.__exit__(None, None, None)
    except RuntimeError:  # already closed
        pass


def ensure_topic(admin: AdminClient, name: str, partitions: int, replication: int = 1,
                 config: dict[str, str] | None = None, timeout: float = 15.0) -> bool:
    """Create ``name`` unless it exists; True when this call created it."""
    try:
        return _ensure_topic(admin, name, partitions, replication, config, timeout)
    finally:
        serve_logs(admin)


def _ensure_topic(admin: AdminClient, name: str, partitions: int, replication: int,
                  config: dict[str, str] | None, timeout: float) -> bool:
    if name in admin.list_topics(timeout=timeout).topics:
        return False
    futures = admin.create_topics([NewTopic(name, partitions, replication, config=config or {})],
                                  operation_timeout=timeout)
    try:
        futures[name].result(timeout)
    except KafkaException as err:
        if err.args[0].name() != "TOPIC_ALREADY_EXISTS":
            raise
        return False
    return True


def ensure_telemetry_topic(bootstrap_servers: str, tcfg: TelemetryConfig) -> bool:
    admin = AdminClient(client_config(bootstrap_servers))
    return ensure_topic(admin, tcfg.topic, tcfg.partitions, tcfg.replication_factor,
                        {"retention.ms": str(tcfg.retention_ms), "cleanup.policy": "delete"})
