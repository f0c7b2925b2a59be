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

from cli.devbroker import free_port
from schemas import catalogue as cat
from schemas.topics import state_topic
from tests.conftest import ROOT, create_topic, parse_prometheus, unique, wait_for

pytestmark = pytest.mark.e2e


def start(args: list[str], log_path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
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
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "exporter"], cwd=ROOT, stdin=subprocess.DEVNULL,
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
    r = subprocess.run([sys.executable, "-m", "cli.main", "exporter", "--bootstrap-servers", "127.0.0.1:1"],
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
