"""``kafka-backup``: one console script, one subcommand per process role.

Every configuration key a command reads is a flag of it (``--section-key``) and an
environment variable (``KAFKA_BACKUP_SECTION_KEY``), generated from ``schemas.config``;
the short names of the command-line contract (``--bootstrap-servers``, ``--topics``,
``--port`` ...) are aliases of those. User mistakes print one line and exit 2; a failed
backup exits 1.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kafka_backup.schemas import logs
from kafka_backup.schemas.config import (
    Config,
    ConfigError,
    env_for,
    flag_for,
    keys_for,
    load,
    require_safe_id,
)
from kafka_backup.schemas.kafka_admin import register, source_security, telemetry_security

ENV_BOOTSTRAP = "KAFKA_BOOTSTRAP_SERVERS"

# contract flag -> config key, per subcommand
ALIASES: dict[str, dict[str, str]] = {
    "backup": {
        "--metrics-output": "run.metrics_output",
        "--bootstrap-servers": "kafka.bootstrap_servers",
        "--telemetry-bootstrap-servers": "kafka.telemetry_bootstrap_servers",
        "--topics": "backup.topics",
        "--backup-id": "backup.backup_id",
        "--storage": "backup.storage",
        "--s3-endpoint-url": "backup.s3_endpoint_url",
        "--compression": "backup.compression",
        "--instance-id": "backup.instance_id",
    },
    "aggregate": {"--bootstrap-servers": "kafka.bootstrap_servers", "--app-id": "aggregator.app_id",
                  "--instance-id": "aggregator.instance_id"},
    "replay": {"--bootstrap-servers": "kafka.bootstrap_servers"},
    "up": {"--bootstrap-servers": "kafka.bootstrap_servers", "--app-id": "aggregator.app_id"},
    "list": {"--storage": "backup.storage", "--s3-endpoint-url": "backup.s3_endpoint_url"},
    "describe": {"--storage": "backup.storage", "--s3-endpoint-url": "backup.s3_endpoint_url",
                 "--backup-id": "backup.backup_id"},
    "status": {"--bootstrap-servers": "kafka.bootstrap_servers", "--app-id": "aggregator.app_id",
               "--backup-id": "backup.backup_id", "--restore-id": "restore.restore_id"},
    "exporter": {"--bootstrap-servers": "kafka.bootstrap_servers", "--bind": "metrics.bind",
                 "--port": "metrics.port", "--app-id": "aggregator.app_id",
                 "--web-config-file": "metrics.web_config_file"},
    "restore": {
        "--metrics-output": "run.metrics_output",
        "--bootstrap-servers": "kafka.bootstrap_servers",
        "--telemetry-bootstrap-servers": "kafka.telemetry_bootstrap_servers",
        "--backup-id": "restore.backup_id",
        "--storage": "restore.storage",
        "--s3-endpoint-url": "restore.s3_endpoint_url",
        "--restore-id": "restore.restore_id",
        "--topic-map": "restore.topic_map",
        "--from-time": "restore.from_time",
        "--to-time": "restore.to_time",
        "--rate-limit": "restore.rate_limit",
    },
    "verify": {
        "--metrics-output": "run.metrics_output",
        "--bootstrap-servers": "kafka.bootstrap_servers",
        "--telemetry-bootstrap-servers": "kafka.telemetry_bootstrap_servers",
        "--backup-id": "verify.backup_id",
        "--storage": "verify.storage",
        "--s3-endpoint-url": "verify.s3_endpoint_url",
    },
    "offset-reset": {
        "--metrics-output": "run.metrics_output",
        "--bootstrap-servers": "kafka.bootstrap_servers",
        "--telemetry-bootstrap-servers": "kafka.telemetry_bootstrap_servers",
        "--group": "offset_reset.group",
        "--topics": "offset_reset.topics",
        "--to-timestamp": "offset_reset.to_timestamp",
        "--to-datetime": "offset_reset.to_timestamp",
        # --from-backup: groups follow the data (producers/offset_follow.py)
        "--from-backup": "offset_reset.from_backup",
        "--storage": "offset_reset.storage",
        "--s3-endpoint-url": "offset_reset.s3_endpoint_url",
        "--restore-id": "offset_reset.restore_id",
        "--topic-map": "offset_reset.topic_map",
        "--groups": "offset_reset.groups",
    },
}


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _property(value: str) -> dict[str, str]:
    """``--kafka-property KEY=VALUE`` (repeatable): one raw librdkafka setting."""
    key, sep, val = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{value!r} is not KEY=VALUE, e.g. sasl.mechanism=OAUTHBEARER")
    return {key.strip(): val}


class _MergeProperties(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        assert isinstance(values, dict)  # type=_property makes each value a one-key dict
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), **values})


def _add_config_flags(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML configuration file (environment and flags override it)")
    aliases = ALIASES.get(command, {})
    by_key: dict[str, list[str]] = {}
    for flag, key in aliases.items():
        by_key.setdefault(key, []).append(flag)
    group = p.add_argument_group("configuration keys (each also settable in the YAML file and as the "
                                 "environment variable shown)")
    for key, default in keys_for(command):
        flags = [*by_key.get(key, []), flag_for(key)]
        # an alias wins over another key's generated flag (restore's --backup-id is restore.backup_id)
        flags = [f for f in flags if aliases.get(f, key) == key]
        if not flags:
            continue
        kwargs: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS, "metavar": "V"}
        if isinstance(default, list):
            kwargs["type"] = _list
            kwargs["metavar"] = "A,B"
        elif isinstance(default, dict):
            kwargs.update(type=_property, metavar="KEY=VALUE", action=_MergeProperties)
        elif key == "log.level":
            kwargs.update(choices=["DEBUG", "INFO", "WARNING", "ERROR"], metavar=None)
        elif key == "log.format":
            kwargs.update(choices=["text", "json"], metavar=None)
        group.add_argument(*dict.fromkeys(flags), help=f"{key}, ${env_for(key)} (default: {default!r})",
                           **kwargs)
    if command == "backup":
        p.add_argument("--continuous", dest="backup.continuous", action="store_const", const=True,
                       default=argparse.SUPPRESS, help="keep backing up until stopped (default: one-shot)")
    if command == "restore":
        p.add_argument("--dry-run", dest="restore_dry_run", action="store_true",
                       help="print what the restore would do (scope, targets, retention verdict, estimate) and "
                            "write nothing; exit 1 when it would refuse to start")
        p.add_argument("--allow-retention-loss", dest="restore.allow_retention_loss", action="store_const",
                       const=True, default=argparse.SUPPRESS,
                       help="restore even if the targets' retention would delete records in scope (counted)")
    if command == "offset-reset":
        for flag, key, help_ in [("--to-earliest", "offset_reset.to_earliest", "reset to the earliest offset"),
                                 ("--to-latest", "offset_reset.to_latest", "reset to the latest offset"),
                                 ("--force", "offset_reset.force", "reset even if the group has active members"),
                                 ("--execute", "offset_reset.execute",
                                  "change the offsets (without it: only print what would be set)")]:
            p.add_argument(flag, dest=key, action="store_const", const=True, default=argparse.SUPPRESS, help=help_)


def version_line() -> str:
    """``kafka-backup --version``: this package and the libraries that decide its behaviour."""
    from kafka_backup.schemas.build import build_info

    info = build_info()
    return (f"kafka-backup {info['version']} (python {info['python']}, faust {info['faust']}, "
            f"confluent-kafka {info['confluent_kafka']})")


class _Version(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        print(version_line())
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line. ``command``: build the flags of that subcommand only (the others are
    listed, with their help, but take no flags): the flags of every command and the modules some
    need cost 25 ms at each start, a tenth of a one-shot backup of an empty topic."""
    parser = argparse.ArgumentParser(prog="kafka-backup", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action=_Version, help="print the version (and its libraries') and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def wanted(name: str) -> bool:
        return command is None or command == name

    p = sub.add_parser("dev-broker", help="run the embedded test broker (noida-db) in the foreground")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--data-dir", default=None, help="keep the broker's data here (default: a temp dir)")
    for name, help_ in [("backup", "back up topics to storage, publishing telemetry"),
                        ("aggregate", "run the Faust aggregator over the telemetry topic"),
                        ("exporter", "serve the aggregated state as Prometheus metrics"),
                        ("restore", "restore a backup into Kafka topics, publishing telemetry"),
                        ("verify", "check every segment of a backup (presence, size, digest, records, gaps)"),
                        ("offset-reset", "reset a consumer group's offsets to a time, the earliest or the latest")]:
        p = sub.add_parser(name, help=help_)
        if wanted(name):
            _add_config_flags(p, name)
    p = sub.add_parser("replay", help="fold the telemetry log again offline: metrics at --to and an audit report")
    if wanted("replay"):
        _add_config_flags(p, "replay")
        from kafka_backup.cli.replay import add_arguments

        add_arguments(p)
    for name, help_ in [("list", "one line per backup in a storage location (metadata only)"),
                        ("describe", "one backup, per partition: offsets, gaps, records, times, verification")]:
        p = sub.add_parser(name, help=help_)
        if wanted(name):
            from kafka_backup.cli.inventory import add_arguments as add_inventory_arguments

            _add_config_flags(p, name)
            add_inventory_arguments(p)
    p = sub.add_parser("status", help="the fleet at a glance: one row per job, read from the state topic")
    if wanted("status"):
        from kafka_backup.cli.status import add_arguments as add_status_arguments

        _add_config_flags(p, "status")
        add_status_arguments(p)
    p = sub.add_parser("up", help="broker + demo workload + backup + aggregator + exporter, until Ctrl-C")
    if wanted("up"):
        _add_config_flags(p, "up")
    return parser


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration keys given as flags: {"backup.topics": [...]}."""
    return {k: v for k, v in vars(args).items() if "." in k}


def config_from(args: argparse.Namespace) -> Config:
    cfg = load(getattr(args, "config", None), overrides_of(args))
    if not cfg.kafka.bootstrap_servers and os.environ.get(ENV_BOOTSTRAP):
        cfg.kafka.bootstrap_servers = os.environ[ENV_BOOTSTRAP]
    # every client made for these clusters picks up their SASL/TLS settings (schemas.kafka_admin)
    register(cfg.kafka.bootstrap_servers, source_security(cfg.kafka))
    if cfg.kafka.telemetry_bootstrap_servers:
        register(cfg.kafka.telemetry_bootstrap_servers, telemetry_security(cfg.kafka))
    return cfg


def _require_bootstrap(cfg: Config) -> None:
    if not cfg.kafka.bootstrap_servers:
        raise ConfigError(f"kafka.bootstrap_servers: not set; use --bootstrap-servers HOST:PORT or {ENV_BOOTSTRAP}")


def cmd_backup(cfg: Config) -> int:
    from kafka_backup.producers.backup import run_backup
    from kafka_backup.producers.storage import Storage, open_backend

    _require_bootstrap(cfg)
    require_safe_id("backup.backup_id", cfg.backup.backup_id)
    logs.set_context(job=cfg.backup.backup_id)
    if not cfg.backup.topics:
        raise ConfigError("backup.topics: no topics given; use --topics t1,t2")
    storage = Storage(open_backend(cfg.backup.storage, cfg.backup.s3_endpoint_url,
                                   concurrency=cfg.backup.storage_concurrency))
    return run_backup(cfg.kafka.bootstrap_servers, cfg.kafka.telemetry_bootstrap_servers, cfg.backup,
                      cfg.telemetry, storage, aggregator_group=cfg.aggregator.app_id)


def cmd_aggregate(cfg: Config, logging_config: dict[str, Any]) -> int:
    from kafka_backup.streams.app import run

    _require_bootstrap(cfg)
    require_safe_id("aggregator.app_id", cfg.aggregator.app_id)
    run(cfg, logging_config)
    return 0


def cmd_exporter(cfg: Config) -> int:
    import socket

    from kafka_backup.exporter.main import run

    _require_bootstrap(cfg)
    logs.set_context(job=cfg.aggregator.app_id, instance=f"exporter@{socket.gethostname()}")
    run(cfg)
    return 0


def cmd_restore(cfg: Config, dry_run: bool = False) -> int:
    from kafka_backup.producers.restore import run_restore
    from kafka_backup.producers.storage import Storage, open_backend

    _require_bootstrap(cfg)
    require_safe_id("restore.restore_id", cfg.restore.restore_id)
    require_safe_id("restore.backup_id", cfg.restore.backup_id)
    logs.set_context(job=cfg.restore.restore_id)
    storage = Storage(open_backend(cfg.restore.storage, cfg.restore.s3_endpoint_url, field="restore.storage",
                                   concurrency=cfg.restore.storage_concurrency))
    return run_restore(cfg.kafka.bootstrap_servers, cfg.kafka.telemetry_bootstrap_servers, cfg.restore,
                       cfg.telemetry, storage, dry_run=dry_run, aggregator_group=cfg.aggregator.app_id)


def cmd_verify(cfg: Config) -> int:
    from kafka_backup.producers.storage import Storage, open_backend
    from kafka_backup.producers.verify import run_verify

    require_safe_id("verify.backup_id", cfg.verify.backup_id)
    logs.set_context(job=cfg.verify.backup_id)
    storage = Storage(open_backend(cfg.verify.storage, cfg.verify.s3_endpoint_url, field="verify.storage",
                                   concurrency=cfg.verify.storage_concurrency))
    return run_verify(cfg.kafka.telemetry_bootstrap_servers or cfg.kafka.bootstrap_servers, cfg.verify,
                      cfg.telemetry, storage, out=sys.stdout)


def cmd_offset_reset(cfg: Config) -> int:
    from kafka_backup.producers.offset_reset import run_offset_reset

    _require_bootstrap(cfg)
    if cfg.offset_reset.from_backup:
        from kafka_backup.producers.offset_follow import run_offset_follow, validate
        from kafka_backup.producers.storage import Storage, open_backend

        validate(cfg.offset_reset)
        storage = Storage(open_backend(cfg.offset_reset.storage, cfg.offset_reset.s3_endpoint_url,
                                       field="offset_reset.storage"))
        return run_offset_follow(cfg.kafka.bootstrap_servers, cfg.kafka.telemetry_bootstrap_servers,
                                 cfg.offset_reset, cfg.telemetry, storage, out=sys.stdout)
    require_safe_id("offset_reset.group", cfg.offset_reset.group)
    logs.set_context(job=cfg.offset_reset.group)
    return run_offset_reset(cfg.kafka.bootstrap_servers, cfg.kafka.telemetry_bootstrap_servers,
                            cfg.offset_reset, cfg.telemetry, out=sys.stdout, err=sys.stderr)


def cmd_dev_broker(port: int, data_dir: str | None) -> int:
    import signal
    import threading

    from kafka_backup.cli.devbroker import DevBroker

    broker = DevBroker(port=port, data_dir=data_dir).start()
    print(f"dev-broker: Kafka on {broker.bootstrap} (Ctrl-C stops it)", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5) and broker.running():
        pass
    broker.stop()
    return 0


def with_metrics_output(cfg: Config, command: Callable[[Config], int]) -> int:
    """Run a worker, keeping its events, and write its metrics when it ends, whatever the outcome."""
    from kafka_backup.cli import metrics_output
    from kafka_backup.producers.telemetry import keep_run_events

    metrics_output.check_writable(cfg.run.metrics_output)
    events = keep_run_events()
    try:
        return command(cfg)
    finally:
        if events:  # a run that emitted nothing (refused at its start) leaves the previous file alone
            metrics_output.write(cfg, cfg.run.metrics_output, events)


def long_running(command: str, cfg: Config) -> bool:
    return command in ("aggregate", "exporter", "up") or (command == "backup" and cfg.backup.continuous)


def setup_logging(command: str, cfg: Config) -> dict[str, Any]:
    """One configuration for our loggers, Faust/mode and librdkafka (schemas.logs)."""
    level = cfg.log.level or (logs.LONG_RUNNING_LEVEL if long_running(command, cfg) else logs.ONE_SHOT_LEVEL)
    return logs.configure(level, cfg.log.format)


def _enable_faulthandler() -> None:
    """A crash in a C extension (librdkafka, a codec) prints every thread's Python stack on stderr
    instead of ending the process with nothing said but its exit code."""
    try:
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # stderr is no file (called in-process, captured)
        pass


def main(argv: list[str] | None = None) -> int:
    _enable_faulthandler()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and not argv[0].startswith("-") else None).parse_args(argv)
    logging.basicConfig(level="WARNING", format=logs.TEXT_FORMAT)  # until the configuration is read
    try:
        if args.command == "dev-broker":
            return cmd_dev_broker(args.port, args.data_dir)
        cfg = config_from(args)
        logging_config = setup_logging(args.command, cfg)
        workers = {"backup": cmd_backup, "verify": cmd_verify, "offset-reset": cmd_offset_reset,
                   "restore": lambda c: cmd_restore(c, getattr(args, "restore_dry_run", False))}
        if args.command in workers:  # the commands whose run's metrics --metrics-output writes
            run = workers[args.command]
            return with_metrics_output(cfg, run) if cfg.run.metrics_output else run(cfg)
        if args.command == "aggregate":
            return cmd_aggregate(cfg, logging_config)
        if args.command == "exporter":
            return cmd_exporter(cfg)
        if args.command == "replay":
            from kafka_backup.cli.replay import run_replay

            return run_replay(cfg, args)
        if args.command in ("list", "describe"):
            from kafka_backup.cli.inventory import run_describe, run_list

            return (run_list if args.command == "list" else run_describe)(cfg, args)
        if args.command == "status":
            from kafka_backup.cli.status import run_status

            return run_status(cfg, args)
        if args.command == "up":
            from kafka_backup.cli.up import run_up

            return run_up(cfg, overrides_of(args), getattr(args, "config", None))
    except ConfigError as err:
        print(f"kafka-backup {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a failed run: one line, the details are in the log above
        from kafka_backup.producers.run import JobFailed, JobInterrupted

        if isinstance(err, JobFailed):
            outcome = "interrupted" if isinstance(err, JobInterrupted) else "failed"
            print(f"kafka-backup {args.command}: {outcome}: {err}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
