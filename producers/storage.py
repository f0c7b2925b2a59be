"""Storage backends (filesystem, S3) and the timing wrapper that reports every call.

Backends only move bytes and raise :class:`StorageError` with a PRD error type
(timeout, auth, not_found, quota, unknown); "not there" is always :class:`Missing`
(a ``not_found`` StorageError), which also says when the storage root itself (a
directory, a bucket) is missing. :class:`Storage` wraps one backend
to time each call from request to response, retry transient failures, and
report it all through a callback, so the workers' code never measures by hand.
What :class:`Storage` needs of a backend is the :class:`Backend` protocol.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from kafka_backup.schemas.config import ConfigError

TRANSIENT = frozenset({"timeout", "quota", "unknown"})
# A file backend's temporary names: this process's own token, then a serial (several processes may
# write to one root: a fleet's workers on a shared mount; O_EXCL refuses a name in use all the same)
_TMP_TOKEN = secrets.token_hex(6)
_TMP_SERIAL = itertools.count()
# a new file, written bytes as they are (O_BINARY: no newline translation where there is one, Windows)
_NEW_FILE = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_BINARY", 0))
T = TypeVar("T")


class StorageError(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type

    @property
    def transient(self) -> bool:
        return self.error_type in TRANSIENT


class Missing(StorageError):
    """No such object (error type ``not_found``). ``root`` names the storage root when that is what is
    missing (a directory that does not exist, a bucket), so callers tell a wrong ``--storage`` from a
    missing object without knowing the backend; empty when only the object is missing."""

    def __init__(self, message: str, root: str = "") -> None:
        super().__init__("not_found", message)
        self.root = root


class Backend(Protocol):
    """What :class:`Storage` needs of a backend (:class:`FileBackend`, :class:`S3Backend`): whole objects
    by key, and the names under a prefix. Failures are :class:`StorageError`s; absence is :class:`Missing`."""

    @property
    def name(self) -> str:
        """The backend's label in metrics (``filesystem``, ``s3``)."""
        ...

    @property
    def concurrency(self) -> int:
        """How many calls are worth making at once (a backup's sealing threads, its checkpoint readers)."""
        ...

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def children(self, prefix: str) -> list[str]: ...


# Storage calls a backup makes at once by default (``backup.storage_concurrency`` 0). A filesystem's
# are bound by its journal: 16 or 32 sealing threads stored 128 partitions no faster than 8. S3's
# are bound by each request's round trip: with 30 ms added to every request, 32 at once took a third
# off a 128-partition run (bench/backup.py ... s3:30, docs/performance.md).
FILE_CONCURRENCY = 8
S3_CONCURRENCY = 32
# stored bytes of the objects a restore or verify fetches ahead and has not used yet (one object always)
READ_AHEAD_BYTES = 64 * 1024 * 1024


class FileBackend:
    """Local or mounted filesystem; writes are atomic (temp file, fsync, rename) so a crash never leaves half a segment."""

    name = "filesystem"

    def __init__(self, root: str, concurrency: int = 0) -> None:
        self.root = os.path.abspath(root)
        self.concurrency = concurrency or FILE_CONCURRENCY
        self._durable_dirs: set[str] = set()  # made (or found) by this backend, their names synced

    def _path(self, key: str) -> str:
        path = os.path.normpath(os.path.join(self.root, *key.split("/")))
        if path != self.root and not path.startswith(self.root.rstrip(os.sep) + os.sep):
            # keys come from metadata too: one naming "../x" must not reach outside the storage root
            raise StorageError("auth", f"{key}: outside the storage root {self.root}; refused")
        return path

    def put(self, key: str, data: bytes) -> None:
        """Durable once it returns: the file's bytes and its name (a rename is recorded in its
        directory, which is synced too, and so are the directories this call created: without it, a
        power loss could keep a checkpoint that names a segment whose rename was lost)."""
        path = self._path(key)
        directory = os.path.dirname(path)
        try:
            try:
                tmp = self._write_new(directory, data)
            except FileNotFoundError:  # removed behind this backend's back: made again
                self._durable_dirs.discard(directory)
                tmp = self._write_new(directory, data)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
            _fsync_dir(directory)
        except OSError as err:
            raise _classify_os(err, key) from None

    def _write_new(self, directory: str, data: bytes) -> str:
        """``data`` in a new file of ``directory`` under a temporary name, synced; that name.

        Bare system calls, not ``tempfile`` and a buffered file: a call each that sealing threads
        make with the interpreter's lock released and must take again, against the fetch loop (13
        calls a write were 8; bench/backup.py at 128 partitions)."""
        if directory not in self._durable_dirs:
            _makedirs_durably(directory)
            self._durable_dirs.add(directory)
        tmp = os.path.join(directory, f".tmp-{_TMP_TOKEN}-{next(_TMP_SERIAL)}")
        fd = os.open(tmp, _NEW_FILE, 0o600)
        try:
            try:
                with memoryview(data) as view:
                    written = 0
                    while written < len(view):
                        written += os.write(fd, view[written:])
                os.fsync(fd)
            finally:
                os.close(fd)  # a network filesystem may report a failed write only here
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as fh:
                return fh.read()
        except FileNotFoundError as err:
            raise Missing(f"{key}: {err.strerror or err}", "" if os.path.isdir(self.root) else self.root) from None
        except OSError as err:
            raise _classify_os(err, key) from None

    def children(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` ("a/b/" -> ["c", "d"]): the backups of a storage root, say."""
        base = self._path(prefix) if prefix else self.root
        try:
            return sorted(n for n in os.listdir(base) if not n.startswith(".") and os.path.isdir(os.path.join(base, n)))
        except FileNotFoundError:
            return []
        except OSError as err:
            raise _classify_os(err, prefix) from None


def _fsync_dir(path: str) -> None:
    """Make the names in a directory durable (POSIX; elsewhere a directory cannot be opened to sync).

    A filesystem that cannot sync a directory (some network and FUSE mounts answer EINVAL or
    EBADF, as PostgreSQL's ``fsync_fname`` also allows for) has no way to make a rename durable:
    that is no failed write, and every backup to it must not start failing; any other error is one.
    """
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _makedirs_durably(path: str) -> None:
    """``os.makedirs``, then each created directory's name synced in its parent."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if not missing:
        return
    os.makedirs(missing[0], exist_ok=True)
    for created in reversed(missing):
        _fsync_dir(os.path.dirname(created))


def _classify_os(err: OSError, key: str) -> StorageError:
    if err.errno == errno.ENOENT:
        return Missing(f"{key}: {err.strerror or err}")
    kind = {
        errno.EACCES: "auth",
        errno.EPERM: "auth",
        errno.ENOSPC: "quota",
        errno.EDQUOT: "quota",
        errno.ETIMEDOUT: "timeout",
    }.get(err.errno or 0, "unknown")
    return StorageError(kind, f"{key}: {err.strerror or err}")


class S3Backend:
    """Any S3 API (AWS, MinIO, GCS interoperability) through boto3."""

    name = "s3"

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None, concurrency: int = 0) -> None:
        import boto3
        from botocore.config import Config as BotoConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.concurrency = concurrency or S3_CONCURRENCY
        # boto3's own retries would hide retries from our metrics: we retry, and count, ourselves. Its
        # pool (10 by default) holds a connection for each call at once, and a few for the main thread's
        # (the manifest, the groups' offsets): beyond the pool, every call would open a new connection.
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url or None,
            config=BotoConfig(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                              max_pool_connections=self.concurrency + 4),
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        self._call(self.client.put_object, key, Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes:
        resp = self._call(self.client.get_object, key, Bucket=self.bucket, Key=self._key(key))
        data: bytes = resp["Body"].read()
        return data

    def children(self, prefix: str) -> list[str]:
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        base = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
                out += [p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        except Exception as err:
            raise _classify_boto(err, prefix, self.bucket) from None
        return sorted(out)

    def _call(self, fn: Callable[..., Any], key: str, **kwargs: Any) -> Any:  # boto3 is untyped
        try:
            return fn(**kwargs)
        except Exception as err:
            raise _classify_boto(err, key, self.bucket) from None


def _classify_boto(err: Exception, key: str, bucket: str) -> StorageError:
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(err, (ConnectTimeoutError, ReadTimeoutError)):
        return StorageError("timeout", f"{key}: {err}")
    if isinstance(err, EndpointConnectionError):
        return StorageError("unknown", f"{key}: {err}")
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        message = f"{key}: {code} {err.response.get('Error', {}).get('Message', '')}".strip()
        if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
            return Missing(message, f"bucket {bucket!r}" if code == "NoSuchBucket" else "")
        kind = (
            "auth" if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken")
            else "quota" if code in ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "503")
            else "timeout" if code in ("RequestTimeout", "RequestTimeTooSkewed")
            else "unknown"
        )
        return StorageError(kind, message)
    return StorageError("unknown", f"{key}: {err}")


def open_backend(url: str, s3_endpoint_url: str = "", field: str = "backup.storage", concurrency: int = 0) -> Backend:
    """``file:///dir`` (or a plain path) or ``s3://bucket/prefix``.

    ``field`` is the configuration key named in errors (``restore.storage`` for a restore);
    ``concurrency``: calls worth making at once, 0 for the backend's default (``FILE_CONCURRENCY``,
    ``S3_CONCURRENCY``).
    """
    if not url:
        raise ConfigError(f"{field}: no storage given; use --storage file:///dir or s3://bucket/prefix")
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        if parsed.scheme == "file" and parsed.netloc:
            raise ConfigError(f"{field}: {url!r} has a host; write file:///absolute/path (three slashes)")
        return FileBackend(path, concurrency)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"{field}: {url!r} names no bucket; write s3://bucket/prefix")
        return S3Backend(parsed.netloc, parsed.path, s3_endpoint_url or None, concurrency)
    raise ConfigError(f"{field}: unsupported scheme {parsed.scheme!r}; use file:// or s3://")


@dataclass
class OpReport:
    """What :class:`Storage` tells its listener about one call."""

    direction: str  # write | read
    operation: str  # segment | manifest | checkpoint
    latency_s: float
    nbytes: int
    error: StorageError | None = None
    retrying: bool = False


class Storage:
    """A backend plus timing, retries of transient errors, and reports of every attempt."""

    def __init__(self, backend: Backend, listener: Callable[[OpReport], None] | None = None,
                 retries: int = 3, backoff_s: float = 0.2) -> None:
        self.backend = backend
        self.listener = listener or (lambda report: None)
        self.retries = retries
        self.backoff_s = backoff_s

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def concurrency(self) -> int:
        return self.backend.concurrency

    def at_once(self, call: Callable[..., T], items: list[tuple[Any, ...]], name: str) -> list[Future[T]]:
        """``call(*item)`` for each of ``items``, :attr:`concurrency` at a time (threads named ``name``),
        all done when it returns: their outcomes, in order (one item runs on the caller's thread).
        One after the other, 128 partitions' checkpoints on S3 were 128 round trips in a row."""
        if len(items) <= 1:
            done: list[Future[T]] = []
            for item in items:
                future: Future[T] = Future()
                try:
                    future.set_result(call(*item))
                except Exception as err:
                    future.set_exception(err)
                done.append(future)
            return done
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items)), thread_name_prefix=name) as pool:
            return [pool.submit(call, *item) for item in items]

    def put(self, key: str, data: bytes, operation: str) -> None:
        self._attempt("write", operation, lambda: self.backend.put(key, data), lambda _: len(data))

    def get(self, key: str, operation: str) -> bytes:
        return self._attempt("read", operation, lambda: self.backend.get(key), len)

    def get_optional(self, key: str, operation: str, report: bool = False) -> bytes | None:
        """A read where absence is an answer, not an error (e.g. the first run's checkpoint).

        With ``report`` the read is timed, retried and reported like :meth:`get` (a restore's
        checkpoint reads are storage traffic worth counting); absence is then a successful
        read of 0 bytes, not an error. Without it nothing is reported, as the backup expects.
        """

        def call() -> bytes | None:
            try:
                return self.backend.get(key)
            except Missing:
                return None

        if report:
            return self._attempt("read", operation, call, lambda data: len(data or b""))
        return call()

    def children(self, prefix: str = "") -> list[str]:
        """Names directly under ``prefix``, as a listing call (not reported: it moves no data)."""
        return self.backend.children(prefix)

    def _attempt(self, direction: str, operation: str, call: Callable[[], T], size: Callable[[T], int]) -> T:
        attempt = 0
        while True:
            start = time.perf_counter()
            try:
                result = call()
            except StorageError as err:
                retrying = err.transient and attempt < self.retries
                self.listener(OpReport(direction, operation, time.perf_counter() - start, 0, err, retrying))
                if not retrying:
                    raise
                attempt += 1
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
                continue
            self.listener(OpReport(direction, operation, time.perf_counter() - start, size(result)))
            return result
