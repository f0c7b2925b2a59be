"""The contract's own guarantees: generated docs current, names unique, config errors one line."""

from __future__ import annotations

import os

import pytest
import yaml

from kafka_backup.schemas import catalogue as cat
from kafka_backup.schemas.config import ConfigError, load
from tests.conftest import ROOT, cli


def test_metrics_reference_is_generated_and_current():
    with open(os.path.join(ROOT, "docs", "metrics.md"), encoding="utf-8") as fh:
        on_disk = fh.read()
    assert on_disk == cat.render_markdown(), "docs/metrics.md is stale: python -m kafka_backup.schemas.catalogue > docs/metrics.md"


def test_catalogue_names_are_unique_and_well_formed():
    names = [m.name for m in cat.CATALOGUE]
    assert len(names) == len(set(names))
    for m in cat.CATALOGUE:
        assert m.name.startswith(("kafka_backup_", "kafka_restore_", "kafka_offset_reset_"))
        assert (m.type == "counter") == m.name.endswith("_total") or m.name == cat.REBALANCES_TOTAL.name
        assert not m.family_name.endswith("_total"), "prometheus_client would emit _total_total"
        assert bool(m.buckets) == (m.type == "histogram")
        assert list(m.buckets) == sorted(m.buckets)


def test_prd_buckets_are_kept_and_extended():
    """The PRD's bounds stay (queries on them keep working); longer runs and slow calls get more."""
    prd_duration = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
    prd_storage = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
    assert cat.BACKUP_DURATION.buckets[:10] == prd_duration
    assert cat.BACKUP_DURATION.buckets[-1] == 30 * 86400
    assert cat.STORAGE_WRITE_LATENCY.buckets[:9] == prd_storage
    assert cat.STORAGE_WRITE_LATENCY.buckets[-1] == 60


def test_every_legacy_bucket_layout_moves_over_exactly():
    for m in cat.CATALOGUE:
        for old in m.legacy_buckets:
            assert set(old) <= set(m.buckets), m.name


def test_yaml_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("metrics:\n  port: 9100\n  path: /m\nbackup:\n  compression: lz4\n")
    cfg = load(str(path), {"metrics.port": "9200"})
    assert (cfg.metrics.port, cfg.metrics.path, cfg.backup.compression) == (9200, "/m", "lz4")


@pytest.mark.parametrize("yaml_text,needle", [
    ("metrics:\n  prot: 1\n", "metrics.prot: unknown key"),
    ("metrics:\n  port: -3\n", "metrics.port: Expected `int` >= 0"),
    ("backup:\n  compression: brotli\n", "backup.compression: Invalid enum value 'brotli'; one of zstd, lz4, snappy, gzip, none"),
    ("[1, 2]\n", "must hold a mapping"),
    ("metrics: [\n", "is not valid YAML"),
])
def test_bad_config_is_one_line_naming_the_field(tmp_path, yaml_text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load(str(path))
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.e2e
@pytest.mark.parametrize("args,needle", [
    (["backup", "--bootstrap-servers", "127.0.0.1:1", "--topics", "t", "--backup-id", "a/b",
      "--storage", "file:///tmp/x"], "backup.backup_id: 'a/b' is not a safe id"),
    (["backup", "--bootstrap-servers", "127.0.0.1:1", "--backup-id", "ok", "--storage", "file:///tmp/x"],
     "backup.topics: no topics given"),
    (["exporter", "--bootstrap-servers", "127.0.0.1:1", "--port", "70000"], "metrics.port: Expected `int` <= 65535"),
    (["aggregate"], "kafka.bootstrap_servers: not set"),
    (["backup", "--config", "/nonexistent.yaml"], "--config: cannot read /nonexistent.yaml"),
])
def test_cli_user_mistakes_exit_2_with_one_line(args, needle):
    r = cli(*args, env={"KAFKA_BOOTSTRAP_SERVERS": ""})
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_events_reference_is_generated_and_current():
    from kafka_backup.schemas import events

    with open(os.path.join(ROOT, "docs", "events.md"), encoding="utf-8") as fh:
        assert fh.read() == events.render_markdown(), "docs/events.md is stale: python -m kafka_backup.schemas.events > docs/events.md"


def test_configuration_reference_is_generated_and_current():
    from kafka_backup.schemas import config

    with open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8") as fh:
        assert fh.read() == config.render_markdown(), "stale: python -m kafka_backup.schemas.config > docs/configuration.md"


def test_no_metric_uses_a_label_prometheus_owns():
    """Prometheus attaches `job` and `instance` to every scraped series and renames ours to `exported_*`."""
    for m in cat.CATALOGUE:
        assert not {"job", "instance"} & set(m.labels), m.name


def test_every_shipped_alert_has_a_case_that_fires_and_stays_quiet_for_a_fleet_at_rest():
    with open(os.path.join(ROOT, "docker", "prometheus", "rules.yml"), encoding="utf-8") as fh:
        alerts = {r["alert"] for g in yaml.safe_load(fh)["groups"] for r in g["rules"] if "alert" in r}
    with open(os.path.join(ROOT, "tests", "prometheus", "rules_test.yml"), encoding="utf-8") as fh:
        cases = yaml.safe_load(fh)["tests"]
    fires = {t["alertname"] for case in cases for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert alerts <= fires, f"no firing case for {alerts - fires}"
    at_rest = cases[-1]["alert_rule_test"]  # the last case: a healthy fleet for 3 hours
    assert {t["alertname"] for t in at_rest if t["eval_time"] == "3h" and t["exp_alerts"] == []} == alerts
