"""The backup buffers records as tuples: the segments they make are byte for byte those of StoredRecords."""

from __future__ import annotations

from kafka_backup.producers import segments


def test_tuples_and_stored_records_make_the_same_segment():
    rows = [(10, 1_790_000_000_000, 1, b"k", b"v" * 50, [("h", b"1"), ("n", None)]),
            (11, 1_790_000_000_001, 2, None, None, []),
            (12, 1_790_000_000_002, 1, b"", b"x", [])]
    for alg in segments.ALGORITHMS:
        as_structs = segments.encode("t", 3, [segments.StoredRecord(*r) for r in rows], alg)
        as_tuples = segments.encode("t", 3, rows, alg)
        assert as_tuples == as_structs
        back = segments.decode(as_tuples[0], alg, as_tuples[1])
        assert [tuple(getattr(r, f) for f in r.__struct_fields__) for r in back.records] == [
            (o, ts, tt, k, v, [tuple(h) for h in hs]) for o, ts, tt, k, v, hs in rows]
