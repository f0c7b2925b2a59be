"""Configuration: one YAML file (the PRD's ``metrics:`` section plus ours), every key also a flag.

Precedence: built-in defaults < YAML file < command-line flags. Unknown keys
and bad values are rejected with one line that names the field
(``backup.compression``) and the flag that sets it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

import msgspec
import yaml

from schemas import topics

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Compression = Literal["zstd", "lz4", "snappy", "gzip", "none"]
# A password-like key. Each one also takes its value from a file (the key ``<key>_file``,
# declared next to it) or from the environment (:func:`env_for`), so that no secret has to be
# written on a command line, where every user of the machine can read it in ``ps``.
Secret = Annotated[str, msgspec.Meta(extra={"secret": True})]

HEALTH_PATH = "/health"  # the exporter's readiness endpoint, open without authentication


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class MetricsConfig(_Section):
    enabled: bool = True
    bind: str = "127.0.0.1"
    port: Port = 8080
    path: str = "/metrics"
    update_interval_ms: Positive = 500  # the exporter re-renders at most this often
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


class BackupConfig(_Section):
    backup_id: str = ""
    topics: list[str] = []
    storage: str = ""  # file:///dir or s3://bucket/prefix
    s3_endpoint_url: str = ""
    compression: Compression = "zstd"
    continuous: bool = False
    instance_id: str = ""  # static group member id; defaults to backup_id@hostname
    poll_interval_ms: Positive = 500
    flush_interval_ms: Positive = 5000
    segment_max_records: Positive = 50_000
    segment_max_bytes: Positive = 16 * 1024 * 1024
    expected_interval_s: Positive = 26 * 3600  # one-shot: alert when no run succeeded for this long (daily + 2 h)
    recovery_point_objective_s: Positive = 48 * 3600  # alert when the newest stored record is older, while lagging


class RestoreConfig(_Section):
    restore_id: str = ""
    backup_id: str = ""
    storage: str = ""  # file:///dir or s3://bucket/prefix, as given to the backup
    s3_endpoint_url: str = ""
    topic_map: list[str] = []  # "source:target" pairs; unmapped topics keep their name
    from_time: int | None = None  # epoch ms, inclusive
    to_time: int | None = None  # epoch ms, exclusive
    rate_limit: Annotated[int, msgspec.Meta(ge=0)] = 0  # records per second; 0 = unlimited
    create_topics: bool = True  # missing targets are created with the source's recorded configuration
    allow_retention_loss: bool = False  # restore even if the targets' retention would delete records in scope
    batch_records: Positive = 1000
    instance_id: str = ""


class VerifyConfig(_Section):
    backup_id: str = ""
    storage: str = ""  # file:///dir or s3://bucket/prefix, as given to the backup
    s3_endpoint_url: str = ""


class OffsetResetConfig(_Section):
    group: str = ""
    topics: list[str] = []
    to_timestamp: int | None = None
    to_earliest: bool = False
    to_latest: bool = False
    force: bool = False


class AggregatorConfig(_Section):
    app_id: str = topics.AGGREGATOR_APP_ID
    instance_id: str = ""  # static group member id; defaults to app_id@hostname
    throughput_window_s: Positive = 60
    dead_letter_topic: str = ""  # skipped telemetry records are copied here when set
    recovery_stall_s: Positive = 30  # table recovery without progress this long: the worker restarts itself
    max_future_s: Positive = 300  # event time ahead of the record's timestamp and the clock by more: refused
    max_keys_per_map: Positive = 256  # per job: error types, storage calls, topics, algorithms, ... (refused beyond)
    max_partitions_per_job: Positive = 2000  # per job (a backup id); split bigger backups into several ids
    max_state_bytes: Annotated[int, msgspec.Meta(ge=4096, le=1_000_000)] = 900_000  # one job's encoded state
    flush_interval_ms: Annotated[int, msgspec.Meta(ge=10, le=60_000)] = 200  # changed job states: one table write per interval


class Config(_Section):
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    backup: BackupConfig = msgspec.field(default_factory=BackupConfig)
    restore: RestoreConfig = msgspec.field(default_factory=RestoreConfig)
    offset_reset: OffsetResetConfig = msgspec.field(default_factory=OffsetResetConfig)
    aggregator: AggregatorConfig = msgspec.field(default_factory=AggregatorConfig)
    verify: VerifyConfig = msgspec.field(default_factory=VerifyConfig)


class ConfigError(Exception):
    """A user mistake in configuration: printed as one line, exit status 2."""


SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def flag_for(path: str) -> str:
    """``backup.compression`` -> ``--backup-compression``; ``backup.backup_id`` -> ``--backup-id``."""
    section, _, key = path.partition(".")
    if key.startswith(section + "_"):
        return "--" + key.replace("_", "-")
    return "--" + path.replace(".", "-").replace("_", "-")


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


def _validate(raw: dict[str, Any]) -> Config:
    try:
        return msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as err:
        where, message = _path_of(err)
        if message == "unknown key":
            section = where.split(".")[0]
            valid = _keys_of(section)
            raise ConfigError(f"{where}: unknown key; valid keys here: {', '.join(valid)}") from None
        raise ConfigError(f"{where}: {message} (set it in the YAML file or with {flag_for(where)})") from None


def _keys_of(section: str) -> list[str]:
    fields = msgspec.structs.fields(Config)
    for f in fields:
        if f.name == section:
            return [g.name for g in msgspec.structs.fields(f.type)]
    return [f.name for f in fields]


def all_keys() -> list[tuple[str, Any]]:
    """Every ``section.key`` with its default, for generating flags."""
    out = []
    for section in msgspec.structs.fields(Config):
        for f in msgspec.structs.fields(section.type):
            default = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
            out.append((f"{section.name}.{f.name}", default))
    return out


def secret_keys() -> list[str]:
    """Every password-like ``section.key`` (typed :data:`Secret`)."""
    out = []
    for section in msgspec.structs.fields(Config):
        for f in msgspec.structs.fields(section.type):
            if any(isinstance(a, msgspec.Meta) and (a.extra or {}).get("secret") for a in get_args(f.type)[1:]):
                out.append(f"{section.name}.{f.name}")
    return out


def env_for(key: str) -> str:
    """``kafka.sasl_password`` -> ``KAFKA_BACKUP_KAFKA_SASL_PASSWORD``."""
    return "KAFKA_BACKUP_" + key.replace(".", "_").upper()


def _resolve_secrets(cfg: Config, environ: Mapping[str, str]) -> None:
    """Fill each secret from the file or the environment variable, when the key itself is not set.

    Setting a key and its ``_file`` both is a mistake (which one wins would be a guess); the
    environment is used only when neither is set. A file's trailing newline is not part of it.
    """
    for key in secret_keys():
        section_name, name = key.split(".")
        section = getattr(cfg, section_name)
        value, path = getattr(section, name), getattr(section, name + "_file")
        if value and path:
            raise ConfigError(f"{key}_file: set either {key} or {key}_file, not both")
        if path:
            try:
                with open(path, encoding="utf-8") as fh:
                    value = fh.read().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"{key}_file: cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
            if not value:
                raise ConfigError(f"{key}_file: {path} is empty")
        elif not value:
            value = environ.get(env_for(key), "")
        setattr(section, name, value)


def _check(cfg: Config) -> None:
    """Rules across one key's value that msgspec's types cannot say."""
    path, flag = cfg.metrics.path, flag_for("metrics.path")
    if not path.startswith("/") or any(c in path for c in "?# "):
        raise ConfigError(f"metrics.path: {path!r} must start with '/' and hold no '?', '#' or space, "
                          f"e.g. /metrics ({flag})")
    if path == HEALTH_PATH:
        raise ConfigError(f"metrics.path: {path!r} would shadow {HEALTH_PATH}, which answers without "
                          f"authentication; choose another, e.g. /metrics ({flag})")


def load(path: str | None = None, overrides: dict[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the YAML file, then ``overrides`` ({"backup.topics": [...]}), validated once;
    then secrets from their files or the environment (``environ``, default ``os.environ``)."""
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh)
        except OSError as err:
            raise ConfigError(f"--config: cannot read {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"--config: {path}{where} is not valid YAML") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of sections (metrics:, kafka:, ...)")
        raw = loaded
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: must be a mapping of keys")
        target[key] = value
    cfg = _validate(raw)
    _check(cfg)
    _resolve_secrets(cfg, os.environ if environ is None else environ)
    return cfg


def require_safe_id(field: str, value: str) -> None:
    """Job ids become label values, group ids and storage paths: keep them boring."""
    if not SAFE_ID.match(value or ""):
        raise ConfigError(
            f"{field}: {value!r} is not a safe id; use 1-200 letters, digits, '.', '_' or '-' "
            f"starting with a letter or digit ({flag_for(field)})"
        )


def render_markdown() -> str:
    """docs/configuration.md, generated: ``python -m schemas.config > docs/configuration.md``."""
    out = [
        "# Configuration",
        "",
        "<!-- Generated by `python -m schemas.config > docs/configuration.md`; do not edit. -->",
        "",
        "One YAML file (`--config FILE`) with the sections below; every key is also a",
        "flag, and flags win over the file. Unknown keys and bad values stop the command",
        "with one line naming the key, and exit status 2. The `metrics:` section is the",
        "PRD's.",
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
        "| key | flag | default |",
        "|---|---|---|",
    ]
    for key, default in all_keys():
        out.append(f"| `{key}` | `{flag_for(key)}` | `{default!r}` |")
    out += [
        "",
        "## Secrets",
        "",
        "Keep passwords off the command line (any user of the machine can read it).",
        "Each password-like key below also takes its value from a file, `<key>_file`",
        "(trailing newline ignored), or, when neither is set, from the environment",
        "variable shown. Setting a key and its `_file` both is an error.",
        "",
        "| key | file key | environment variable |",
        "|---|---|---|",
    ]
    for key in secret_keys():
        out.append(f"| `{key}` | `{key}_file` | `{env_for(key)}` |")
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
