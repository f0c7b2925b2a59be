"""``kafka-backup list`` and ``kafka-backup describe``: what a storage location holds (docs/inventory.md)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO, TypeVar

from kafka_backup.producers import inventory, layout
from kafka_backup.producers.storage import Storage, StorageError, open_backend
from kafka_backup.schemas.config import Config, require_safe_id

if TYPE_CHECKING:
    from rich.table import Table

T = TypeVar("T")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", dest="inventory_format", choices=["table", "json"], default="table",
                   help="a table for people, or JSON (docs/inventory.md) for scripts")


def _storage(cfg: Config) -> Storage:
    return Storage(open_backend(cfg.backup.storage, cfg.backup.s3_endpoint_url))


def _read(command: str, fn: Callable[[], T]) -> T | None:
    """Run ``fn``; a storage failure is a one-line configuration error, unreadable metadata exit 1."""
    try:
        return fn()
    except StorageError as err:
        raise inventory.storage_failure(err, "backup.storage") from None
    except layout.MetadataError as err:
        print(f"kafka-backup {command}: {err}", file=sys.stderr)
        return None


def run_list(cfg: Config, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    storage = _storage(cfg)
    found = _read("list", lambda: list(inventory.summaries(storage)))
    if found is None:
        return 1
    if args.inventory_format == "json":
        out.write(inventory.as_json({"backups": found}).decode() + "\n")
        return 0
    table = _table("BACKUP", "TOPICS", "PARTITIONS", "RECORDS", "BYTES", "STORED", "OLDEST RECORD",
                   "NEWEST RECORD", "LAST RUN", "STATUS")
    for b in found:
        run = b.last_run
        table.add_row(b.backup_id, ",".join(b.topics), str(b.partitions), f"{b.records:,}", _size(b.bytes),
                      _size(b.stored_bytes), _ms(b.oldest_record_ts), _ms(b.newest_record_ts),
                      _s(run.ended_ts or run.started_ts) if run else "-", run.status if run else "-")
    _print(out, table, "no backup in this storage" if not found else "")
    return 0


def run_describe(cfg: Config, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    require_safe_id("backup.backup_id", cfg.backup.backup_id)
    storage = _storage(cfg)
    doc = _read("describe", lambda: inventory.describe(storage, cfg.backup.backup_id, cfg.backup.storage))
    if doc is None:
        return 1
    if args.inventory_format == "json":
        out.write(inventory.as_json(doc).decode() + "\n")
        return 0
    s = doc.summary
    run = s.last_run
    out.write(f"backup {s.backup_id}: {len(s.topics)} topic(s), {s.partitions} partitions, {s.records:,} records, "
              f"{_size(s.bytes)} ({_size(s.stored_bytes)} stored), records {_ms(s.oldest_record_ts)} .. "
              f"{_ms(s.newest_record_ts)}, layout {s.layout_version}\n")
    if run:
        out.write(f"last run: {run.status} ({run.mode}), started {_s(run.started_ts)}"
                  + (f", ended {_s(run.ended_ts)}" if run.ended_ts else "") + "\n")
    v = doc.last_verification
    out.write(f"last verification: {_s(v.ts)}: {v.segments} segments, {v.bad} bad, {v.gaps} gaps"
              + (f", {v.unverified} without a digest" if v.unverified else "") + "\n" if v
              else "last verification: never (kafka-backup verify)\n")
    table = _table("TOPIC", "PARTITION", "OFFSETS", "GAPS", "RECORDS", "BYTES", "OLDEST RECORD", "NEWEST RECORD",
                   "COMPRESSION", "SEGMENTS")
    for p in doc.partitions:
        table.add_row(p.topic, str(p.partition), ",".join(f"{r.start}-{r.end}" for r in p.ranges) or "-",
                      ",".join(f"{g.start}-{g.end}" for g in p.gaps) or "-", f"{p.records:,}", _size(p.bytes),
                      _ms(p.oldest_record_ts), _ms(p.newest_record_ts), ",".join(p.compression) or "-",
                      str(p.segments))
    _print(out, table)
    return 0


def _table(*columns: str) -> Table:
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for c in columns:
        table.add_column(c, justify="right" if c in {"PARTITIONS", "RECORDS", "BYTES", "STORED", "SEGMENTS"}
                         else "left", no_wrap=True)
    return table


def _print(out: TextIO, table: Table, caption: str = "") -> None:
    from rich.console import Console

    if caption:
        table.caption = caption
    Console(file=out, highlight=False, width=None if out.isatty() else 250).print(table)


def _size(n: int) -> str:
    size: float = n
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def _s(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ms(ts: int | None) -> str:
    return "-" if ts is None else _s(ts / 1000)
