"""``kafka-backup status``: the fleet at a glance, read straight from the state topic.

No aggregator or exporter process is needed: the command reads the aggregator's state
topic itself and renders rows with the exporter's own collector (``exporter.status``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from kafka_backup.schemas.config import Config, ConfigError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from kafka_backup.exporter import status

# The exporter's collector is imported by the functions that use it: every command's parser
# imports add_arguments from here, and a one-shot backup should not pay for importing it.

STATUS_STYLE = {"OK": "green", "WARN": "yellow", "STALL": "red", "STOP": "red", "ERROR": "bold red"}
READY_TIMEOUT_S = 30.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    p.add_argument("--format", dest="status_format", choices=["table", "json"], default="table",
                   help="table (coloured on a terminal, plain lines otherwise) or json (docs/status.md)")


def run_status(cfg: Config, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from kafka_backup.exporter import status
    from kafka_backup.exporter.state_reader import StateReader

    if not cfg.kafka.bootstrap_servers:
        raise ConfigError("kafka.bootstrap_servers: not set; use --bootstrap-servers (the telemetry cluster)")
    if args.watch is not None and args.watch <= 0:
        raise ConfigError("--watch: give a positive number of seconds")
    backup_id, restore_id = cfg.backup.backup_id or None, cfg.restore.restore_id or None
    reader = StateReader(cfg.kafka.bootstrap_servers, cfg.aggregator.app_id).start()
    try:
        if not reader.ready.wait(READY_TIMEOUT_S):
            raise ConfigError(f"aggregator.app_id: no state topic {reader.topic} could be read on "
                              f"{cfg.kafka.bootstrap_servers} within {READY_TIMEOUT_S:.0f} s; is an aggregator "
                              f"running with --app-id {cfg.aggregator.app_id}?")
        collector_args = dict(throughput_window_s=cfg.aggregator.throughput_window_s,
                              stop_after_s=cfg.metrics.worker_stop_after_s,
                              expire_after_s=cfg.metrics.expire_after_s,
                              max_series_per_family=cfg.metrics.max_series_per_family)

        def current() -> tuple[float, list[status.Row]]:
            now = time.time()
            return now, status.rows(reader.snapshot(), now, backup_id, restore_id, **collector_args)

        if args.watch is None:
            now, selected = current()
            _print(out, args.status_format, now, selected)
            return status.exit_code(selected)
        return _watch(out, args, current)
    finally:
        reader.stop()


def _print(out: TextIO, fmt: str, now: float, selected: list[status.Row]) -> None:
    from kafka_backup.exporter import status
    if fmt == "json":
        out.write(json.dumps(status.as_json(selected, now), indent=2) + "\n")
    elif out.isatty():
        _console(out).print(_table(selected))
    else:
        out.write("\n".join(status.plain_lines(selected)) + ("\n" if selected else ""))
    out.flush()


def _watch(out: TextIO, args: argparse.Namespace, current: Callable[[], tuple[float, list[status.Row]]]) -> int:
    from kafka_backup.exporter import status
    code = status.EXIT_NO_JOB
    try:
        if args.status_format == "table" and out.isatty():
            from rich.live import Live

            with Live(_table([]), console=_console(out), auto_refresh=False) as live:
                while True:
                    _now, selected = current()
                    code = status.exit_code(selected)
                    live.update(_table(selected), refresh=True)
                    time.sleep(args.watch)
        while True:  # json, or not a terminal: a new block each time, nothing redrawn
            now, selected = current()
            code = status.exit_code(selected)
            if args.status_format == "table":
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
                out.write(f"# {stamp}\n")
            _print(out, args.status_format, now, selected)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return code


def _console(out: TextIO) -> Console:
    from rich.console import Console

    return Console(file=out, highlight=False)


def _table(selected: list[status.Row]) -> Table:
    from rich.table import Table

    from kafka_backup.exporter import status

    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in status.COLUMNS:
        table.add_column(name, justify="right" if name in {"RECORDS", "LAG", "RATE/S", "PROGRESS"} else "left")
    for r in selected:
        cells = list(status.cells(r))
        cells[2] = f"[{STATUS_STYLE.get(r.status, 'red')}]{r.status}[/]"
        table.add_row(*cells)
    if not selected:
        table.caption = "no job matches"
    return table
