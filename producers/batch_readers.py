"""Whether the aggregator reads batch records: ``telemetry.batch_events: auto``.

A batch record (``events.Batch``) is refused whole, as ``unknown_type``, by an aggregator older than
the batch envelope: its events would be counted as refused and never folded. So a worker on ``auto``
(the default) asks the broker who reads its telemetry: the members of the aggregator's consumer group
(``aggregator.app_id``, DescribeGroups). Every aggregator that folds batch records says so in its Kafka
client id (``events.BATCH_READER_MARK``). The worker sends batch records while every member carries the
mark, and single-event records otherwise: while the group has no member (aggregators stopped for an
upgrade, say), while one member lacks the mark (a rolling upgrade half done, a rollback), and while the
group cannot be described (no Describe permission on it: docs/security.md). It asks at start, off the
worker's thread, then every ``CHECK_INTERVAL_S``.

Readers of the telemetry topic outside that group (a second aggregator app, an older ``replay``) are not
asked: with one that cannot read batch records, set ``telemetry.batch_events: false``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka.admin import AdminClient

from kafka_backup.schemas import events as ev
from kafka_backup.schemas.kafka_admin import client_config, close_admin

log = logging.getLogger("kafka_backup.telemetry")

CHECK_INTERVAL_S = 60.0
DESCRIBE_TIMEOUT_S = 10.0
STOP_WAIT_S = 1.0  # how long stop() waits for a check under way before it closes the client anyway


def verdict(members: list[tuple[str, str]]) -> tuple[bool, str]:
    """Whether to send batch records to a group with these members ``(client id, member or instance id)``,
    and the reason in a few words (for the log)."""
    if not members:
        return False, "it has no member"
    for client_id, member in members:
        if not ev.reads_batches(client_id):
            return False, f"member {member} (client id {client_id!r}) does not read batch records"
    return True, f"every member reads batch records ({len(members)})"


class BatchReaders:
    """Asks, at :meth:`start` and then every ``interval_s``, whether every member of ``group`` reads
    batch records; ``on_change(True | False)`` whenever the answer changes (first answer included).

    ``describe``: a function ``group -> [(client id, member id)]`` (tests hand in a fake); by default
    one DescribeGroups request through an AdminClient on ``bootstrap``.
    """

    def __init__(self, bootstrap: str, group: str, on_change: Callable[[bool], None],
                 interval_s: float = CHECK_INTERVAL_S,
                 describe: Callable[[str], list[tuple[str, str]]] | None = None) -> None:
        self.bootstrap, self.group, self.on_change, self.interval_s = bootstrap, group, on_change, interval_s
        self._describe = describe or self._describe_group
        self._admin: Any = None
        self._admin_lock = threading.Lock()  # a request is made, or the client closed, one at a time
        self.batching: bool | None = None  # None: not asked yet
        self._failed: str | None = None  # the last failure logged (a failure is logged once until it changes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="batch-readers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """No more checks; the client is closed before this returns (see ``close_admin``)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_WAIT_S)  # a check under way: its request is seldom more than ms
        with self._admin_lock:
            admin, self._admin = self._admin, None
        close_admin(admin)  # a request still pending is dropped; its check ends quietly

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.interval_s)

    def check(self) -> bool:
        """Ask once; tell ``on_change`` if the answer differs from the last one."""
        failure: Exception | None = None
        try:
            members = self._describe(self.group)
        except Exception as err:  # any failure: single-event records, which every aggregator reads
            failure = err
        if self._stop.is_set():  # stopped while asking: the answer no longer matters
            return bool(self.batching)
        if failure is None:
            batching, why = verdict(members)
            self._failed = None
        else:
            batching, why = False, f"it cannot be described ({failure})"
            if str(failure) != self._failed:
                self._failed = str(failure)
                log.warning("telemetry: cannot describe aggregator group %s (%s): sending single-event records; "
                            "grant this worker Describe on the group (docs/security.md) or set "
                            "telemetry.batch_events true or false", self.group, failure)
        if batching != self.batching:
            self.batching = batching
            log.info("telemetry: aggregator group %s: %s: sending %s records", self.group, why,
                     "batch" if batching else "single-event")
            self.on_change(batching)
        return batching

    def _describe_group(self, group: str) -> list[tuple[str, str]]:
        with self._admin_lock:
            if self._stop.is_set():
                raise RuntimeError("stopped")
            if self._admin is None:
                self._admin = AdminClient(client_config(self.bootstrap))
            futures = self._admin.describe_consumer_groups([group], request_timeout=DESCRIBE_TIMEOUT_S)
        description = futures[group].result(timeout=DESCRIBE_TIMEOUT_S + 5)
        return [(m.client_id, m.group_instance_id or m.member_id) for m in description.members]
