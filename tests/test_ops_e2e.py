"""Issue 11, for real: settings from the environment and secrets from files reaching running processes,
and one JSON log format for all three sources of the aggregator's lines."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import bcrypt
import pytest

from kafka_backup.cli.devbroker import free_port
from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas.topics import state_topic
from tests.conftest import ROOT, backup, cli, create_topic, parse_prometheus, produce, unique, wait_for

pytestmark = pytest.mark.e2e


def start(args: list[str], log_path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kafka_backup.cli.main", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env={**os.environ, **env})


def stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def test_the_environment_and_secret_files_configure_a_running_exporter(broker, tmp_path):
    app_id = unique("agg")
    create_topic(broker, state_topic(app_id), 1)
    (tmp_path / "hash").write_text(bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode() + "\n")
    port = free_port()
    env = {"KAFKA_BACKUP_KAFKA_BOOTSTRAP_SERVERS": broker, "KAFKA_BACKUP_AGGREGATOR_APP_ID": app_id,
           "KAFKA_BACKUP_METRICS_PORT": str(port), "KAFKA_BACKUP_METRICS_BASIC_AUTH_USERNAME": "prom",
           "KAFKA_BACKUP_METRICS_BASIC_AUTH_PASSWORD_BCRYPT_FILE": str(tmp_path / "hash"),
           "KAFKA_BACKUP_METRICS_PATH": "/m"}
    env_without_bootstrap = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    proc = subprocess.Popen([sys.executable, "-m", "kafka_backup.cli.main", "exporter"], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=open(tmp_path / "exporter.log", "wb"), stderr=subprocess.STDOUT,
                            env={**env_without_bootstrap, **env})

    def get(path: str, password: str | None) -> tuple[int, str]:
        headers = {"Authorization": "Basic " + base64.b64encode(f"prom:{password}".encode()).decode()
                   } if password else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers),
                                        timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, ""

    try:
        wait_for(lambda: get("/health", None)[0] == 200, 60, 0.2, what="exporter up on the port from the environment")
        assert get("/m", None)[0] == 401  # the username from the environment, the hash from its file
        assert get("/m", "wrong")[0] == 401
        status, body = get("/m", "s3cret")
        assert status == 200
        build = parse_prometheus(body).matching(cat.BUILD_INFO.name)
        assert list(build.values()) == [1.0]
    finally:
        assert stop(proc) == 0, (tmp_path / "exporter.log").read_text()[-2000:]


def test_a_bad_environment_value_stops_a_process_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kafka_backup.cli.main", "exporter", "--bootstrap-servers", "127.0.0.1:1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "KAFKA_BACKUP_METRICS_PORT": "eighty"})
    assert r.returncode == 2
    assert r.stderr == ("kafka-backup exporter: error: environment KAFKA_BACKUP_METRICS_PORT: Expected `int`, "
                        "got `str` (metrics.port)\n")


def test_the_aggregator_logs_json_from_our_code_faust_and_librdkafka(broker, tmp_path):
    """Every line of a real aggregator's output is one JSON object; all three sources are there.

    librdkafka is made to log by a consumer-only raw property, which its admin clients (producers)
    warn about (CONFWARN); the property also makes the aggregator log that aiokafka ignores it.
    """
    app_id = unique("agg")
    log_path = tmp_path / "aggregator.log"
    proc = start(["aggregate", "--bootstrap-servers", broker, "--app-id", app_id,
                  "--kafka-property", "fetch.wait.max.ms=100"], log_path, {"KAFKA_BACKUP_LOG_FORMAT": "json"})

    def lines() -> list[dict]:
        return [json.loads(line) for line in log_path.read_text().splitlines()]

    def sources() -> set[str]:
        found = set()
        for rec in lines():
            logger = rec["logger"]
            found.add("ours" if logger.startswith("kafka_backup.") else
                      "faust" if logger.split(".")[0] in ("faust", "mode") else
                      "librdkafka" if logger == "librdkafka" else "other")
        return found

    try:
        wait_for(lambda: {"ours", "faust", "librdkafka"} <= sources(), 90, 0.5,
                 what="log lines from our logger, faust/mode and librdkafka")
        # the worker is up and logging steadily: enough lines to check
    finally:
        code = stop(proc)
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"line {n} is not JSON: {line!r}") from None
    for rec in records:
        assert {"time", "level", "logger", "message"} <= rec.keys(), rec
        assert dt.datetime.fromisoformat(rec["time"]).utcoffset() == dt.timedelta(0), rec["time"]
        assert rec["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), rec
    ours = [r for r in records if r["logger"] == "kafka_backup.aggregator"]
    assert any("fetch.wait.max.ms applies to librdkafka clients only" in r["message"] for r in ours)
    assert all((r["job"], r["instance"]) == (app_id, f"{app_id}@{socket.gethostname()}") for r in ours)
    rdkafka = [r for r in records if r["logger"] == "librdkafka"]
    assert any("fetch.wait.max.ms is a consumer property" in r["message"] and r["level"] == "WARNING"
               for r in rdkafka), rdkafka
    assert any(r["logger"].startswith(("faust.", "mode.")) and r["level"] == "INFO" for r in records)
    assert not any(r["level"] == "DEBUG" for r in records)  # a long-running process defaults to INFO


def test_metrics_output_textfile_and_json_hold_the_runs_own_metrics(broker, tmp_path):
    """A one-shot backup and a verify write their metrics at the end; read back by Prometheus' own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    topic, bid = unique("orders"), unique("bk")
    create_topic(broker, topic, 3)
    truth = produce(broker, topic, 3, 600)
    store = tmp_path / "store"
    prom = tmp_path / "textfile" / "backup.prom"
    prom.parent.mkdir()
    backup(broker, topic, bid, f"file://{store}", "--metrics-output", str(prom))
    assert [p.name for p in prom.parent.iterdir()] == ["backup.prom"]  # no temporary file left behind
    samples = {}
    for family in text_string_to_metric_families(prom.read_text()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    want = {
        (cat.RECORDS_TOTAL.name, frozenset({("backup_id", bid)})): truth.total_records,
        (cat.BYTES_TOTAL.name, frozenset({("backup_id", bid)})): truth.total_bytes,
        (cat.BACKUP_DURATION.name + "_count", frozenset({("backup_id", bid), ("status", "success")})): 1,
    }
    for key, value in want.items():
        assert samples.get(key) == value, key
    for p in range(3):  # caught up at the end of the run: the lag it reported is 0 on every partition
        key = (cat.LAG_RECORDS.name, frozenset({("topic", topic), ("partition", str(p)), ("backup_id", bid)}))
        assert samples[key] == 0
    segments = [os.path.join(d, f) for d, _, fs in os.walk(store / bid) for f in fs if ".seg" in f]
    assert samples[(cat.COMPRESSED_BYTES.name, frozenset({("algorithm", "zstd"), ("backup_id", bid)}))] == sum(
        os.path.getsize(f) for f in segments)

    out = tmp_path / "verify.json"
    r = cli("verify", "--bootstrap-servers", broker, "--backup-id", bid, "--storage", f"file://{store}",
            "--metrics-output", str(out))
    assert r.returncode == 0, r.stderr
    metrics = json.loads(out.read_text())
    assert metrics[cat.VERIFY_SEGMENTS_TOTAL.name] == [{"labels": {"backup_id": bid}, "value": len(segments)}]
    assert metrics[cat.VERIFY_FAILED_SEGMENTS.name] == [{"labels": {"backup_id": bid}, "value": 0}]
    assert metrics[cat.VERIFY_DURATION.name + "_count"] == [
        {"labels": {"backup_id": bid, "status": "success"}, "value": 1}]


def test_metrics_output_to_a_missing_directory_is_refused_before_the_run(tmp_path):
    r = cli("backup", "--bootstrap-servers", "127.0.0.1:1", "--topics", "t", "--backup-id", "b",
            "--storage", f"file://{tmp_path}", "--metrics-output", str(tmp_path / "no" / "m.prom"), timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("kafka-backup backup: error: run.metrics_output: cannot write ")
    assert len(r.stderr.splitlines()) == 1


def test_raw_properties_from_a_file_reach_librdkafka_and_the_aggregator(broker, tmp_path):
    """SASL set only as raw client properties, from a client.properties file named in the environment.

    The dev broker accepts any SASL/PLAIN credentials but no SCRAM: the aggregator (aiokafka) logging
    its PLAIN login as the file's user, a backup succeeding with them, and one with SCRAM given as a
    --kafka-property failing, show the properties reach both kinds of client.
    """
    props = tmp_path / "client.properties"
    props.write_text("security.protocol=SASL_PLAINTEXT\nsasl.mechanism=PLAIN\nsasl.username=props-user\n"
                     "sasl.password=props-secret\n")
    env = {"KAFKA_BACKUP_KAFKA_PROPERTIES_FILE": str(props)}
    app_id = unique("agg")
    log_path = tmp_path / "aggregator.log"
    proc = start(["aggregate", "--bootstrap-servers", broker, "--app-id", app_id], log_path, env)
    try:
        wait_for(lambda: "Authenticated as props-user via PLAIN" in log_path.read_text(), 90, 0.5,
                 what="the aggregator's aiokafka login with the file's credentials")
    finally:
        assert stop(proc) == 0, log_path.read_text()[-2000:]

    topic, bid = unique("props"), unique("bk-props")
    create_topic(broker, topic, 2)
    produce(broker, topic, 2, 50)
    r = cli("backup", "--bootstrap-servers", broker, "--topics", topic, "--backup-id", bid,
            "--storage", f"file://{tmp_path}/store", env=env)
    assert r.returncode == 0, r.stderr[-1000:]
    r = cli("backup", "--bootstrap-servers", broker, "--topics", topic, "--backup-id", unique("bk-scram"),
            "--storage", f"file://{tmp_path}/store", "--kafka-property", "sasl.mechanism=SCRAM-SHA-512",
            "--telemetry-bootstrap-servers", broker.replace("127.0.0.1", "localhost"), env=env)
    assert r.returncode == 1 and "failed: kafka:" in r.stderr, r.stderr[-1000:]
