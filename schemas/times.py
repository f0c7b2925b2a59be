"""Times given on the command line: ISO 8601 (a zone-less time is UTC) or epoch milliseconds."""

from __future__ import annotations

import datetime as dt

from kafka_backup.schemas.config import ConfigError


def parse_time(field: str, value: str | int | None) -> float | None:
    """ISO 8601 (``2026-01-31T00:00:00Z``; a zone-less time is UTC) or epoch milliseconds, to epoch seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, int) or value.lstrip("-").isdigit():
        return int(value) / 1000
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{field}: {value!r} is neither ISO 8601 (2026-01-31T00:00:00Z) nor epoch ms") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()
