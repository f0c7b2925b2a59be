"""The three simulated weeks of ``test_longrun_unit``, judged by Prometheus itself.

Every hourly render of the real collector becomes OpenMetrics samples with their timestamps,
``promtool tsdb create-blocks-from openmetrics`` backfills them into a TSDB, and Debian's
Prometheus, started on that data, answers: ``resets()`` of every counter-like series is 0, and
``increase()`` over the three weeks equals what the renders hold from first to last.
"""

from __future__ import annotations

import math
import random
import subprocess

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest

from kafka_backup.exporter.collector import StateCollector
from tests.conftest import wait_for
from tests.test_exposition_e2e import PROMTOOL, needs_prometheus, real_prometheus
from tests.test_longrun_unit import COUNTER_SUFFIXES, EXPIRE_AFTER_S, T0, simulate

pytestmark = pytest.mark.e2e

COUNTERS = '{__name__=~"kafka_.+(_total|_count|_sum|_bucket)"}'


class Merged:
    """Families of many renders, each sample stamped with its render's time, in OpenMetrics order:
    per family, per metric (label set without ``le`` or the state set's label), by time."""

    def __init__(self) -> None:
        self.families: dict[str, object] = {}
        self.points: dict[str, dict[tuple, list]] = {}

    def add(self, families, ts: float) -> None:
        for fam in families:
            if fam.name not in self.families:
                self.families[fam.name] = fam
                self.points[fam.name] = {}
            for s in fam.samples:
                metric = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("le", fam.name)))
                self.points[fam.name].setdefault(metric, []).append(s._replace(timestamp=ts))

    def collect(self):
        for name, fam in self.families.items():
            fam.samples = [s for metric in sorted(self.points[name]) for s in self.points[name][metric]]
            if fam.samples:
                yield fam


@needs_prometheus
def test_prometheus_finds_no_reset_and_exact_increases_over_three_simulated_weeks(tmp_path):
    merged, first, last = Merged(), {}, {}
    start = end = None
    for now, fleet in simulate(random.Random(11)):
        if (now - T0) % 3600:
            continue  # hourly
        snap = fleet.snapshot()
        families = list(StateCollector(lambda s=snap: s, clock=lambda t=now: t, expire_after_s=EXPIRE_AFTER_S)
                        .collect())
        merged.add(families, now)
        for fam in families:
            for s in fam.samples:
                if s.name.endswith(COUNTER_SUFFIXES):
                    key = (s.name, tuple(sorted(s.labels.items())))
                    first.setdefault(key, (now, s.value))
                    last[key] = (now, s.value)
        start = start if start is not None else now
        end = now
    registry = CollectorRegistry(auto_describe=False)
    registry.register(merged)
    (tmp_path / "weeks.om").write_bytes(generate_latest(registry))
    data = tmp_path / "prometheus-data"
    r = subprocess.run([PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", str(tmp_path / "weeks.om"),
                        str(data)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

    with real_prometheus(tmp_path, "", "--storage.tsdb.retention.time=100y") as query:
        span = f"{int(end - start) + 1}s"  # the range starts 1 s before the first sample

        def loaded():
            got = query(f"count({COUNTERS})", at=end)["data"]["result"]
            return got and int(float(got[0]["value"][1])) > 0 and got

        counted = wait_for(loaded, 60, what="Prometheus to load the backfilled blocks")
        assert int(float(counted[0]["value"][1])) == sum(1 for key in last if last[key][0] == end)
        names = sorted({name for name, _ in last})
        for name in names:  # one name at a time: resets() drops the name, and label sets repeat across names
            answer = query(f"resets({name}[{span}]) > 0", at=end)
            assert answer.get("status") == "success", answer
            assert answer["data"]["result"] == [], (name, answer["data"]["result"][:3])
        checked = 0
        for (name, labels), (t_last, v_last) in last.items():
            t_first, v_first = first[(name, labels)]
            if t_last != end or t_first == t_last:
                continue
            selector = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"
            own_span = f"{int(end - t_first) + 1}s"  # from 1 s before this series' own first sample
            got = query(f"increase({selector}[{own_span}])", at=end)["data"]["result"]
            assert got, selector
            value = float(got[0]["value"][1])
            # extrapolation over the 1 s before the first sample: a relative error below 1e-5
            assert math.isclose(value, v_last - v_first, rel_tol=1e-5, abs_tol=1e-9), (selector, value)
            checked += 1
        assert checked > 50
