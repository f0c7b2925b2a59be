"""Configuration: one YAML file (the PRD's ``metrics:`` section plus ours), every key also a flag
and an environment variable.

Precedence: built-in defaults < YAML file < environment (``KAFKA_BACKUP_<SECTION>_<KEY>``) <
command-line flags. Flags, environment variables and docs/configuration.md are all generated
from the one key list below (:func:`all_keys`). Unknown keys and bad values are rejected with
one line that names the field (``backup.compression``) and where its value came from.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec

from kafka_backup.schemas import topics

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Compression = Literal["zstd", "lz4", "snappy", "gzip", "none"]
# A password-like key. Each one also takes its value from a file (the key ``<key>_file``,
# declared next to it) or from the environment (:func:`env_for`), so that no secret has to be
# written on a command line, where every user of the machine can read it in ``ps``.
Secret = Annotated[str, msgspec.Meta(extra={"secret": True})]
PropertyValue = str | int | float | bool

HEALTH_PATH = "/health"  # the exporter's readiness endpoint, open without authentication


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class MetricsConfig(_Section):
    enabled: bool = True
    bind: str = "127.0.0.1"
    port: Port = 8080
    path: str = "/metrics"
    update_interval_ms: Positive = 500  # an unchanged state is re-rendered at most this often (a changed one: 100 ms)
    worker_stop_after_s: Positive = 60  # a running job silent this long is STOP
    expire_after_s: Positive = 7 * 24 * 3600  # series of jobs ended or silent this long are dropped
    max_series_per_family: Positive = 10_000
    tls_cert_file: str = ""  # PEM; with tls_key_file, the endpoint speaks HTTPS
    tls_key_file: str = ""
    basic_auth_username: str = ""  # with basic_auth_password_bcrypt, /metrics asks for credentials
    basic_auth_password_bcrypt: Secret = ""  # bcrypt hash: htpasswd -nbBC 10 "" "$PASSWORD" | cut -d: -f2
    basic_auth_password_bcrypt_file: str = ""
    basic_auth_password_sha256: Secret = ""  # deprecated (unsalted, fast to guess): use the bcrypt key
    basic_auth_password_sha256_file: str = ""
    header_timeout_s: Positive = 10  # a client must finish its TLS handshake and request headers within this
    max_connections: Positive = 1000  # open connections; when full, the oldest still sending headers is closed
    # exporter-toolkit's --web.config.file format (tls_server_config, basic_auth_users), re-read when it changes
    web_config_file: str = ""
    ready_max_state_age_s: Positive = 60  # /-/ready answers 503 when the state was not proven current this long


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL", ""]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", ""]


class KafkaConfig(_Section):
    """Source cluster for workers, telemetry cluster for aggregate/exporter.

    The ``telemetry_*`` keys are the workers' telemetry cluster; each one left
    empty takes the source cluster's value when the telemetry goes to the source
    cluster, and the default otherwise.
    """

    bootstrap_servers: str = ""
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism = "PLAIN"
    sasl_username: str = ""
    sasl_password: Secret = ""
    sasl_password_file: str = ""
    ssl_ca_location: str = ""
    ssl_certificate_location: str = ""
    ssl_key_location: str = ""
    telemetry_bootstrap_servers: str = ""  # workers only: defaults to bootstrap_servers
    telemetry_security_protocol: SecurityProtocol = ""
    telemetry_sasl_mechanism: SaslMechanism = ""
    telemetry_sasl_username: str = ""
    telemetry_sasl_password: Secret = ""
    telemetry_sasl_password_file: str = ""
    telemetry_ssl_ca_location: str = ""
    # librdkafka refuses a fetch reply above this (0: its default, 100 MB). Real Kafka keeps replies
    # small; the embedded dev broker sends all it holds, so `up` raises it (docs/architecture.md).
    receive_message_max_bytes: Annotated[int, msgspec.Meta(ge=0, le=2_147_483_647)] = 0
    # Raw librdkafka settings (OAUTHBEARER, GSSAPI, cloud IAM, tuning) for every client of the source
    # cluster, over the keys above; the aggregator maps them to aiokafka or refuses them (streams/app.py).
    properties: dict[str, PropertyValue] = {}
    properties_file: str = ""  # a Java-style client.properties (KEY=VALUE lines), under `properties`
    telemetry_properties: dict[str, PropertyValue] = {}  # empty: the source's, when telemetry goes there
    telemetry_properties_file: str = ""


class TelemetryConfig(_Section):
    topic: str = topics.TELEMETRY_TOPIC
    partitions: Positive = topics.TELEMETRY_PARTITIONS
    replication_factor: Positive = 1
    retention_ms: Annotated[int, msgspec.Meta(ge=-1)] = topics.TELEMETRY_RETENTION_MS
    buffer_max_events: Positive = 100_000
    delivery_timeout_ms: Annotated[int, msgspec.Meta(ge=0)] = 300_000
    spool_dir: str = ""  # when set, events the queue cannot hold go to disk here instead of being dropped
    spool_max_bytes: Positive = 1024 * 1024 * 1024
    signing_key_file: str = ""  # shared by workers and aggregator: records are HMAC-signed, unsigned ones refused
    # workers: send the events of one poll cycle as one batch record. auto: only while every member of
    # the aggregator group (aggregator.app_id) reads them, asked every minute (an older aggregator
    # refuses batch records as unknown_type); docs/architecture.md, "Batch records"
    batch_events: bool | Literal["auto"] = "auto"


class BackupConfig(_Section):
    backup_id: str = ""
    topics: list[str] = []
    storage: str = ""  # file:///dir or s3://bucket/prefix
    s3_endpoint_url: str = ""
    # storage calls made at once (segments of different partitions sealed, checkpoints read and
    # confirmed); 0: the backend's own, 8 on a filesystem (its journal is the limit), 32 on S3 (each
    # request's round trip is)
    storage_concurrency: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0
    compression: Compression = "zstd"
    continuous: bool = False
    instance_id: str = ""  # static group member id; defaults to backup_id@hostname
    poll_interval_ms: Positive = 500
    flush_interval_ms: Positive = 5000
    segment_max_records: Positive = 50_000
    segment_max_bytes: Positive = 16 * 1024 * 1024
    # key + value bytes buffered across all partitions and not yet cut into segments: beyond it the largest
    # buffers are cut early. Without it a catch-up of many partitions (each fetch a slice of every one)
    # buffered up to flush_interval_ms of the whole fetch rate, or segment_max_records x the partitions
    buffer_max_bytes: Positive = 256 * 1024 * 1024
    expected_interval_s: Positive = 26 * 3600  # one-shot: alert when no run succeeded for this long (daily + 2 h)
    recovery_point_objective_s: Positive = 48 * 3600  # alert when the newest stored record is older, while lagging
    # consumer groups whose committed offsets on the backed-up topics are recorded ({backup_id}/groups.json):
    # "*" every group the cluster lists, or names; [] (--backup-consumer-groups "") records none
    consumer_groups: list[str] = msgspec.field(default_factory=lambda: ["*"])
    consumer_groups_interval_s: Positive = 60  # continuous: how often they are read again (and at the end)


class RestoreConfig(_Section):
    restore_id: str = ""
    backup_id: str = ""
    storage: str = ""  # file:///dir or s3://bucket/prefix, as given to the backup
    s3_endpoint_url: str = ""
    # storage calls made at once (checkpoints read, segments fetched ahead, up to 64 MB); 0: the backend's own
    storage_concurrency: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0
    topic_map: list[str] = []  # "source:target" pairs; unmapped topics keep their name
    from_time: int | None = None  # epoch ms, inclusive
    to_time: int | None = None  # epoch ms, exclusive
    rate_limit: Annotated[int, msgspec.Meta(ge=0)] = 0  # records per second; 0 = unlimited
    create_topics: bool = True  # missing targets are created with the source's recorded configuration
    allow_retention_loss: bool = False  # restore even if the targets' retention would delete records in scope
    batch_records: Positive = 1000
    instance_id: str = ""
    offset_header: bool = True  # each record gets a kafka-backup.offset header: its offset in the source


class VerifyConfig(_Section):
    backup_id: str = ""
    storage: str = ""  # file:///dir or s3://bucket/prefix, as given to the backup
    s3_endpoint_url: str = ""
    # storage calls made at once (checkpoints read, segments fetched ahead, up to 64 MB); 0: the backend's own
    storage_concurrency: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0


class OffsetResetConfig(_Section):
    group: str = ""
    topics: list[str] = []
    to_timestamp: int | str | None = None  # epoch ms or ISO 8601 (2026-01-31T00:00:00Z; zone-less is UTC)
    to_earliest: bool = False
    to_latest: bool = False
    force: bool = False
    # --from-backup: move --groups to the restored records following the offsets the backup recorded
    from_backup: str = ""  # backup id
    storage: str = ""  # file:///dir or s3://bucket/prefix, as given to the backup
    s3_endpoint_url: str = ""
    restore_id: str = ""  # the restore whose targets to use (exact: its checkpoint's topic map and offsets)
    topic_map: list[str] = []  # without restore_id: "source:target" pairs, as given to the restore
    groups: list[str] = []
    execute: bool = False  # without it, only print the offsets a reset would set (as kafka-consumer-groups)


class AggregatorConfig(_Section):
    app_id: str = topics.AGGREGATOR_APP_ID
    instance_id: str = ""  # static group member id; defaults to app_id@hostname
    # Faust's data directory (table metadata; the tables themselves live in memory and on the state
    # topic). Empty: Faust's default, "<app_id>-data" in the working directory (or $APP_DATADIR).
    data_dir: str = ""
    throughput_window_s: Positive = 60
    dead_letter_topic: str = ""  # skipped telemetry records are copied here when set
    recovery_stall_s: Positive = 30  # table recovery without progress this long: the worker restarts itself
    # records waiting in its telemetry partitions and none delivered to the agent this long: the worker
    # restarts itself (a Faust fetch stall, seen after a restart in place). Under a minute, so a stall
    # never holds the job alerts (they are held while the telemetry lag is over 60 s: docs/alerting.md)
    delivery_stall_s: Positive = 30
    max_future_s: Positive = 300  # event time ahead of the record's timestamp and the clock by more: refused
    max_keys_per_map: Positive = 256  # per job: error types, storage calls, topics, algorithms, ... (refused beyond)
    max_partitions_per_job: Positive = 2000  # per job (a backup id); split bigger backups into several ids
    max_state_bytes: Annotated[int, msgspec.Meta(ge=4096, le=1_000_000)] = 900_000  # one job's encoded state
    flush_interval_ms: Annotated[int, msgspec.Meta(ge=10, le=60_000)] = 200  # changed job states: one table write per interval
    # Deliver each fetched record without Faust's four tasks per record, through Faust's own path from the
    # start of a rebalance (1.2-1.4x the single-event rate, docs/performance.md). Faust skips records after a
    # kill or a join as often with it as without (bench/rebalance_skips.py; each skip restarts the worker in
    # place, and the offset guard keeps the totals exact): false only to rule it out.
    eager_delivery: bool = True
    # A fetch the broker answers with nothing new sooner than this: the next one waits the rest (a Kafka
    # broker holds such a fetch for its wait, so this never pauses there; the dev broker answers at once,
    # and the aggregator then fetched back to back: most of a core). 0: fetch again at once
    empty_fetch_pause_ms: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 50


class RunConfig(_Section):
    """A worker's run (backup, restore, verify, offset-reset), apart from the telemetry it sends."""

    # At the end of the run, its metrics from its own events: a Prometheus textfile (node_exporter's
    # textfile collector; name it *.prom), or JSON when the name ends in .json. Written atomically.
    metrics_output: str = ""


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", ""]


class LogConfig(_Section):
    level: LogLevel = ""  # empty: INFO for long-running processes (aggregate, exporter, continuous backup), else WARNING
    format: Literal["text", "json"] = "text"  # json: one JSON object a line, for log shippers


class Config(_Section):
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    backup: BackupConfig = msgspec.field(default_factory=BackupConfig)
    restore: RestoreConfig = msgspec.field(default_factory=RestoreConfig)
    offset_reset: OffsetResetConfig = msgspec.field(default_factory=OffsetResetConfig)
    aggregator: AggregatorConfig = msgspec.field(default_factory=AggregatorConfig)
    verify: VerifyConfig = msgspec.field(default_factory=VerifyConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    run: RunConfig = msgspec.field(default_factory=RunConfig)


# Which sections each command reads: its --help shows these keys only, and only these are flags
# of it. Entries with a dot name one key of a section the command otherwise does not read.
COMMAND_SECTIONS: dict[str, tuple[str, ...]] = {
    "backup": ("kafka", "telemetry", "backup", "run", "log", "aggregator.app_id"),
    "restore": ("kafka", "telemetry", "restore", "run", "log", "aggregator.app_id"),
    "verify": ("kafka", "telemetry", "verify", "run", "log"),
    "offset-reset": ("kafka", "telemetry", "offset_reset", "run", "log"),
    "aggregate": ("kafka", "telemetry", "aggregator", "log"),
    "exporter": ("metrics", "kafka", "log", "aggregator.app_id", "aggregator.throughput_window_s", "telemetry.topic"),
    "replay": ("metrics", "kafka", "telemetry", "aggregator", "log", "backup.backup_id", "restore.restore_id"),
    "list": ("log", "backup.storage", "backup.s3_endpoint_url"),
    "describe": ("log", "backup.storage", "backup.s3_endpoint_url", "backup.backup_id"),
    "status": ("kafka", "log", "aggregator.app_id", "aggregator.throughput_window_s", "backup.backup_id",
               "restore.restore_id", "metrics.worker_stop_after_s", "metrics.expire_after_s",
               "metrics.max_series_per_family"),
    "up": ("metrics", "kafka", "telemetry", "backup", "aggregator", "log"),
}


@functools.cache
def _fields(struct: type) -> tuple[msgspec.structs.FieldInfo, ...]:
    """``msgspec.structs.fields``, once per type: it resolves the type hints anew on every call, and
    a restore's start-up made 88 calls for 11 types (14 ms of its 0.2 s under cProfile; now 2 ms)."""
    return msgspec.structs.fields(struct)


def keys_for(command: str) -> list[tuple[str, Any]]:
    """The ``section.key`` s (with defaults) a command reads, in key-list order."""
    wanted = COMMAND_SECTIONS.get(command, ())
    return [(k, d) for k, d in all_keys() if k in wanted or k.split(".")[0] in wanted]


def commands_for(section: str) -> list[str]:
    return [c for c, secs in COMMAND_SECTIONS.items() if section in secs]


class ConfigError(Exception):
    """A user mistake in configuration: printed as one line, exit status 2."""


SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def flag_for(path: str) -> str:
    """``backup.compression`` -> ``--backup-compression``; ``backup.backup_id`` -> ``--backup-id``;
    a mapping (``kafka.properties``) is a repeatable ``--kafka-property KEY=VALUE``."""
    section, _, key = path.partition(".")
    if key.endswith("properties"):
        key = key.removesuffix("properties") + "property"
    if key.startswith(section + "_"):
        return "--" + key.replace("_", "-")
    return "--" + f"{section}.{key}".replace(".", "-").replace("_", "-")


def _path_of(err: msgspec.ValidationError) -> tuple[str, str]:
    """Turn msgspec's "... - at `$.backup.compression`" into ("backup.compression", "...")."""
    text = str(err)
    m = re.search(r"^(.*?)(?: - at `\$\.?([^`]*)`)?$", text)
    message, where = (m.group(1), m.group(2) or "") if m else (text, "")
    unknown = re.match(r"Object contains unknown field `([^`]+)`", message)
    if unknown:
        where = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
        message = "unknown key"
    return where, message


def _validate(raw: dict[str, Any], origins: Mapping[str, str] | None = None) -> Config:
    try:
        return msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as err:
        where, message = _path_of(err)
        where = re.sub(r"\[[^\]]*\]", "", where)  # kafka.properties[...] -> kafka.properties
        if message == "unknown key":
            section = where.split(".")[0]
            valid = _keys_of(section)
            raise ConfigError(f"{where}: unknown key; valid keys here: {', '.join(valid)}") from None
        if message.startswith("Invalid enum value") and (choices := _choices_of(where)):
            message += f"; one of {', '.join(choices)}"
        origin = _origin_of(where, origins or {})
        if origin.startswith("environment "):
            raise ConfigError(f"{origin}: {message} ({where})") from None
        source = f"from {origin}; " if origin else ""
        raise ConfigError(f"{where}: {message} ({source}set it in the YAML file, with {flag_for(where)} "
                          f"or {env_for(where)})") from None


def _origin_of(where: str, origins: Mapping[str, str]) -> str:
    """The source of ``where`` or of the key it is inside (``kafka.properties.x`` -> ``kafka.properties``)."""
    while where:
        if where in origins:
            return origins[where]
        where = where.rpartition(".")[0]
    return ""


def _choices_of(where: str) -> list[str]:
    """The values a ``section.key`` of a fixed vocabulary takes (``Literal``, ``bool``), as written in YAML."""

    def flat(kind: Any) -> list[str]:
        if kind is bool:
            return ["true", "false"]
        if get_origin(kind) is Literal:
            return [str(v) for v in get_args(kind) if v != ""]
        return [c for k in get_args(kind) for c in flat(k)]  # a union: each of its members

    section, _, key = where.partition(".")
    for f in _fields(Config):
        if f.name == section:
            return next((flat(g.type) for g in _fields(f.type) if g.name == key), [])
    return []


def _keys_of(section: str) -> list[str]:
    fields = _fields(Config)
    for f in fields:
        if f.name == section:
            return [g.name for g in _fields(f.type)]
    return [f.name for f in fields]


def all_keys() -> list[tuple[str, Any]]:
    """Every ``section.key`` with its default, for generating flags."""
    out = []
    for section in _fields(Config):
        for f in _fields(section.type):
            default = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
            out.append((f"{section.name}.{f.name}", default))
    return out


def secret_keys() -> list[str]:
    """Every password-like ``section.key`` (typed :data:`Secret`)."""
    out = []
    for section in _fields(Config):
        for f in _fields(section.type):
            if any(isinstance(a, msgspec.Meta) and (a.extra or {}).get("secret") for a in get_args(f.type)[1:]):
                out.append(f"{section.name}.{f.name}")
    return out


def env_for(key: str) -> str:
    """``metrics.port`` -> ``KAFKA_BACKUP_METRICS_PORT``; every key has one."""
    return "KAFKA_BACKUP_" + key.replace(".", "_").upper()


def _from_env(key: str, default: Any, text: str) -> Any:
    """An environment variable's text as the key's value: lists are comma-separated, mappings are
    YAML (``{sasl.mechanism: OAUTHBEARER}``) or ``KEY=VALUE`` lines; the rest is converted by type."""
    if isinstance(default, list):
        return [v.strip() for v in text.split(",") if v.strip()]
    if isinstance(default, dict):
        return parse_properties(text, f"environment {env_for(key)}")
    return text


def parse_properties(text: str, source: str) -> dict[str, Any]:
    """A mapping written as YAML (``{a.b: 1}``) or as ``KEY=VALUE`` lines (``#`` comments), as in a
    Java client.properties file."""
    stripped = text.strip()
    if stripped.startswith("{"):
        import yaml  # here: 10 ms at every start otherwise, for what few runs use

        try:
            loaded = yaml.safe_load(stripped)
        except yaml.YAMLError:
            loaded = None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: not a YAML mapping; write {{key: value, ...}} or KEY=VALUE lines")
        return {str(k): v for k, v in loaded.items()}
    out: dict[str, Any] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source}: line {n} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Every ``KAFKA_BACKUP_<SECTION>_<KEY>`` set (and not empty) in ``environ``, as ``{section.key: value}``."""
    out = {}
    for key, default in all_keys():
        text = environ.get(env_for(key), "")
        if text != "":
            out[key] = _from_env(key, default, text)
    return out


def _pair(key: str) -> tuple[str, ...]:
    """A secret and its ``_file`` form are one setting for precedence: the pair, else nothing."""
    base = key.removesuffix("_file")
    return (base, base + "_file") if base in secret_keys() else ()


def _resolve_secrets(cfg: Config, origins: Mapping[str, str]) -> None:
    """Fill each secret from its file, when set; setting a key and its ``_file`` both (in one
    place: a higher-precedence source replaces both) is a mistake. A file's trailing newline is
    not part of it. Errors name the variable when the file was named in the environment."""

    def field(key: str) -> str:
        origin = origins.get(key, "")
        return origin if origin.startswith("environment ") else key

    for key in secret_keys():
        section_name, name = key.split(".")
        section = getattr(cfg, section_name)
        value, path = getattr(section, name), getattr(section, name + "_file")
        if value and path:
            raise ConfigError(f"{key}_file: set either {key} or {key}_file, not both")
        if path:
            value = _read_file(field(key + "_file"), path)
            if not value:
                raise ConfigError(f"{field(key + '_file')}: {path} is empty")
        setattr(section, name, value)
    for name in ("properties", "telemetry_properties"):
        path = getattr(cfg.kafka, name + "_file")
        if path:
            where = field(f"kafka.{name}_file")
            from_file = parse_properties(_read_file(where, path), f"{where}: {path}")
            setattr(cfg.kafka, name, {**from_file, **getattr(cfg.kafka, name)})


def _read_file(field: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{field}: cannot read {path}: {getattr(err, 'strerror', None) or err}") from None


def _check(cfg: Config) -> None:
    """Rules across one key's value that msgspec's types cannot say."""
    path, flag = cfg.metrics.path, flag_for("metrics.path")
    if not path.startswith("/") or any(c in path for c in "?# "):
        raise ConfigError(f"metrics.path: {path!r} must start with '/' and hold no '?', '#' or space, "
                          f"e.g. /metrics ({flag})")
    if path == HEALTH_PATH:
        raise ConfigError(f"metrics.path: {path!r} would shadow {HEALTH_PATH}, which answers without "
                          f"authentication; choose another, e.g. /metrics ({flag})")


def read_yaml(path: str, field: str) -> Any:
    """A YAML file's content; an unreadable or invalid file is one line naming ``field``."""
    import yaml  # here: 10 ms at every start otherwise, for what few runs use

    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except OSError as err:
        raise ConfigError(f"{field}: cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{field}: {path}{where} is not valid YAML") from None


def load(path: str | None = None, overrides: dict[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the YAML file, then the environment (``environ``, default ``os.environ``), then
    ``overrides`` (the flags: {"backup.topics": [...]}), validated once; then secrets from their files.

    A secret and its ``_file`` are one setting: the source that sets either replaces both from lower
    sources. Mappings (``kafka.properties``) merge key by key, the higher source winning.
    """
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path:
        loaded = read_yaml(path, "--config")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of sections (metrics:, kafka:, ...)")
        raw = loaded
        for section, keys in raw.items():
            for key in keys if isinstance(keys, dict) else ():
                origins[f"{section}.{key}"] = f"--config {path}"
    env = environment(os.environ if environ is None else environ)
    layers: tuple[tuple[Mapping[str, Any], Callable[[str], str]], ...] = (
        (env, lambda k: f"environment {env_for(k)}"), (overrides or {}, flag_for))
    for layer, label in layers:
        for dotted, value in layer.items():
            section, key = dotted.split(".", 1)
            target = raw.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{section}: must be a mapping of keys")
            for other in _pair(dotted):  # this source replaces the whole setting from lower ones
                if other not in layer:
                    target.pop(other.split(".", 1)[1], None)
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                value = {**target[key], **value}
            target[key] = value
            origins[dotted] = label(dotted)
    cfg = _validate(raw, origins)
    _check(cfg)
    _resolve_secrets(cfg, origins)
    return cfg


def require_safe_id(field: str, value: str) -> None:
    """Job ids become label values, group ids and storage paths: keep them boring."""
    if not SAFE_ID.match(value or ""):
        raise ConfigError(
            f"{field}: {value!r} is not a safe id; use 1-200 letters, digits, '.', '_' or '-' "
            f"starting with a letter or digit ({flag_for(field)})"
        )


def render_markdown() -> str:
    """docs/configuration.md, generated: ``python -m kafka_backup.schemas.config > docs/configuration.md``."""
    out = [
        "# Configuration",
        "",
        "<!-- Generated by `python -m kafka_backup.schemas.config > docs/configuration.md`; do not edit. -->",
        "",
        "One YAML file (`--config FILE`) with the sections below; every key is also a",
        "flag and an environment variable `KAFKA_BACKUP_<SECTION>_<KEY>`. Precedence:",
        "flags > environment > YAML file > defaults. Unknown keys and bad values stop the",
        "command with one line naming the key and where its value came from (e.g.",
        "\"environment KAFKA_BACKUP_METRICS_PORT: Expected `int`, got `str` (metrics.port)\"),",
        "and exit status 2. The `metrics:` section is the PRD's.",
        "",
        "In the environment, a list is comma-separated (`KAFKA_BACKUP_BACKUP_TOPICS=orders,payments`),",
        "a boolean is `true`/`false`, a mapping (`kafka.properties`) is a YAML mapping",
        "(`{sasl.mechanism: OAUTHBEARER}`) or `KEY=VALUE` lines; an empty variable counts as unset.",
        "",
        "Each command reads only some sections, and only their keys are its flags (`--help`",
        "lists them); a shared YAML file may hold every section.",
        "",
        "```yaml",
        "metrics:",
        "  enabled: true",
        "  bind: 127.0.0.1",
        "  port: 8080",
        "  path: /metrics",
        "  update_interval_ms: 500",
        "kafka:",
        "  bootstrap_servers: broker-1:9092,broker-2:9092",
        "backup:",
        "  backup_id: orders-prod",
        "  topics: [orders, payments]",
        "  storage: s3://backups/kafka",
        "  compression: zstd",
        "  continuous: true",
        "```",
        "",
    ]
    section = None
    for key, default in all_keys():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            users = commands_for(section)
            some = [c for c, secs in COMMAND_SECTIONS.items() if any(s.startswith(section + ".") for s in secs)]
            used = ", ".join(f"`{c}`" for c in users) + (
                f" (and {', '.join(f'`{c}`' for c in some)}: some keys)" if some else "")
            out += ["", f"### `{section}:`", "", f"Read by: {used}.", "",
                    "| key | flag | environment variable | default |", "|---|---|---|---|"]
        flag = flag_for(key) + (" KEY=VALUE (repeatable)" if isinstance(default, dict) else "")
        out.append(f"| `{key}` | `{flag}` | `{env_for(key)}` | `{default!r}` |")
    out += [
        "",
        "## Secrets",
        "",
        "Keep passwords off the command line (any user of the machine can read it).",
        "Each password-like key below also takes its value from a file, `<key>_file`",
        "(trailing newline ignored), and both forms from the environment. A key and its",
        "`_file` are one setting: the source of higher precedence that sets either one",
        "replaces both (`KAFKA_BACKUP_KAFKA_SASL_PASSWORD_FILE` in the environment wins over",
        "`sasl_password:` in the YAML file); setting both in one source is an error.",
        "Raw client properties holding secrets (`sasl.oauthbearer.client.secret`, ...) go in",
        "`kafka.properties_file`, a Java-style `client.properties` file of `KEY=VALUE` lines",
        "(as `kafka-consumer-groups --command-config` takes); `kafka.properties` entries win",
        "over it key by key.",
        "",
        "| key | file key | environment variables |",
        "|---|---|---|",
    ]
    for key in secret_keys():
        out.append(f"| `{key}` | `{key}_file` | `{env_for(key)}`, `{env_for(key + '_file')}` |")
    out += [
        "",
        "The exporter's password is stored only as a bcrypt hash, as in Prometheus'",
        "`web-config.yml`: `htpasswd -nbBC 10 \"\" \"$PASSWORD\" | cut -d: -f2`, or",
        "`python -c 'import bcrypt,getpass; print(bcrypt.hashpw(getpass.getpass().encode(), bcrypt.gensalt()).decode())'`.",
        "`metrics.basic_auth_password_sha256` (unsalted) still works and logs a deprecation warning.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    sys.stdout.write(render_markdown())
