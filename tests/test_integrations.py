"""docker/integrations/: each snippet parses, scrapes our endpoint, and names only catalogue metrics;
the Prometheus-format parts pass `promtool check config`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from kafka_backup.schemas import catalogue as cat
from tests.conftest import ROOT

INTEGRATIONS = os.path.join(ROOT, "docker", "integrations")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(not PROMTOOL and not os.environ.get("CI"),
                                    reason="apt-get install prometheus (CI installs it and never skips)")
SNIPPETS = ("datadog-openmetrics.yaml", "newrelic-remote-write.yml", "splunk-otel-collector.yaml")


def text(name: str) -> str:
    with open(os.path.join(INTEGRATIONS, name), encoding="utf-8") as fh:
        return fh.read()


def known_names() -> set[str]:
    out = set()
    for m in cat.CATALOGUE:
        out |= {m.name, m.name + "_bucket", m.name + "_count", m.name + "_sum", m.family_name}
    return out


@pytest.mark.parametrize("name", SNIPPETS)
def test_snippet_parses_and_names_only_catalogue_metrics(name):
    yaml.safe_load(text(name))
    used = {n for n in re.findall(r"\bkafka_(?:backup|restore|offset_reset)_[a-z0-9_]*[a-z0-9]\b", text(name))}
    assert used <= known_names(), used - known_names()
    for pattern in re.findall(r'regex: "([^"]+)"', text(name)) + re.findall(r'- "(kafka_[^"]+)"', text(name)):
        regex = re.compile(pattern)  # Prometheus and Datadog both anchor their regexes
        assert all(regex.fullmatch(m.name) for m in cat.CATALOGUE), (name, pattern)


def test_datadog_scrapes_the_exporter_endpoint():
    (instance,) = yaml.safe_load(text("datadog-openmetrics.yaml"))["instances"]
    assert instance["openmetrics_endpoint"] == "http://kafka-backup-exporter:8080/metrics"
    assert instance["namespace"] == "kafka_backup"


def test_splunk_collector_pipeline_uses_its_receiver():
    config = yaml.safe_load(text("splunk-otel-collector.yaml"))
    pipeline = config["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["prometheus/kafka-backup"]
    assert set(pipeline["exporters"]) <= set(config["exporters"])
    (job,) = config["receivers"]["prometheus/kafka-backup"]["config"]["scrape_configs"]
    assert (job["metrics_path"], job["static_configs"][0]["targets"]) == ("/metrics", ["kafka-backup-exporter:8080"])


@pytest.mark.e2e
@needs_promtool
@pytest.mark.parametrize("name", ["newrelic-remote-write.yml", "splunk-otel-collector.yaml"])
def test_prometheus_parts_pass_promtool(tmp_path, name):
    with open(os.path.join(ROOT, "docker", "prometheus", "prometheus.yml"), encoding="utf-8") as fh:
        config = yaml.safe_load(fh)
    config.pop("rule_files")
    snippet = yaml.safe_load(text(name))
    if "remote_write" in snippet:
        config["remote_write"] = snippet["remote_write"]
        (tmp_path / "newrelic-license-key").write_text("x\n")
        config["remote_write"][0]["authorization"]["credentials_file"] = str(tmp_path / "newrelic-license-key")
    else:
        config["scrape_configs"] = snippet["receivers"]["prometheus/kafka-backup"]["config"]["scrape_configs"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    r = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
