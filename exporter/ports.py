"""What the exporter's endpoint and ``kafka-backup status`` need from a state reader.

:class:`kafka_backup.exporter.state_reader.StateReader` (the state topic mirrored into memory) is
the one implementation; tests pass small fakes. Written as Protocols so neither side imports the
other's class and mypy checks that the reader still offers what its users call.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


class StateSource(Protocol):
    """A copy of the aggregator's state: one value per state key (``JobState``, ``PipelineState``)."""

    @property
    def ready(self) -> threading.Event:
        """Set once the copy has caught up with the state topic (until then /metrics answers 503)."""
        ...

    def snapshot(self) -> Mapping[str, Any]:
        """The values now; the caller may keep it (values are replaced, never mutated)."""
        ...


@runtime_checkable
class ProvenCurrent(Protocol):
    """A state source that can say how long ago its copy was last proven complete (the readiness
    bound ``metrics.ready_max_state_age_s`` and ``kafka_backup_exporter_state_age_seconds``)."""

    def state_age(self, now: float | None = None) -> float | None:
        """Seconds since the copy last held the whole topic (at ``now``, default the wall clock); None before."""
        ...


@runtime_checkable
class CountsUndecodable(Protocol):
    """A state source that counts the values it could not read, by reason
    (``kafka_backup_exporter_undecodable_state_values_total``)."""

    def undecodable_counts(self) -> dict[str, int]:
        """Values refused so far, by reason (``newer_version``, ``malformed``, ``no_key``)."""
        ...


@runtime_checkable
class CountsChanges(Protocol):
    """A state source that says when its values may have changed: the endpoint renders a changed
    state at the next scrape instead of serving the cached body for ``metrics.update_interval_ms``."""

    def changes(self) -> int:
        """Grows whenever a value may have changed; equal counts mean equal snapshots."""
        ...
