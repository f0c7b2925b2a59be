"""A scrape's body written straight from the state, redoing only what changed since the last one.

The output is byte for byte what prometheus_client's encoders write for
:meth:`StateCollector.collect` (tests/test_render_cache.py proves it on random histories);
only the work differs:

* **Per-job families** (:class:`~exporter.collector.PerJob`): each job's lines are kept with the
  state value they came from, and reused while the snapshot holds that same value (the state
  reader replaces values, never mutates them, so identity is the test). A family whose samples
  also depend on "now" declares the part of it they read (its ``time_key``: the minute, whether
  the job passed ``stop_after_s``, the rate window's whole-second horizon and divisor); its lines
  are reused while that key is unchanged too.
* **Shared families** (:class:`~exporter.collector.Shared`, one series merged over several jobs):
  each job's contribution is kept with its state value; the merge, in key order as always, is
  redone only when a job changed, appeared, disappeared or expired, else its lines are reused.
* **Everything else** (verification verdicts, telemetry pipelines, the exporter's own counters)
  is small and built on every render.

A family that cannot use the cache (a builder failed for some job, or it holds more than
``max_series_per_family`` samples) is built the uncached way, which logs and counts exactly as
:meth:`StateCollector.collect` does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from kafka_backup.exporter.collector import (
    PerJob,
    Sample,
    Shared,
    StateCollector,
    View,
    new_family,
    rendered,
)
from kafka_backup.exporter.exposition import EOF, FamilyFormat
from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas.state import JobState

Fragment = tuple[str, int] | None  # a job's lines of one family and how many samples; None: its builder failed


class _Job:
    """What was made from one state value."""

    __slots__ = ("fragments", "shares", "state", "timed")

    def __init__(self, state: JobState) -> None:
        self.state = state
        self.fragments: dict[PerJob, Fragment] = {}
        self.timed: dict[PerJob, tuple[Any, Fragment]] = {}
        self.shares: dict[Shared, list | None] = {}


class Renderer:
    """Renders one :class:`StateCollector`; one render at a time (a lock)."""

    def __init__(self, collector: StateCollector) -> None:
        self._collector = collector
        self._jobs: dict[str, _Job] = {}
        self._live: list[bool] = []
        self._shared: dict[Shared, str] = {}  # merged lines, valid until the fleet changes
        self._lock = threading.Lock()

    def render(self, openmetrics: bool = False) -> bytes:
        with self._lock:
            view = self._collector.view()
            jobs, changed = self._refresh(view)
            bodies: dict[cat.Metric, str] = {}
            for m, builder in rendered():
                fmt = _format(m)
                if isinstance(builder, PerJob):
                    body = self._per_job(m, builder, fmt, view, jobs)
                elif isinstance(builder, Shared):
                    body = self._merged(m, builder, fmt, view, changed)
                else:
                    body = None
                bodies[m] = body if body is not None else self._uncached(m, builder, fmt, view)
            out = []
            for m in cat.CATALOGUE:
                body = bodies.get(m)
                if body is not None:
                    fmt = _FORMATS[m]
                    out.append(fmt.om_header if openmetrics else fmt.text_header)
                    out.append(body)
            if openmetrics:
                out.append(EOF)
            return "".join(out).encode()

    def _refresh(self, view: View) -> tuple[list[_Job], bool]:
        """Each job's entry, made anew for a new state value; whether any job changed, came, went or expired."""
        known, changed = self._jobs, False
        entries = []
        for key, (state, _live) in zip(view.keys, view.everyone, strict=True):
            entry = known.get(key)
            if entry is None or entry.state is not state:
                entry = known[key] = _Job(state)
                changed = True
            entries.append(entry)
        if len(known) != len(entries):  # jobs gone from the snapshot
            self._jobs = dict(zip(view.keys, entries, strict=True))
            changed = True
        live = [flag for _, flag in view.everyone]
        if live != self._live:
            self._live, changed = live, True
        if changed:
            self._shared = {}
        return [e for e, flag in zip(entries, live, strict=True) if flag], changed

    def _per_job(self, m: cat.Metric, builder: PerJob, fmt: FamilyFormat, view: View, jobs: list[_Job]) -> str | None:
        kinds, key_of, lines = builder.kinds, builder.time_key, fmt.lines
        parts, count = [], 0
        for entry, state in zip(jobs, view.jobs, strict=True):
            if kinds is not None and state.kind not in kinds:
                continue
            if key_of is None:
                try:
                    fragment = entry.fragments[builder]
                except KeyError:
                    fragment = entry.fragments[builder] = _fragment(m, builder, state, view, lines)
            else:
                try:
                    key = key_of(state, view)
                except Exception:
                    return None
                hit = entry.timed.get(builder)
                if hit is not None and hit[0] == key:
                    fragment = hit[1]
                else:
                    fragment = _fragment(m, builder, state, view, lines)
                    entry.timed[builder] = (key, fragment)
            if fragment is None:
                return None
            parts.append(fragment[0])
            count += fragment[1]
        if count > self._collector.max_series:
            return None
        return "".join(parts)

    def _merged(self, m: cat.Metric, builder: Shared, fmt: FamilyFormat, view: View, changed: bool) -> str | None:
        body = self._shared.get(builder)
        if body is not None:
            return body
        shares = []
        for (state, live), key in zip(view.everyone, view.keys, strict=True):
            entry = self._jobs[key]
            try:
                share = entry.shares[builder]
            except KeyError:
                try:
                    share = list(builder.contribution(state))
                except Exception:
                    share = None
                entry.shares[builder] = share
            if share is None:
                return None
            shares.append((share, live))
        samples = self._collector.family_samples(m, lambda _view: builder.merged(shares), view)
        body = "".join(map(fmt.lines, samples))
        if m.name not in view.dropped_series:
            self._shared[builder] = body
        return body

    def _uncached(self, m: cat.Metric, builder: Callable[[View], Any], fmt: FamilyFormat, view: View) -> str:
        return "".join(map(fmt.lines, self._collector.family_samples(m, builder, view)))


_FORMATS: dict[cat.Metric, FamilyFormat] = {}  # the catalogue's families do not change while running


def _format(m: cat.Metric) -> FamilyFormat:
    fmt = _FORMATS.get(m)
    if fmt is None:
        fmt = _FORMATS[m] = FamilyFormat(m, new_family(m))
    return fmt


def _fragment(m: cat.Metric, builder: PerJob, state: JobState, view: View,
              lines: Callable[[Sample], str]) -> Fragment:
    """One job's lines; None when its builder fails (the family is then built uncached, which logs it)."""
    try:
        samples = list(builder.build(state, view))
        if m.type == "info" and any(len(s[0]) != len(m.labels) for s in samples):
            return None
    except Exception:
        return None
    return "".join(map(lines, samples)), len(samples)
