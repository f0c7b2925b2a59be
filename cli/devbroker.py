"""The embedded development broker: noida-db's Kafka on a loopback port, as a child process.

We run the packaged binary directly (not its Python wrapper) so that stopping
us stops the broker: the wrapper would leave it orphaned.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from importlib.resources import files

from kafka_backup.schemas.config import ConfigError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def binary() -> str:
    try:
        path = files("noida_db").joinpath("noida-db")
    except ModuleNotFoundError:
        path = None
    if path is not None and path.is_file():
        os.chmod(str(path), 0o755)
        return str(path)
    found = shutil.which("noida-db")
    if not found:
        raise ConfigError("dev-broker: noida-db is not installed; pip install noida-db==0.2.3")
    return found


class DevBroker:
    """Start with ``start()``; ``bootstrap`` is then ``127.0.0.1:PORT``. Also a context manager."""

    def __init__(self, port: int = 0, data_dir: str | None = None, log_path: str | None = None) -> None:
        self.port = port or free_port()
        self._tmp: str | None = None  # a data directory made here, removed by stop()
        if not data_dir:
            data_dir = self._tmp = tempfile.mkdtemp(prefix="kafka-backup-broker-")
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> DevBroker:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [binary(), "start", "--only", "kafka", "--kafka-port", str(self.port), "--data-dir", self.data_dir],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigError(f"dev-broker: noida-db exited with status {self.proc.returncode} "
                                  f"(is port {self.port} free?)")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise ConfigError(f"dev-broker: no answer on port {self.port} within {timeout:.0f}s")

    def running(self) -> bool:
        """Started and not exited since."""
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the broker freezes (for outage tests)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> DevBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
