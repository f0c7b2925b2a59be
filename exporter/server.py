"""HTTP endpoint for Prometheus: the metrics path, probes, a landing page, nothing else.

Paths: ``/`` (a landing page linking the others), ``/-/healthy`` (the process answers: for a
liveness probe), ``/-/ready`` (the state copy has caught up and was proven current within
``metrics.ready_max_state_age_s``: for a readiness probe; ``/health`` is the same, kept for
existing checks) and ``metrics.path``. Only ``metrics.path`` asks for credentials: probes and the
landing page reveal nothing and must answer a kubelet that has none. Metrics are gzipped when the
client accepts it (Prometheus always does); the compressed body is cached with the render.

Rendering is cached per format so that many scrapers (or an impatient curl loop)
cost one render per interval: for ``update_interval_ms`` while the state is unchanged
(only time-dependent values such as ages would differ), for ``CHANGED_RENDER_S`` once the
state reader has applied a new value (a changelog write shows at the next scrape instead
of up to an interval later). The
registry holds only the state collector: process metrics of the exporter
itself would be mistaken for the backup's.

Connections live on one asyncio event loop, not one thread each: a client that
connects and then says nothing (or never finishes its TLS handshake) costs a
socket until ``metrics.header_timeout_s``, never a thread, and at most
``metrics.max_connections`` are open (when full, the oldest connection still
sending its request is closed for the new one, so idle clients cannot lock a
scraper out). Rendering and password checks (bcrypt is slow on purpose) run in
a small thread pool, so the loop keeps accepting while they work. Each
connection serves one request (HTTP/1.0 semantics, as before).
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import gzip
import hashlib
import hmac
import http
import http.client
import io
import ipaddress
import logging
import re
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import bcrypt
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from kafka_backup.exporter.collector import EndpointCounters, StateCollector
from kafka_backup.exporter.ports import CountsChanges, CountsUndecodable, ProvenCurrent, StateSource
from kafka_backup.exporter.renderer import Renderer
from kafka_backup.exporter.webconfig import CachedBasicAuth, WebConfig
from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas.config import HEALTH_PATH, Config, ConfigError, MetricsConfig

log = logging.getLogger("kafka_backup.exporter")

TEXT = "text/plain; charset=utf-8"
MAX_HEADER_BYTES = 16 * 1024  # request line and headers; a scrape sends a few hundred bytes
BACKLOG = 1024
WORKER_THREADS = 2  # renders (one at a time, cached) and password checks
FAILED_LOGIN_LOG_INTERVAL_S = 10.0
FD_HEADROOM = 256  # files beyond the connections: the Kafka client, logs, the listening socket
HEALTHY_PATH = "/-/healthy"  # liveness: the process answers (Prometheus' own convention)
READY_PATH = "/-/ready"  # readiness: caught up and current; HEALTH_PATH is an alias
OPEN_PATHS = ("/", HEALTHY_PATH, READY_PATH, HEALTH_PATH)  # answered without credentials
GZIP_LEVEL = 6
CHANGED_RENDER_S = 0.1  # a changed state is rendered at most this often (a client hammering a busy fleet)
LANDING = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>kafka-backup exporter</title></head>
<body><h1>kafka-backup exporter</h1>
<p>Telemetry of Kafka backups and restores, from the aggregator's state topic.</p>
<ul>
<li><a href="{path}">{path}</a> metrics (Prometheus text, OpenMetrics by Accept header)</li>
<li><a href="/-/healthy">/-/healthy</a> liveness: the process answers</li>
<li><a href="/-/ready">/-/ready</a> readiness: the state is caught up and current (also <a href="/health">/health</a>)</li>
</ul></body></html>
"""


class BasicAuth(CachedBasicAuth):
    """One user, its password as a bcrypt hash (or, deprecated, an unsalted SHA-256 digest)."""

    def __init__(self, username: str, bcrypt_hash: bytes | None = None, sha256_hex: str | None = None) -> None:
        super().__init__()
        self._user = username.encode("utf-8")
        self._bcrypt = bcrypt_hash
        self._sha256 = sha256_hex.encode() if sha256_hex else None

    def _verify(self, user: bytes, password: bytes) -> str | None:
        user_ok = hmac.compare_digest(user, self._user)
        password_ok = self._password_ok(password)  # checked even for a wrong user: same time either way
        if not user_ok:
            return "unknown_user"
        return None if password_ok else "wrong_password"

    def _password_ok(self, password: bytes) -> bool:
        if self._bcrypt is not None:
            try:
                return bcrypt.checkpw(password, self._bcrypt)
            except ValueError:  # bcrypt >= 5 refuses passwords longer than 72 bytes
                return False
        assert self._sha256 is not None
        return hmac.compare_digest(hashlib.sha256(password).hexdigest().encode(), self._sha256)


class _FailedLogins:
    """One log line per interval at most, saying how many were not logged: a password-guessing
    client must not fill the disk."""

    def __init__(self, interval_s: float = FAILED_LOGIN_LOG_INTERVAL_S) -> None:
        self._interval = interval_s
        self._last = float("-inf")
        self._unlogged = 0

    def note(self, reason: str, peer: str) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._unlogged += 1
            return
        more = f"; {self._unlogged} more refused since the last message" if self._unlogged else ""
        log.warning("metrics endpoint: refused credentials from %s (%s)%s; counted in %s",
                    peer, reason, more, cat.EXPORTER_AUTH_FAILURES.name)
        self._last, self._unlogged = now, 0


class _Rendered:
    """One format's cached body, with the state's change count it was rendered at."""

    __slots__ = ("at", "body", "changes", "gzipped")

    def __init__(self, at: float, changes: int, body: bytes) -> None:
        self.at, self.changes, self.body = at, changes, body
        self.gzipped: bytes | None = None  # made once, for the first scraper that asks for it

    def fresh(self, now: float, changes: int, interval: float, changed_interval: float) -> bool:
        age = now - self.at
        return age < (interval if changes == self.changes else changed_interval)


class _Conn:
    __slots__ = ("reading",)

    def __init__(self) -> None:
        self.reading = True  # still in its TLS handshake or request headers


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
        basic_auth: CachedBasicAuth | None = None,
        header_timeout_s: float = 10.0,
        max_connections: int = 1000,
        counters: EndpointCounters | None = None,
        web_config: WebConfig | None = None,
        current_fn: Callable[[], str | None] | None = None,
        changes_fn: Callable[[], int] | None = None,
    ) -> None:
        self.path = path
        self._web = web_config
        self._current = current_fn  # for /-/ready once caught up: None when current, else why not
        self._landing = LANDING.format(path=path).encode()
        self._auth = basic_auth
        self._tls = tls
        self._timeout = header_timeout_s
        self._max = max_connections
        self._counters = counters if counters is not None else EndpointCounters()
        self._failed_logins = _FailedLogins()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(collector)
        self._renderer = Renderer(collector) if isinstance(collector, StateCollector) else None
        self._interval = update_interval_ms / 1000
        self._ready = ready_fn
        self._changed_interval = min(self._interval, CHANGED_RENDER_S)
        self._changes = changes_fn  # the state's change count; None: only the interval ends a cached body
        self._cache: dict[str, _Rendered] = {}
        self._lock = threading.Lock()
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self._sock = socket.create_server((bind, port), family=family, backlog=BACKLOG)
        self._conns: dict[asyncio.Task, _Conn] = {}  # insertion order: oldest first
        self._pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="metrics-worker")
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._serving = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    def start(self) -> MetricsServer:
        self._thread.start()
        self._serving.wait(10)
        return self

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        else:
            self._sock.close()
            self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- the event loop ----------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._accepted, sock=self._sock, limit=MAX_HEADER_BYTES,
                                            backlog=BACKLOG)
        self._serving.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            tasks = list(self._conns)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _closed(self, reason: str) -> None:
        self._counters.add(cat.EXPORTER_CONNECTIONS_CLOSED, reason)

    def _evict_oldest_reading(self) -> bool:
        for task, conn in self._conns.items():
            if conn.reading:
                del self._conns[task]
                task.cancel()
                self._closed("connection_limit")
                return True
        return False

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= self._max and not self._evict_oldest_reading():
            self._closed("connection_limit")  # every slot is busy answering: refuse the newcomer
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        conn = self._conns[task] = _Conn()
        try:
            await self._exchange(reader, writer, conn)
        except asyncio.CancelledError:
            pass  # evicted (already counted) or shutting down
        except Exception:
            log.exception("metrics endpoint: unexpected error serving a request")
        finally:
            self._conns.pop(task, None)
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn) -> None:
        tls, auth, headers = self._tls, self._auth, ""
        if self._web is not None:  # re-read when changed: a rotated certificate serves the next connection
            web = self._web.current()
            tls, auth = web.tls, web.auth
            headers = "".join(f"{k}: {v}\r\n" for k, v in web.headers.items())
        handshaking = tls is not None
        try:
            async with asyncio.timeout(self._timeout):  # one deadline for the handshake and the headers
                if tls is not None:
                    await writer.start_tls(tls)
                    handshaking = False
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            self._closed("header_timeout")
            return
        except asyncio.LimitOverrunError:
            self._closed("bad_request")
            return
        except (OSError, asyncio.IncompleteReadError):
            if handshaking:  # plain HTTP on the TLS port, an unknown CA on the client...
                self._closed("tls_handshake")
            return  # otherwise the client left before asking anything: nothing was refused
        conn.reading = False
        status, body, ctype, extra = await self._answer(head, writer, auth)
        response = (f"HTTP/1.0 {status} {http.HTTPStatus(status).phrase}\r\n"
                    f"Server: kafka-backup-exporter\r\nDate: {email.utils.formatdate(usegmt=True)}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                    f"{headers}{extra}\r\n").encode("latin-1")
        writer.write(response + body)
        try:
            async with asyncio.timeout(self._timeout):  # a client that does not read is not waited for
                await writer.drain()
                writer.close()
                await writer.wait_closed()
        except (TimeoutError, OSError):
            pass

    async def _answer(self, head: bytes, writer: asyncio.StreamWriter,
                      auth: CachedBasicAuth | None) -> tuple[int, bytes, str, str]:
        request_line, _, rest = head.partition(b"\r\n")
        try:
            method, target, version = request_line.decode("latin-1").split(" ")
            if not version.startswith("HTTP/"):
                raise ValueError(version)
            headers = http.client.parse_headers(io.BytesIO(rest))
        except (ValueError, http.client.HTTPException):
            self._closed("bad_request")
            return 400, b"bad request\n", TEXT, ""
        if method != "GET":
            return 405, b"only GET\n", TEXT, "Allow: GET\r\n"
        path = urlsplit(target).path
        loop = asyncio.get_running_loop()
        if path not in OPEN_PATHS and auth is not None:
            reason = await loop.run_in_executor(self._pool, auth.check, headers.get("Authorization", ""))
            if reason is not None:
                self._counters.add(cat.EXPORTER_AUTH_FAILURES, reason)
                peer = writer.get_extra_info("peername")
                self._failed_logins.note(reason, peer[0] if peer else "?")
                return 401, b"unauthorized\n", TEXT, 'WWW-Authenticate: Basic realm="kafka-backup"\r\n'
        if path == self.path:
            status, body, ctype = await loop.run_in_executor(self._pool, self.respond, path,
                                                             headers.get("Accept", ""),
                                                             headers.get("Accept-Encoding", ""))
            if status == 200:
                return status, body, ctype, "Vary: Accept-Encoding\r\n" + (
                    "Content-Encoding: gzip\r\n" if accepts_gzip(headers.get("Accept-Encoding", "")) else "")
        else:
            status, body, ctype = self.respond(path, "")
        return status, body, ctype, ""

    # ---- what is answered ----------------------------------------------------------------------

    def respond(self, path: str, accept: str, accept_encoding: str = "") -> tuple[int, bytes, str]:
        if path == self.path:
            if not self._ready():
                # Re-reading the state topic meets older values of a key before newer ones: serving
                # them would show counters going down. Nothing until the copy is at least as new as
                # the table was when this process started, so no scrape is older than a previous one.
                return 503, b"catching up with the state topic\n", TEXT
            return self._metrics(accept, accepts_gzip(accept_encoding))
        if path in (READY_PATH, HEALTH_PATH):
            if not self._ready():
                return 503, b"catching up\n", TEXT
            why = self._current() if self._current is not None else None
            return (200, b"ok\n", TEXT) if why is None else (503, why.encode() + b"\n", TEXT)
        if path == HEALTHY_PATH:
            return 200, b"ok\n", TEXT
        if path == "/":
            return 200, self._landing, "text/html; charset=utf-8"
        return 404, b"not found\n", TEXT

    def _metrics(self, accept: str, gzipped: bool = False) -> tuple[int, bytes, str]:
        try:
            body, ctype = self.render(accept, gzipped)
        except Exception:
            log.exception("rendering metrics failed")
            return 500, b"rendering metrics failed\n", TEXT
        return 200, body, ctype

    def render(self, accept: str, gzipped: bool = False) -> tuple[bytes, str]:
        """The lock also makes concurrent scrapes wait for one render instead of each doing it;
        the gzipped body is made once per render, for the first scraper that asks for it."""
        encoder, ctype = choose_encoder(accept)
        with self._lock:
            now = time.monotonic()
            changes = self._changes() if self._changes is not None else 0
            hit = self._cache.get(ctype)
            if hit is None or not hit.fresh(now, changes, self._interval, self._changed_interval):
                hit = self._cache[ctype] = _Rendered(now, changes, self._encode(encoder, ctype))
            if not gzipped:
                return hit.body, ctype
            if hit.gzipped is None:
                hit.gzipped = gzip.compress(hit.body, GZIP_LEVEL, mtime=0)
            return hit.gzipped, ctype

    def _encode(self, encoder: Callable[[CollectorRegistry], bytes], ctype: str) -> bytes:
        """The state collector's own renderer (same bytes, reusing unchanged jobs' lines), except for
        the ``escaping=dots`` a client may ask for, which renames every metric: that one is
        prometheus_client's."""
        if self._renderer is None or "escaping=dots" in ctype:
            return encoder(self._registry)
        return self._renderer.render(openmetrics=ctype.startswith("application/openmetrics-text"))


def accepts_gzip(accept_encoding: str) -> bool:
    """True when Accept-Encoding lists gzip (or *) without q=0."""
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() not in ("gzip", "*"):
            continue
        q = params.strip().replace(" ", "").lower()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def serve(cfg: Config, reader: StateSource,
          telemetry_lag: Callable[[float], dict[int, tuple[int, float]]] | None = None) -> MetricsServer:
    """Start serving ``reader``'s state as configured; a busy port is a configuration mistake.
    ``telemetry_lag``: how far the aggregator is behind (``exporter.telemetry_lag.TelemetryLag.lags``)."""
    m = cfg.metrics
    counters = EndpointCounters()
    counters.telemetry_lag = telemetry_lag
    collector = StateCollector(reader.snapshot, cfg.aggregator.throughput_window_s,
                               stop_after_s=cfg.metrics.worker_stop_after_s,
                               expire_after_s=cfg.metrics.expire_after_s,
                               max_series_per_family=cfg.metrics.max_series_per_family,
                               endpoint=counters)
    if m.path in OPEN_PATHS:
        raise ConfigError(f"metrics.path: {m.path!r} would shadow {m.path}, which answers without "
                          f"authentication; choose another, e.g. /metrics (--metrics-path)")
    web = _web_config(m)
    tls: ssl.SSLContext | None = None
    auth: CachedBasicAuth | None
    if web is not None:
        auth = web.current().auth
    else:
        tls, auth = _tls(m), _basic_auth(m)
    max_age = m.ready_max_state_age_s
    state_age = reader.state_age if isinstance(reader, ProvenCurrent) else None
    counters.state_age = state_age  # read by kafka_backup_exporter_state_age_seconds
    counters.undecodable = reader.undecodable_counts if isinstance(reader, CountsUndecodable) else None

    def current() -> str | None:
        age = state_age() if state_age is not None else 0.0
        if age is None or age <= max_age:
            return None
        return (f"state not proven current for {age:.0f} s (metrics.ready_max_state_age_s is {max_age}): "
                f"is the telemetry cluster reachable?")

    if auth is None and not _is_loopback(m.bind):
        log.warning("metrics endpoint on %s has no authentication; set metrics.basic_auth_* or keep it on "
                    "127.0.0.1 behind a proxy", m.bind)
    _raise_open_files_limit(m.max_connections + FD_HEADROOM)
    try:
        server = MetricsServer(m.bind, m.port, m.path, collector, m.update_interval_ms, reader.ready.is_set,
                               tls, auth, header_timeout_s=m.header_timeout_s, max_connections=m.max_connections,
                               counters=counters, web_config=web, current_fn=current,
                               changes_fn=reader.changes if isinstance(reader, CountsChanges) else None)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"metrics.port: {m.port} is in use on {m.bind}; choose another with --port") from None
        raise ConfigError(f"metrics.bind: cannot listen on {m.bind}:{m.port}: {err.strerror or err}") from None
    return server.start()


def _web_config(m: MetricsConfig) -> WebConfig | None:
    """metrics.web_config_file replaces the metrics.tls_* and metrics.basic_auth_* keys: never both."""
    if not m.web_config_file:
        return None
    for key in ("tls_cert_file", "tls_key_file", "basic_auth_username", "basic_auth_password_bcrypt",
                "basic_auth_password_sha256"):
        if getattr(m, key):
            raise ConfigError(f"metrics.{key}: remove it; metrics.web_config_file is set and configures TLS and "
                              f"basic auth (tls_server_config, basic_auth_users)")
    return WebConfig(m.web_config_file)


def _raise_open_files_limit(need: int) -> None:
    """Each open connection is a file descriptor: lift the soft limit to what metrics.max_connections needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < need:
        log.warning("metrics.max_connections: needs about %d open files but the hard limit is %d; "
                    "lower metrics.max_connections or raise the limit (ulimit -n)", need, hard)


def _is_loopback(bind: str) -> bool:
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return bind == "localhost"


def _tls(m: MetricsConfig) -> ssl.SSLContext | None:
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


BCRYPT_HASH = re.compile(rb"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
MAKE_BCRYPT = 'htpasswd -nbBC 10 "" "$PASSWORD" | cut -d: -f2'
_sha256_warned = False


def _basic_auth(m: MetricsConfig) -> BasicAuth | None:
    bcrypt_hash, sha256 = m.basic_auth_password_bcrypt.strip(), m.basic_auth_password_sha256.strip().lower()
    if not (m.basic_auth_username or bcrypt_hash or sha256):
        return None
    if not m.basic_auth_username:
        raise ConfigError("metrics.basic_auth_username: required with a metrics.basic_auth_password_* key")
    if bcrypt_hash and sha256:
        raise ConfigError("metrics.basic_auth_password_sha256: remove it; metrics.basic_auth_password_bcrypt "
                          "is set and replaces it")
    if bcrypt_hash:
        hashed = bcrypt_hash.encode()
        try:
            valid = BCRYPT_HASH.fullmatch(hashed) is not None and bcrypt.checkpw(b"", hashed) in (True, False)
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError(f"metrics.basic_auth_password_bcrypt: not a bcrypt hash ($2b$...); make one with "
                              f"{MAKE_BCRYPT}")
        return BasicAuth(m.basic_auth_username, bcrypt_hash=hashed)
    if not sha256:
        raise ConfigError(f"metrics.basic_auth_password_bcrypt: required with metrics.basic_auth_username; "
                          f"make one with {MAKE_BCRYPT}")
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ConfigError("metrics.basic_auth_password_sha256: expected 64 hex digits "
                          "(printf %s \"$PASSWORD\" | sha256sum)")
    global _sha256_warned
    if not _sha256_warned:
        _sha256_warned = True
        log.warning("metrics.basic_auth_password_sha256 is deprecated: an unsalted SHA-256 digest is quick to "
                    "guess; set metrics.basic_auth_password_bcrypt instead (%s)", MAKE_BCRYPT)
    return BasicAuth(m.basic_auth_username, sha256_hex=sha256)
