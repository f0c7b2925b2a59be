"""Backup throughput against a bare confluent-kafka consume loop, measured side by side in one run.

Fills a topic, then alternates, ``repeats`` times:

* ``bare``: a consumer (new group, from the earliest offset) calling ``consume(1000)`` until it
  has seen every record, touching each record's key and value: the ceiling of any Python backup
  (the issue's baseline);
* ``bare-full``: the same loop also reading what a backup must keep of each record besides key and
  value: offset, timestamp and headers (confluent-kafka builds a new list of header tuples per
  record on ``headers()``, a cost no Python backup can skip without losing the headers);
* ``ours``: ``python -m kafka_backup.cli.main backup`` (one-shot, zstd, telemetry on to the same broker, file
  storage in a temp dir, or with ``s3`` an S3 bucket served over HTTP by moto's server in its own
  process: storage round trips, which the sealing threads take off the fetch loop; ``s3:30`` puts
  a proxy in front of it that holds every request 30 ms, the round trip moto on the loopback lacks
  and S3 has).

Each runs in its own process; wall time and CPU time (user + system, from ``wait4``) cover the
whole process, start-up included for both. Prints records/s, MB/s and CPU seconds, and the ratios
ours/bare (rate) and ours/bare (CPU); min/median over the repeats.

    python bench/backup.py [records] [partitions] [repeats] [file|s3]
    python bench/backup.py 1200000 1,4,128 3      # the cost per record at each partition count
    python bench/backup.py 300000 4,128 2 s3:30   # S3 with 30 ms added to every request
    BENCH_PYSPY=/tmp/backup.txt python bench/backup.py ...   # also py-spy's collapsed stacks of ours

With several partition counts (comma-separated), each gets its own topic of ``records`` records
and the comparison above, then a table of the cost per record (wall and CPU, start-up
subtracted) at each count: whether it stays flat from 1 to 128 partitions (issue 12). The
per-segment work (a file, a checkpoint, their fsyncs) is fixed per partition, so keep the
records per partition realistic: at 300,000 records on 128 partitions a segment holds 2,300.

Starts its own dev broker unless KAFKA_BOOTSTRAP_SERVERS is set. The dev broker ignores fetch
size limits and answers with all it holds: above ~90 MB of records, both processes raise
librdkafka's ``receive.message.max.bytes`` to 1 GB (ours by ``--kafka-receive-message-max-bytes``).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import bootstrap_servers, compare, int_args, ours, pyspy, timed  # noqa: E402

BARE = r'''
import sys, time
from confluent_kafka import Consumer, TopicPartition
bootstrap, topic, n, partitions = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[5])
full = sys.argv[6] == "full"
c = Consumer({"bootstrap.servers": bootstrap, "group.id": sys.argv[4], "enable.auto.commit": False,
              **({"receive.message.max.bytes": int(sys.argv[7])} if int(sys.argv[7]) else {})})
c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])  # as a one-shot backup does
seen = size = 0
while seen < n:
    for m in c.consume(1000, 1.0):
        if m.error():
            continue
        seen += 1
        size += len(m.key() or b"") + len(m.value() or b"")
        if full:
            m.offset(), m.timestamp(), m.headers()
c.close()
'''


def fill(bootstrap: str, topic: str, partitions: int, records: int) -> int:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(15)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4"})
    payload = 0
    for i in range(records):
        key = b"key-%d" % i
        value = b"value-%d-" % i + b"x" * (150 + i % 100)
        p.produce(topic, key=key, value=value, partition=i % partitions, headers=[("h", b"%d" % (i % 7))])
        payload += len(key) + len(value)
        if i % 10_000 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    return payload


class _Delayed(http.server.BaseHTTPRequestHandler):
    """Forwards each request to moto after ``delay`` seconds: S3's round trip, which moto on the
    loopback does not have (tens of milliseconds from a VM in the bucket's region)."""

    protocol_version = "HTTP/1.1"
    upstream = ("127.0.0.1", 0)
    delay = 0.0
    local = threading.local()

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(self.delay)
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response_only(resp.status, resp.reason)
        for key, value in resp.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def delayed(endpoint: str, delay_ms: int) -> Iterator[str]:
    """An endpoint in front of ``endpoint`` adding ``delay_ms`` to every request (threads: requests
    in parallel wait in parallel, as S3's do)."""
    host, port = endpoint.removeprefix("http://").split(":")
    handler = type("Handler", (_Delayed,), {"upstream": (host, int(port)), "delay": delay_ms / 1000,
                                            "local": threading.local()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def s3_bucket(delay_ms: int = 0) -> Iterator[tuple[str, str]]:
    """A bucket on moto's S3 server, run in its own process: (storage URL prefix, endpoint URL);
    with ``delay_ms``, the endpoint adds that much to every request (:func:`delayed`)."""
    import boto3

    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-backup")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        if delay_ms:
            with delayed(endpoint, delay_ms) as slow:
                yield "s3://bench-backup/", slow
        else:
            yield "s3://bench-backup/", endpoint
    finally:
        server.kill()
        server.wait()


RECEIVE_MAX = 1_000_000_000  # librdkafka's ceiling; the dev broker's replies exceed its 100 MB default above ~90 MB


def storage_choice(arg: str) -> tuple[str, int]:
    """A bench's storage argument, ``file``, ``s3`` or ``s3:<ms>``: (kind, milliseconds added to each request);
    anything else ends the bench with one line."""
    kind, _, delay = arg.partition(":")
    if kind not in ("file", "s3") or (delay and (kind != "s3" or not delay.isdigit())):
        sys.exit(f"storage: {arg!r} is not file, s3 or s3:<milliseconds added to each request>")
    return kind, int(delay or 0)


@contextlib.contextmanager
def backups(name: str, records: int, partitions: int, storage: str,
            *backup_args: str) -> Iterator[tuple[str, str, list[str], dict[str, tuple[str, str, int]]]]:
    """A work directory, a broker, the storage named by ``storage`` and two backups in it, made by ``ours``
    (zstd, and ``backup_args``): of a topic of ``records`` and of an empty one (start-up alone). Yields the
    work directory (removed afterwards), the bootstrap servers, the storage options every command of ours
    takes, and ``{"full"|"empty": (topic, backup id, records)}``."""
    kind, delay_ms = storage_choice(storage)
    work = tempfile.mkdtemp(prefix=f"bench-{name}-")
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        bootstrap = stack.enter_context(bootstrap_servers(name))
        store, endpoint = (stack.enter_context(s3_bucket(delay_ms)) if kind == "s3"
                           else (f"file://{work}/store/", ""))
        where = ["--storage", store + "bench", *(["--s3-endpoint-url", endpoint] if endpoint else [])]
        sources = {}
        for which, n in (("full", records), ("empty", 0)):
            topic = f"bench-src-{which}-" + uuid.uuid4().hex[:6]
            fill(bootstrap, topic, partitions, n)
            bid = f"bench-{which}-" + uuid.uuid4().hex[:6]
            timed(ours("backup", "--bootstrap-servers", bootstrap, "--topics", topic, "--backup-id", bid, *where,
                       "--compression", "zstd", *backup_args), os.path.join(work, f"backup-{which}.log"))
            sources[which] = (topic, bid, n)
        yield work, bootstrap, where, sources


def main() -> None:
    args = sys.argv[1:]
    records, = int_args(args[:1], 200_000)
    counts = [int(p) for p in args[1].split(",")] if len(args) > 1 else [4]
    repeats, = int_args(args[2:3], 3)
    storage = args[3] if len(args) > 3 else "file"
    kind, delay_ms = storage_choice(storage)
    receive_max = RECEIVE_MAX if records * 260 > 90_000_000 else 0
    work = tempfile.mkdtemp(prefix="bench-backup-")
    with contextlib.ExitStack() as stack:
        bootstrap = stack.enter_context(bootstrap_servers("backup"))
        bucket, endpoint = stack.enter_context(s3_bucket(delay_ms)) if kind == "s3" else ("", "")
        try:
            bare_py = os.path.join(work, "bare.py")
            with open(bare_py, "w") as fh:
                fh.write(BARE)
            per_record = {}
            for partitions in counts:
                steady = run_count(bootstrap, bucket, endpoint, work, bare_py, records, partitions, repeats,
                                   storage, receive_max)
                per_record[partitions] = {name: (1e6 / rate, 1e6 * cpu / records) for name, (rate, cpu) in steady.items()}
            if len(counts) > 1:
                print_per_record(per_record, counts)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def run_count(bootstrap: str, bucket: str, endpoint: str, work: str, bare_py: str, records: int, partitions: int,
              repeats: int, storage: str, receive_max: int) -> dict[str, tuple[float, float]]:
    """Fill a topic of ``partitions`` partitions, run the interleaved comparison, print it; the
    start-up-subtracted (records/s, CPU s) of each process."""
    topic = "bench-src-" + uuid.uuid4().hex[:6]
    payload = fill(bootstrap, topic, partitions, records)
    empty = "bench-empty-" + uuid.uuid4().hex[:6]
    fill(bootstrap, empty, partitions, 0)
    os.sync()  # the broker's unsynced writes of the fill, else written back by our first run's first fsync
    names = ("bare", "bare-full", "ours")
    runs: dict[str, list[dict[str, float]]] = {k: [] for n in names for k in (n, f"{n}-empty")}
    tag = f"p{partitions}"

    def bare(source: str, n: int, log: str, full: bool = False) -> dict[str, float]:
        return timed([sys.executable, bare_py, bootstrap, source, str(n), "bench-bare-" + uuid.uuid4().hex[:6],
                      str(partitions), "full" if full else "kv", str(receive_max)], os.path.join(work, log))

    def backup(source: str, log: str, spy: list[str]) -> dict[str, float]:
        # Each run its own store, all removed with the work directory at the end: removing one between
        # runs charged the next run's file creations and fsyncs with the deletion (the disk here is
        # mounted with ``discard``: freed blocks are trimmed at the next journal commit, which a run's
        # first fsync waits for), by up to 0.2 s of system time at 128 partitions.
        store = os.path.join(work, "store-" + uuid.uuid4().hex[:6])
        where = (["--storage", bucket + uuid.uuid4().hex[:6], "--s3-endpoint-url", endpoint] if bucket
                 else ["--storage", f"file://{store}"])
        limit = ["--kafka-receive-message-max-bytes", str(receive_max)] if receive_max else []
        return timed([*spy, *ours("backup", "--bootstrap-servers", bootstrap, "--topics", source,
                                  "--backup-id", "bench-" + uuid.uuid4().hex[:6], *where,
                                  "--compression", "zstd", *limit)],
                     os.path.join(work, log))

    for r in range(repeats):  # interleaved: a noisy neighbour hits both
        runs["bare"].append(bare(topic, records, f"bare-{tag}-{r}.log"))
        runs["bare-full"].append(bare(topic, records, f"bare-full-{tag}-{r}.log", full=True))
        runs["ours"].append(backup(topic, f"ours-{tag}-{r}.log", pyspy(r == 0)))  # py-spy: the first run
        runs["bare-empty"].append(bare(empty, 0, f"bare-empty-{tag}-{r}.log"))  # start-up and shut-down alone
        runs["bare-full-empty"].append(bare(empty, 0, f"bare-full-empty-{tag}-{r}.log", full=True))
        runs["ours-empty"].append(backup(empty, f"ours-empty-{tag}-{r}.log", []))
    print(f"{records} records ({payload / records:.0f} B key+value, 1 header) on {partitions} partitions, "
          f"{repeats} runs each, whole process (start-up included); ours stores to {storage}")
    return compare(runs, records, payload, baselines=("bare", "bare-full"))


def print_per_record(per_record: dict[int, dict[str, tuple[float, float]]], counts: list[int]) -> None:
    """Wall and CPU microseconds per record (start-up subtracted) at each partition count, and ours
    against its own cost at the first count: flat means about 1.00x down the column."""
    print("cost per record, start-up subtracted: wall us / CPU us")
    print(f"  {'partitions':>10s}  {'bare':>13s}  {'bare-full':>13s}  {'ours':>13s}  ours vs {counts[0]} partition(s)")
    first = per_record[counts[0]]["ours"]
    for n in counts:
        row = per_record[n]
        cells = "  ".join(f"{row[k][0]:5.2f} / {row[k][1]:5.2f}" for k in ("bare", "bare-full", "ours"))
        print(f"  {n:>10d}  {cells}  wall {row['ours'][0] / first[0]:.2f}x, CPU {row['ours'][1] / first[1]:.2f}x")


if __name__ == "__main__":
    main()
