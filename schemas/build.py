"""What this process is built from: ``kafka-backup --version`` and the exporter's
``kafka_backup_build_info`` gauge say the same."""

from __future__ import annotations

import importlib.metadata
import platform

from kafka_backup.schemas import __version__


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_info() -> dict[str, str]:
    """Label values of ``kafka_backup_build_info`` (no import of the libraries themselves: cheap)."""
    return {"version": __version__, "python": platform.python_version(),
            "faust": _dist_version("faust-streaming"), "confluent_kafka": _dist_version("confluent-kafka")}
