"""Deployment files checked without a Docker engine: compose, the Dockerfile, Grafana provisioning,
the Prometheus config, the constraints file, and the choice of test broker (testcontainers)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement

from tests import conftest
from tests.conftest import ROOT

DOCKER = os.path.join(ROOT, "docker")
PROMTOOL = shutil.which("promtool")


def load_yaml(*parts: str):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def test_compose_parses_pins_its_images_and_mounts_files_that_exist():
    compose = load_yaml("docker", "compose.yml")
    services = compose["services"]
    assert set(services) == {"backup", "aggregate", "exporter", "prometheus", "grafana"}
    for name, svc in services.items():
        if "build" in svc:
            assert os.path.isfile(os.path.join(DOCKER, svc["build"]["context"], svc["build"]["dockerfile"])), name
        image = svc["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: pin an exact version, not {image!r}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert os.path.exists(os.path.join(DOCKER, source)), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    grafana = services["grafana"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    assert "./grafana/kafka-backup.json:/var/lib/grafana/dashboards/kafka-backup.json:ro" in grafana
    assert "/-/ready" in " ".join(services["exporter"]["healthcheck"]["test"])


def test_grafana_is_provisioned_with_the_prometheus_datasource_and_the_dashboard():
    (ds,) = load_yaml("docker", "grafana", "provisioning", "datasources", "prometheus.yml")["datasources"]
    assert (ds["type"], ds["url"], ds["isDefault"]) == ("prometheus", "http://prometheus:9090", True)
    (provider,) = load_yaml("docker", "grafana", "provisioning", "dashboards", "kafka-backup.yml")["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = load_yaml("docker", "grafana", "kafka-backup.json")  # JSON is YAML
    assert {v["type"]: v["query"] for v in dashboard["templating"]["list"]}["datasource"] == "prometheus"


def test_dockerfile_pins_its_base_exposes_the_port_labels_and_installs_with_constraints():
    with open(os.path.join(DOCKER, "Dockerfile"), encoding="utf-8") as fh:
        text = fh.read()
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    assert re.search(r"^EXPOSE 8080$", text, re.M)
    for label in ("title", "description", "version"):
        assert f"org.opencontainers.image.{label}=" in text
    assert "pip install --no-cache-dir -c constraints.txt ." in text and "constraints.txt" in text.split("RUN")[0]
    assert re.search(r"^USER 65534:65534$", text, re.M)


@pytest.mark.e2e
@pytest.mark.skipif(not PROMTOOL, reason="apt-get install prometheus")
def test_promtool_accepts_the_prometheus_config():
    r = subprocess.run([PROMTOOL, "check", "config", os.path.join(DOCKER, "prometheus", "prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_constraints_pin_every_dependency_within_pyproject_and_are_used():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    with open(os.path.join(ROOT, "constraints.txt"), encoding="utf-8") as fh:
        pins = dict(line.strip().split("==") for line in fh if line.strip() and not line.startswith("#"))
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]
              + project["optional-dependencies"]["dev"]]
    for req in wanted:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} not in constraints.txt: run python .ci/lock.py"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req}: constraints.txt pins {pins[name]}"
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as fh:
        assert "pip install -q -c constraints.txt -e '.[test]'" in fh.read()


# ---- the test broker ------------------------------------------------------------------------


@pytest.mark.parametrize("environ,source", [
    ({}, "embedded"),
    ({"KAFKA_BACKUP_TEST_BROKER": "embedded"}, "embedded"),
    ({"KAFKA_BACKUP_TEST_BROKER": "testcontainers"}, "testcontainers"),
    ({"KAFKA_BACKUP_TEST_BROKER": " TestContainers "}, "testcontainers"),
    ({"KAFKA_BACKUP_TEST_BROKER": "testcontainers", "KAFKA_BOOTSTRAP_SERVERS": "k:9092"}, "external"),
])
def test_broker_selection(environ, source):
    assert conftest.broker_source(environ) == source


def test_an_unknown_broker_choice_is_refused():
    with pytest.raises(pytest.UsageError, match=r"^KAFKA_BACKUP_TEST_BROKER: 'docker' is not one of embedded, "
                                                r"testcontainers$"):
        conftest.broker_source({"KAFKA_BACKUP_TEST_BROKER": "docker"})


def test_testcontainers_kafka_is_importable_and_configured_without_docker():
    cls = conftest.kafka_container_class()
    assert cls.__name__ == "KafkaContainer" and hasattr(cls, "get_bootstrap_server")

    class Fake:
        def __init__(self, image: str) -> None:
            self.image, self.kraft = image, False

        def with_kraft(self):
            self.kraft = True
            return self

    made = conftest.kafka_container({}, Fake)
    assert (made.image, made.kraft) == ("confluentinc/cp-kafka:7.6.0", True)
    made = conftest.kafka_container({"KAFKA_BACKUP_TEST_KAFKA_IMAGE": "confluentinc/cp-kafka:7.7.1"}, Fake)
    assert made.image == "confluentinc/cp-kafka:7.7.1"


def test_a_test_not_marked_e2e_cannot_start_a_process():
    with pytest.raises(conftest.ProcessOutsideE2E, match=r"test_deploy_files.py::test_a_test_not_marked_e2e_cannot"
                                                         r"_start_a_process starts a process \(true\) but is not marked e2e"):
        subprocess.run(["true"])


def test_a_test_asking_for_a_process_fixture_without_the_e2e_marker_is_refused_at_collection():
    from types import SimpleNamespace

    def item(nodeid: str, fixtures: list[str], e2e: bool):
        return SimpleNamespace(nodeid=nodeid, fixturenames=fixtures,
                               get_closest_marker=lambda name: object() if e2e and name == "e2e" else None)

    conftest.pytest_collection_modifyitems(None, [item("t.py::marked", ["broker", "tmp_path"], True),
                                                  item("t.py::pure", ["tmp_path"], False)])
    with pytest.raises(pytest.UsageError, match=r"^tests that start processes must be marked e2e: "
                                                r"t.py::unmarked uses \['pipeline_factory'\]$"):
        conftest.pytest_collection_modifyitems(None, [item("t.py::unmarked", ["pipeline_factory", "tmp_path"], False)])
