"""Issue #11, the endpoint as SRE teams deploy it, on real exporter processes: probes during and after
catch-up, gzip, an exporter-toolkit web config (bcrypt users, TLS) and a certificate rotated without
a restart."""

from __future__ import annotations

import base64
import gzip
import os
import socket
import ssl
import urllib.error
import urllib.request

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kafka_backup.cli.devbroker import free_port
from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas.topics import state_topic
from tests.conftest import Proc, cli, create_topic, parse_prometheus, unique, wait_for
from tests.test_exposition_e2e import PROMETHEUS, real_prometheus, self_signed

pytestmark = pytest.mark.e2e


def get(url: str, headers: dict | None = None, context: ssl.SSLContext | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_probes_before_and_after_the_state_is_read_and_gzip(broker, tmp_path):
    app_id, port = unique("agg"), free_port()
    proc = Proc(["exporter", "--bootstrap-servers", broker, "--app-id", app_id, "--port", str(port),
                 "--metrics-update-interval-ms", "100"], str(tmp_path / "exporter.log")).start()
    base = f"http://127.0.0.1:{port}"
    try:
        # no state topic yet (no aggregator has written): alive, not ready, no metrics
        wait_for(lambda: get(base + "/-/healthy")[0] == 200, 30, 0.2, what="exporter alive")
        assert get(base + "/-/ready")[0::2] == (503, b"catching up\n")
        assert get(base + "/health")[0::2] == (503, b"catching up\n")
        assert get(base + "/metrics")[0::2] == (503, b"catching up with the state topic\n")
        create_topic(broker, state_topic(app_id), 2)
        wait_for(lambda: get(base + "/-/ready")[0] == 200, 60, 0.2, what="exporter ready")
        assert get(base + "/-/healthy")[0::2] == (200, b"ok\n")
        assert get(base + "/health")[0::2] == (200, b"ok\n")
        # what Prometheus sends: gzip, decoded here
        status, headers, body = get(base + "/metrics", {"Accept-Encoding": "gzip"})
        assert (status, headers["Content-Encoding"]) == (200, "gzip")
        samples = parse_prometheus(gzip.decompress(body).decode())
        age = samples.get_value(cat.EXPORTER_STATE_AGE.name)
        assert age is not None and 0 <= age < 10  # proven current every 2 s
        status, headers, body = get(base + "/")
        assert status == 200 and b'href="/metrics"' in body
    finally:
        proc.stop()
    assert "Traceback" not in proc.log()


def cert_der(path: str) -> bytes:
    with open(path, "rb") as fh:
        return x509.load_pem_x509_certificate(fh.read()).public_bytes(serialization.Encoding.DER)


def served_cert(port: int) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # only looking at what is presented
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        return tls.getpeercert(binary_form=True)


def test_web_config_bcrypt_users_and_a_certificate_rotated_without_restart(broker, tmp_path):
    app_id, port = unique("agg"), free_port()
    create_topic(broker, state_topic(app_id), 1)
    certs = tmp_path / "certs"
    certs.mkdir()
    cert, _key = self_signed(certs)
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    web = tmp_path / "web.yml"
    web.write_text("tls_server_config:\n  cert_file: certs/cert.pem\n  key_file: certs/key.pem\n"
                   f"basic_auth_users:\n  prom: '{hashed}'\n")
    proc = Proc(["exporter", "--bootstrap-servers", broker, "--app-id", app_id, "--port", str(port),
                 "--metrics-update-interval-ms", "100", "--web-config-file", str(web)], str(tmp_path / "exporter.log")).start()
    ctx = ssl.create_default_context(cafile=cert)
    base = f"https://127.0.0.1:{port}"

    def auth(password: str) -> dict:
        return {"Authorization": "Basic " + base64.b64encode(f"prom:{password}".encode()).decode()}

    try:
        wait_for(lambda: get(base + "/-/ready", context=ctx)[0] == 200, 60, 0.2, what="TLS exporter ready")
        assert get(base + "/metrics", auth("s3cret"), ctx)[0] == 200
        assert get(base + "/metrics", auth("wrong"), ctx)[0] == 401
        assert get(base + "/metrics", context=ctx)[0] == 401
        assert get(base + "/-/healthy", context=ctx)[0] == 200  # probes need no credentials
        old = cert_der(cert)
        assert served_cert(port) == old

        # rotate: a new key pair replaces the files (as cert-manager or a mounted Secret does)
        new = tmp_path / "new"
        new.mkdir()
        new_cert, new_key = self_signed(new)
        os.replace(new_key, certs / "key.pem")
        os.replace(new_cert, certs / "cert.pem")
        rotated = cert_der(str(certs / "cert.pem"))
        assert rotated != old
        assert served_cert(port) == rotated  # the next connection, same process
        new_ctx = ssl.create_default_context(cafile=str(certs / "cert.pem"))

        def refusals():
            status, _, body = get(base + "/metrics", auth("s3cret"), new_ctx)
            assert status == 200
            return parse_prometheus(body.decode()).matching(cat.EXPORTER_AUTH_FAILURES.name)

        wait_for(lambda: len(refusals()) == 2, 10, 0.2, what="refusals rendered")
        assert {dict(k[1])["reason"]: v for k, v in refusals().items()} == {"wrong_password": 1, "missing": 1}
        assert proc.proc.poll() is None  # the same process throughout

        if PROMETHEUS:  # a real Prometheus: TLS with the rotated certificate, basic auth, gzip (it always asks)
            job = ("  - job_name: kb\n    scheme: https\n"
                   f"    tls_config:\n      ca_file: {certs / 'cert.pem'}\n    basic_auth:\n      username: prom\n"
                   f"      password: s3cret\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
            with real_prometheus(tmp_path, job) as query:
                up = wait_for(lambda: query('up{job="kb"} == 1')["data"]["result"], 60, what="Prometheus scraping")
                assert float(up[0]["value"][1]) == 1
                age = wait_for(lambda: query(cat.EXPORTER_STATE_AGE.name)["data"]["result"], 60)
                assert 0 <= float(age[0]["value"][1]) < 10
    finally:
        proc.stop()
    assert "Traceback" not in proc.log()


def test_invalid_web_config_is_one_line_exit_2(tmp_path):
    web = tmp_path / "web.yml"
    web.write_text("tls_server_config:\n  cert_file: cert.pem\n")
    r = cli("exporter", "--bootstrap-servers", "127.0.0.1:1", "--port", "0", "--web-config-file", str(web),
            timeout=60)
    assert r.returncode == 2
    assert r.stderr == (f"kafka-backup exporter: error: metrics.web_config_file: {web}: tls_server_config.key_file: "
                        "required: TLS needs both cert_file and key_file\n")


def test_cut_off_from_its_cluster_it_stays_alive_turns_unready_and_reports_the_age(tmp_path):
    """Its own broker, stopped and started again on the same port and data: the copy's age grows while
    the broker is away, /-/ready says so, and it recovers without a restart."""
    from kafka_backup.cli.devbroker import DevBroker

    own = DevBroker(data_dir=str(tmp_path / "broker"), log_path=str(tmp_path / "broker.log")).start()
    app_id, port = unique("agg"), free_port()
    proc = None
    try:
        create_topic(own.bootstrap, state_topic(app_id), 1)
        proc = Proc(["exporter", "--bootstrap-servers", own.bootstrap, "--app-id", app_id, "--port", str(port),
                     "--metrics-update-interval-ms", "100", "--metrics-ready-max-state-age-s", "3"],
                    str(tmp_path / "exporter.log")).start()
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: get(base + "/-/ready")[0] == 200, 60, 0.2, what="exporter ready")
        own.stop()

        def unready():
            status, _, body = get(base + "/-/ready")
            return status == 503 and body.startswith(b"state not proven current for ")

        wait_for(unready, 60, 0.2, what="/-/ready to notice the broker is gone")
        assert get(base + "/-/healthy")[0::2] == (200, b"ok\n")
        status, _, body = get(base + "/metrics")  # still served, with the age that alerts
        assert status == 200
        assert parse_prometheus(body.decode()).get_value(cat.EXPORTER_STATE_AGE.name) > 3

        own.start()
        wait_for(lambda: get(base + "/-/ready")[0] == 200, 90, 0.2, what="ready again once the broker is back")
        age = parse_prometheus(get(base + "/metrics")[2].decode()).get_value(cat.EXPORTER_STATE_AGE.name)
        assert age is not None and age < 5  # proven again every 2 s
        assert proc.proc.poll() is None
    finally:
        if proc is not None:
            proc.stop()
        own.stop()
