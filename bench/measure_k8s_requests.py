"""RSS and CPU of the aggregator and the exporter, for the resource requests in docker/kubernetes/.

    python bench/measure_k8s_requests.py     (from the repository root; about 2 minutes)

Starts the dev broker, a real aggregator and exporter, folds 5 one-shot backups of 5,000 records,
then scrapes every second for 60 s and prints each process's RSS and CPU cores used.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kafka_backup.cli.devbroker import DevBroker  # noqa: E402
from tests.conftest import Pipeline, backup, create_topic, produce, unique  # noqa: E402


def stat(pid):
    rss = [line for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")][0].split()[1]
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    ticks = int(f[11]) + int(f[12])
    return int(rss), ticks / os.sysconf("SC_CLK_TCK")

tmp = tempfile.mkdtemp()
with DevBroker(log_path=os.path.join(tmp, "b.log")) as b:
    p = Pipeline(b.bootstrap, tmp).start()
    try:
        for i in range(5):
            t = unique("m")
            create_topic(b.bootstrap, t, 3)
            produce(b.bootstrap, t, 3, 5000)
            backup(b.bootstrap, t, unique("bk"), f"file://{tmp}/store{i}")
        for name, proc in (("aggregator", p.aggregator), ("exporter", p.exporter)):
            print(name, "after 5 backups: rss KiB, cpu s", stat(proc.proc.pid))
        a0 = {n: stat(pr.proc.pid) for n, pr in (("aggregator", p.aggregator), ("exporter", p.exporter))}
        t0 = time.time()
        while time.time() - t0 < 60:
            p.scrape()
            time.sleep(1)  # a 1 s scraper
        for n, pr in (("aggregator", p.aggregator), ("exporter", p.exporter)):
            rss, cpu = stat(pr.proc.pid)
            print(n, "idle 60 s with a 1 s scrape: rss KiB", rss, "cpu cores", round((cpu - a0[n][1]) / (time.time() - t0), 4))
    finally:
        p.stop()
