"""``kafka-backup replay``: the telemetry log folded again offline, metrics at ``--to`` and an audit report.

Runs the live aggregator's fold (``streams.replay``) and the live exporter's
collector (``exporter.collector``) on the log, so a replay of the live period
shows what the live exporter shows.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from kafka_backup.schemas.config import Config, ConfigError, require_safe_id

if TYPE_CHECKING:
    from kafka_backup.streams.replay import Replay

# The fold, the collector and the signing code are imported by the commands that use them, not
# here: every command's parser imports this module's add_arguments, and a one-shot backup (run
# every few minutes by a scheduler) should not pay for importing the exporter.


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="replay_from", metavar="TIME", help="period start: ISO 8601 or epoch ms")
    p.add_argument("--to", dest="replay_to", metavar="TIME", help="period end (exclusive); default: now")
    # --backup-id and --restore-id are the configuration keys backup.backup_id and restore.restore_id
    p.add_argument("--format", choices=["prometheus", "openmetrics", "json"], default="prometheus",
                   help="format of the metrics written to --output (default: prometheus)")
    p.add_argument("--output", default="-", help="metrics as they stood at --to ('-': stdout)")
    p.add_argument("--report-json", help="write the audit report as JSON here")
    p.add_argument("--report-md", help="write the audit report as Markdown here")
    p.add_argument("--input", help="replay a recorded log file instead of reading the telemetry topic")
    p.add_argument("--record", help="also save the log that was read, for a later --input")
    p.add_argument("--sign-key", metavar="PEM", help="sign each report written with this Ed25519 private key "
                   "(REPORT.sig beside it; openssl genpkey -algorithm ed25519 -out key.pem)")
    p.add_argument("--verify-report", metavar="REPORT", help="check REPORT against --signature and --public-key "
                   "instead of replaying; exit 0 when it verifies, 1 when any byte differs")
    p.add_argument("--signature", metavar="SIG", help="with --verify-report: the signature file (default REPORT.sig)")
    p.add_argument("--public-key", metavar="PEM", help="with --verify-report: the signer's Ed25519 public key")


def run_replay(cfg: Config, args: argparse.Namespace) -> int:
    import msgspec

    from kafka_backup.cli import evidence
    from kafka_backup.schemas import signing
    from kafka_backup.schemas.times import parse_time
    from kafka_backup.streams import audit, fold
    from kafka_backup.streams.replay import read_log, read_topic, replay, write_log

    if args.verify_report:
        return _verify_report(args)
    sign_key = evidence.load_private_key(args.sign_key) if args.sign_key else None  # fail before any work
    start = parse_time("--from", args.replay_from)
    until = parse_time("--to", args.replay_to)
    if start is not None and until is not None and start >= until:
        raise ConfigError("--from: must be before --to")
    backup_id, restore_id = cfg.backup.backup_id or None, cfg.restore.restore_id or None
    for field, value in (("backup.backup_id", backup_id), ("restore.restore_id", restore_id)):
        if value:
            require_safe_id(field, value)
    if args.input:
        try:
            with open(args.input, "rb") as fh:
                records = read_log(fh.read())
        except OSError as err:
            raise ConfigError(f"--input: cannot read {args.input}: {err.strerror}") from None
        except msgspec.DecodeError:
            raise ConfigError(f"--input: {args.input} is not a recorded telemetry log") from None
    else:
        if not cfg.kafka.bootstrap_servers:
            raise ConfigError("kafka.bootstrap_servers: not set; use --bootstrap-servers (the telemetry cluster)")
        try:
            records = list(read_topic(cfg.kafka.bootstrap_servers, cfg.telemetry.topic))
        except FileNotFoundError as err:
            raise ConfigError(f"telemetry.topic: {err}") from None
    if args.record:
        with open(args.record, "wb") as fh:
            fh.write(write_log(records))
    result = replay(records, until, fold.Settings.of(cfg.aggregator), signing.load_key(cfg.telemetry.signing_key_file))
    if restore_id:
        result.jobs = {k: v for k, v in result.jobs.items() if v.kind == "restore" and v.job == restore_id}
    elif backup_id:
        bid = backup_id
        result.jobs = {k: v for k, v in result.jobs.items() if v.job == bid or v.backup_id == bid}
    _write(args.output, _metrics(cfg, result, args.format))
    report = audit.build(result, start, backup_id)
    if sign_key is not None and "-" in (args.report_json, args.report_md):
        raise ConfigError("--sign-key: signed reports must go to files (--report-json FILE, --report-md FILE)")
    for path, data in ((args.report_json, audit.to_json(report)),
                       (args.report_md, audit.to_markdown(report).encode() if args.report_md else b"")):
        if path:
            _write(path, data)
            if sign_key is not None:
                _write(path + ".sig", evidence.sign(sign_key, data))
    return 0


def _verify_report(args: argparse.Namespace) -> int:
    from kafka_backup.cli import evidence

    if not args.public_key:
        raise ConfigError("--public-key: required with --verify-report (the signer's Ed25519 public key, PEM)")
    signature = args.signature or args.verify_report + ".sig"
    if evidence.verify_files(args.verify_report, signature, args.public_key):
        print(f"replay: {args.verify_report} verifies against {signature} with {args.public_key}")
        return 0
    print(f"replay: {args.verify_report} does NOT match {signature} with {args.public_key}: "
          "the report changed after it was signed, or another key signed it", file=sys.stderr)
    return 1


def _metrics(cfg: Config, result: Replay, fmt: str) -> bytes:
    import msgspec

    from kafka_backup.exporter.collector import frozen_collector
    from kafka_backup.exporter.renderer import Renderer
    from kafka_backup.streams.replay import snapshot

    now = result.until if result.until != float("inf") else max(
        (s.last_event_ts for s in result.jobs.values()), default=0.0)
    snap = snapshot(result)
    if fmt == "json":
        return msgspec.json.format(msgspec.json.encode(dict(sorted(snap.items())), order="sorted"), indent=2) + b"\n"
    # "now" is --to, not the wall clock: the same replay renders the same bytes tomorrow
    collector = frozen_collector(snap, now, cfg.aggregator.throughput_window_s, cfg.metrics.worker_stop_after_s,
                                 cfg.metrics.max_series_per_family)
    return Renderer(collector).render(openmetrics=fmt == "openmetrics")  # the live exporter's bytes


def _write(path: str, data: bytes) -> None:
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    with open(path, "wb") as fh:
        fh.write(data)
