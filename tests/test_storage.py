"""Segments and storage backends, including S3 over real HTTP (moto's server)."""

from __future__ import annotations

import errno
import os

import boto3
import pytest

from kafka_backup.producers import segments
from kafka_backup.producers.storage import (
    FileBackend,
    Missing,
    OpReport,
    S3Backend,
    Storage,
    StorageError,
    open_backend,
)
from kafka_backup.schemas.config import ConfigError


@pytest.mark.parametrize("algorithm", segments.ALGORITHMS)
def test_segment_round_trip_keeps_every_field(algorithm):
    records = [segments.StoredRecord(10 + i, 1_700_000_000_000 + i, 1, None if i % 3 == 0 else b"k%d" % i,
                                     b"v" * i, [("h", b"1"), ("n", None)]) for i in range(50)]
    data, raw = segments.encode("t", 3, records, algorithm)
    back = segments.decode(data, algorithm)
    assert (back.topic, back.partition, back.records) == ("t", 3, records)
    assert (len(data) == raw) == (algorithm == "none")


def test_corrupt_segment_is_reported_not_crashed():
    data, _ = segments.encode("t", 0, [segments.StoredRecord(0, 0, 1, b"k", b"v")], "zstd")
    with pytest.raises(segments.CorruptSegment):
        segments.decode(data[:-4], "zstd")


def test_file_backend_reports_each_call_and_classifies_errors(tmp_path):
    reports: list[OpReport] = []
    store = Storage(FileBackend(str(tmp_path)), reports.append)
    store.put("a/b.bin", b"12345", "segment")
    assert store.get("a/b.bin", "segment") == b"12345"
    assert store.get_optional("missing", "checkpoint") is None
    with pytest.raises(StorageError) as err:
        store.get("missing", "checkpoint")
    assert err.value.error_type == "not_found" and not err.value.transient
    assert [(r.direction, r.operation, r.nbytes, r.error is None) for r in reports] == [
        ("write", "segment", 5, True), ("read", "segment", 5, True), ("read", "checkpoint", 0, False)]
    assert all(r.latency_s >= 0 for r in reports)
    assert err.value.root == ""  # the object is missing, not the root
    with pytest.raises(Missing) as err:
        Storage(FileBackend(str(tmp_path / "nowhere"))).get("k", "manifest")
    assert err.value.root == str(tmp_path / "nowhere")


def test_transient_failures_are_retried_and_reported(tmp_path):
    class Flaky(FileBackend):
        calls = 0

        def put(self, key, data):
            Flaky.calls += 1
            if Flaky.calls < 3:
                raise StorageError("timeout", "slow")
            super().put(key, data)

    reports: list[OpReport] = []
    Storage(Flaky(str(tmp_path)), reports.append, backoff_s=0).put("x", b"abc", "manifest")
    assert [(r.error.error_type if r.error else None, r.retrying) for r in reports] == [
        ("timeout", True), ("timeout", True), (None, False)]


def test_s3_backend_over_http(s3_endpoint):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="bk-test")
    backend = open_backend("s3://bk-test/some/prefix", s3_endpoint)
    assert isinstance(backend, S3Backend)
    backend.put("b1/x.seg", b"data")
    assert backend.get("b1/x.seg") == b"data"
    obj = boto3.client("s3", endpoint_url=s3_endpoint).head_object(Bucket="bk-test", Key="some/prefix/b1/x.seg")
    assert obj["ContentLength"] == 4
    with pytest.raises(StorageError) as err:
        backend.get("nope")
    assert err.value.error_type == "not_found"
    with pytest.raises(StorageError) as err:
        open_backend("s3://no-such-bucket/p", s3_endpoint).put("k", b"v")
    assert err.value.error_type == "not_found" and err.value.root == "bucket 'no-such-bucket'"


def test_each_backend_says_how_many_calls_are_worth_making_at_once(tmp_path, monkeypatch):
    """A filesystem 8 (its journal is the limit), S3 32 with a connection for each in boto3's pool and
    a few for the main thread's calls (beyond the pool every call would open a new connection);
    ``backup.storage_concurrency`` sets either, within 0..256 (0: the backend's own), and so do
    ``restore.`` and ``verify.storage_concurrency``."""
    from kafka_backup.producers.storage import Storage
    from kafka_backup.schemas.config import load

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert open_backend(f"file://{tmp_path}").concurrency == 8
    assert open_backend(f"file://{tmp_path}", concurrency=2).concurrency == 2
    s3 = open_backend("s3://b/p", "http://127.0.0.1:9")
    assert isinstance(s3, S3Backend)
    assert (s3.concurrency, s3.client.meta.config.max_pool_connections) == (32, 36)
    s3 = open_backend("s3://b/p", "http://127.0.0.1:9", concurrency=64)
    assert isinstance(s3, S3Backend)
    assert (s3.concurrency, s3.client.meta.config.max_pool_connections) == (64, 68)
    assert Storage(s3).concurrency == 64
    assert load(environ={}).backup.storage_concurrency == 0
    assert load(environ={"KAFKA_BACKUP_BACKUP_STORAGE_CONCURRENCY": "16"}).backup.storage_concurrency == 16
    with pytest.raises(ConfigError) as err:
        load(environ={"KAFKA_BACKUP_BACKUP_STORAGE_CONCURRENCY": "257"})
    assert "backup.storage_concurrency" in str(err.value) and "\n" not in str(err.value)
    # a restore and a verify read with it too (checkpoints at once, segments fetched ahead)
    assert load(environ={"KAFKA_BACKUP_RESTORE_STORAGE_CONCURRENCY": "4"}).restore.storage_concurrency == 4
    assert load(None, {"verify.storage_concurrency": 2}, environ={}).verify.storage_concurrency == 2


def test_calls_at_once_run_the_storage_s_concurrency_at_a_time_and_keep_their_order(tmp_path):
    """Four calls on a backend of concurrency 2: two meet at a barrier (one at a time, the first would
    wait alone and fail), the outcomes come in the order asked, an error stays with its call; one
    call runs on the caller's thread."""
    import threading

    from kafka_backup.producers.storage import Storage

    meet = threading.Barrier(2, timeout=10)
    caller = threading.get_ident()

    def call(n: int) -> tuple[int, bool]:
        if n == 2:
            raise ValueError("two")
        meet.wait()
        return n, threading.get_ident() == caller

    storage = Storage(FileBackend(str(tmp_path), concurrency=2))
    done = storage.at_once(call, [(0,), (1,), (2,), (3,), (4,)], "test")
    assert [f.result() for f in done[:2]] == [(0, False), (1, False)] and [f.result()[0] for f in done[3:]] == [3, 4]
    with pytest.raises(ValueError, match="two"):
        done[2].result()
    [alone] = storage.at_once(lambda: threading.get_ident() == caller, [()], "test")
    assert alone.result() is True


def test_reads_ahead_keep_their_order_and_stay_within_concurrency_and_bytes():
    """Sizes 5, 52, 5, 5, 200 with 3 at a time and 60 bytes: the first two start (a third would pass 60),
    each take starts what then fits, the 200-byte one starts alone once nothing is ahead of it; an item
    at hand is passed over, an item out of turn gets nothing, and a read's error comes out of its future."""
    import threading

    from kafka_backup.producers.threads import ReadAhead

    release = threading.Event()

    def read(item: tuple[str, int]) -> str:
        release.wait(10)
        if item[0] == "e":
            raise ValueError("e unreadable")
        return item[0].upper()

    items = [("a", 5), ("b", 52), ("skip", 100), ("c", 5), ("d", 5), ("e", 200)]
    ahead = ReadAhead(read, lambda item: item[1], 3, 60, "test", skip=lambda item: item[0] == "skip")
    ahead.plan(items)
    assert [i for i, _ in ahead.under_way()] == ["a", "b"] and ahead.head() == ("a", 5)
    assert ahead.take(("b", 52)) is None  # not its turn
    release.set()
    taken = []
    for item, then in [(("a", 5), "bc"), (("b", 52), "cd"), (("c", 5), "d"), (("d", 5), "e")]:
        taken.append(ahead.take(item).result())
        assert "".join(i for i, _ in ahead.under_way()) == then  # e (200) starts once nothing is ahead of it
    assert taken == ["A", "B", "C", "D"]
    with pytest.raises(ValueError, match="e unreadable"):
        ahead.take(("e", 200)).result()
    assert ahead.head() is None


@pytest.mark.parametrize("url,field", [("", "backup.storage"), ("ftp://x/y", "unsupported scheme"),
                                       ("s3:///nobucket", "names no bucket"), ("file://host/x", "has a host")])
def test_bad_storage_urls_are_one_line_errors(url, field):
    with pytest.raises(ConfigError) as err:
        open_backend(url)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_spool_keeps_order_and_survives_a_crash(tmp_path):
    from kafka_backup.producers.spool import Spool

    path = str(tmp_path / "s" / "backup-b1.spool")
    spool = Spool(path, max_bytes=60)
    assert [spool.append(b"event-%d" % i) for i in range(6)] == [True] * 5 + [False]  # 5 x (4+7) bytes fit
    assert spool.peek() == b"event-0"
    spool.pop()
    spool.close()  # the process ends with 4 events pending
    with open(path, "ab") as fh:
        fh.write(b"\x00\x00\x00\x09torn")  # a crash in the middle of an append
    again = Spool(path, max_bytes=60)
    assert again.pending == 4
    out = []
    while again.pending:
        out.append(again.peek())
        again.pop()
    assert out == [b"event-1", b"event-2", b"event-3", b"event-4"]
    again.close()
    assert not os.path.exists(path)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names synced files through /proc")
def test_a_file_put_syncs_the_file_then_its_name_and_the_directories_it_created(tmp_path, monkeypatch):
    """A rename is durable only once its directory is synced: otherwise a power loss can keep a
    checkpoint naming a segment whose own rename was lost."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    backend = FileBackend(str(tmp_path))
    backend.put("bk/topics/t/0/checkpoint.json", b"{}")
    root = str(tmp_path)
    assert synced[:4] == [root, f"{root}/bk", f"{root}/bk/topics", f"{root}/bk/topics/t"]  # each new name
    assert synced[4].startswith(f"{root}/bk/topics/t/0/.tmp-")  # the bytes, under the temporary name
    assert synced[5:] == [f"{root}/bk/topics/t/0"]  # then the rename
    synced.clear()
    backend.put("bk/topics/t/0/checkpoint.json", b"{\"v\": 2}")  # nothing created: the file and its name
    assert len(synced) == 2 and synced[1] == f"{root}/bk/topics/t/0"
    assert (tmp_path / "bk/topics/t/0/checkpoint.json").read_bytes() == b"{\"v\": 2}"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names synced files through /proc")
def test_a_file_put_remakes_a_directory_removed_behind_its_back_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """The backend remembers the directories it made durable (no stat a write): one removed since (a
    cleanup of the store while a worker runs) is made again. A write that fails (EIO at the file's
    sync) leaves no temporary file behind and is a failed write."""
    import shutil

    backend = FileBackend(str(tmp_path))
    backend.put("bk/topics/t/0/a.seg", b"one")
    shutil.rmtree(tmp_path / "bk")
    backend.put("bk/topics/t/0/b.seg", b"two")
    assert sorted(os.listdir(tmp_path / "bk/topics/t/0")) == ["b.seg"]
    assert backend.get("bk/topics/t/0/b.seg") == b"two"
    real = os.fsync

    def fsync(fd: int) -> None:
        if not os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageError) as err:
        backend.put("bk/topics/t/0/c.seg", b"three")
    assert err.value.error_type == "unknown" and "c.seg" in str(err.value)
    assert sorted(os.listdir(tmp_path / "bk/topics/t/0")) == ["b.seg"]


@pytest.mark.parametrize("code, fails", [(errno.EINVAL, False), (errno.ENOTSUP, False), (errno.EIO, True)])
def test_a_filesystem_that_cannot_sync_a_directory_still_takes_writes_but_a_failing_one_does_not(
        tmp_path, monkeypatch, code, fails):
    """Some network and FUSE mounts refuse to fsync a directory (EINVAL): every backup to them must not
    start failing for it. A directory sync that fails for another reason (EIO) is a failed write."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    backend = FileBackend(str(tmp_path))
    if fails:
        with pytest.raises(StorageError):
            backend.put("bk/k", b"data")
    else:
        backend.put("bk/k", b"data")
        assert (tmp_path / "bk/k").read_bytes() == b"data"
