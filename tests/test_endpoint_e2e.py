"""The real exporter process under idle clients and bad credentials (issue #10, "Exporter HTTP").

One exporter speaks TLS and asks for basic auth, its bcrypt hash read from a file:
3,000 clients that connect and never send a ClientHello must not cost it a thread each
nor delay a real scrape, and are closed after metrics.header_timeout_s.
"""

from __future__ import annotations

import base64
import os
import resource
import socket
import ssl
import time
import urllib.error
import urllib.request

import bcrypt
import pytest

from kafka_backup.cli.devbroker import free_port
from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas.topics import state_topic
from tests.conftest import Proc, cli, create_topic, parse_prometheus, unique, wait_for
from tests.test_exposition_e2e import self_signed

pytestmark = pytest.mark.e2e

IDLE_CLIENTS = 3000
HEADER_TIMEOUT_S = 8  # long enough to connect 3,000 clients and scrape on a loaded machine


class Exporter:
    def __init__(self, proc: Proc, port: int, cafile: str) -> None:
        self.proc, self.port = proc, port
        self.ctx = ssl.create_default_context(cafile=cafile)

    def get(self, path: str, user: str | None = None, password: str = "") -> tuple[int, str]:
        headers = {}
        if user is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        req = urllib.request.Request(f"https://127.0.0.1:{self.port}{path}", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.ctx) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, ""

    def metrics(self):
        status, body = self.get("/metrics", "prom", "s3cret")
        assert status == 200
        return parse_prometheus(body)

    def proc_status(self, field: str) -> int:
        with open(f"/proc/{self.proc.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError(field)

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.proc.pid}/fd"))

    def full_log(self) -> str:
        with open(self.proc.log_path, errors="replace") as fh:
            return fh.read()


@pytest.fixture(scope="module")
def exporter(broker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("endpoint")
    cert, key = self_signed(tmp)
    hash_file = tmp / "password.bcrypt"
    hash_file.write_text(bcrypt.hashpw(b"s3cret", bcrypt.gensalt()).decode() + "\n")  # the default cost, 12
    port = free_port()
    app_id = unique("agg")
    create_topic(broker, state_topic(app_id), 1)  # empty: the exporter is caught up as soon as it reads it
    proc = Proc(["exporter", "--bootstrap-servers", broker, "--app-id", app_id, "--port", str(port),
                 "--metrics-update-interval-ms", "100", "--metrics-tls-cert-file", cert,
                 "--metrics-tls-key-file", key, "--metrics-basic-auth-username", "prom",
                 "--metrics-basic-auth-password-bcrypt-file", str(hash_file),
                 "--metrics-header-timeout-s", str(HEADER_TIMEOUT_S), "--metrics-max-connections", "4000"],
                str(tmp / "exporter.log")).start()
    exp = Exporter(proc, port, cert)
    try:
        wait_for(lambda: exp.get("/health")[0] == 200, 30, 0.2, what="exporter caught up")
        yield exp
    finally:
        proc.stop()


def test_idle_clients_cost_no_thread_and_do_not_delay_a_scrape(exporter):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_CLIENTS + 500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, IDLE_CLIENTS + 500), hard))
    exporter.metrics()  # the worker pool has started its threads
    threads_before, fds_before = exporter.proc_status("Threads"), exporter.open_fds()
    idle = []
    try:
        first_connected_at = time.monotonic()
        for _ in range(IDLE_CLIENTS):  # TCP connected; no ClientHello, no request, ever
            idle.append(socket.create_connection(("127.0.0.1", exporter.port), timeout=10))
        connected_at = time.monotonic()
        # (less 2: the warm-up scrape's socket and a Kafka client's may have closed since the count)
        wait_for(lambda: exporter.open_fds() >= fds_before + IDLE_CLIENTS - 2, 30, 0.1,
                 what=f"all idle clients accepted (fds before: {fds_before})")

        # a thread per connection would be 3,000 more; the loop and its small pool do not grow
        assert exporter.proc_status("Threads") <= threads_before + 2
        started = time.monotonic()
        samples = exporter.metrics()
        assert time.monotonic() - started < 3.0, "a real scrape waited behind idle clients"
        assert time.monotonic() - first_connected_at < HEADER_TIMEOUT_S, "too slow: some idle clients timed out"
        assert samples.get_value(cat.EXPORTER_CONNECTIONS_CLOSED.name, reason="header_timeout") is None

        def all_closed_by_the_server() -> bool:
            for s in idle:
                s.setblocking(False)
                try:
                    if s.recv(1) != b"":
                        return False
                except BlockingIOError:
                    return False
            return True

        wait_for(all_closed_by_the_server, HEADER_TIMEOUT_S + 30, 0.2, what="idle clients closed")
        assert time.monotonic() - connected_at >= HEADER_TIMEOUT_S - 1  # by the timeout, not before
        assert exporter.metrics().get_value(cat.EXPORTER_CONNECTIONS_CLOSED.name,
                                            reason="header_timeout") == IDLE_CLIENTS
        wait_for(lambda: exporter.open_fds() <= fds_before, 30, 0.2, what="the exporter's sockets released")
    finally:
        for s in idle:
            s.close()


def test_bcrypt_password_from_a_file_and_refusals_counted_without_traceback(exporter):
    status, body = exporter.get("/metrics", "prom", "s3cret")  # the hash came from the file
    assert status == 200 and f"# TYPE {cat.EXPORTER_AUTH_FAILURES.name} counter" in body
    assert exporter.get("/metrics", "prom", "wrong")[0] == 401
    assert exporter.get("/metrics", "prömé", "s3cret")[0] == 401  # used to drop the connection with a TypeError
    assert exporter.get("/metrics")[0] == 401
    assert exporter.get("/health")[0] == 200  # open, as before
    samples = exporter.metrics()
    assert {reason: samples.get_value(cat.EXPORTER_AUTH_FAILURES.name, reason=reason)
            for reason in ("wrong_password", "unknown_user", "missing")} == {
        "wrong_password": 1, "unknown_user": 1, "missing": 1}
    log = exporter.full_log()
    assert "Traceback" not in log and "TypeError" not in log
    assert log.count("metrics endpoint: refused credentials") == 1  # three refusals, one line per 10 s


def test_metrics_path_shadowing_health_is_refused_in_one_line():
    r = cli("exporter", "--bootstrap-servers", "127.0.0.1:1", "--metrics-path", "/health", timeout=60)
    assert r.returncode == 2
    assert r.stderr == ("kafka-backup exporter: error: metrics.path: '/health' would shadow /health, which "
                        "answers without authentication; choose another, e.g. /metrics (--metrics-path)\n")
