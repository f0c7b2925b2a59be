"""offset-reset --from-backup without a broker: the search against brute force, the documents, the mistakes."""

from __future__ import annotations

import itertools

import pytest

from kafka_backup.cli.main import main
from kafka_backup.producers import group_offsets, layout
from kafka_backup.producers.offset_follow import _original_offset, first_at_or_after


def brute_force(records: list[tuple[int, int | None]], lo: int, hi: int, recorded: int) -> int | None:
    """The definition, by reading every record: records = [(target offset, original offset or None)]."""
    restored = [(t, o) for t, o in records if lo <= t < hi and o is not None]
    if not restored:
        return None
    at_or_after = [t for t, o in restored if o >= recorded]
    return at_or_after[0] if at_or_after else restored[-1][0] + 1


def probe_of(records: list[tuple[int, int | None]], calls: list[int]):
    def probe(m: int):
        calls.append(m)
        return next(((t, o) for t, o in records if t >= m and o is not None), None)
    return probe


LAYOUTS = {
    # target offsets 0..: unrelated records (None) before and after, original offsets with holes (a time
    # window, compaction), a target offset gap (transaction marker) and one-record partitions
    "plain": [(t, t + 100) for t in range(10)],
    "prefix-and-suffix": [(t, None) for t in range(5)] + [(t, 3 * t) for t in range(5, 20)] + [(20, None)],
    "window-holes": [(t, o) for t, o in zip(range(3, 40), itertools.count(17, 4), strict=False)],
    "target-gap": [(0, None), (1, 5), (2, 6), (4, 9), (5, 10), (7, None)],
    "one": [(0, None), (1, 42)],
    "none": [(0, None), (1, None)],
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_search_equals_brute_force_for_every_recorded_offset(name):
    records = LAYOUTS[name]
    end = max(t for t, _ in records) + 1
    originals = [o for _, o in records if o is not None] or [0]
    for lo, hi in ((0, end), (records[0][0], end)):
        for recorded in range(min(originals) - 2, max(originals) + 3):
            calls: list[int] = []
            got = first_at_or_after(probe_of(records, calls), lo, hi, recorded)
            assert got == brute_force(records, lo, hi, recorded), (name, lo, hi, recorded)
            assert len(set(calls)) <= (hi - lo).bit_length() + 2, "binary search, not a scan"


def test_search_edges_of_a_point_in_time_restore():
    # originals 17, 21, ..., 161 restored at target offsets 3..39
    records = LAYOUTS["window-holes"]
    probe = probe_of(records, [])
    assert first_at_or_after(probe, 3, 40, 0) == 3  # before the window: the first restored record
    assert first_at_or_after(probe, 3, 40, 21) == 4  # exactly restored
    assert first_at_or_after(probe, 3, 40, 22) == 5  # not restored (a hole): the next restored one
    assert first_at_or_after(probe, 3, 40, 161) == 39  # the last
    assert first_at_or_after(probe, 3, 40, 162) == 40  # after the window: the end
    assert first_at_or_after(probe, 7, 7, 5) is None  # nothing restored in the range


def test_original_offset_header():
    assert _original_offset([("h", b"1"), (layout.OFFSET_HEADER, b"12")]) == 12
    assert _original_offset([(layout.OFFSET_HEADER, b"1"), (layout.OFFSET_HEADER, b"7")]) == 7  # last wins
    assert _original_offset([(layout.OFFSET_HEADER, b"-1")]) is None
    assert _original_offset([(layout.OFFSET_HEADER, None)]) is None
    assert _original_offset([(layout.OFFSET_HEADER, b"\xff")]) is None
    assert _original_offset(None) is None


def test_groups_document_round_trip_merge_and_older_documents():
    doc = layout.GroupsDocument("bk")
    a = layout.GroupSnapshot(10.0, [layout.GroupOffset("t", 0, 5)])
    b = layout.GroupSnapshot(11.0, [layout.GroupOffset("t", 1, 0)])
    group_offsets.merge(doc, {"b": b, "a": a})
    later = layout.GroupSnapshot(12.0, [layout.GroupOffset("t", 0, 9)])
    group_offsets.merge(doc, {"a": later})  # a read again replaces a; b keeps its last read
    got = layout.decode_groups(layout.encode(doc))
    assert list(got.groups) == ["a", "b"]
    assert got.groups["a"] == later and got.groups["b"] == b and got.version == 2
    with pytest.raises(layout.MetadataError, match="invalid value"):
        layout.decode_groups(b'{"backup_id": "bk", "groups": {"a": {"read_ts": 1, "offsets": '
                             b'[{"topic": "t", "partition": 0, "offset": -3}]}}}')
    # a restore checkpoint written before the header existed: restored without it
    old = layout.decode_restore_checkpoint(b'{"restore_id": "r", "backup_id": "b", "topic_map": {}, '
                                           b'"total_records": 0, "version": 2}')
    assert old.offset_header is False


@pytest.mark.parametrize("args,needle", [
    (["--from-backup", "a/b", "--storage", "/tmp/x", "--groups", "g"], "offset_reset.from_backup: 'a/b' is not"),
    (["--from-backup", "bk", "--groups", "g"], "offset_reset.storage: no storage given"),
    (["--from-backup", "bk", "--storage", "/tmp/x"], "offset_reset.groups: no groups given"),
    (["--from-backup", "bk", "--storage", "/tmp/x", "--groups", "g", "--to-latest"],
     "offset_reset.from_backup: --from-backup moves --groups to the restored records; drop --to-latest"),
    (["--from-backup", "bk", "--storage", "/tmp/x", "--groups", "g", "--restore-id", "r", "--topic-map", "a:b"],
     "offset_reset.topic_map: give --restore-id"),
    (["--from-backup", "bk", "--storage", "/tmp/x", "--groups", "g", "--topic-map", "a"],
     "offset_reset.topic_map: 'a' is not source:target"),
])
def test_from_backup_mistakes_exit_2_with_one_line(args, needle, capsys):
    assert main(["offset-reset", "--bootstrap-servers", "127.0.0.1:1", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_unknown_group_and_missing_backup_name_the_fix(tmp_path, capsys):
    store = tmp_path / "store"
    (store / "bk").mkdir(parents=True)
    (store / "bk" / "manifest.json").write_bytes(layout.encode(layout.Manifest("bk", topics={"t": 1})))
    base = ["offset-reset", "--bootstrap-servers", "127.0.0.1:1", "--storage", f"file://{store}"]
    assert main([*base, "--from-backup", "bk", "--groups", "g"]) == 2  # a backup without groups.json
    err = capsys.readouterr().err
    assert "offset_reset.groups: backup 'bk' recorded no offsets of group 'g'" in err and "none" in err
    (store / "bk" / "groups.json").write_bytes(layout.encode(group_offsets.merge(
        layout.GroupsDocument("bk"), {"billing": layout.GroupSnapshot(1.0, [layout.GroupOffset("t", 0, 3)])})))
    assert main([*base, "--from-backup", "bk", "--groups", "g"]) == 2
    assert "groups recorded: billing" in capsys.readouterr().err
    assert main([*base, "--from-backup", "ghost", "--groups", "g"]) == 2
    assert "offset_reset.from_backup: no backup 'ghost'" in capsys.readouterr().err
    assert main([*base, "--from-backup", "bk", "--groups", "billing", "--restore-id", "nope"]) == 2
    assert "offset_reset.restore_id: no restore 'nope'" in capsys.readouterr().err


class _Future:
    def __init__(self, value=None, error: Exception | None = None) -> None:
        self.value, self.error = value, error

    def result(self, _timeout=None):
        if self.error is not None:
            raise self.error
        return self.value


class _Admin:
    """list_consumer_groups / list_consumer_group_offsets as confluent_kafka answers them."""

    def __init__(self, offsets: dict, fail_listing: bool = False, fail: dict | None = None) -> None:
        self.offsets = offsets
        self.fail_listing = fail_listing
        self.fail = fail or {}  # group -> [KafkaError code, ...] answered before its offsets

    def list_consumer_groups(self, **_kw):
        from types import SimpleNamespace

        from confluent_kafka import KafkaError, KafkaException
        if self.fail_listing:
            return _Future(error=KafkaException(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED)))
        return _Future(SimpleNamespace(valid=[SimpleNamespace(group_id=g) for g in self.offsets], errors=[]))

    def list_consumer_group_offsets(self, requests, **_kw):
        from types import SimpleNamespace

        from confluent_kafka import TopicPartition
        group = requests[0].group_id
        if self.fail.get(group):
            from confluent_kafka import KafkaError, KafkaException
            code = self.fail[group].pop(0)
            return {group: _Future(error=KafkaException(KafkaError(code, retriable=code < 0)))}
        tps = [TopicPartition(t, p, o) for t, p, o in self.offsets.get(group, [])]
        return {group: _Future(SimpleNamespace(topic_partitions=tps))}


class _Emitter:
    def __init__(self) -> None:
        self.events: list[tuple[type, dict]] = []

    def emit(self, cls, **kw) -> None:
        self.events.append((cls, kw))


def _worker(tmp_path, admin, groups=("*",)):
    from kafka_backup.producers.backup import BackupWorker
    from kafka_backup.producers.storage import FileBackend, Storage
    from kafka_backup.schemas.config import BackupConfig

    w = BackupWorker.__new__(BackupWorker)  # no Kafka client: only the groups step is exercised
    w.cfg = BackupConfig(backup_id="bk", topics=["t"], consumer_groups=list(groups))
    w.id, w.manifest, w.groups_due, w._admin, w._groups_reading = "bk", None, 0.0, admin, None
    w.storage, w.emitter = Storage(FileBackend(str(tmp_path))), _Emitter()
    return w


def test_backup_records_the_applications_groups_on_its_topics_only(tmp_path):
    admin = _Admin({"app": [("t", 1, 9), ("t", 0, 4), ("other", 0, 1), ("t", 2, -1001)],
                    "kafka-backup.bk": [("t", 0, 100)],  # the backup's own group
                    "idle": [("other", 0, 3)]})
    w = _worker(tmp_path, admin)
    w._record_groups()
    doc = layout.decode_groups((tmp_path / "bk" / "groups.json").read_bytes())
    assert list(doc.groups) == ["app"]
    assert doc.groups["app"].offsets == [layout.GroupOffset("t", 0, 4), layout.GroupOffset("t", 1, 9)]
    assert w.emitter.events == []
    named = _worker(tmp_path, admin, groups=("kafka-backup.bk",))  # named explicitly: recorded
    named._record_groups()
    assert list(layout.decode_groups((tmp_path / "bk" / "groups.json").read_bytes()).groups) == [
        "app", "kafka-backup.bk"]


def test_a_failed_admin_call_is_counted_and_never_fails_the_backup(tmp_path, caplog):
    from kafka_backup.schemas import events as ev

    w = _worker(tmp_path, _Admin({}, fail_listing=True))
    w._record_groups()  # no exception
    assert not (tmp_path / "bk" / "groups.json").exists()
    [(cls, kw)] = w.emitter.events
    assert cls is ev.ErrorRaised and kw["error_type"] == "consumer_groups" and kw["operation"] == "consumer_groups"
    assert "list_consumer_groups" in kw["message"] and "AUTHORIZATION" in kw["message"].upper()
    assert len([r for r in caplog.records if "consumer group offsets not recorded" in r.getMessage()]) == 1
    off = _worker(tmp_path, _Admin({}, fail_listing=True), groups=())  # backup.consumer_groups: [] reads nothing
    off._record_groups()
    assert off.emitter.events == []


def test_a_group_id_must_be_a_safe_id(capsys):
    assert main(["offset-reset", "--bootstrap-servers", "127.0.0.1:1", "--from-backup", "bk", "--storage", "/tmp/x",
                 "--groups", "ok,bad group"]) == 2
    assert "offset_reset.groups: 'bad group' is not a safe id" in capsys.readouterr().err


def test_a_retriable_group_error_is_retried_once_then_counted():
    from confluent_kafka import KafkaError

    admin = _Admin({"a": [("t", 0, 1)], "b": [("t", 0, 2)], "c": [("t", 0, 3)]},
                   fail={"a": [KafkaError._TRANSPORT], "b": [KafkaError._TRANSPORT, KafkaError._TRANSPORT],
                         "c": [KafkaError.GROUP_AUTHORIZATION_FAILED]})
    found, problems = group_offsets.read(admin, {"t"}, ["*"])
    assert list(found) == ["a"]  # b failed twice, c is not retriable
    assert sorted(p.split(":")[0] for p in problems) == ["list_consumer_group_offsets(b)",
                                                         "list_consumer_group_offsets(c)"]
