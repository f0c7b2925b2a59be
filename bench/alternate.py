"""Our backup at an earlier commit and as checked out, alternating on one broker and one topic.

The other benches compare ours with a bare baseline; this one compares ours with ours, to see a
change's effect apart from the machine's noise (both alternate through the same noise). ``rev``'s tree
is checked out into a temporary git worktree, compiled as the checkout is (``common.precompiled``), and
laid out as the ``kafka_backup`` package in a directory put first on ``PYTHONPATH`` for its runs; the
checkout's own code runs as installed. Each run is a one-shot backup (zstd) of the same topic into a
store of its own, kept to the end (bench/backup.py says why). Prints wall and CPU medians of each and
the ratios now/then.

    python bench/alternate.py <rev> [records] [partitions] [repeats] [file|tmpfs]
    python bench/alternate.py HEAD~1 300000 128 10          # the last commit's effect at 128 partitions
    python bench/alternate.py HEAD~1 300000 128 10 tmpfs    # the same, stored in /dev/shm: no disk

Starts its own dev broker unless KAFKA_BOOTSTRAP_SERVERS is set.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.backup import fill  # noqa: E402
from bench.common import PACKAGES, ROOT, bootstrap_servers, int_args, ours, timed  # noqa: E402


def worktree(rev: str, work: str) -> str:
    """``rev`` laid out as the ``kafka_backup`` package under a directory of ``work``: that directory."""
    tree = os.path.join(work, "tree")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", tree, rev], check=True)
    shim = os.path.join(work, "shim", "kafka_backup")
    os.makedirs(shim)
    open(os.path.join(shim, "__init__.py"), "w").close()
    for name in PACKAGES:
        os.symlink(os.path.join(tree, name), os.path.join(shim, name))
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(os.path.join(tree, d) for d in PACKAGES)],
                   check=True, stdout=subprocess.DEVNULL)
    return os.path.dirname(shim)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python bench/alternate.py <rev> [records] [partitions] [repeats] [file|tmpfs]")
    rev = sys.argv[1]
    records, partitions, repeats = int_args(sys.argv[2:], 300_000, 128, 10)
    where = sys.argv[5] if len(sys.argv) > 5 else "file"
    with tempfile.TemporaryDirectory(prefix="bench-alternate-") as work, bootstrap_servers("alternate") as bootstrap:
        store_root = tempfile.mkdtemp(prefix="bench-alternate-", dir="/dev/shm") if where == "tmpfs" else work
        then_path = worktree(rev, work)
        try:
            topic = "bench-src-" + uuid.uuid4().hex[:6]
            fill(bootstrap, topic, partitions, records)
            os.sync()  # the broker's writes of the fill, else written back by the first run's first fsync
            runs: dict[str, list[dict[str, float]]] = {"then": [], "now": []}
            env_then = {**os.environ, "PYTHONPATH": then_path}
            for r in range(repeats):
                for name in ("then", "now") if r % 2 == 0 else ("now", "then"):  # neither always first
                    store = os.path.join(store_root, f"store-{name}-{r}")
                    cmd = ours("backup", "--bootstrap-servers", bootstrap, "--topics", topic,
                               "--backup-id", f"alt-{name}-{r}", "--storage", f"file://{store}", "--compression", "zstd")
                    runs[name].append(timed(cmd, os.path.join(work, f"{name}-{r}.log"),
                                            env=env_then if name == "then" else None))
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", os.path.join(work, "tree")], check=False)
            if where == "tmpfs":
                subprocess.run(["rm", "-rf", store_root], check=False)
    print(f"{records} records on {partitions} partitions, {repeats} runs each, alternating; stored to {where}")
    med = {}
    for name, label in (("then", rev), ("now", "checkout")):
        wall = statistics.median(x["wall"] for x in runs[name])
        cpu = statistics.median(x["cpu"] for x in runs[name])
        med[name] = (wall, cpu)
        print(f"  {label:>10s}: wall {wall:.3f} s median ({min(x['wall'] for x in runs[name]):.3f} min), "
              f"CPU {cpu:.3f} s median")
    print(f"  now/then: wall {med['now'][0] / med['then'][0]:.2f}x, CPU {med['now'][1] / med['then'][1]:.2f}x")


if __name__ == "__main__":
    main()
