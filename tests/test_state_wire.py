"""State values on the wire: what earlier aggregators wrote still reads, and earlier readers read ours.

``tests/data/state-v1-*.msgpack`` were folded by the code of commit d85ab4f (``list[int]`` pairs,
``list[float]`` dedup marks, job-level rate samples under the topic ``""``) from the histories in
``tests/data/make_state_v1.py``; the ``Old*`` Structs below are that code's definitions, frozen.
"""

from __future__ import annotations

import importlib.util
import os

import msgspec
import pytest

from kafka_backup.schemas.state import (
    STATE_VERSION,
    Compressed,
    Consumed,
    Hole,
    JobRate,
    JobState,
    NewerStateError,
    RateSample,
    Seen,
    decode_state,
    encode_state,
)

DATA = os.path.join(os.path.dirname(__file__), "data")
T0 = 1_790_000_000


def fixture(name: str) -> bytes:
    with open(os.path.join(DATA, f"state-v1-{name}.msgpack"), "rb") as fh:
        return fh.read()


def histories():
    spec = importlib.util.spec_from_file_location("make_state_v1", os.path.join(DATA, "make_state_v1.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HISTORIES


# ---- the state Structs of commit d85ab4f, frozen (fields only) ----------------------------------


class OldHistogram(msgspec.Struct, array_like=True):
    counts: list[int]
    sum: float = 0.0
    count: int = 0


class OldSizeSample(msgspec.Struct, array_like=True):
    minute: int
    records: int
    bytes: int


class OldPartitionState(msgspec.Struct, omit_defaults=True):
    topic: str
    partition: int
    committed: int = -1
    high_watermark: int = -1
    newest_stored_ts: int | None = None
    newest_available_ts: int | None = None
    stored_next_offset: int = 0
    stored_holes: list[tuple[int, int]] = []
    records: int = 0
    bytes: int = 0
    last_commit_ts: float | None = None
    sizes: list[OldSizeSample] = []


class OldStorageCalls(msgspec.Struct):
    direction: str
    backend: str
    operation: str
    outcome: str
    latency: OldHistogram
    bytes: int = 0


class OldStorageErrors(msgspec.Struct, array_like=True):
    backend: str
    error_type: str
    count: int


class OldRateSample(msgspec.Struct, array_like=True):
    second: int
    topic: str
    records: int
    bytes: int
    fetches: int = 0


class OldStatusSample(msgspec.Struct, array_like=True):
    ts: float
    lag: int
    committed: int


class OldJobState(msgspec.Struct, omit_defaults=True):
    kind: str
    job: str
    v: int = 1
    backup_id: str = ""
    status: str = "running"
    mode: str = ""
    started_ts: float | None = None
    ended_ts: float | None = None
    last_success_ts: float | None = None
    expected_interval_s: float | None = None
    recovery_point_objective_s: float | None = None
    last_event_ts: float = 0.0
    runs: int = 0
    records: int = 0
    bytes: int = 0
    fetches: int = 0
    consumed: dict[str, list[int]] = {}
    partitions: dict[str, OldPartitionState] = {}
    rates: list[OldRateSample] = []
    durations: dict[str, OldHistogram] = {}
    storage_calls: list[OldStorageCalls] = []
    storage_failures: list[OldStorageErrors] = []
    storage_latency: dict[str, OldHistogram] = {}
    storage_bytes: dict[str, int] = {}
    storage_errors: dict[str, int] = {}
    compression: dict[str, list[int]] = {}
    errors: dict[str, int] = {}
    permanent_errors: dict[str, int] = {}
    retries: dict[str, int] = {}
    rebalances: int = 0
    window: list[OldStatusSample] = []
    total_records: int | None = None
    restored_total: int = 0
    dropped: dict[str, int] = {}
    seen: dict[str, list[float]] = {}
    checked_segments: int = 0
    unverified_segments: int = 0
    verified_ts: float | None = None
    verify_bad: int = 0
    verify_gaps: int = 0


old_decoder = msgspec.msgpack.Decoder(OldJobState)


# ---- old values, new reader -----------------------------------------------------------------


def test_the_previous_versions_values_read_as_the_same_numbers():
    """The numbers of the histories in make_state_v1.py, worked out by hand."""
    s = decode_state(fixture("backup"))
    assert s.v == 1
    assert s.consumed == {"orders": Consumed(10 + 20, 1000 + 2000), "pay": Consumed(3, 300)}
    assert s.compression == {"zstd": Compressed(400, 1100), "lz4": Compressed(500, 1100)}
    # w1's mark went through a decode and an encode as list[float] (a restart): 4.0 on the wire
    assert s.seen == {"w1": Seen(4, T0 + 3.0), "w2": Seen(3, T0 + 6.0)}
    assert type(s.seen["w1"].seq) is int
    assert s.partitions["orders/0"].stored_holes == [Hole(10, 20)]
    assert s.rates == [RateSample(T0 + 1, "orders", 10, 1000), RateSample(T0 + 1, "pay", 3, 300),
                       RateSample(T0 + 4, "orders", 20, 2000)]
    assert s.job_rates == [JobRate(T0 + 1, fetches=4), JobRate(T0 + 4, fetches=2)]
    assert (s.records, s.bytes, s.fetches) == (20, 2000, 6)

    r = decode_state(fixture("restore"))
    assert r.rates == [] and r.job_rates == [JobRate(T0 + 1, records=50 + 25, bytes=5000 + 2500)]
    assert (r.records, r.bytes, r.restored_total, r.total_records) == (175, 17_500, 175, 1000)
    assert r.seen == {"r1": Seen(3, T0 + 1.5)}


def test_the_same_history_folded_now_writes_the_same_bytes():
    """Identical bytes, except the documented moves: job-level samples and float-encoded seqs."""
    made = {name: history() for name, history in histories().items()}
    assert made["plain"] == fixture("plain")
    for name in ("backup", "restore"):
        old = msgspec.msgpack.decode(fixture(name))
        job = [[r[0], r[2], r[3], r[4]] for r in old.get("rates", []) if r[1] == ""]
        old["rates"] = [r for r in old.get("rates", []) if r[1] != ""]
        if not old["rates"]:
            del old["rates"]
        old["job_rates"] = job
        old["seen"] = {i: [int(seq), ts] for i, (seq, ts) in old["seen"].items()}
        assert msgspec.msgpack.decode(made[name]) == old, name
    for data in (*made.values(), *(fixture(n) for n in made)):
        state = decode_state(data)
        assert decode_state(encode_state(state)) == state


# ---- new values, old reader (an exporter not yet upgraded) ----------------------------------


def test_an_older_reader_reads_what_this_version_writes():
    """Everything but the job-level samples, which it does not know: upgrade exporters first."""
    for name, history in histories().items():
        new = old_decoder.decode(history())
        expected = old_decoder.decode(fixture(name))
        expected.rates = [r for r in expected.rates if r.topic != ""]
        assert new == expected, name


def test_the_typed_pairs_encode_as_the_lists_they_replace():
    enc = msgspec.msgpack.encode
    assert enc(Consumed(5, 50)) == enc([5, 50])
    assert enc(Compressed(10, 30)) == enc([10, 30])
    assert enc(Hole(3, 9)) == enc((3, 9))
    assert enc(Seen(7, T0 + 0.5)) == enc([7, T0 + 0.5])
    assert enc(RateSample(T0, "t", 1, 2)) == enc(OldRateSample(T0, "t", 1, 2))


def test_a_dedup_mark_must_be_a_whole_number():
    raw = msgspec.msgpack.encode({"kind": "backup", "job": "b", "seen": {"w": [4.5, T0]}})
    with pytest.raises(msgspec.ValidationError, match="not an integer"):
        decode_state(raw)


# ---- versions ---------------------------------------------------------------------------------


def test_the_version_is_written_only_when_it_is_not_the_first():
    """omit_defaults leaves v out at its default, so the default must mean the first version."""
    assert "v" not in msgspec.msgpack.decode(encode_state(JobState(kind="backup", job="b")))
    newer = msgspec.msgpack.decode(encode_state(JobState(kind="backup", job="b", v=STATE_VERSION + 1)))
    assert newer["v"] == STATE_VERSION + 1


def test_a_newer_writers_value_is_refused_naming_its_version():
    newer = encode_state(JobState(kind="backup", job="b", v=STATE_VERSION + 1, records=5))
    with pytest.raises(NewerStateError) as err:
        decode_state(newer)
    assert err.value.version == STATE_VERSION + 1
    assert f"version {STATE_VERSION + 1}, newer than this code reads ({STATE_VERSION})" in str(err.value)
    # a newer layout that changed a field's type is still "newer", not "malformed"
    changed = msgspec.msgpack.encode({"kind": "backup", "job": "b", "v": STATE_VERSION + 1, "records": [1, 2]})
    with pytest.raises(NewerStateError):
        decode_state(changed)
    broken = msgspec.msgpack.encode({"kind": "backup", "job": "b", "records": [1, 2]})
    with pytest.raises(msgspec.ValidationError):
        decode_state(broken)
