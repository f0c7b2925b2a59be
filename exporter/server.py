"""HTTP endpoint for Prometheus: the metrics path, /health, nothing else.

Rendering is cached per format for ``update_interval_ms`` so that many
scrapers (or an impatient curl loop) cost one render per interval, and the
registry holds only the state collector: process metrics of the exporter
itself would be mistaken for the backup's.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from exporter.collector import StateCollector
from schemas.config import Config, ConfigError

log = logging.getLogger("kafka_backup.exporter")

HEALTH_PATH = "/health"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    app: MetricsServer


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "kafka-backup-exporter"

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        status, body, ctype = self.server.app.respond(urlsplit(self.path).path, self.headers.get("Accept", ""))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature inherited
        """Scrapes every few seconds would drown the exporter's own messages."""


TEXT = "text/plain; charset=utf-8"


class MetricsServer:
    """Binds on construction (so a busy port fails before anything starts); serves after :meth:`start`."""

    def __init__(
        self,
        bind: str,
        port: int,
        path: str,
        collector: Collector,
        update_interval_ms: int,
        ready_fn: Callable[[], bool],
    ) -> None:
        self.path = path
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(collector)
        self._interval = update_interval_ms / 1000
        self._ready = ready_fn
        self._cache: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()
        cls = _HTTPServer6 if ":" in bind else _HTTPServer
        self._httpd = cls((bind, port), _Handler)
        self._httpd.app = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    def respond(self, path: str, accept: str) -> tuple[int, bytes, str]:
        if path == self.path:
            return self._metrics(accept)
        if path == HEALTH_PATH:
            return (200, b"ok\n", TEXT) if self._ready() else (503, b"catching up\n", TEXT)
        return 404, b"not found\n", TEXT

    def _metrics(self, accept: str) -> tuple[int, bytes, str]:
        try:
            body, ctype = self.render(accept)
        except Exception:
            log.exception("rendering metrics failed")
            return 500, b"rendering metrics failed\n", TEXT
        return 200, body, ctype

    def render(self, accept: str) -> tuple[bytes, str]:
        """The lock also makes concurrent scrapes wait for one render instead of each doing it."""
        encoder, ctype = choose_encoder(accept)
        with self._lock:
            now = time.monotonic()
            hit = self._cache.get(ctype)
            if hit is not None and now - hit[0] < self._interval:
                return hit[1], ctype
            body = encoder(self._registry)
            self._cache[ctype] = (now, body)
        return body, ctype


def serve(cfg: Config, reader) -> MetricsServer:
    """Start serving ``reader``'s state as configured; a busy port is a configuration mistake."""
    m = cfg.metrics
    collector = StateCollector(reader.snapshot, cfg.aggregator.throughput_window_s,
                               stop_after_s=cfg.metrics.worker_stop_after_s,
                               expire_after_s=cfg.metrics.expire_after_s,
                               max_series_per_family=cfg.metrics.max_series_per_family)
    try:
        server = MetricsServer(m.bind, m.port, m.path, collector, m.update_interval_ms, reader.ready.is_set)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"metrics.port: {m.port} is in use on {m.bind}; choose another with --port") from None
        raise ConfigError(f"metrics.bind: cannot listen on {m.bind}:{m.port}: {err.strerror or err}") from None
    return server.start()
