"""Storage layout 2 without a broker: digests, bounded decompression, key containment, versions, the index."""

from __future__ import annotations

import json
import subprocess
import sys

import cramjam
import msgspec
import pytest

from kafka_backup.producers import layout, segments
from kafka_backup.producers.storage import FileBackend, Storage, StorageError
from tests.conftest import ROOT

BK, TOPIC = "bk", "t"


def make_segment(partition: int, start: int, n: int, algorithm: str, topic: str = TOPIC):
    records = [segments.StoredRecord(start + i, 1000 + start + i, 1, b"k%d" % i, b"v" * (i % 30)) for i in range(n)]
    data, raw = segments.encode(topic, partition, records, algorithm)
    info = layout.SegmentInfo(layout.segment_key(BK, TOPIC, partition, start, algorithm), start, start + n, n,
                              sum(r.size for r in records), raw, len(data), algorithm, 1000 + start,
                              1000 + start + n - 1, layout.digest(data), start)
    return data, info, records


@pytest.mark.parametrize("algorithm", ["none", "lz4", "zstd"])
def test_a_flipped_byte_is_caught_by_the_digest_before_decoding(algorithm):
    data, info, records = make_segment(0, 100, 50, algorithm)
    assert layout.read_segment(data, info, TOPIC, 0) == records
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x01
    with pytest.raises(layout.SegmentDamaged) as err:
        layout.read_segment(bytes(flipped), info, TOPIC, 0)
    assert err.value.error_type == "integrity" and "SHA-256" in str(err.value) and info.key in str(err.value)
    with pytest.raises(layout.SegmentDamaged, match="is 10 bytes, the index recorded"):
        layout.read_segment(data[:10], info, TOPIC, 0)


def test_decoded_records_must_be_the_partition_and_range_the_index_claims():
    data, info, _ = make_segment(1, 100, 50, "zstd")
    with pytest.raises(layout.SegmentDamaged, match="holds records of t/1, not t/0"):
        layout.read_segment(data, info, TOPIC, 0)
    shifted = msgspec.structs.replace(info, start_offset=90, end_offset=140)
    with pytest.raises(layout.SegmentDamaged, match="the index claims 50 at 90..139"):
        layout.read_segment(data, shifted, TOPIC, 1)
    # a layout 1 entry (no digest) still gets every other check
    legacy = msgspec.structs.replace(info, sha256="", records=49)
    with pytest.raises(layout.SegmentDamaged, match="holds 50 records"):
        layout.read_segment(data, legacy, TOPIC, 1)


@pytest.mark.e2e
def test_a_small_zstd_bomb_does_not_allocate_what_it_claims(tmp_path):
    """1 GiB of zeros in ~32 KiB: decoding it against a recorded size of 1000 bytes fails within a few MB."""
    comp = cramjam.zstd.Compressor()
    chunk = b"\0" * (1 << 20)
    for _ in range(1024):
        comp.compress(chunk)
    bomb = bytes(comp.finish())
    assert len(bomb) < 1 << 20
    (tmp_path / "bomb").write_bytes(bomb)
    code = (
        "import resource, sys\n"
        "from producers import segments\n"
        f"data = open({str(tmp_path / 'bomb')!r}, 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    segments.decode(data, 'zstd', 1000)\n"
        "    print('decoded')\n"
        "except segments.CorruptSegment as err:\n"
        "    print('refused', err)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    verdict, grown_mb = out.stdout.strip().splitlines()
    assert verdict == "refused inflates beyond the 1000 bytes the checkpoint recorded", out.stderr
    assert int(grown_mb) < 64, f"decoding grew the process by {grown_mb} MB"


@pytest.mark.parametrize("key", ["bk/topics/t/0/../../../../etc/passwd", "../bk/topics/t/0/x.seg", "/etc/passwd",
                                 "bk/topics/t/0//x.seg", "bk/topics/t/0/./x.seg", "other/topics/t/0/x.seg",
                                 "bk/topics/t/1/x.seg", "bk/topics/t/0/a\\..\\x.seg"])
def test_keys_from_metadata_must_stay_inside_the_partition_prefix(key):
    _, info, _ = make_segment(0, 0, 3, "none")
    cp = layout.Checkpoint(TOPIC, 0, 3, [msgspec.structs.replace(info, key=key)])
    with pytest.raises(layout.MetadataError) as err:
        layout.all_segments(cp, lambda k: b"", BK)
    assert err.value.error_type == "integrity" and "outside" in str(err.value) and "\n" not in str(err.value)


def test_the_file_backend_refuses_a_key_escaping_its_root(tmp_path):
    (tmp_path / "secret").write_bytes(b"x")
    backend = FileBackend(str(tmp_path / "root"))
    with pytest.raises(StorageError, match="outside the storage root"):
        backend.get("../secret")


@pytest.mark.parametrize("text,needle", [
    (b'{"topic": "t", "partition": 0, "next_', "is corrupt or truncated"),
    (b"\x00\xff garbage", "is corrupt or truncated"),
    (b'{"topic": "t", "partition": "zero", "next_offset": 1}', "holds an invalid value"),
    (b'{"topic": "../t", "partition": 0, "next_offset": 1}', "holds an invalid value"),
    (b'{"topic": "t", "partition": 0, "next_offset": -5}', "holds an invalid value"),
    (b'{"topic": "t", "partition": 0, "next_offset": 1, "version": 3}', "layout version 3, newer than"),
    # a newer layout that changed a field's type: the version is the cause, not damage
    (b'{"topic": "t", "partition": {"id": 0}, "next_offset": 1, "version": 3}', "layout version 3, newer than"),
    (b'{"topic": "t", "partition": {"id": 0}, "next_offset": 1, "version": 2}', "holds an invalid value"),
])
def test_unusable_checkpoints_are_one_line_naming_the_file(text, needle):
    with pytest.raises(layout.MetadataError) as err:
        layout.decode_checkpoint(text, "bk/topics/t/0/checkpoint.json")
    line = str(err.value)
    assert line.startswith("bk/topics/t/0/checkpoint.json: ") and needle in line and "\n" not in line
    if "newer than" in needle:
        assert line.endswith("upgrade kafka-backup") and err.value.error_type == "layout_version"


def test_the_head_stays_bounded_and_the_chunks_chain_back_to_every_segment(tmp_path):
    storage = Storage(FileBackend(str(tmp_path)))
    cp = layout.Checkpoint(TOPIC, 0, 0)
    infos, sizes = [], []
    for i in range(300):
        _, info, _ = make_segment(0, i * 3, 3, "none")
        infos.append(info)
        cp, chunks = layout.append(BK, cp, info, 0)
        for key, data in chunks:
            storage.put(key, data, "index")
        sizes.append(len(layout.encode(cp)))
    assert len(cp.segments) == 300 % layout.CHUNK_SEGMENTS and cp.segment_count == 300
    # bounded: never more than the fullest head before the first seal plus one index reference
    assert max(sizes) < max(sizes[: layout.CHUNK_SEGMENTS]) + 1024
    read = lambda k: storage.get(k, "index")  # noqa: E731
    assert layout.all_segments(cp, read, BK) == infos
    assert cp.max_ts == infos[-1].max_ts and cp.next_offset == 900
    # only the chunks above a mark are read
    assert [c.segments[0].start_offset for c in layout.chunks(cp, read, BK, stop_below=500)] == [576, 384]
    # a chunk altered in storage breaks the chain's digest
    key = cp.index.key
    path = tmp_path / key
    path.write_bytes(path.read_bytes().replace(b'"records": 3', b'"records": 4', 1))
    with pytest.raises(layout.MetadataError, match="does not match the digest"):
        layout.all_segments(cp, read, BK)


def test_a_layout_1_checkpoint_is_read_and_migrated_into_chunks_by_the_next_flush(tmp_path):
    infos = [msgspec.structs.replace(make_segment(0, i * 3, 3, "zstd")[1], sha256="", covers_from=-1)
             for i in range(150)]
    v1 = {"topic": TOPIC, "partition": 0, "next_offset": 450, "version": 1,
          "segments": [json.loads(msgspec.json.encode(s)) for s in infos], "reported_offset": 450}
    cp = layout.decode_checkpoint(json.dumps(v1).encode())
    assert cp.version == 1 and layout.all_segments(cp, lambda k: b"", BK) == infos
    _, new, _ = make_segment(0, 450, 3, "zstd")
    head, chunks = layout.append(BK, cp, new, 450)
    assert len(chunks) == 151 // layout.CHUNK_SEGMENTS and head.version == layout.LAYOUT_VERSION
    store = dict(chunks)
    assert layout.all_segments(head, store.__getitem__, BK) == [*infos, new]
    assert len(head.segments) == 151 % layout.CHUNK_SEGMENTS and head.reported_offset == 450


def test_which_target_configurations_delete_or_refuse_old_records():
    from kafka_backup.producers import topic_configs as tc

    now = 10 * 86_400_000
    assert tc.deletes_before({"retention.ms": "604800000"}, now) == (now - 604800000, "retention.ms=604800000 (7 d)")
    assert tc.deletes_before({"retention.ms": "-1"}, now) is None
    assert tc.deletes_before({"retention.ms": str(2**63 - 1)}, now) is None
    assert tc.deletes_before({"retention.ms": "1000", "cleanup.policy": "compact"}, now) is None
    assert tc.deletes_before({"retention.ms": "1000", "cleanup.policy": "compact,delete"}, now) == (now - 1000,
                                                                                                   "retention.ms=1000 (1 s)")
    assert tc.deletes_before({"retention.ms": "1000", "message.timestamp.type": "LogAppendTime"}, now) is None
    assert tc.refuses_before({"message.timestamp.before.max.ms": "3600000",
                              "message.timestamp.difference.max.ms": str(2**63 - 1)}, now) == (
        now - 3600000, "message.timestamp.before.max.ms=3600000 (1 h)")
    assert tc.refuses_before({"message.timestamp.difference.max.ms": str(2**63 - 1)}, now) is None
