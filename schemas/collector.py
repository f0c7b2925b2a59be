"""The garbage collector as every stage's long loops want it: what start-up built, frozen out of its
walks, and young objects collected every ``GC_THRESHOLD`` allocations instead of Python's 700.

The loops allocate container objects by the thousand, nearly all freed by their reference counts: a
backup's fetched messages, their rows and headers lists; a restore's or a verify's decoded records; the
aggregator's events and the envelopes Faust wraps them in. At the default threshold the collector ran
several times a batch, each time walking what the batch still held: 6-9% of a backup's run
(bench/alternate.py), a 50,000-record segment decoded at 1,155 ns a record against 438 (its records,
alive until the segment is done, walked again and again as they aged through the generations), and
single-event telemetry folded at 11,713 events/s against 14,239 (bench/aggregator.py). Cyclic garbage
(asyncio's futures and tracebacks make some) is still collected, every ``GC_THRESHOLD`` allocations.
"""

from __future__ import annotations

import gc

GC_THRESHOLD = 20_000  # allocations of container objects between two collections of the youngest generation


def collect_rarely() -> None:
    """Freeze what exists now (modules, configuration, clients: they live as long as the process) and
    collect young objects every ``GC_THRESHOLD`` allocations; the older generations' thresholds stay."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
