"""``kafka-backup up``: the whole product on one machine, for a first look.

Starts the embedded broker (unless a cluster is configured), a demo topic with
a steady demo workload, then the three real processes exactly as a fleet runs
them (continuous backup, aggregator, exporter), and prints the metrics URL.
Ctrl-C stops everything in reverse order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import yaml
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from kafka_backup.cli.devbroker import DevBroker
from kafka_backup.schemas.config import Config, env_for, keys_for
from kafka_backup.schemas.kafka_admin import client_config, ensure_topic

DEMO_TOPIC = "demo.orders"
DEMO_PARTITIONS = 3
DEMO_BACKUP_ID = "demo"
DEMO_RATE = 200  # records per second
# The embedded broker answers a fetch with everything it holds past the offset, and never compacts:
# the state topic grows about 45 MB an hour here, and a reply above librdkafka's 100 MB default is
# refused, stalling the reader. 1 GB keeps a restarted exporter able to catch up for about 20 hours.
DEV_BROKER_RECEIVE_MAX_BYTES = 1_000_000_000


def _demo_workload(bootstrap: str, stop: threading.Event) -> None:
    producer = Producer(client_config(bootstrap, **{"linger.ms": 20}))
    i = 0
    while not stop.is_set():
        tick = time.monotonic()
        for _ in range(DEMO_RATE // 10):
            producer.produce(DEMO_TOPIC, key=f"customer-{i % 97}".encode(),
                             value=(f'{{"order": {i}, "amount": {i % 1000}, "note": "' + "x" * (i % 200) + '"}')
                             .encode(), headers=[("source", b"demo")])
            i += 1
        producer.poll(0)
        stop.wait(max(0.0, 0.1 - (time.monotonic() - tick)))
    producer.flush(10)


def env_value(value: Any) -> str:
    """A configuration value as its environment variable's text (schemas.config reads it back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return str(value)


def child_env(command: str, overrides: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the ``command`` child: ours (so KAFKA_BACKUP_* variables reach it too),
    plus each setting given to ``up`` as a flag that ``command`` reads, as its variable: in the
    environment, not on the command line, so a secret given to ``up`` does not show in ``ps``."""
    env = dict(os.environ if environ is None else environ)
    reads = {key for key, _ in keys_for(command)}
    for key, value in overrides.items():
        if key in reads and value is not None:
            env[env_for(key)] = env_value(value)
    return env


def _receive(cfg: Config, embedded: bool) -> list[str]:
    """Children that read the embedded broker need to accept its oversized fetch replies."""
    return (["--kafka-receive-message-max-bytes", str(DEV_BROKER_RECEIVE_MAX_BYTES)] if embedded
            else [f"--kafka-receive-message-max-bytes={cfg.kafka.receive_message_max_bytes}"])


def _common(cfg: Config, bootstrap: str, embedded: bool) -> list[str]:
    return ["--bootstrap-servers", bootstrap, "--app-id", cfg.aggregator.app_id, *_receive(cfg, embedded)]


def child_commands(cfg: Config, overrides: dict[str, Any], config_path: str | None, bootstrap: str,
                   embedded: bool, storage: str) -> list[tuple[str, list[str]]]:
    """(command, argv) of the three processes: the configuration file, then what ``up`` decides.

    Everything else ``up`` was given (security, telemetry topic, signing key, auth, log format ...)
    reaches them through :func:`child_env`; the flags here win over it.
    """
    me = [sys.executable, "-m", "kafka_backup.cli.main"]
    conf = ["--config", config_path] if config_path else []
    receive = _receive(cfg, embedded)
    common = _common(cfg, bootstrap, embedded)
    return [
        ("aggregate", [*me, "aggregate", *conf, *common]),
        ("exporter", [*me, "exporter", *conf, *common, "--bind", cfg.metrics.bind, "--port", str(cfg.metrics.port),
                      "--metrics-path", cfg.metrics.path]),
        ("backup", [*me, "backup", *conf, "--bootstrap-servers", bootstrap, *receive, "--topics", DEMO_TOPIC,
                    "--backup-id", DEMO_BACKUP_ID, "--storage", storage, "--continuous",
                    "--compression", cfg.backup.compression, "--aggregator-app-id", cfg.aggregator.app_id]),
    ]


def run_up(cfg: Config, overrides: dict[str, Any] | None = None, config_path: str | None = None) -> int:
    broker = None
    bootstrap = cfg.kafka.bootstrap_servers
    if not bootstrap:
        broker = DevBroker(data_dir=os.path.abspath(".noida-db")).start()
        bootstrap = broker.bootstrap
        print(f"up: embedded broker (noida-db) on {bootstrap}", flush=True)
    ensure_topic(AdminClient(client_config(bootstrap)), DEMO_TOPIC, DEMO_PARTITIONS)
    stop = threading.Event()
    workload = threading.Thread(target=_demo_workload, args=(bootstrap, stop), daemon=True)
    workload.start()
    storage = cfg.backup.storage or f"file://{os.path.abspath('kafka-backup-data')}"
    config_path = os.path.abspath(config_path) if config_path else None
    procs = [subprocess.Popen(argv, env=child_env(command, overrides or {}))
             for command, argv in child_commands(cfg, overrides or {}, config_path, bootstrap, broker is not None,
                                                 storage)]
    url = f"http://{cfg.metrics.bind}:{cfg.metrics.port}{cfg.metrics.path}"
    print(f"up: demo workload -> {DEMO_TOPIC} ({DEMO_RATE} records/s), continuous backup '{DEMO_BACKUP_ID}' "
          f"-> {storage}", flush=True)
    print(f"up: metrics at {url}  (Ctrl-C to stop)", flush=True)
    watch = " ".join(["kafka-backup status", *_common(cfg, bootstrap, broker is not None), "--watch"])
    print(f"up: watch the fleet with: {watch}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    status = 0
    while not done.wait(1.0):
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            print(f"up: a process exited with status {dead[0].returncode}; stopping", file=sys.stderr)
            status = 1
            break
    stop.set()
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    if broker:
        broker.stop()
    return status
