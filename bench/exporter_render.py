"""Scrape cost of the exporter as the fleet grows, measured side by side in one run.

Builds N backup jobs of P partitions each (folded from real events), then times, against
prometheus_client's ``generate_latest`` over the same number of plain Gauge series (the
library's own cost on this machine, measured in the same run):

* ``uncached``: a render by a new renderer, nothing reused (a restarted exporter's first scrape);
* ``nothing changed``: the next render, the clock 0.5 s later (``metrics.update_interval_ms``);
* ``1% changed``: 1% of the jobs hold a new state value (a new decoded object, as the state
  reader hands a changed key over), the clock 0.5 s later;
* prometheus_client's encoders over ``StateCollector.collect()`` (what the exporter did before);

then the same for 10x the jobs, and the renderer's memory (tracemalloc) per 10,000 series.
Ratios, not thresholds: absolute times drift on a shared machine.

    python bench/exporter_render.py [jobs] [partitions]     (default 100 x 20: 10,101 series)
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from kafka_backup.exporter.collector import StateCollector
from kafka_backup.exporter.renderer import Renderer
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.state import decode_state, encode_state
from kafka_backup.streams import fold

T0 = 1_790_000_000.0
START = T0 + 100  # the jobs are older than the rate window, as in a running fleet


def states(jobs: int, partitions: int) -> dict:
    out = {}
    for j in range(jobs):
        w = dict(worker=f"w{j}", job=f"job-{j}")
        s = fold.apply(None, ev.JobStarted(**w, seq=1, ts=T0, mode="continuous"))
        s = fold.apply(s, ev.Progress(**w, seq=2, ts=T0 + 1, fetches=2,
                                      partitions=[ev.PartitionProgress("t", p, 100, 150, int(T0 * 1000), int(T0 * 1000) + 5)
                                                  for p in range(partitions)],
                                      consumed=[ev.TopicConsumed("t", 50 * partitions, 5000 * partitions)]))
        for p in range(partitions):
            s = fold.apply(s, ev.SegmentStored(**w, seq=3 + p, ts=T0 + 2, topic="t", partition=p, start_offset=0,
                                               end_offset=100, records=100, bytes=10_000, uncompressed_bytes=12_000,
                                               stored_bytes=3_000, algorithm="zstd"))
        out[f"backup:job-{j}"] = decode_state(encode_state(s))
    return out


def best_of(fn, repeats: int = 5, setup=lambda: None) -> float:
    best = float("inf")
    for _ in range(repeats):
        setup()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class Fleet:
    """A snapshot and a clock that moves 0.5 s per render."""

    def __init__(self, jobs: int, partitions: int) -> None:
        self.snap = states(jobs, partitions)
        self.now = START
        self.collector = StateCollector(lambda: self.snap, clock=lambda: self.now, max_series_per_family=10**9)

    def tick(self) -> None:
        self.now += 0.5

    def change(self, share: float) -> None:
        """``share`` of the jobs get a new state value (same content, a new object: the renderer cannot
        tell, so it costs what a real change costs)."""
        keys = sorted(self.snap)
        step = max(1, round(1 / share))
        for key in keys[::step]:
            self.snap[key] = decode_state(encode_state(self.snap[key]))
        self.tick()


def plain(series: int) -> CollectorRegistry:
    baseline = CollectorRegistry()
    gauge = Gauge("baseline_series", "same number of plain samples", ["i"], registry=baseline)
    for i in range(series):
        gauge.labels(str(i)).set(i)
    return baseline


def measure(jobs: int, partitions: int, openmetrics: bool = False, repeats: int = 5) -> dict:
    fleet = Fleet(jobs, partitions)
    text = Renderer(fleet.collector).render()
    series = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
    baseline = plain(series)
    encode = generate_openmetrics if openmetrics else generate_latest
    t_base = best_of(lambda: encode(baseline), repeats)
    t_cold = best_of(lambda: Renderer(fleet.collector).render(openmetrics), repeats, fleet.tick)
    warm = Renderer(fleet.collector)
    warm.render(openmetrics)
    t_same = best_of(lambda: warm.render(openmetrics), repeats, fleet.tick)
    t_one = best_of(lambda: warm.render(openmetrics), repeats, lambda: fleet.change(0.01))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(fleet.collector)
    t_old = best_of(lambda: encode(registry), max(1, repeats // 2), fleet.tick)
    return dict(series=series, kib=len(text) / 1024, base=t_base, cold=t_cold, same=t_same, one=t_one, old=t_old)


def memory_per_10k(jobs: int, partitions: int) -> tuple[float, int]:
    fleet = Fleet(jobs, partitions)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    renderer = Renderer(fleet.collector)
    body = renderer.render()
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    del body
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert renderer is not None
    return kept / series * 10_000, series


def row(label: str, t: float, r: dict) -> str:
    return (f"  {label:<34} {t * 1000:8.1f} ms  {t / r['series'] * 1e6:5.2f} us/series"
            f"  {t / r['base']:5.2f}x plain")


def report(jobs: int, partitions: int, openmetrics: bool, repeats: int) -> None:
    r = measure(jobs, partitions, openmetrics, repeats)
    fmt = "OpenMetrics" if openmetrics else "Prometheus text"
    print(f"{jobs} jobs x {partitions} partitions = {r['series']} series ({r['kib']:.0f} KiB), {fmt}")
    print(row("prometheus_client, plain Gauges", r["base"], r))
    print(row("ours, uncached (new renderer)", r["cold"], r))
    print(row("ours, nothing changed", r["same"], r))
    print(row("ours, 1% of jobs changed", r["one"], r))
    print(row("before: encoders over collect()", r["old"], r))


def main() -> None:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    partitions = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    report(jobs, partitions, False, 7)
    report(jobs, partitions, True, 7)
    report(jobs * 10, partitions, False, 3)
    kept, series = memory_per_10k(jobs, partitions)
    print(f"renderer memory (tracemalloc, {series} series): {kept / 1024:.0f} KiB per 10,000 series")


if __name__ == "__main__":
    main()
