"""What a real Prometheus would see over time: no scrape may be older than the one before it.

Real processes: the broker, backup workers, the aggregator and the exporter. Jobs end and
expire while another runs, and the exporter is killed with -9 and restarted. Every scrape
that answers 200 is compared with the previous one that did: no counter-like sample
(``_total``, ``_count``, ``_sum``, ``_bucket``) may be lower.
"""

from __future__ import annotations

import os
import threading

import pytest

from kafka_backup.schemas import catalogue as cat
from tests.conftest import Pipeline, Samples, backup, create_topic, produce, unique, wait_for
from tests.test_faults_e2e import SteadyWorkload, continuous_backup, stop, stored_records

pytestmark = pytest.mark.e2e

COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")


class ScrapeHistory:
    """Scrapes in the background; remembers each answer's status and every counter that fell."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.statuses: list[int] = []
        self.fell: list[str] = []
        self.last: Samples | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.15):
            try:
                current = self.pipe.scrape()
            except OSError as err:  # refused while restarting, or an HTTP error status
                self.statuses.append(getattr(err, "code", 0))
                continue
            except AssertionError as err:  # Pipeline.scrape's own check: a counter fell since any scrape
                self.fell.append(str(err))
                return
            self.statuses.append(200)
            if self.last is not None:
                for key, value in current.items():
                    before = self.last.get(key)
                    if key[0].endswith(COUNTER_SUFFIXES) and before is not None and value < before:
                        self.fell.append(f"{key[0]}{dict(key[1])}: {before} -> {value}")
            self.last = current

    def successes(self) -> int:
        return self.statuses.count(200)

    def __enter__(self) -> ScrapeHistory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_no_scrape_is_older_than_the_last_while_jobs_expire_and_the_exporter_is_killed(
        broker, pipeline_factory, tmp_path):
    store = str(tmp_path / "store")
    ended = [unique("exp-a"), unique("exp-b")]
    running_topic, running = unique("exp-run"), unique("bk-run")
    for topic in [*ended, running_topic]:
        create_topic(broker, topic, 2)
    pipe = pipeline_factory(extra_exporter_args=["--metrics-expire-after-s", "15"])
    with ScrapeHistory(pipe) as history, SteadyWorkload(broker, running_topic, rate=200):
        worker = continuous_backup(broker, running_topic, running, store, str(tmp_path / "run.log"))
        try:
            # two one-shot backups that end, then expire (a scheduled backup's series outlive its next due
            # run by the expiry: an interval of 1 s lets them go after 16 s); they share storage series
            for topic in ended:
                produce(broker, topic, 2, 300)
                backup(broker, topic, topic, f"file://{store}", "--backup-expected-interval-s", "1")
            pipe.wait_value(cat.RECORDS_TOTAL.name, 300, 60, backup_id=ended[1])
            # both ended jobs gone from the scrape while the continuous one is still exported (the
            # expired count itself also holds jobs of earlier tests on this broker)
            def both_expired():
                s = pipe.scrape()
                return (all(s.get_value(cat.RECORDS_TOTAL.name, backup_id=b) is None for b in ended)
                        and s.get_value(cat.RECORDS_TOTAL.name, backup_id=running) is not None
                        and s.get_value(cat.EXPORTER_EXPIRED_JOBS.name) >= 2)
            wait_for(both_expired, 90, what="two jobs expired while the third runs")
            before_kill = history.successes()
            pipe.exporter.stop(kill=True)
            pipe.exporter.start()
            wait_for(lambda: pipe.health() == 200, 60, what="restarted exporter caught up")
            wait_for(lambda: history.successes() >= before_kill + 10, 60, what="scrapes after the restart")
        finally:
            stop(worker)
    assert history.fell == [], "\n".join(history.fell[:20])
    assert history.successes() >= 20
    assert set(history.statuses) <= {0, 200, 503}
    # and the numbers are the truth: the running job's records are what its checkpoints hold
    pipe.wait_value(cat.RECORDS_TOTAL.name, stored_records(store, running), 60, backup_id=running)
    shared = pipe.scrape().matching("kafka_backup_storage_write_latency_seconds_count", backend="filesystem")
    assert shared and all(v > 0 for v in shared.values())
    assert os.path.isdir(os.path.join(store, ended[0]))
