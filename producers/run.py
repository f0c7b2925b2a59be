"""One job run's lifecycle, shared by backup, restore, verify and offset reset.

A job announces itself (``JobStarted``), does its work, and ends with exactly one
``JobEnded`` carrying its status (``success``, ``interrupted``, ``failure``), its
duration and a one-line reason. Failures are mapped once, here: a user mistake
(:class:`ConfigError`) and a failure the job already reported (:class:`JobFailed`)
keep their message; unusable metadata is reported by its category; a storage or
Kafka failure is reported under the job's operation. Whatever ends the run is
raised as the job's own :class:`JobFailed` subclass, which the CLI prints in one
line with exit status 1 (``interrupted`` for :class:`JobInterrupted`).

:func:`run_reporting` adds what a process around a job needs: SIGTERM/SIGINT ask
the job to stop at its next safe point, and the telemetry is delivered (bounded
wait) at the end, saying what was lost.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from confluent_kafka import KafkaError, KafkaException

from kafka_backup.producers.layout import MetadataError
from kafka_backup.producers.storage import OpReport, StorageError
from kafka_backup.schemas import events as ev
from kafka_backup.schemas.config import ConfigError

log = logging.getLogger("kafka_backup.telemetry")  # where the lost-telemetry line always was


class JobFailed(Exception):
    """A failure that ends the run (already reported as an error event): exit status 1."""


class JobInterrupted(JobFailed):
    """Stopped by SIGTERM/SIGINT before the run's work was done (status ``interrupted``, exit status 1)."""


class Reporter(Protocol):
    """What a job needs of its telemetry: the emitter, or ``NullEmitter`` without a cluster."""

    worker: str  # who emits: recorded in a backup's manifest run

    def emit(self, event_type: type[ev.Event], **fields: Any) -> None: ...

    def storage_op(self, backend: str, r: OpReport) -> None: ...

    def kafka_error(self, err: KafkaError, operation: str) -> None: ...

    def run_failure(self, err: StorageError | KafkaException, operation: str) -> str: ...

    def poll(self) -> None: ...

    def close(self, timeout: float = 30.0) -> int: ...


class NullEmitter:
    """Stands in for the telemetry emitter when no Kafka cluster was given (verify) or nothing may be
    emitted (a restore's dry run): the run still does its work."""

    worker = "local"

    def emit(self, event_type: type[ev.Event], **fields: Any) -> None:
        pass

    def storage_op(self, backend: str, r: OpReport) -> None:
        pass

    def kafka_error(self, err: KafkaError, operation: str) -> None:
        """Nothing to report it to; the line is still logged, as the emitter logs it."""
        log.warning("kafka: %s", err.str())

    def run_failure(self, err: StorageError | KafkaException, _operation: str) -> str:
        if isinstance(err, KafkaException):
            return f"kafka: {err.args[0].str()}"
        return f"storage {err.error_type}: {err}"

    def poll(self) -> None:
        pass

    def close(self, timeout: float = 30.0) -> int:
        return 0


@dataclass
class Outcome:
    """How the run is ending, as ``JobEnded`` will say it."""

    status: str = "failure"
    reason: str = ""


def metadata_failure(emitter: Reporter, err: MetadataError) -> str:
    """Report unusable metadata (``ErrorRaised`` by its category) and return the run's one-line reason."""
    emitter.emit(ev.ErrorRaised, error_type=err.error_type, transient=False, operation="read",
                 message=str(err)[:500])
    return str(err)


class Job:
    """A job's steps; :meth:`run` drives them in the one order every job shares.

    ``failed``: what a storage, Kafka or metadata failure is raised as. ``operation``: the
    operation a storage or Kafka failure is reported under (``ErrorRaised``); ``None`` names
    a Kafka failure in the reason only, reporting nothing.
    """

    failed: ClassVar[type[JobFailed]] = JobFailed
    operation: ClassVar[str | None] = None
    emitter: Reporter

    def begin(self) -> None:
        """Announce the run (``JobStarted``)."""

    def work(self) -> None:
        raise NotImplementedError

    def before_end(self, outcome: Outcome) -> None:
        """What must be said or saved before ``JobEnded`` (final progress, counts, the manifest's run)."""

    def after_end(self, outcome: Outcome) -> None:
        """After ``JobEnded``: what the outcome allows saving, and closing clients (a close must not raise)."""

    def explain(self, reason: str) -> str:
        """The message a storage or Kafka failure ends the run with (``JobEnded`` keeps ``reason``)."""
        return reason

    def stop(self, *_args: object) -> None:
        """Signal handler: stop at the next safe point."""

    def run(self) -> int:
        started = time.monotonic()
        self.begin()
        outcome = Outcome()
        try:
            self.work()
            outcome.status = "success"
        except JobInterrupted as err:
            outcome.status, outcome.reason = "interrupted", str(err)
            raise
        except (JobFailed, ConfigError) as err:
            outcome.reason = str(err)
            raise
        except MetadataError as err:
            outcome.reason = metadata_failure(self.emitter, err)
            raise self.failed(outcome.reason) from None
        except (StorageError, KafkaException) as err:
            outcome.reason = self._failure(err)
            raise self.failed(self.explain(outcome.reason)) from None
        finally:
            self.before_end(outcome)
            self.emitter.emit(ev.JobEnded, status=outcome.status, duration_s=time.monotonic() - started,
                              reason=outcome.reason[:500])
            self.after_end(outcome)
        return 0

    def _failure(self, err: StorageError | KafkaException) -> str:
        if self.operation is None and isinstance(err, KafkaException):
            return f"kafka: {err.args[0].str()}"
        return self.emitter.run_failure(err, self.operation or "")


def run_reporting(job: Job, emitter: Reporter, signals: bool = True) -> int:
    """Run a job until done (or, with ``signals``, until SIGTERM/SIGINT ask it to stop at its next safe
    point), then deliver its telemetry (bounded wait), saying what was lost."""
    if signals:
        signal.signal(signal.SIGTERM, job.stop)
        signal.signal(signal.SIGINT, job.stop)
    try:
        return job.run()
    finally:
        lost = emitter.close()
        if lost:
            log.warning("telemetry: %d events of this run were not delivered", lost)
