"""Shared fixtures: a real broker process, and helpers to run the pipeline's real processes.

The broker is noida-db started as a subprocess on a free loopback port, unless
``KAFKA_BOOTSTRAP_SERVERS`` names a real cluster, or ``KAFKA_BACKUP_TEST_BROKER=testcontainers``
asks for a real Apache Kafka in Docker (testcontainers; needs a Docker engine). Every test uses its own
topics, backup ids and aggregator application id, so tests share one broker
without seeing each other's data.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from moto.server import ThreadedMotoServer
from prometheus_client.parser import text_string_to_metric_families

from kafka_backup.cli.devbroker import DevBroker, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A test that starts a process (a broker, the pipeline, Prometheus, the command line) is an e2e test,
# so that `pytest -m "not e2e"` runs in seconds. Enforced twice: asking for a fixture that starts one
# without the marker is a collection error, and starting one any other way fails the test.
PROCESS_FIXTURES = frozenset({"broker", "pipeline_factory", "shared_pipeline", "telemetry_cluster"})
# Started by libraries at import time, not by a test: platform.architecture() runs `file` on the interpreter
# (croniter, imported by Faust's mode, calls it).
LIBRARY_PROBES = frozenset({"file"})
_running: list = [None]  # the test item whose setup, call or teardown is running


class ProcessOutsideE2E(Exception):
    pass


def pytest_collection_modifyitems(config, items):
    unmarked = [f"{item.nodeid} uses {sorted(PROCESS_FIXTURES & set(item.fixturenames))}" for item in items
                if PROCESS_FIXTURES & set(item.fixturenames) and item.get_closest_marker("e2e") is None]
    if unmarked:
        raise pytest.UsageError("tests that start processes must be marked e2e: " + "; ".join(unmarked))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running[0] = item
    try:
        yield
    finally:
        _running[0] = None


def pytest_configure(config):
    """Every process start goes through the guard, fixtures of any scope included."""
    real_init = subprocess.Popen.__init__

    def guarded_init(self, args, *rest, **kwargs):
        item = _running[0]
        program = os.path.basename(str(args if isinstance(args, (str, bytes, os.PathLike)) else args[0]))
        if item is not None and item.get_closest_marker("e2e") is None and program not in LIBRARY_PROBES:
            raise ProcessOutsideE2E(f"{item.nodeid} starts a process ({program}) but is not marked e2e")
        real_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = guarded_init


@pytest.fixture(autouse=True)
def _collector_as_it_was():
    """A job run in the test's own process (``schemas.collector.collect_rarely``) freezes what exists and raises the
    collector's threshold for the whole process: both put back after the test."""
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)
    gc.unfreeze()


@pytest.fixture(scope="session", autouse=True)
def _faust_data_dirs_in_tmp(tmp_path_factory):
    """Faust keeps an aggregator's data dir in its working directory ("<app id>-data" in the repository
    root) unless APP_DATADIR, Faust's own setting, says otherwise (no aggregate flag sets it): every
    process a test starts inherits this one, under pytest's temporary directory."""
    old = os.environ.get("APP_DATADIR")
    os.environ["APP_DATADIR"] = str(tmp_path_factory.mktemp("faust") / "{conf.name}-data")
    yield
    if old is None:
        os.environ.pop("APP_DATADIR", None)
    else:
        os.environ["APP_DATADIR"] = old


@pytest.fixture(scope="session")
def s3_endpoint():
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


# How long a test waits for an aggregator it (re)started to fold again. Faust 0.15.3 can come back
# from a start "ready" and then fetch nothing, or hang in recovery; the watchdogs restart it in place
# after 30 s (aggregator.delivery_stall_s, recovery_stall_s), and the restarted process starts Faust
# and recovers its table again: 60 s was not always enough on a loaded CI machine.
AFTER_RESTART_S = 150.0

BROKER_ENV = "KAFKA_BACKUP_TEST_BROKER"  # embedded (default) | testcontainers
KAFKA_IMAGE_ENV = "KAFKA_BACKUP_TEST_KAFKA_IMAGE"
KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"  # Apache Kafka 3.6 in KRaft mode, testcontainers' tested default


def broker_source(environ=None) -> str:
    """Which broker the suite runs against: ``external`` (KAFKA_BOOTSTRAP_SERVERS names one),
    ``testcontainers`` (a real Kafka in Docker, KAFKA_BACKUP_TEST_BROKER=testcontainers) or
    ``embedded`` (noida-db, the default: no Docker engine needed)."""
    environ = os.environ if environ is None else environ
    if environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return "external"
    choice = environ.get(BROKER_ENV, "embedded").strip().lower() or "embedded"
    if choice not in ("embedded", "testcontainers"):
        raise pytest.UsageError(f"{BROKER_ENV}: {choice!r} is not one of embedded, testcontainers")
    return choice


def kafka_container_class():
    try:
        from testcontainers.community.kafka import KafkaContainer  # testcontainers >= 4.9
    except ImportError:  # older releases
        from testcontainers.kafka import KafkaContainer
    return KafkaContainer


def kafka_container(environ=None, cls=None):
    """A testcontainers Kafka in KRaft mode, not started (constructing it already asks the Docker engine)."""
    environ = os.environ if environ is None else environ
    cls = cls or kafka_container_class()
    try:
        return cls(environ.get(KAFKA_IMAGE_ENV) or KAFKA_IMAGE).with_kraft()
    except Exception as err:  # docker.errors.DockerException: no engine
        pytest.fail(f"{BROKER_ENV}=testcontainers: no Docker engine reachable ({type(err).__name__}); "
                    f"unset it to use the embedded broker", pytrace=False)


@pytest.fixture(scope="session")
def broker():
    """Bootstrap address of a running Kafka-protocol broker (see :func:`broker_source`)."""
    source = broker_source()
    if source == "external":
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    elif source == "testcontainers":
        with kafka_container() as kafka:
            yield kafka.get_bootstrap_server()
    else:
        with DevBroker(log_path=os.path.join(tempfile.gettempdir(), "kafka-backup-test-broker.log")) as b:
            yield b.bootstrap


class FakeMessage:
    """A confluent-kafka Message, as the backup's ``_take`` and the exporter's state reader read one."""

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None = b"k", value: bytes | None = b"vv",
                 headers: list | None = None, error: object = None) -> None:
        self._t, self._p, self._o, self._k, self._v, self._h, self._e = topic, partition, offset, key, value, headers, error

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes | None:
        return self._v

    def headers(self) -> list | None:
        return self._h

    def timestamp(self) -> tuple[int, int]:
        return 1, 1_790_000_000_000 + self._o

    def error(self) -> object:
        return self._e


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(15)


@dataclass
class Produced:
    """Ground truth of what a test produced, computed on the producing side."""

    base_ts: int = 0  # record i has timestamp base_ts + i (ms)
    records: dict[int, int] = field(default_factory=dict)  # partition -> count
    bytes: dict[int, int] = field(default_factory=dict)  # partition -> key+value bytes

    @property
    def total_records(self) -> int:
        return sum(self.records.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def produce(bootstrap: str, topic: str, partitions: int, n: int, seed: int = 0,
            truth: Produced | None = None) -> Produced:
    """Produce n records round-robin with varied keys, values and headers; return the truth."""
    # Recent timestamps: records older than the topic's retention.ms would be deleted at once.
    truth = truth or Produced(base_ts=int(time.time() * 1000) - 3_600_000)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(n):
        part = i % partitions
        key = f"key-{seed}-{i}".encode() if i % 5 else None
        value = (f"value-{seed}-{i}-" + "x" * ((i * 7) % 120)).encode()
        p.produce(topic, value=value, key=key, partition=part, headers=[("h", str(i).encode())],
                  timestamp=truth.base_ts + i)
        truth.records[part] = truth.records.get(part, 0) + 1
        truth.bytes[part] = truth.bytes.get(part, 0) + len(key or b"") + len(value)
    assert p.flush(30) == 0
    return truth


def watermarks(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("wm")})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    finally:
        c.close()


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kafka_backup.cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def backup(broker: str, topic: str, backup_id: str, storage: str, *extra: str) -> None:
    """A one-shot backup through the real command line; it must succeed."""
    r = cli("backup", "--bootstrap-servers", broker, "--topics", topic, "--backup-id", backup_id,
            "--storage", storage, *extra)
    assert r.returncode == 0, r.stderr


def wait_for(predicate: Callable[[], object], timeout: float = 60, interval: float = 0.5, what: str = ""):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as err:  # not ready yet: keep the last error for the message
            last = err
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: last={last!r}")


class Samples(dict):
    """{(name, frozenset(labels.items())): value} with a friendly getter."""

    def get_value(self, name: str, **labels) -> float | None:
        return self.get((name, frozenset((k, str(v)) for k, v in labels.items())))

    def matching(self, name: str, **labels) -> dict:
        want = {(k, str(v)) for k, v in labels.items()}
        return {k: v for k, v in self.items() if k[0] == name and want <= k[1]}


def parse_prometheus(text: str) -> Samples:
    out = Samples()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def state_counters(text: str) -> dict[tuple[str, frozenset], float]:
    """The samples of every counter and histogram served from the aggregator's state (the
    exporter's own endpoint counters live in its process and start again with it)."""
    from kafka_backup.schemas import catalogue as cat

    cumulative = {m.name.removesuffix("_total") for m in cat.CATALOGUE
                  if m.type in ("counter", "histogram") and m.section != cat.S9}
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) if fam.name in cumulative
            for s in fam.samples if not s.name.endswith("_created")}


class Proc:
    def __init__(self, args: list[str], log_path: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Proc:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "kafka_backup.cli.main", *self.args], cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **self.env})
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()[-4000:]


class Pipeline:
    """A real aggregator process and a real exporter process on one telemetry cluster."""

    def __init__(self, bootstrap: str, tmp: str, app_id: str | None = None,
                 extra_aggregator_args: list[str] | None = None,
                 extra_exporter_args: list[str] | None = None) -> None:
        self.bootstrap = bootstrap
        self.app_id = app_id or unique("agg")
        self.port = free_port()
        self.tmp = tmp
        self.extra_aggregator_args = extra_aggregator_args or []
        self.workers: list[Proc] = []
        self.highest: dict[tuple[str, frozenset], float] = {}  # each state counter's highest value served
        # one scrape at a time, checked in the order served: a test's background scraper and its main thread
        # both scrape, and a page served first but checked second would look like a counter that fell
        self._scrape_lock = threading.Lock()
        self.aggregator = self._aggregator_proc(1)
        self.exporter = Proc(["exporter", "--bootstrap-servers", bootstrap, "--app-id", self.app_id,
                              "--port", str(self.port), "--metrics-update-interval-ms", "100",
                              *(extra_exporter_args or [])],
                             os.path.join(tmp, f"{self.app_id}-exporter.log"))

    def _aggregator_proc(self, n: int) -> Proc:
        # with the pipeline's files, also when a bench uses it outside pytest (see _faust_data_dirs_in_tmp)
        datadir = os.path.join(self.tmp, f"{self.app_id}-{n}-data")
        return Proc(["aggregate", "--bootstrap-servers", self.bootstrap, "--app-id", self.app_id,
                     "--instance-id", f"{self.app_id}-{n}", "--log-level", "INFO", *self.extra_aggregator_args],
                    os.path.join(self.tmp, f"{self.app_id}-aggregator-{n}.log"), env={"APP_DATADIR": datadir})

    def add_aggregator_worker(self) -> Proc:
        """Another worker of the same Faust application (a fleet's second aggregator host)."""
        proc = self._aggregator_proc(len(self.workers) + 2).start()
        self.workers.append(proc)
        return proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Pipeline:
        self.aggregator.start()
        self.exporter.start()
        wait_for(lambda: self.health() == 200, 60, what="exporter /health")
        return self

    def stop(self) -> None:
        self.exporter.stop()
        for w in self.workers:
            w.stop()
        self.aggregator.stop()

    def health(self) -> int:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code

    def scrape_text(self, accept: str | None = None) -> tuple[str, str]:
        req = urllib.request.Request(self.url + "/metrics", headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.read().decode(), r.headers.get("Content-Type", "")

    def scrape(self) -> Samples:
        """The exporter's samples; every test that scrapes also checks that no counter served from
        the state ever fell, across aggregator and exporter kills, restarts and rebalances."""
        with self._scrape_lock:
            text = self.scrape_text()[0]
            self.check_no_counter_fell(text)
        return parse_prometheus(text)

    def check_no_counter_fell(self, text: str) -> None:
        fell = []
        for key, value in state_counters(text).items():
            before = self.highest.get(key)
            if before is not None and value < before:
                fell.append(f"{key[0]}{dict(key[1])}: {before} -> {value}")
            else:
                self.highest[key] = value
        assert not fell, ("counters fell (Prometheus would read a reset):\n" + "\n".join(fell[:20])
                          + f"\n--- exporter log ---\n{self.exporter.log()}"  # a position reset is logged there
                          + f"\n--- aggregator log ---\n{self.aggregator.log()}")

    def assert_state_never_fell(self, *keys_with: str, timeout: float = 60) -> int:
        """Read the state topic from its start and check, from the broker's own log, that no job state the
        aggregator wrote would serve a counter lower than an earlier state of the same key did.

        Scrapes only sample what the exporter served; this checks every value ever written, in offset
        order (a key's values share one partition), which is what any exporter started at any time reads.
        Each value is rendered alone by the exporter's collector. ``keys_with``: check only the keys that
        contain one of these (default: all). Returns how many values were checked.
        """
        from prometheus_client import CollectorRegistry, generate_latest

        from kafka_backup.exporter.collector import StateCollector
        from kafka_backup.exporter.state_reader import StateReader
        from kafka_backup.schemas.topics import state_topic

        topic = state_topic(self.app_id)
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": unique("audit"),
                             "enable.auto.commit": False, "enable.partition.eof": True})
        try:
            partitions = sorted(consumer.list_topics(topic, timeout=15).topics[topic].partitions)
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
            ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15, cached=False)[1]
                    for p in partitions}
            reader = StateReader(self.bootstrap, self.app_id)  # its decoding only: never started
            one: dict = {}
            registry = CollectorRegistry(auto_describe=False)
            registry.register(StateCollector(lambda: one))
            highest: dict[tuple[str, str, frozenset], tuple[float, int]] = {}  # -> (value, offset); a key: one partition
            fell: list[str] = []
            checked, done, deadline = 0, set(), time.monotonic() + timeout
            while len(done) < len(partitions):
                assert time.monotonic() < deadline, f"the state topic {topic} was not read to its end in {timeout}s"
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF and msg.offset() >= ends[msg.partition()]:
                        done.add(msg.partition())
                    continue
                key = (msg.key() or b"").decode()
                if (keys_with and not any(k in key for k in keys_with)) or msg.value() is None:
                    continue
                reader.apply(msg.key(), msg.value())
                one.clear()
                one[key] = reader.snapshot().get(key)
                if one[key] is None:  # refused by the exporter too (counted there): nothing served from it
                    continue
                checked += 1
                for name_labels, value in state_counters(generate_latest(registry).decode()).items():
                    series = (key, *name_labels)  # shared series (by backend, ...) are each key's own share here
                    before = highest.get(series)
                    if before is not None and value < before[0]:
                        fell.append(f"{key}: {series[1]}{dict(series[2])}: {before[0]} at {msg.partition()}/{before[1]} "
                                    f"-> {value} at {msg.partition()}/{msg.offset()}")
                    elif before is None or value > before[0]:
                        highest[series] = (value, msg.offset())
        finally:
            consumer.close()
        assert checked, f"no state value of a key with any of {keys_with} on {topic}"
        assert not fell, "the aggregator wrote a state whose counters fell:\n" + "\n".join(fell[:20])
        return checked

    def caught_up(self, timeout: float = 120, topic: str | None = None) -> Samples:
        """Wait until the aggregator has folded everything produced to the telemetry topic so far.

        A marker event goes to every partition (events of other tests, still being read by a
        pipeline that started late, land in shared series such as storage latency by backend).
        """
        from kafka_backup.schemas import catalogue as cat
        from kafka_backup.schemas import events as ev
        from kafka_backup.schemas.topics import TELEMETRY_TOPIC

        topic = topic or TELEMETRY_TOPIC
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        partitions = sorted(admin.list_topics(topic, timeout=15).topics[topic].partitions)
        base = unique("caught-up")
        p = Producer({"bootstrap.servers": self.bootstrap})
        for partition in partitions:  # one job per partition: a job's state lives in one partition
            job = f"{base}-{partition}"
            marker = ev.Retry(worker=job, seq=1, ts=time.time(), job=job, operation="marker")
            p.produce(topic, ev.encode(marker), ev.event_key("backup", job).encode(), partition=partition)
        assert p.flush(15) == 0

        def all_seen() -> Samples | None:
            s = self.scrape()
            seen = [s.get_value(cat.RETRIES_TOTAL.name, backup_id=f"{base}-{q}", operation="marker") for q in partitions]
            return s if all(v == 1 for v in seen) else None

        return wait_for(all_seen, timeout, what="the aggregator to fold a marker on every telemetry partition")

    def state_read_since(self, since: float, timeout: float = 60) -> Samples:
        """Wait until the exporter has proven its copy of the state topic current at or after ``since``
        (``time.time()``): every state write the broker held by then is in what it serves.

        The exporter's state age is the time since it last saw every partition read to the end the broker
        reported; scraping at ``asked`` and seeing age ``a`` means it was current at ``asked - a`` or later.
        """
        from kafka_backup.schemas import catalogue as cat

        def current() -> Samples | None:
            asked = time.time()
            s = self.scrape()
            age = s.get_value(cat.EXPORTER_STATE_AGE.name)
            return s if age is not None and asked - age >= since else None

        return wait_for(current, timeout, 0.2, what=f"the exporter to read the state topic to its end after {since}")

    def wait_value(self, name: str, expected: float, timeout: float = 60, **labels) -> Samples:
        return self.wait_values((name, expected, labels), timeout=timeout)

    def wait_values(self, *expected: tuple[str, float, dict], timeout: float = 60) -> Samples:
        """The first scrape where each ``(name, value, labels)`` holds: values that come from different
        events (a run's error, then its end) may be folded in different flushes, so one is waited for
        with the others, never read on the strength of another having arrived."""
        def check():
            s = self.scrape()
            return s if all(s.get_value(name, **labels) == value for name, value, labels in expected) else None

        try:
            return wait_for(check, timeout, what=" and ".join(f"{n}{lb} == {v}" for n, v, lb in expected))
        except AssertionError:
            scraped = self.scrape()
            got = "; ".join(f"{n}{lb}: expected {v}, got {scraped.get_value(n, **lb)}" for n, v, lb in expected)
            lag = {(k[0].removeprefix("kafka_backup_telemetry_lag_"), dict(k[1]).get("partition")): v
                   for k, v in scraped.items() if k[0].startswith("kafka_backup_telemetry_lag")}
            raise AssertionError(
                f"{got}; telemetry lag (what, partition): {lag}"
                f"\n--- aggregator log ---\n{self.aggregator.log()}"
                + "".join(f"\n--- aggregator worker {n} log ---\n{w.log()}" for n, w in enumerate(self.workers, 2))
                + f"\n--- exporter log ---\n{self.exporter.log()}") from None


@pytest.fixture
def pipeline_factory(broker, tmp_path):
    made: list[Pipeline] = []

    def make(app_id: str | None = None, **kwargs) -> Pipeline:
        p = Pipeline(broker, str(tmp_path), app_id, **kwargs)
        made.append(p)
        return p.start()

    yield make
    for p in made:
        p.stop()


@pytest.fixture(scope="module")
def shared_pipeline(broker, tmp_path_factory):
    """One aggregator and exporter for tests that only add their own backup ids."""
    p = Pipeline(broker, str(tmp_path_factory.mktemp("pipeline"))).start()
    yield p
    p.stop()


def indexed_segments(root: str, checkpoint: dict) -> list[dict]:
    """Every segment entry a partition's checkpoint names, read independently of producers/layout.py:
    the sealed index chunks (layout 2, followed through ``index`` and ``previous``) then the head's own."""
    import json

    out: list[dict] = []
    ref = checkpoint.get("index")
    while ref:
        with open(os.path.join(root, *ref["key"].split("/")), "rb") as fh:
            chunk = json.load(fh)
        out[:0] = chunk["segments"]
        ref = chunk.get("previous")
    return out + checkpoint["segments"]
