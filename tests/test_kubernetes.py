"""docker/kubernetes/: rendered offline with `kubectl kustomize` and every object validated against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors). ServiceMonitor and
PrometheusRule are CRDs the package has no schema for: they are skipped by name and checked here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

kv = pytest.importorskip("kubernetes_validate")

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(not KUBECTL and not os.environ.get("CI"),
                                   reason="apt-get install kubectl (CI installs it and never skips)")
K8S = os.path.join(ROOT, "docker", "kubernetes")
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}

pytestmark = pytest.mark.e2e  # every test renders with kubectl or runs generate.py: a process


def render(directory: str) -> list[dict]:
    r = subprocess.run([KUBECTL or "kubectl", "kustomize", directory], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.fixture(scope="module")
def base() -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in render(K8S)}


def pod_spec(obj: dict) -> dict:
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


@needs_kubectl
@pytest.mark.parametrize("directory", [K8S, os.path.join(K8S, "restore")])
def test_every_object_is_valid_kubernetes(directory):
    skipped = []
    for obj in render(directory):
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            skipped.append(obj["kind"])  # no schema in kubernetes-validate: checked by the tests below
            continue
        kv.validate(obj, kv.latest_version(), strict=True)  # raises ValidationError naming the field
    assert sorted(skipped) == (["PrometheusRule", "ServiceMonitor"] if directory == K8S else [])


@needs_kubectl
def test_the_objects_a_deployment_needs(base):
    assert sorted(base) == [
        "ConfigMap/" + next(k.split("/")[1] for k in base if k.startswith("ConfigMap/")),
        "CronJob/kafka-backup-orders", "Deployment/kafka-backup-exporter", "PrometheusRule/kafka-backup",
        "Service/kafka-backup-aggregator", "Service/kafka-backup-exporter", "ServiceMonitor/kafka-backup-exporter",
        "StatefulSet/kafka-backup-aggregator"]
    cron = base["CronJob/kafka-backup-orders"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["startingDeadlineSeconds"] == 3600
    job = cron["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 3 and job["activeDeadlineSeconds"] == 21600
    assert job["podFailurePolicy"]["rules"][0] == {
        "action": "FailJob", "onExitCodes": {"containerName": "backup", "operator": "In", "values": [2]}}
    assert job["template"]["spec"]["restartPolicy"] == "Never"

    agg = base["StatefulSet/kafka-backup-aggregator"]
    container = pod_spec(agg)["containers"][0]
    assert container["args"][container["args"].index("--instance-id") + 1] == "$(POD_NAME)"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]

    exporter = pod_spec(base["Deployment/kafka-backup-exporter"])["containers"][0]
    assert exporter["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert exporter["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    monitor = base["ServiceMonitor/kafka-backup-exporter"]["spec"]
    service = base["Service/kafka-backup-exporter"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}


@needs_kubectl
def test_pods_run_as_non_root_with_requests_and_secrets_as_files(base):
    for key, obj in base.items():
        if obj["kind"] not in ("Deployment", "StatefulSet", "CronJob"):
            continue
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True, key
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, key
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert (sc["allowPrivilegeEscalation"], sc["readOnlyRootFilesystem"], sc["capabilities"]) == (
                False, True, {"drop": ["ALL"]}), key
            assert set(c["resources"]["requests"]) == {"cpu", "memory"}, key
            assert all("secretKeyRef" not in e.get("valueFrom", {}) for e in c.get("env", [])), key
        secrets = [v for v in spec["volumes"] if "secret" in v]
        assert secrets and all(v["secret"]["defaultMode"] == 0o440 for v in secrets), key


def test_prometheusrule_is_generated_from_the_rules_file():
    r = subprocess.run([sys.executable, os.path.join(K8S, "generate.py"), "--check"], capture_output=True)
    assert r.returncode == 0, "docker/kubernetes/prometheusrule.yaml is stale: run python docker/kubernetes/generate.py"
    with open(os.path.join(ROOT, "docker", "prometheus", "rules.yml"), encoding="utf-8") as fh:
        rules = yaml.safe_load(fh)
    with open(os.path.join(K8S, "prometheusrule.yaml"), encoding="utf-8") as fh:
        generated = yaml.safe_load(fh)
    assert generated["spec"]["groups"] == rules["groups"]


@needs_kubectl
def test_every_container_command_line_and_the_config_file_are_accepted(base):
    """What the pods run must get past the CLI's parser and the configuration checks."""
    from kafka_backup.cli.main import build_parser
    from kafka_backup.schemas.config import load

    cfg = load(os.path.join(K8S, "config.yaml"), environ={})
    assert (cfg.metrics.bind, cfg.metrics.port) == ("0.0.0.0", 8080)
    objects = list(base.values()) + render(os.path.join(K8S, "restore"))
    commands = []
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "CronJob", "Job"):
            for container in pod_spec(obj)["containers"]:
                args = build_parser().parse_args(container["args"])  # exits 2 on a bad flag
                commands.append(args.command)
                assert args.config == "/etc/kafka-backup/config.yaml"
    assert sorted(commands) == ["aggregate", "backup", "exporter", "restore"]
