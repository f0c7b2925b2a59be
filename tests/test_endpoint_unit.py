"""The exporter's endpoint in one process: secrets, metrics.path, basic auth, the connection bound."""

from __future__ import annotations

import base64
import hashlib
import logging
import socket
import threading
import urllib.error
import urllib.request

import bcrypt
import pytest

from kafka_backup.exporter.collector import EndpointCounters, StateCollector
from kafka_backup.exporter.server import BasicAuth, serve
from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas.config import ConfigError, all_keys, env_for, load, secret_keys
from tests.conftest import parse_prometheus, wait_for

HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()  # cost 4: the test's speed, not production's


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ---- secrets ----------------------------------------------------------------------------------


def test_every_secret_has_a_file_key_and_an_environment_variable():
    keys = {k for k, _ in all_keys()}
    assert secret_keys() == ["metrics.basic_auth_password_bcrypt", "metrics.basic_auth_password_sha256",
                             "kafka.sasl_password", "kafka.telemetry_sasl_password"]
    for key in secret_keys():
        assert key + "_file" in keys
    assert env_for("kafka.sasl_password") == "KAFKA_BACKUP_KAFKA_SASL_PASSWORD"


def test_secret_from_a_file(tmp_path):
    (tmp_path / "pw").write_text("kafka-pw\n")
    (tmp_path / "hash").write_text(HASH + "\n")
    cfg = load(None, {"kafka.sasl_password_file": str(tmp_path / "pw"),
                      "metrics.basic_auth_password_bcrypt_file": str(tmp_path / "hash")}, environ={})
    assert (cfg.kafka.sasl_password, cfg.metrics.basic_auth_password_bcrypt) == ("kafka-pw", HASH)


def test_secret_from_the_environment_only_when_not_set_otherwise(tmp_path):
    env = {"KAFKA_BACKUP_KAFKA_SASL_PASSWORD": "from-env", "KAFKA_BACKUP_KAFKA_TELEMETRY_SASL_PASSWORD": "t-env"}
    cfg = load(None, {"kafka.sasl_password": "from-flag"}, environ=env)
    assert (cfg.kafka.sasl_password, cfg.kafka.telemetry_sasl_password) == ("from-flag", "t-env")


@pytest.mark.parametrize("overrides,needle", [
    ({"kafka.sasl_password": "a", "kafka.sasl_password_file": "/x"},
     "kafka.sasl_password_file: set either kafka.sasl_password or kafka.sasl_password_file, not both"),
    ({"kafka.sasl_password_file": "/nonexistent/pw"},
     "kafka.sasl_password_file: cannot read /nonexistent/pw: No such file or directory"),
])
def test_secret_file_mistakes_are_one_line(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load(None, overrides, environ={})
    assert str(err.value) == needle


def test_an_empty_secret_file_is_refused(tmp_path):
    (tmp_path / "pw").write_text("\n")
    with pytest.raises(ConfigError, match=r"^kafka.sasl_password_file: .*/pw is empty$"):
        load(None, {"kafka.sasl_password_file": str(tmp_path / "pw")}, environ={})


# ---- metrics.path -----------------------------------------------------------------------------


@pytest.mark.parametrize("path,needle", [
    ("/health", "metrics.path: '/health' would shadow /health, which answers without authentication"),
    ("metrics", "metrics.path: 'metrics' must start with '/'"),
    ("/m?x=1", "metrics.path: '/m?x=1' must start with '/' and hold no '?'"),
])
def test_metrics_path_is_checked(path, needle):
    with pytest.raises(ConfigError) as err:
        load(None, {"metrics.path": path})
    assert str(err.value).startswith(needle) and "\n" not in str(err.value)


# ---- basic auth -------------------------------------------------------------------------------


def test_bcrypt_accepts_the_password_and_refuses_others_by_reason():
    auth = BasicAuth("prom", bcrypt_hash=HASH.encode())
    assert auth.check(basic("prom", "s3cret")) is None
    assert auth.check(basic("prom", "s3cret")) is None  # the remembered fingerprint
    assert auth.check(basic("prom", "wrong")) == "wrong_password"
    assert auth.check(basic("other", "s3cret")) == "unknown_user"
    assert auth.check(basic("prömé", "s3cret")) == "unknown_user"  # used to raise TypeError in compare_digest
    assert auth.check("Basic " + base64.b64encode("prömé:x".encode("latin-1")).decode()) == "unknown_user"
    assert auth.check(basic("prom", "x" * 100)) == "wrong_password"  # bcrypt 5 raises on > 72 bytes
    assert auth.check("") == "missing"
    assert auth.check("Bearer abc") == "malformed"
    assert auth.check("Basic !!!") == "malformed"
    assert auth.check("Basic " + base64.b64encode(b"no-colon").decode()) == "malformed"


def test_a_non_ascii_username_can_be_configured():
    auth = BasicAuth("prömé", bcrypt_hash=HASH.encode())
    assert auth.check(basic("prömé", "s3cret")) is None


class Reader:
    """A state reader that has caught up (/metrics answers 503 until then)."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.ready.set()

    def snapshot(self):
        return {}


@pytest.mark.parametrize("settings,needle", [
    ({"metrics.basic_auth_username": "u", "metrics.basic_auth_password_bcrypt": "plain-password"},
     "metrics.basic_auth_password_bcrypt: not a bcrypt hash"),
    ({"metrics.basic_auth_username": "u"}, "metrics.basic_auth_password_bcrypt: required with"),
    ({"metrics.basic_auth_username": "u", "metrics.basic_auth_password_bcrypt": HASH,
      "metrics.basic_auth_password_sha256": "ab" * 32}, "metrics.basic_auth_password_sha256: remove it"),
])
def test_password_mistakes_are_one_line(settings, needle):
    with pytest.raises(ConfigError) as err:
        serve(load(None, {"metrics.port": 0, **settings}), Reader())
    assert str(err.value).startswith(needle) and "\n" not in str(err.value)


def test_sha256_still_works_with_a_warning_logged_once(caplog, monkeypatch):
    import kafka_backup.exporter.server as server_mod

    monkeypatch.setattr(server_mod, "_sha256_warned", False)
    cfg = load(None, {"metrics.port": 0, "metrics.basic_auth_username": "u",
                      "metrics.basic_auth_password_sha256": hashlib.sha256(b"pw").hexdigest()})
    with caplog.at_level(logging.WARNING, logger="kafka_backup.exporter"):
        servers = [serve(cfg, Reader()), serve(cfg, Reader())]
    try:
        warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].startswith("metrics.basic_auth_password_sha256 is deprecated")
        assert get(servers[0].port, "/metrics", basic("u", "pw"))[0] == 200
        assert get(servers[0].port, "/metrics", basic("u", "nope"))[0] == 401
    finally:
        for s in servers:
            s.shutdown()


def get(port: int, path: str, authorization: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": authorization} if authorization else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


# ---- the endpoint's own counters --------------------------------------------------------------


def test_endpoint_counters_are_served_from_the_catalogue():
    counters = EndpointCounters()
    counters.add(cat.EXPORTER_AUTH_FAILURES, "wrong_password", 2)
    counters.add(cat.EXPORTER_CONNECTIONS_CLOSED, "header_timeout")
    fams = {f.name: f for f in StateCollector(lambda: {}, endpoint=counters).collect()}
    fam = fams[cat.EXPORTER_AUTH_FAILURES.family_name]
    assert fam.documentation == cat.EXPORTER_AUTH_FAILURES.help
    assert [(s.name, s.labels, s.value) for s in fam.samples] == [
        ("kafka_backup_exporter_auth_failures_total", {"reason": "wrong_password"}, 2)]
    closed = fams[cat.EXPORTER_CONNECTIONS_CLOSED.family_name]
    assert [(s.labels, s.value) for s in closed.samples if s.name.endswith("_total")] == [
        ({"reason": "header_timeout"}, 1)]


def test_at_the_connection_limit_the_oldest_idle_connection_makes_room():
    srv = serve(load(None, {"metrics.port": 0, "metrics.max_connections": 3, "metrics.update_interval_ms": 1}),
                Reader())
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]
    try:
        # the listen queue is first in, first out: the idle ones are in before the scrape, which evicts idle[0]
        status, body = get(srv.port, "/metrics")
        assert status == 200
        assert parse_prometheus(body).get_value(cat.EXPORTER_CONNECTIONS_CLOSED.name, reason="connection_limit") == 1
        idle[0].settimeout(10)
        assert idle[0].recv(1) == b""  # closed by the server, unanswered
        idle.append(socket.create_connection(("127.0.0.1", srv.port)))  # full again: the next scrape evicts idle[1]
        body = get(srv.port, "/metrics")[1]
        assert parse_prometheus(body).get_value(cat.EXPORTER_CONNECTIONS_CLOSED.name, reason="connection_limit") == 2
        idle[1].settimeout(10)
        assert idle[1].recv(1) == b""
    finally:
        for s in idle:
            s.close()
        srv.shutdown()


def test_a_client_that_sends_no_headers_is_closed_after_the_timeout():
    srv = serve(load(None, {"metrics.port": 0, "metrics.header_timeout_s": 1, "metrics.update_interval_ms": 1}),
                Reader())
    try:
        with socket.create_connection(("127.0.0.1", srv.port)) as idle:
            idle.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line
            idle.settimeout(30)
            assert idle.recv(1) == b""
        wait_for(lambda: parse_prometheus(get(srv.port, "/metrics")[1]).get_value(
            cat.EXPORTER_CONNECTIONS_CLOSED.name, reason="header_timeout") == 1, 10, 0.1)
    finally:
        srv.shutdown()


def test_when_every_connection_is_being_answered_a_newcomer_is_refused_and_counted():
    entered, release = threading.Event(), threading.Event()

    class SlowReader(Reader):
        def snapshot(self):
            entered.set()
            release.wait(30)
            return {}

    srv = serve(load(None, {"metrics.port": 0, "metrics.max_connections": 1, "metrics.update_interval_ms": 1}),
                SlowReader())
    try:
        first: list = []
        scraper = threading.Thread(target=lambda: first.append(get(srv.port, "/metrics")))
        scraper.start()
        assert entered.wait(10)  # the only slot is busy rendering, not reading headers: nothing to evict
        with socket.create_connection(("127.0.0.1", srv.port)) as newcomer:
            newcomer.settimeout(10)
            try:
                assert newcomer.recv(1) == b""  # closed unanswered
            except ConnectionResetError:
                pass  # closed with a reset: unanswered too
        release.set()
        scraper.join(30)
        assert first[0][0] == 200
        body = get(srv.port, "/metrics")[1]
        assert parse_prometheus(body).get_value(cat.EXPORTER_CONNECTIONS_CLOSED.name, reason="connection_limit") == 1
    finally:
        release.set()
        srv.shutdown()
