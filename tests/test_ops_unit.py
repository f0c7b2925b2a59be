"""Issue 11: what SRE tooling reads from a process: its version and build info."""

from __future__ import annotations

import importlib.metadata
import platform

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kafka_backup.exporter.collector import EndpointCounters, StateCollector
from kafka_backup.schemas import catalogue as cat
from tests.conftest import cli, parse_prometheus


def _expected() -> dict[str, str]:
    """Independent of schemas.build: the installed distributions and the pyproject's version source."""
    import kafka_backup.schemas

    return {"version": kafka_backup.schemas.__version__, "python": platform.python_version(),
            "faust": importlib.metadata.version("faust-streaming"),
            "confluent_kafka": importlib.metadata.version("confluent-kafka")}


@pytest.mark.e2e
def test_version_flag_names_the_versions():
    r = cli("--version", timeout=60)
    want = _expected()
    assert r.returncode == 0, r.stderr
    assert r.stdout == (f"kafka-backup {want['version']} (python {want['python']}, faust {want['faust']}, "
                        f"confluent-kafka {want['confluent_kafka']})\n")


def test_the_exporter_serves_build_info_and_a_replay_does_not():
    def scrape(endpoint):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StateCollector(lambda: {}, endpoint=endpoint))
        return parse_prometheus(generate_latest(registry).decode())

    live = scrape(EndpointCounters())
    assert live.matching(cat.BUILD_INFO.name) == {(cat.BUILD_INFO.name, frozenset(_expected().items())): 1.0}
    assert scrape(None).matching(cat.BUILD_INFO.name) == {}  # replay output stays machine-independent


def test_json_log_lines_carry_zone_level_logger_message_job_and_instance(capsys):
    import datetime as dt
    import json
    import logging

    from kafka_backup.schemas import logs

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, dict(logs._context))
    try:
        logs.configure("INFO", "json")
        logs.set_context(job="orders-bk", instance="host-1-42")
        logging.getLogger("kafka_backup.backup").warning("partition %d: %s", 3, "slow")
        logging.getLogger("librdkafka").info("FAIL [rdkafka#consumer-1] connect refused")
        logging.getLogger("faust.worker").debug("below the level: not written")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logs._context.clear()
        logs._context.update(saved[2])
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(r["level"], r["logger"], r["message"], r["job"], r["instance"]) for r in lines] == [
        ("WARNING", "kafka_backup.backup", "partition 3: slow", "orders-bk", "host-1-42"),
        ("INFO", "librdkafka", "FAIL [rdkafka#consumer-1] connect refused", "orders-bk", "host-1-42")]
    for r in lines:
        assert dt.datetime.fromisoformat(r["time"]).utcoffset() == dt.timedelta(0)
