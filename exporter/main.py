"""The exporter process: state reader plus HTTP server, until SIGINT or SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading

from kafka_backup.exporter.server import serve
from kafka_backup.exporter.state_reader import StateReader
from kafka_backup.exporter.telemetry_lag import TelemetryLag
from kafka_backup.schemas.config import Config, ConfigError, flag_for


def run(cfg: Config) -> None:
    if not cfg.kafka.bootstrap_servers:
        raise ConfigError(
            "kafka.bootstrap_servers: required: the cluster holding the state topic "
            f"(set it in the YAML file or with {flag_for('kafka.bootstrap_servers')})"
        )
    if not cfg.metrics.enabled:
        sys.stdout.write("exporter: metrics.enabled is false; not serving (set it true to serve /metrics)\n")
        return
    reader = StateReader(cfg.kafka.bootstrap_servers, cfg.aggregator.app_id)
    # the aggregator's consumer group is its app id (Faust's default)
    lag = TelemetryLag(cfg.kafka.bootstrap_servers, cfg.aggregator.app_id, cfg.telemetry.topic)
    server = serve(cfg, reader, lag.lags)  # binds first: a busy port must fail before the reader starts
    reader.start()
    lag.start()
    try:
        sys.stdout.write(f"exporter: serving http://{cfg.metrics.bind}:{server.port}{cfg.metrics.path}\n")
        sys.stdout.flush()
        wait_for_signal()
    finally:
        server.shutdown()
        lag.stop()
        reader.stop()


def wait_for_signal() -> None:
    """Turn SIGINT/SIGTERM into a clean return, so shutdown runs the same way for both."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
