"""How often Faust skips records at a rebalance or a restart, with eager delivery on and off.

Runs one end-to-end test ``runs`` times with ``aggregator.eager_delivery`` on and as many with it
off, interleaved (a noisy neighbour hits both):

* ``join``: ``test_two_aggregator_workers_equal_one``, a second worker of the same application
  joins halfway through eight backups;
* ``kill``: ``test_aggregator_killed_mid_stream_restarts_exact``, the aggregator is killed (SIGKILL)
  mid-stream and started again.

It counts per setting the runs that went through a restart in place: the offset guard saw Faust
skip records (``streams.guards.OffsetGuard``) and restarted the worker, which reads them again.
The totals stay exact either way (the tests assert them); a restart costs a recovery. Prints, per
setting, runs, runs with a restart, restarts, failed runs and the median run time.

    python bench/rebalance_skips.py [runs] [join|kill]

Each run starts its own dev broker (the test's), about 30 s a run.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ROOT, int_args  # noqa: E402

TESTS = {"join": "tests/test_faults_e2e.py::test_two_aggregator_workers_equal_one",
         "kill": "tests/test_faults_e2e.py::test_aggregator_killed_mid_stream_restarts_exact"}
RESTART = "restarting this worker in place"


def one_run(test: str, eager: bool, basetemp: str) -> tuple[bool, int, float]:
    """(passed, restarts in the aggregators' logs, seconds)."""
    env = {**os.environ, "KAFKA_BACKUP_AGGREGATOR_EAGER_DELIVERY": "true" if eager else "false"}
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test, f"--basetemp={basetemp}"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.monotonic() - start
    restarts = 0
    for folder, _dirs, files in os.walk(basetemp):
        for name in files:
            if name.endswith(".log") and "aggregator" in name:
                with open(os.path.join(folder, name), errors="replace") as fh:
                    restarts += fh.read().count(RESTART)
    return r.returncode == 0, restarts, took


def main() -> None:
    (runs,) = int_args(sys.argv[1:2], 10)
    which = sys.argv[2] if len(sys.argv) > 2 else "join"
    if which not in TESTS:
        sys.exit(f"test: {which!r} is not one of {', '.join(TESTS)}")
    test = TESTS[which]
    work = tempfile.mkdtemp(prefix="bench-rebalance-")
    results: dict[bool, list[tuple[bool, int, float]]] = {True: [], False: []}
    for i in range(runs):
        for eager in (True, False):
            results[eager].append(one_run(test, eager, os.path.join(work, f"{'on' if eager else 'off'}-{i}")))
            passed, restarts, took = results[eager][-1]
            print(f"  run {i + 1} eager {'on ' if eager else 'off'}: {'passed' if passed else 'FAILED'}, "
                  f"{restarts} restart(s), {took:.0f} s", flush=True)
    print(f"{runs} runs each of {test} (logs in {work})")
    for eager in (True, False):
        xs = results[eager]
        print(f"  eager delivery {'on ' if eager else 'off'}: {sum(1 for _, n, _ in xs if n)} of {len(xs)} runs went "
              f"through a restart ({sum(n for _, n, _ in xs)} restarts), {sum(1 for ok, _, _ in xs if not ok)} failed, "
              f"median {statistics.median(t for _, _, t in xs):.0f} s a run")


if __name__ == "__main__":
    main()
