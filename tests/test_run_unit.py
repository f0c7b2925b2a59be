"""One job-run lifecycle: each way a run ends gives its status, reason and exception, once."""

from __future__ import annotations

import pytest

from kafka_backup.producers.layout import MetadataError
from kafka_backup.producers.run import Job, JobFailed, JobInterrupted, NullEmitter, Outcome
from kafka_backup.producers.storage import Missing
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.config import ConfigError


class Recorder(NullEmitter):
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def emit(self, event_type, **fields) -> None:
        self.events.append((event_type.__name__, fields))


class Failed(JobFailed):
    pass


class Probe(Job):
    failed = Failed
    operation = "read"

    def __init__(self, error: Exception | None) -> None:
        self.emitter = Recorder()
        self.error = error
        self.seen: list[str] = []

    def begin(self) -> None:
        self.emitter.emit(ev.JobStarted)

    def work(self) -> None:
        if self.error is not None:
            raise self.error

    def before_end(self, outcome: Outcome) -> None:
        self.seen.append(f"before {outcome.status}")

    def after_end(self, outcome: Outcome) -> None:
        self.seen.append(f"after {outcome.status}")

    def explain(self, reason: str) -> str:
        return reason + "; explained"


def ended(job: Probe) -> tuple[str, str]:
    names = [name for name, _ in job.emitter.events]
    assert names[0] == "JobStarted" and names.count("JobEnded") == 1 and names[-1] == "JobEnded"
    fields = job.emitter.events[-1][1]
    return fields["status"], fields["reason"]


def test_success():
    job = Probe(None)
    assert job.run() == 0
    assert ended(job) == ("success", "") and job.seen == ["before success", "after success"]


@pytest.mark.parametrize("error,raised,status,reason,message", [
    (JobInterrupted("stopped at 3"), JobInterrupted, "interrupted", "stopped at 3", "stopped at 3"),
    (Failed("bad segment"), Failed, "failure", "bad segment", "bad segment"),
    (ConfigError("x.y: wrong"), ConfigError, "failure", "x.y: wrong", "x.y: wrong"),
    (Missing("k: gone"), Failed, "failure", "storage not_found: k: gone", "storage not_found: k: gone; explained"),
    (MetadataError("m.json", "is corrupt"), Failed, "failure", "m.json: is corrupt", "m.json: is corrupt"),
])
def test_each_ending(error, raised, status, reason, message):
    job = Probe(error)
    with pytest.raises(raised) as err:
        job.run()
    assert str(err.value) == message
    assert ended(job) == (status, reason)
    assert job.seen == [f"before {status}", f"after {status}"]
    if isinstance(error, MetadataError):  # reported by its category before the end
        assert job.emitter.events[1] == ("ErrorRaised", {"error_type": "corrupt_metadata", "transient": False,
                                                         "operation": "read", "message": "m.json: is corrupt"})


def test_a_programming_error_is_not_a_job_failure():
    job = Probe(TypeError("bug"))
    with pytest.raises(TypeError):
        job.run()
    assert ended(job) == ("failure", "")


def test_a_job_s_loops_run_with_what_exists_frozen_and_young_objects_collected_rarely(monkeypatch):
    """The backup collects rarely from its fetch loop on (schemas.collector.collect_rarely): its loop runs with the
    threshold raised and the start-up's objects frozen out of the collector's walks."""
    import gc

    from kafka_backup.producers import backup
    from kafka_backup.schemas import collector

    seen: list[tuple[int, int]] = []
    worker = backup.BackupWorker.__new__(backup.BackupWorker)
    worker.parts, worker.stopping, worker.cfg = {}, False, None
    monkeypatch.setattr(worker, "_start", lambda: seen.append((gc.get_threshold()[0], gc.get_freeze_count())))
    monkeypatch.setattr(worker, "_loop", lambda: seen.append((gc.get_threshold()[0], gc.get_freeze_count())))
    for step in ("_stop_fetching", "_flush_all", "_record_groups"):
        monkeypatch.setattr(worker, step, lambda: None)
    gc.set_threshold(700, 10, 10)
    gc.unfreeze()
    worker.work()
    (before, frozen_before), (during, frozen_during) = seen
    assert (before, frozen_before) == (700, 0)
    assert during == collector.GC_THRESHOLD > 700 and frozen_during > 0
    assert gc.get_threshold()[1:] == (10, 10)  # the older generations' thresholds as they were
