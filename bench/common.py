"""What every bench repeats: a broker, the command line of ours, timing a process, the side-by-side summary.

A bench measures ``ours`` and a bare baseline in the same run, interleaved, and prints ratios (the
machine is shared and noisy; absolute numbers drift, ratios much less).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ours(*args: str) -> list[str]:
    """The command line of one of our processes, as a user runs it."""
    return [sys.executable, "-m", "kafka_backup.cli.main", *args]


def int_args(argv: list[str], *defaults: int) -> list[int]:
    """Positional integer arguments, each falling back to its default."""
    return [int(argv[i]) if len(argv) > i else d for i, d in enumerate(defaults)]


@contextlib.contextmanager
def bootstrap_servers(name: str) -> Iterator[str]:
    """``KAFKA_BOOTSTRAP_SERVERS`` when set (a real cluster), else a dev broker for the bench's run."""
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if given:
        yield given
        return
    from kafka_backup.cli.devbroker import DevBroker

    with DevBroker(log_path=os.path.join(tempfile.gettempdir(), f"bench-{name}-broker.log")) as broker:
        yield broker.bootstrap


def pyspy(enabled: bool) -> list[str]:
    """A py-spy prefix writing raw collapsed stacks to ``$BENCH_PYSPY`` (where the time goes), if asked;
    with ``BENCH_PYSPY_IDLE=1`` waiting threads are sampled too (where the wall time goes)."""
    out = os.environ.get("BENCH_PYSPY")
    idle = ["--idle"] if os.environ.get("BENCH_PYSPY_IDLE") == "1" else []
    return ["py-spy", "record", "-r", "200", "-f", "raw", *idle, "-o", out, "--"] if out and enabled else []


PACKAGES = ("schemas", "producers", "streams", "exporter", "cli")


@functools.cache
def precompiled() -> None:
    """Our modules compiled to bytecode once, beside their sources (``__pycache__``, ignored by git), as
    ``pip install`` and the Docker image have them: this machine sets ``PYTHONDONTWRITEBYTECODE=1``, so
    from a checkout every run of ours compiled its modules from source again, 30 ms of an empty
    restore's 0.21 s start-up that no installed copy spends (the bare scripts import only installed
    packages, already compiled)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(os.path.join(ROOT, d) for d in PACKAGES)],
                   check=True, stdout=subprocess.DEVNULL)


def timed(cmd: list[str], log_path: str, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``cmd`` to completion (in ``env``, else this process's environment): wall seconds and the
    process's CPU seconds (user + system)."""
    precompiled()
    with open(log_path, "ab") as log:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{cmd[:4]} exited {code}; see {log_path}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime}


def cpu_seconds(pid: int) -> float:
    """CPU seconds a running process has used so far (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def compare(runs: dict[str, list[dict[str, float]]], records: int, payload: int | None = None,
            baselines: tuple[str, ...] = ("bare",)) -> dict[str, tuple[float, float]]:
    """Print ours against each baseline: whole process, then with start-up subtracted; return the
    latter, (records/s, CPU s) by name.

    ``runs`` holds ``ours`` and each baseline, and the same processes on an empty topic under
    ``<name>-empty`` (start-up and shut-down alone), each a list of :func:`timed` results.
    """
    names = (*baselines, "ours")
    width = max(map(len, names))
    med: dict[str, tuple[float, float]] = {}
    for name in names:
        xs = runs[name]
        rates = [records / x["wall"] for x in xs]
        med[name] = (statistics.median(rates), statistics.median(x["cpu"] for x in xs))
        mbs = f" ({med[name][0] * payload / records / 1e6:5.1f} MB/s)" if payload else ""
        print(f"  {name:{width}s}: {min(rates):8.0f} min / {med[name][0]:8.0f} median records/s{mbs}; "
              f"CPU {med[name][1]:5.2f} s median")
    for base in baselines:
        print(f"  ratio ours/{base}, whole process: rate {med['ours'][0] / med[base][0]:.2f}x, "
              f"CPU {med['ours'][1] / med[base][1]:.2f}x")
    steady: dict[str, tuple[float, float]] = {}
    for name in names:
        wall0 = statistics.median(x["wall"] for x in runs[f"{name}-empty"])
        cpu0 = statistics.median(x["cpu"] for x in runs[f"{name}-empty"])
        wall = statistics.median(x["wall"] for x in runs[name]) - wall0
        # nan when the run on the empty topic took as long: start-up and shut-down hid the work
        steady[name] = (records / wall if wall > 0 else math.nan, statistics.median(x["cpu"] for x in runs[name]) - cpu0)
        print(f"  {name:{width}s} without start-up ({wall0:.2f} s, {cpu0:.2f} s CPU on an empty topic): "
              f"{steady[name][0]:8.0f} records/s, CPU {steady[name][1]:5.2f} s")
    for base in baselines:
        print(f"  ratio ours/{base}, start-up subtracted: rate {steady['ours'][0] / steady[base][0]:.2f}x, "
              f"CPU {steady['ours'][1] / steady[base][1]:.2f}x")
    if any(math.isnan(r) for r, _ in steady.values()):
        print("  (rate nan: the run on the empty topic took as long as the run on the data, so start-up and "
              "shut-down waits, not the data, set the wall time; use a larger topic, or read the CPU ratio)")
    return steady

