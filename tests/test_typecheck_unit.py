"""The type check of .ci/run (mypy, configured in pyproject.toml), so `python -m pytest` covers it too."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, ".ci", "typecheck.py")


def _script():
    spec = importlib.util.spec_from_file_location("typecheck", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.e2e  # runs mypy in its own process (as .ci/run does)
def test_the_packages_type_check():
    r = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("Success: no issues found"), r.stdout


def test_reported_paths_are_the_repository_s():
    out = _script().LINKED.sub("", "kafka_backup/schemas/events.py:3: error: x  [misc]\n"
                                   "kafka_backup/streams/app.py:9: note: y\n"
                                   "see kafka_backup/cli/main.py\n"
                                   "kafka_backup/other/z.py:1: error: z\n")
    assert out == ("schemas/events.py:3: error: x  [misc]\n"
                   "streams/app.py:9: note: y\n"
                   "see kafka_backup/cli/main.py\n"
                   "kafka_backup/other/z.py:1: error: z\n")
