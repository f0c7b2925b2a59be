"""Consumer offsets that follow the data: real broker, backup, restore and offset-reset CLIs.

Ground truth is computed here, outside the code: the source topics are fresh,
so partition p's j-th produced record has offset j; the groups' offsets are
committed explicitly; the target topics get unrelated records first, so target
offsets differ from source offsets by a known base. A group's expected target
offset is that base plus the number of restored records whose source offset is
below the recorded one (the first restored record at or after it, or the end).
"""

from __future__ import annotations

import json
import os
import time

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from kafka_backup.producers.layout import OFFSET_HEADER
from tests.conftest import Proc, cli, committed, create_topic, unique, wait_for, watermarks
from tests.test_restore_e2e import backup, one_line, produce_records, read_topic, restore

pytestmark = pytest.mark.e2e

def commit(broker: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    c = Consumer({"bootstrap.servers": broker, "group.id": group, "enable.auto.commit": False})
    try:
        c.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
    finally:
        c.close()


def record_at(broker: str, topic: str, partition: int, offset: int):
    c = Consumer({"bootstrap.servers": broker, "group.id": unique("at"), "enable.auto.commit": False,
                  "enable.partition.eof": True})
    try:
        c.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = c.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None or msg.error().code() != KafkaError._PARTITION_EOF, \
                f"no record at {topic}/{partition}@{offset}"
            assert msg.error() is None, msg.error()
            assert msg.offset() == offset
            return msg
        raise AssertionError(f"timed out reading {topic}/{partition}@{offset}")
    finally:
        c.close()


def unrelated(broker: str, topic: str, counts: dict[int, int]) -> None:
    p = Producer({"bootstrap.servers": broker})
    for part, n in counts.items():
        for i in range(n):
            p.produce(topic, value=f"unrelated-{i}".encode(), key=b"u", partition=part)
    assert p.flush(30) == 0


def groups_doc(store, bid: str) -> dict:
    with open(os.path.join(store, bid, "groups.json"), "rb") as fh:
        return json.load(fh)


def follow(broker: str, bid: str, url: str, groups: list[str], *extra: str):
    return cli("offset-reset", "--bootstrap-servers", broker, "--from-backup", bid, "--storage", url,
               "--groups", ",".join(groups), *extra)


def plan_rows(stdout: str) -> dict[tuple[str, int], tuple[int, str]]:
    """(group, partition) -> (target offset, note), from the printed plan."""
    lines = stdout.strip().splitlines()
    assert lines[0].split("\t") == ["group", "topic", "partition", "recorded", "target_topic", "target_offset",
                                    "note"], stdout
    out = {}
    for line in lines[1:]:
        cols = line.split("\t")
        if len(cols) == 7:
            out[(cols[0], int(cols[2]))] = (int(cols[5]), cols[6])
    return out


def expected_target(pre: int, restored_offsets: list[int], recorded: int) -> int:
    """The first restored record at or after ``recorded``, or the end, computed from the truth."""
    return pre + sum(1 for j in restored_offsets if j < recorded)


def check_positioned(broker: str, group: str, target: str, truth, pre: dict[int, int],
                     restored: dict[int, list[int]], recorded: dict[int, int]) -> None:
    """The group's committed offset on each target partition holds the record it would have read next."""
    got = committed(broker, group, target, len(pre))
    for p, rec in recorded.items():
        want = expected_target(pre[p], restored[p], rec)
        assert got[p] == want, (group, p, got, want)
        later = [j for j in restored[p] if j >= rec]
        if not later:  # after the last restored record: the end
            assert want == watermarks(broker, target, len(pre))[p]
            continue
        msg = record_at(broker, target, p, got[p])
        assert dict(msg.headers())[OFFSET_HEADER] == str(later[0]).encode()
        assert (msg.key(), msg.value()) == (truth[p][later[0]].key, truth[p][later[0]].value)
        if rec in restored[p]:
            assert later[0] == rec  # restored: exactly the record it committed to read next


def test_groups_follow_the_data_into_a_topic_with_another_offset_base(broker, tmp_path):
    src, bid, rid = unique("follow"), unique("bk-follow"), unique("rs-follow")
    create_topic(broker, src, 2)
    truth = produce_records(broker, src, 2, 120, int(time.time() * 1000) - 3_600_000)  # 60 per partition
    recorded = {unique("fg-mid"): {0: 17, 1: 42}, unique("fg-edge"): {0: 0, 1: 60}}
    for group, offsets in recorded.items():
        commit(broker, group, src, offsets)
    store = tmp_path / "store"
    url = f"file://{store}"
    before = time.time()
    backup(broker, src, bid, url, "--backup-segment-max-records", "25")

    # every group with offsets on the topic (default "*"), not the backup's own group, with the time read
    doc = groups_doc(store, bid)
    assert set(doc["groups"]) == set(recorded)
    for group, offsets in recorded.items():
        assert doc["groups"][group]["offsets"] == [{"topic": src, "partition": p, "offset": o}
                                                   for p, o in sorted(offsets.items())]
        assert before <= doc["groups"][group]["read_ts"] <= time.time()

    target, pre = f"{src}-r", {0: 7, 1: 3}
    create_topic(broker, target, 2)
    unrelated(broker, target, pre)
    r = restore(broker, bid, url, rid, "--topic-map", f"{src}:{target}")
    assert r.returncode == 0, r.stderr
    got = read_topic(broker, target, 2)
    for p in range(2):
        assert [(x.key, x.value, x.headers) for x in got[p][pre[p]:]] == [
            (x.key, x.value, x.headers + ((OFFSET_HEADER, str(j).encode()),)) for j, x in enumerate(truth[p])]
    restored = {p: list(range(60)) for p in range(2)}
    groups = sorted(recorded)

    # preview: the plan, and nothing changed (the groups' offsets on the target, set here, stay)
    placed = {0: 1, 1: 2}
    for group in groups:
        commit(broker, group, target, placed)
    r = follow(broker, bid, url, groups, "--restore-id", rid)
    assert r.returncode == 0, r.stderr
    rows = plan_rows(r.stdout)
    assert {k: v[0] for k, v in rows.items()} == {
        (g, p): expected_target(pre[p], restored[p], o) for g, offs in recorded.items() for p, o in offs.items()}
    edge = next(g for g in groups if g.startswith("fg-edge"))
    assert rows[(edge, 1)][1] == "after the last restored record: the end"
    assert "preview: nothing changed" in r.stdout
    for group in groups:
        assert committed(broker, group, target, 2) == placed

    # a group with an active member: refused in one line, nothing changed for any group
    mid = next(g for g in groups if g.startswith("fg-mid"))
    member = Consumer({"bootstrap.servers": broker, "group.id": mid, "enable.auto.commit": False})
    member.subscribe([target])
    try:
        wait_for(lambda: member.poll(0.2) is not None or member.assignment(), 60, 0.1, "group membership")
        r = follow(broker, bid, url, groups, "--restore-id", rid, "--execute")
        assert r.returncode == 2
        line = one_line(r.stderr)
        assert "offset_reset.groups" in line and mid in line and "active member" in line
        for group in groups:
            assert committed(broker, group, target, 2) == placed
    finally:
        member.close()

    r = follow(broker, bid, url, groups, "--restore-id", rid, "--execute")
    assert r.returncode == 0, r.stderr
    assert "applied: 4 offset(s) of 2 group(s)" in r.stdout
    for group in groups:
        check_positioned(broker, group, target, truth, pre, restored, recorded[group])

    # --topic-map instead of the restore's checkpoint: the unrelated records are stepped over, same result
    r = cli("offset-reset", "--bootstrap-servers", broker, "--group", mid, "--topics", target, "--to-earliest",
            "--execute")
    assert r.returncode == 0, r.stderr
    assert committed(broker, mid, target, 2) == {0: 0, 1: 0}
    r = follow(broker, bid, url, [mid], "--topic-map", f"{src}:{target}", "--execute")
    assert r.returncode == 0, r.stderr
    check_positioned(broker, mid, target, truth, pre, restored, recorded[mid])


def test_point_in_time_restore_maps_before_inside_and_after_the_window(broker, tmp_path):
    src, bid, rid = unique("pitf"), unique("bk-pitf"), unique("rs-pitf")
    create_topic(broker, src, 2)
    base = int(time.time() * 1000) - 3_600_000
    truth = produce_records(broker, src, 2, 200, base, step_ms=10)  # record i = offset i // 2 of partition i % 2
    recorded = {unique("w-before"): {0: 5, 1: 29}, unique("w-inside"): {0: 30, 1: 55},
                unique("w-after"): {0: 70, 1: 100}}
    for group, offsets in recorded.items():
        commit(broker, group, src, offsets)
    commit(broker, unique("w-unnamed"), src, {0: 1})  # not named in backup.consumer_groups: not recorded
    store = tmp_path / "store"
    url = f"file://{store}"
    backup(broker, src, bid, url, "--backup-segment-max-records", "25",
           "--backup-consumer-groups", ",".join(recorded))
    assert set(groups_doc(store, bid)["groups"]) == set(recorded)

    lo, hi = base + 600, base + 1400
    restored = {p: [j for j, x in enumerate(truth[p]) if lo <= x.timestamp < hi] for p in range(2)}
    assert restored == {0: list(range(30, 70)), 1: list(range(30, 70))}
    target, pre = f"{src}-pit", {0: 4, 1: 11}
    create_topic(broker, target, 2)
    unrelated(broker, target, pre)
    r = restore(broker, bid, url, rid, "--from-time", str(lo), "--to-time", str(hi), "--topic-map",
                f"{src}:{target}")
    assert r.returncode == 0, r.stderr

    groups = sorted(recorded)
    r = follow(broker, bid, url, groups, "--restore-id", rid, "--execute")
    assert r.returncode == 0, r.stderr
    notes = {k: v[1] for k, v in plan_rows(r.stdout).items()}
    before, inside, after = (next(g for g in groups if g.startswith(s)) for s in ("w-before", "w-inside", "w-after"))
    assert notes[(before, 0)] == notes[(before, 1)] == "before the first restored record: the first"
    assert notes[(inside, 0)] == notes[(inside, 1)] == ""
    assert notes[(after, 0)] == notes[(after, 1)] == "after the last restored record: the end"
    for group in groups:
        check_positioned(broker, group, target, truth, pre, restored, recorded[group])
    assert committed(broker, before, target, 2) == {0: 4, 1: 11}  # the first restored records
    assert committed(broker, after, target, 2) == {0: 44, 1: 51}  # the end


def test_a_continuous_backup_records_the_offsets_again_as_they_move(broker, tmp_path):
    src, bid, group = unique("contf"), unique("bk-contf"), unique("cg")
    create_topic(broker, src, 1)
    produce_records(broker, src, 1, 20, int(time.time() * 1000) - 3_600_000)
    commit(broker, group, src, {0: 3})
    store = tmp_path / "store"
    proc = Proc(["backup", "--bootstrap-servers", broker, "--topics", src, "--backup-id", bid, "--storage",
                 f"file://{store}", "--continuous", "--backup-consumer-groups", group,
                 "--backup-consumer-groups-interval-s", "1"], str(tmp_path / "backup.log")).start()

    def recorded() -> list:
        return groups_doc(store, bid)["groups"][group]["offsets"]

    try:
        wait_for(lambda: recorded() == [{"topic": src, "partition": 0, "offset": 3}], 120, what="first read")
        commit(broker, group, src, {0: 11})
        wait_for(lambda: recorded() == [{"topic": src, "partition": 0, "offset": 11}], 120, what="read again")
    finally:
        proc.stop()
    assert "Traceback" not in proc.log()
