"""Consumer groups' committed offsets on the backed-up topics, read with the AdminClient.

The backup records them (``{backup_id}/groups.json``, see ``producers/layout.py``)
so that after a restore ``offset-reset --from-backup`` can put each group where it
was (``producers/offset_follow.py``). Reading them never fails a backup: a failed
call is returned as a one-line problem, which the backup counts as an
``ErrorRaised`` (``error_type="consumer_groups"``) and logs.
"""

from __future__ import annotations

import time

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from kafka_backup.producers import layout
from kafka_backup.schemas.topics import consumer_group

ALL = "*"
OWN_PREFIX = consumer_group("")  # "kafka-backup.": the backups' own groups are not the applications'
TIMEOUT_S = 15
BATCH = 50


def _text(err: Exception | KafkaError) -> str:
    """One line for an admin call's error: a KafkaException's KafkaError, else the error's text."""
    if isinstance(err, KafkaException) and err.args:
        err = err.args[0]
    return err.str() if isinstance(err, KafkaError) else str(err)


def read(admin: AdminClient, topics: set[str], wanted: list[str]) -> tuple[dict[str, layout.GroupSnapshot], list[str]]:
    """Each wanted group's committed offsets on ``topics`` (groups without any are left out), and
    the problems met (one line each). ``wanted``: group ids, or ``"*"`` for every group listed."""
    problems: list[str] = []
    names = [g for g in wanted if g != ALL]
    if ALL in wanted:
        try:
            listed = admin.list_consumer_groups(request_timeout=TIMEOUT_S).result(TIMEOUT_S)
        except KafkaException as err:
            return {}, [f"list_consumer_groups: {_text(err)}"]
        problems += [f"list_consumer_groups: {_text(e)}" for e in listed.errors]
        names += sorted(g.group_id for g in listed.valid if not g.group_id.startswith(OWN_PREFIX))
    found: dict[str, layout.GroupSnapshot] = {}
    results, failed = _fetch(admin, list(dict.fromkeys(names)))
    retry = [g for g, err in failed.items() if _retriable(err)]
    if retry:  # a coordinator moving, a group rebalancing: once more before counting it
        again, failed_again = _fetch(admin, retry)
        results.update(again)
        failed = {**{g: e for g, e in failed.items() if g not in retry}, **failed_again}
    problems += [f"list_consumer_group_offsets({g}): {_text(err)}" for g, err in failed.items()]
    for group, result in results.items():
        offsets = []
        for tp in result.topic_partitions or []:
            if tp.topic not in topics:
                continue
            if tp.error is not None:
                problems.append(f"list_consumer_group_offsets({group}) {tp.topic}/{tp.partition}: {_text(tp.error)}")
            elif tp.offset >= 0:
                offsets.append(layout.GroupOffset(tp.topic, tp.partition, tp.offset))
        if offsets:
            found[group] = layout.GroupSnapshot(time.time(), sorted(offsets, key=lambda o: (o.topic, o.partition)))
    return found, problems


def _fetch(admin: AdminClient, groups: list[str]) -> tuple[dict, dict]:
    """Each group's ``list_consumer_group_offsets`` answer, or its error; a batch of requests in flight
    together (one group per request is the client's limit; a cluster may hold many groups)."""
    results, failed = {}, {}
    for i in range(0, len(groups), BATCH):
        pending = {}
        for group in groups[i:i + BATCH]:
            try:
                pending[group] = admin.list_consumer_group_offsets(
                    [ConsumerGroupTopicPartitions(group)], request_timeout=TIMEOUT_S)[group]
            except KafkaException as err:
                failed[group] = err
        for group, future in pending.items():
            try:
                results[group] = future.result(TIMEOUT_S)
            except KafkaException as err:
                failed[group] = err
    return results, failed


def _retriable(err: KafkaException) -> bool:
    inner = err.args[0] if err.args else None
    return bool(getattr(inner, "retriable", lambda: False)())


def merge(doc: layout.GroupsDocument, found: dict[str, layout.GroupSnapshot]) -> layout.GroupsDocument:
    """Groups read now replace their entries; the others keep the entry of their last read."""
    doc.groups.update(found)
    doc.groups = dict(sorted(doc.groups.items()))
    doc.updated_ts = time.time()
    doc.version = layout.LAYOUT_VERSION
    return doc
