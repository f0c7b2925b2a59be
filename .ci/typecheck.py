"""Type-check the five packages with mypy, configured by pyproject.toml's [tool.mypy].

    python .ci/typecheck.py          # exit status is mypy's; extra arguments go to mypy

mypy cannot follow the setuptools editable hook that maps kafka_backup.<pkg> to the repository's
folders, so it checks a tree of links (kafka_backup/<pkg> -> <repo>/<pkg>) kept in the temporary
directory, one per checkout, with its cache beside it. Reported paths are mapped back to the
repository's (kafka_backup/schemas/x.py -> schemas/x.py), so they can be opened from the root.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("schemas", "producers", "streams", "exporter", "cli")
LINKED = re.compile(rf"^kafka_backup/(?=(?:{'|'.join(PACKAGES)})/)", re.M)  # a path in the link tree


def link_tree() -> str:
    """The directory holding kafka_backup/<pkg> links to this checkout (made or refreshed)."""
    tag = hashlib.sha1(ROOT.encode()).hexdigest()[:12]
    base = os.path.join(tempfile.gettempdir(), f"kafka-backup-typecheck-{tag}")
    os.makedirs(os.path.join(base, "kafka_backup"), exist_ok=True)
    for pkg in PACKAGES:
        link, target = os.path.join(base, "kafka_backup", pkg), os.path.join(ROOT, pkg)
        if os.path.islink(link) and os.readlink(link) == target:
            continue
        spare = f"{link}.{os.getpid()}"
        os.symlink(target, spare)
        os.replace(spare, link)  # atomic: a concurrent run sees the old link or the new one
    return base


def main(argv: list[str]) -> int:
    base = link_tree()
    cmd = [sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"),
           "--cache-dir", os.path.join(base, ".mypy_cache"), "-p", "kafka_backup", *argv]
    r = subprocess.run(cmd, cwd=base, capture_output=True, text=True)
    sys.stdout.write(LINKED.sub("", r.stdout + r.stderr))
    return r.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
