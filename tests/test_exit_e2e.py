"""A worker command ends with no AdminClient left alive.

An AdminClient hands its results over on librdkafka's background thread (``rdk:bg``), which takes
the GIL to do it. One still alive when the interpreter finalizes can be handed an event after the
GIL is gone: the process segfaults at exit (exit code -11, nothing printed) after a run that did its
work, and a CronJob, a script or a CI step sees a failure. This happened once in CI, to a one-shot
backup: its consumer-group reader and its batch-reader check kept their clients to the end.

The child below runs a command in-process and counts the ``rdk:bg`` threads left when it returns:
librdkafka joins them when a client is destroyed, so the count is exact.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, create_topic, produce, unique

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

CHILD = """
import glob, sys
from kafka_backup.cli.main import main
rc = main(sys.argv[1:])
names = []
for path in glob.glob("/proc/self/task/*/comm"):
    try:
        with open(path) as f:
            names.append(f.read().strip())
    except OSError:  # a thread that ended meanwhile
        pass
print("background threads left:", names.count("rdk:bg"))
sys.exit(rc)
"""


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.e2e
def test_backup_restore_and_offset_reset_leave_no_admin_client_behind(broker, tmp_path):
    topic, bid = unique("exit"), unique("bk-exit")
    create_topic(broker, topic, 2)
    produce(broker, topic, 2, 40)
    url = f"file://{tmp_path / 'store'}"
    group = unique("exit-group")
    for args in (
        # consumer_groups defaults to "*", telemetry.batch_events to auto: both read with an AdminClient
        ["backup", "--bootstrap-servers", broker, "--topics", topic, "--backup-id", bid, "--storage", url],
        ["restore", "--bootstrap-servers", broker, "--backup-id", bid, "--storage", url,
         "--restore-id", unique("rs-exit"), "--topic-map", f"{topic}:{topic}-r"],
        ["offset-reset", "--bootstrap-servers", broker, "--group", group, "--topics", topic, "--to-earliest",
         "--execute"],
        ["offset-reset", "--bootstrap-servers", broker, "--group", group, "--topics", topic, "--to-latest"],
    ):
        r = run_in_process(*args)
        assert r.returncode == 0, (args[0], r.stderr[-2000:])
        assert "background threads left: 0" in r.stdout, (args[0], r.stdout[-2000:])
    # a run that fails (a user mistake found once connected: exit 2) cleans up as well
    r = run_in_process("backup", "--bootstrap-servers", broker, "--topics", unique("missing"), "--backup-id",
                       unique("bk-exit"), "--storage", url)
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr[-2000:]
    assert "background threads left: 0" in r.stdout, r.stdout[-2000:]


@pytest.mark.e2e
def test_a_crash_after_a_command_prints_the_python_stack_not_nothing():
    """Should a C extension still crash one, the exit code is no longer all that is said: every
    command turns on faulthandler, which prints each thread's Python stack."""
    crash = ("import ctypes, sys\n"
             "from kafka_backup.cli.main import main\n"
             "assert main(['backup', '--topics', 't']) == 2\n"  # a user mistake: one line, exit 2
             "ctypes.string_at(0)\n")
    r = subprocess.run([sys.executable, "-c", crash], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == -11
    assert "Segmentation fault" in r.stderr and 'File "<string>", line 4' in r.stderr, r.stderr[-2000:]
