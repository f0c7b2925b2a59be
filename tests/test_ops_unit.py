"""Issue 11: what SRE tooling reads from a process: its version and build info."""

from __future__ import annotations

import importlib.metadata
import platform

from prometheus_client import CollectorRegistry, generate_latest

from exporter.collector import EndpointCounters, StateCollector
from schemas import catalogue as cat
from tests.conftest import cli, parse_prometheus


def _expected() -> dict[str, str]:
    """Independent of schemas.build: the installed distributions and the pyproject's version source."""
    import schemas

    return {"version": schemas.__version__, "python": platform.python_version(),
            "faust": importlib.metadata.version("faust-streaming"),
            "confluent_kafka": importlib.metadata.version("confluent-kafka")}


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
