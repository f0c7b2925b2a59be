"""Scrape cost of the exporter as the fleet grows, measured side by side in one run.

Builds N backup jobs of P partitions each (folded from real events), then times a
full render in Prometheus text and in OpenMetrics, and compares with the same
number of samples held in plain prometheus_client Gauges (the library's own
baseline on this machine). Prints per-series costs and ratios, not thresholds:
absolute times drift on a shared machine.

    python bench/exporter_render.py [jobs] [partitions]
"""

from __future__ import annotations

import sys
import time

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from kafka_backup.exporter.collector import StateCollector
from kafka_backup.schemas import events as ev
from kafka_backup.streams import fold

T0 = 1_790_000_000.0


def states(jobs: int, partitions: int) -> dict:
    out = {}
    for j in range(jobs):
        w = dict(instance=f"w{j}", job=f"job-{j}")
        s = fold.apply(None, ev.JobStarted(**w, seq=1, ts=T0, mode="continuous"))
        s = fold.apply(s, ev.Progress(**w, seq=2, ts=T0 + 1, fetches=2,
                                      partitions=[ev.PartitionProgress("t", p, 100, 150, T0 * 1000, T0 * 1000 + 5)
                                                  for p in range(partitions)],
                                      consumed=[ev.TopicConsumed("t", 50 * partitions, 5000 * partitions)]))
        for p in range(partitions):
            s = fold.apply(s, ev.SegmentStored(**w, seq=3 + p, ts=T0 + 2, topic="t", partition=p, start_offset=0,
                                               end_offset=100, records=100, bytes=10_000, uncompressed_bytes=12_000,
                                               stored_bytes=3_000, algorithm="zstd"))
        out[f"backup:job-{j}"] = s
    return out


def best_of(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    partitions = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    snap = states(jobs, partitions)
    ours = CollectorRegistry(auto_describe=False)
    ours.register(StateCollector(lambda: snap, clock=lambda: T0 + 3, max_series_per_family=10**9))
    text = generate_latest(ours)
    series = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
    baseline = CollectorRegistry()
    gauge = Gauge("baseline_series", "same number of plain samples", ["i"], registry=baseline)
    for i in range(series):
        gauge.labels(str(i)).set(i)
    t_text = best_of(lambda: generate_latest(ours))
    t_om = best_of(lambda: generate_openmetrics(ours))
    t_base = best_of(lambda: generate_latest(baseline))
    print(f"{jobs} jobs x {partitions} partitions = {series} series, {len(text) / 1024:.0f} KiB of text")
    print(f"  exporter, Prometheus text : {t_text * 1000:7.1f} ms  ({t_text / series * 1e6:.1f} us/series)")
    print(f"  exporter, OpenMetrics     : {t_om * 1000:7.1f} ms  ({t_om / series * 1e6:.1f} us/series)")
    print(f"  plain Gauge, same count   : {t_base * 1000:7.1f} ms  ({t_base / series * 1e6:.1f} us/series)")
    print(f"  ratio exporter/plain: {t_text / t_base:.2f}x (state folding and derived gauges included);"
          f" OpenMetrics/text: {t_om / t_text:.2f}x")
    print("  renders are cached for metrics.update_interval_ms, so this is paid at most once per interval")


if __name__ == "__main__":
    main()
