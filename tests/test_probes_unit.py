"""Issue #11's endpoint parts, in process: probes, state age, gzip, landing page, exporter-toolkit web config."""

from __future__ import annotations

import base64
import gzip
import os
import threading
import urllib.error
import urllib.request

import bcrypt
import pytest

from kafka_backup.exporter.server import accepts_gzip, serve
from kafka_backup.exporter.state_reader import StateReader
from kafka_backup.exporter.webconfig import UsersAuth, WebConfig
from kafka_backup.exporter.webconfig import load as load_web
from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas.config import ConfigError, load
from tests.conftest import parse_prometheus
from tests.test_exposition_e2e import self_signed

HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class FakeReader:
    def __init__(self) -> None:
        self.ready = threading.Event()
        self.age: float | None = None

    def snapshot(self):
        return {}

    def state_age(self, now: float | None = None) -> float | None:
        return self.age


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture
def server():
    reader = FakeReader()
    srv = serve(load(overrides={"metrics.port": 0, "metrics.ready_max_state_age_s": 30}), reader)
    yield srv, reader, f"http://127.0.0.1:{srv.port}"
    srv.shutdown()


def test_liveness_answers_while_readiness_waits_for_the_state(server):
    _, reader, base = server
    assert get(base + "/-/healthy")[0::2] == (200, b"ok\n")
    assert get(base + "/-/ready")[0::2] == (503, b"catching up\n")
    assert get(base + "/health")[0::2] == (503, b"catching up\n")
    reader.ready.set()
    reader.age = 1.5
    assert get(base + "/-/ready")[0::2] == (200, b"ok\n")
    assert get(base + "/health")[0::2] == (200, b"ok\n")
    reader.age = 31.0  # caught up once, then not proven current for longer than ready_max_state_age_s
    assert get(base + "/-/ready")[0::2] == (
        503, b"state not proven current for 31 s (metrics.ready_max_state_age_s is 30): "
             b"is the telemetry cluster reachable?\n")
    assert get(base + "/-/healthy")[0] == 200  # alive all the same: a restart would not help
    assert get(base + "/metrics")[0] == 200  # still served, with its age, so the staleness alert can fire
    samples = parse_prometheus(get(base + "/metrics")[2].decode())
    assert samples.get_value(cat.EXPORTER_STATE_AGE.name) == 31.0


def test_landing_page_links_the_endpoints(server):
    _, _, base = server
    status, headers, body = get(base + "/")
    assert (status, headers["Content-Type"]) == (200, "text/html; charset=utf-8")
    for path in ("/metrics", "/-/healthy", "/-/ready", "/health"):
        assert f'href="{path}"'.encode() in body


def test_gzip_when_asked_and_cached_with_the_render(server):
    srv, reader, base = server
    reader.ready.set()
    reader.age = 0.0
    status, headers, body = get(base + "/metrics", {"Accept-Encoding": "gzip"})
    assert (status, headers["Content-Encoding"], headers["Vary"]) == (200, "gzip", "Accept-Encoding")
    plain = gzip.decompress(body)
    assert f"# TYPE {cat.EXPORTER_STATE_AGE.name} gauge".encode() in plain
    status, headers, again = get(base + "/metrics", {"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in headers and again == plain
    # one render serves both: the gzipped body is the cached plain body compressed
    assert gzip.decompress(srv.render("", gzipped=True)[0]) == srv.render("")[0]


@pytest.mark.parametrize("value,expected", [
    ("gzip", True), ("gzip, deflate, br", True), ("deflate, gzip;q=0.5", True), ("*", True),
    ("gzip;q=0", False), ("identity", False), ("", False), ("x-gzip", False),
])
def test_accept_encoding(value, expected):
    assert accepts_gzip(value) is expected


@pytest.mark.parametrize("path", ["/-/healthy", "/-/ready", "/"])
def test_metrics_path_may_not_shadow_an_open_path(path):
    with pytest.raises(ConfigError) as err:
        serve(load(overrides={"metrics.port": 0, "metrics.path": path}), FakeReader())
    assert str(err.value) == (f"metrics.path: {path!r} would shadow {path}, which answers without "
                              "authentication; choose another, e.g. /metrics (--metrics-path)")


def test_state_age_is_measured_from_the_last_proof_of_being_current():
    reader = StateReader("127.0.0.1:1", "x")
    assert reader.state_age(1000.0) is None
    reader.current_at = 990.0
    assert reader.state_age(1000.0) == 10.0
    assert reader.state_age(980.0) == 0.0  # a clock step backwards is not a negative age


# ---- web config ------------------------------------------------------------------------------


def write(tmp_path, text: str) -> str:
    path = tmp_path / "web.yml"
    path.write_text(text)
    return str(path)


def test_web_config_users_and_refusals():
    auth = UsersAuth({"prom": HASH.encode(), "ops": HASH.encode()})
    assert auth.check(basic("prom", "s3cret")) is None
    assert auth.check(basic("ops", "s3cret")) is None
    assert auth.check(basic("prom", "wrong")) == "wrong_password"
    assert auth.check(basic("nobody", "s3cret")) == "unknown_user"
    assert auth.check("") == "missing"
    assert auth.check("Basic !!") == "malformed"


def test_web_config_paths_are_relative_to_the_file(tmp_path):
    cert, key = self_signed(tmp_path)
    path = write(tmp_path, f"tls_server_config:\n  cert_file: {os.path.basename(cert)}\n  key_file: key.pem\n"
                           "  min_version: TLS13\nhttp_server_config:\n  headers:\n"
                           "    X-Content-Type-Options: nosniff\n"
                           f"basic_auth_users:\n  prom: '{HASH}'\n")
    loaded = load_web(path)
    assert loaded.tls is not None and loaded.tls.minimum_version.name == "TLSv1_3"
    assert loaded.headers == {"X-Content-Type-Options": "nosniff"}
    assert loaded.auth.check(basic("prom", "s3cret")) is None


@pytest.mark.parametrize("text,needle", [
    ("tls_server_config:\n  cert_file: cert.pem\n", "tls_server_config.key_file: required: TLS needs both"),
    ("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  min_version: TLS14\n",
     "tls_server_config.min_version: 'TLS14' is not one of TLS10, TLS11, TLS12, TLS13"),
    ("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  client_ca_file: cert.pem\n",
     "tls_server_config.client_auth_type: client_ca_file is set without a client auth policy; "
     "set client_auth_type: RequireAndVerifyClientCert"),
    ("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  client_auth_type: RequireAnyClientCert\n"
     "  client_ca_file: cert.pem\n",
     "tls_server_config.client_auth_type: RequireAnyClientCert accepts unverified client certificates"),
    ("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  client_auth_type: RequireAndVerifyClientCert\n",
     "tls_server_config.client_ca_file: required with client_auth_type: RequireAndVerifyClientCert"),
    ("tls_server_config:\n  cert_file: missing.pem\n  key_file: key.pem\n", "tls_server_config.cert_file: "),
    ("tls_server_config:\n  cert_file: key.pem\n  key_file: key.pem\n", "tls_server_config.cert_file: cannot load"),
    ("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  cipher_suites: [X]\n",
     "tls_server_config.cipher_suites: not supported by this exporter; remove it"),
    ("basic_auth_users:\n  prom: s3cret\n", "basic_auth_users.prom: not a bcrypt hash ($2y$...)"),
    ("basic_auth_user:\n  prom: x\n", "basic_auth_user: unknown key; valid keys here: tls_server_config, "
                                      "http_server_config, basic_auth_users"),
    ("rate_limit: {interval: 1s}\n", "rate_limit: not supported by this exporter"),
    ("- a\n", "top level: must be a mapping"),
    ("a: [\n", "is not valid YAML"),
])
def test_web_config_mistakes_are_one_line_naming_the_field(tmp_path, text, needle):
    self_signed(tmp_path)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_web(path)
    message = str(err.value)
    assert message.startswith(f"metrics.web_config_file: {path}") and needle in message and "\n" not in message


def test_web_config_excludes_the_older_keys(tmp_path):
    path = write(tmp_path, f"basic_auth_users:\n  prom: '{HASH}'\n")
    with pytest.raises(ConfigError) as err:
        serve(load(overrides={"metrics.port": 0, "metrics.web_config_file": path,
                              "metrics.basic_auth_username": "prom"}), FakeReader())
    assert str(err.value) == ("metrics.basic_auth_username: remove it; metrics.web_config_file is set and "
                              "configures TLS and basic auth (tls_server_config, basic_auth_users)")


def test_a_broken_change_keeps_the_previous_configuration(tmp_path):
    path = write(tmp_path, f"basic_auth_users:\n  prom: '{HASH}'\n")
    web = WebConfig(path)
    first = web.current()
    with open(path, "a") as fh:
        fh.write("  ops: not-a-hash\n")
    assert web.current() is first and web.reloads == 0
    other = bcrypt.hashpw(b"other", bcrypt.gensalt(4)).decode()
    with open(path, "w") as fh:
        fh.write(f"basic_auth_users:\n  ops: '{other}'\n")
    now = web.current()
    assert web.reloads == 1 and now.auth.check(basic("ops", "other")) is None
    assert now.auth.check(basic("prom", "s3cret")) == "unknown_user"


def _ca_and_leaf(tmp_path, names: tuple[str, ...]) -> str:
    """A CA (ca.pem) and, per name, a certificate it signed (<name>.pem, <name>-key.pem) for 127.0.0.1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               False)
                .sign(ca_key, hashes.SHA256()))
        (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / f"{name}-key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(tmp_path / "ca.pem")


def test_mutual_tls_refuses_a_client_without_a_certificate_from_the_ca(tmp_path):
    import ssl

    ca = _ca_and_leaf(tmp_path, ("server", "client"))
    path = write(tmp_path, "tls_server_config:\n  cert_file: server.pem\n  key_file: server-key.pem\n"
                           "  client_ca_file: ca.pem\n  client_auth_type: RequireAndVerifyClientCert\n")
    reader = FakeReader()
    reader.ready.set()
    reader.age = 0.0
    srv = serve(load(overrides={"metrics.port": 0, "metrics.web_config_file": path}), reader)
    url = f"https://127.0.0.1:{srv.port}/metrics"
    try:
        with_cert = ssl.create_default_context(cafile=ca)
        with_cert.load_cert_chain(str(tmp_path / "client.pem"), str(tmp_path / "client-key.pem"))
        with urllib.request.urlopen(url, timeout=5, context=with_cert) as r:
            assert r.status == 200
        without = ssl.create_default_context(cafile=ca)
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(url, timeout=5, context=without).read()
        stranger = tmp_path / "other"
        stranger.mkdir()
        _ca_and_leaf(stranger, ("client",))  # a certificate from another CA
        foreign = ssl.create_default_context(cafile=ca)
        foreign.load_cert_chain(str(stranger / "client.pem"), str(stranger / "client-key.pem"))
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(url, timeout=5, context=foreign).read()
    finally:
        srv.shutdown()
