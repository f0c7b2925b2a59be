"""HTTP endpoint for Prometheus: the metrics path, /health, nothing else.

Rendering is cached per format for ``update_interval_ms`` so that many
scrapers (or an impatient curl loop) cost one render per interval, and the
registry holds only the state collector: process metrics of the exporter
itself would be mistaken for the backup's.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import ipaddress
import logging
import socket
import ssl
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
        app = self.server.app
        path = urlsplit(self.path).path
        if path != HEALTH_PATH and not app.authorized(self.headers.get("Authorization", "")):
            status, body, ctype = 401, b"unauthorized\n", TEXT
        else:
            status, body, ctype = app.respond(path, self.headers.get("Accept", ""))
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="kafka-backup"')
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
        tls: ssl.SSLContext | None = None,
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        self.path = path
        self._auth = basic_auth
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(collector)
        self._interval = update_interval_ms / 1000
        self._ready = ready_fn
        self._cache: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()
        cls = _HTTPServer6 if ":" in bind else _HTTPServer
        self._httpd = cls((bind, port), _Handler)
        self._httpd.app = self
        if tls is not None:
            # handshake in the handler thread, not in the accept loop, so one slow client cannot block others
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True, do_handshake_on_connect=False)
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

    def authorized(self, header: str) -> bool:
        """Basic auth against a SHA-256 digest: the password itself is never stored in the config."""
        if self._auth is None:
            return True
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(token, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        digest = hashlib.sha256(password.encode()).hexdigest()
        return hmac.compare_digest(user, self._auth[0]) & hmac.compare_digest(digest, self._auth[1].lower())

    def respond(self, path: str, accept: str) -> tuple[int, bytes, str]:
        if path == self.path:
            if not self._ready():
                # Re-reading the state topic meets older values of a key before newer ones: serving
                # them would show counters going down. Nothing until the copy is at least as new as
                # the table was when this process started, so no scrape is older than a previous one.
                return 503, b"catching up with the state topic\n", TEXT
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
    tls, auth = _tls(m), _basic_auth(m)
    if auth is None and not _is_loopback(m.bind):
        log.warning("metrics endpoint on %s has no authentication; set metrics.basic_auth_* or keep it on "
                    "127.0.0.1 behind a proxy", m.bind)
    try:
        server = MetricsServer(m.bind, m.port, m.path, collector, m.update_interval_ms, reader.ready.is_set,
                               tls, auth)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"metrics.port: {m.port} is in use on {m.bind}; choose another with --port") from None
        raise ConfigError(f"metrics.bind: cannot listen on {m.bind}:{m.port}: {err.strerror or err}") from None
    return server.start()


def _is_loopback(bind: str) -> bool:
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return bind == "localhost"


def _tls(m) -> ssl.SSLContext | None:
    if not (m.tls_cert_file or m.tls_key_file):
        return None
    if not (m.tls_cert_file and m.tls_key_file):
        missing = "metrics.tls_key_file" if m.tls_cert_file else "metrics.tls_cert_file"
        raise ConfigError(f"{missing}: TLS needs both a certificate and a key file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(m.tls_cert_file, m.tls_key_file)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"metrics.tls_cert_file: cannot load {m.tls_cert_file} / {m.tls_key_file}: "
                          f"{getattr(err, 'strerror', None) or err}") from None
    return ctx


def _basic_auth(m) -> tuple[str, str] | None:
    if not (m.basic_auth_username or m.basic_auth_password_sha256):
        return None
    if not m.basic_auth_username:
        raise ConfigError("metrics.basic_auth_username: required with metrics.basic_auth_password_sha256")
    digest = m.basic_auth_password_sha256.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError("metrics.basic_auth_password_sha256: expected 64 hex digits "
                          "(printf %s \"$PASSWORD\" | sha256sum)")
    return m.basic_auth_username, digest
