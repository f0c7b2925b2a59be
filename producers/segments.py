"""Segment files: a partition's records, msgpack-encoded, then compressed.

A segment holds a contiguous run of one partition's records with everything a
restore needs to reproduce them (offset, timestamp and its type, key, value,
headers). Compression is by cramjam, which covers all four codecs with one
maintained dependency. Snappy and LZ4 use their framed formats so a segment
is self-delimiting and checksummed.
"""

from __future__ import annotations

import cramjam
import msgspec

FORMAT_VERSION = 1
ALGORITHMS = ("zstd", "lz4", "snappy", "gzip", "none")
SUFFIX = {"zstd": ".seg.zst", "lz4": ".seg.lz4", "snappy": ".seg.sz", "gzip": ".seg.gz", "none": ".seg"}


class StoredRecord(msgspec.Struct, array_like=True):
    offset: int
    timestamp: int  # epoch ms
    timestamp_type: int  # confluent_kafka TIMESTAMP_CREATE_TIME (1) or TIMESTAMP_LOG_APPEND_TIME (2)
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] = []

    @property
    def size(self) -> int:
        """Payload bytes as the metrics count them: key plus value, no protocol overhead."""
        return len(self.key or b"") + len(self.value or b"")


class Segment(msgspec.Struct, array_like=True):
    version: int
    topic: str
    partition: int
    records: list[StoredRecord]


class CorruptSegment(ValueError):
    pass


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Segment)


def compress(data: bytes | memoryview, algorithm: str) -> bytes:
    if algorithm == "none":
        return bytes(data)  # bytes: the same object, not a copy
    codec = {"zstd": cramjam.zstd, "lz4": cramjam.lz4, "snappy": cramjam.snappy, "gzip": cramjam.gzip}[algorithm]
    return bytes(codec.compress(data))


def decompress(data: bytes, algorithm: str, size: int | None = None) -> bytes:
    """Decompress; with ``size`` (the uncompressed size the checkpoint recorded) never allocate more.

    The output buffer is ``size + 1`` bytes, fixed: a stream inflating beyond it (a damaged or
    malicious object, e.g. a small zstd bomb) fails as soon as it overflows, without allocating
    what it claims; one that inflates to another size than recorded is corrupt too.
    """
    if algorithm == "none":
        if size is not None and len(data) != size:
            raise CorruptSegment(f"holds {len(data)} bytes, the checkpoint recorded {size}")
        return data
    codec = {"zstd": cramjam.zstd, "lz4": cramjam.lz4, "snappy": cramjam.snappy, "gzip": cramjam.gzip}[algorithm]
    if size is None:
        return bytes(codec.decompress(data))
    out = bytearray(size + 1)
    try:
        n = codec.decompress_into(data, out)
    except cramjam.DecompressionError as err:
        if "whole buffer" in str(err):
            raise CorruptSegment(f"inflates beyond the {size} bytes the checkpoint recorded") from None
        raise
    if n != size:
        raise CorruptSegment(f"inflates to {n} bytes, the checkpoint recorded {size}")
    del out[n:]
    return bytes(out)


def encode(topic: str, partition: int, records: list[StoredRecord] | list[tuple], algorithm: str) -> tuple[bytes, int]:
    """Return (stored bytes, uncompressed size).

    ``records`` may be ``StoredRecord``s or plain tuples of the same fields in the same order (the
    backup's buffer): both encode to the same msgpack array, so the segment bytes are identical.
    """
    # the fields of a Segment as a tuple: an array_like Struct and a tuple are the same msgpack array,
    # and a tuple may hold the backup's plain tuples where a Segment is declared to hold StoredRecords
    raw = _encoder.encode((FORMAT_VERSION, topic, partition, records))
    return compress(raw, algorithm), len(raw)


def _array_header(n: int) -> bytes:
    """msgpack's header of an array of ``n`` elements, in the smallest form (as msgspec writes it)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _array_header_size(first: int) -> int:
    return 1 if first < 0xDC else 3 if first == 0xDC else 5


_RESERVED = 64  # room before the records for the segment's head: its array, version, partition, topic ...
_TOPIC_MAX = 249  # ... and Kafka's longest topic name (the head is written in place when it fits)


class SegmentBuffer:
    """A segment being filled, its records encoded as they arrive.

    The backup adds each fetched run of a partition's records (``StoredRecord`` fields as tuples) and
    drops the tuples at once: holding a segment's 50,000 records as Python objects until it was cut
    cost more than encoding them (allocations no longer reused, caches cold: the fetch loop ran at
    0.62x its rate without a segment buffered, 0.86x encoding as it goes; bench/backup.py). Kept
    per segment: the encoded array elements, and what its checkpoint entry needs (count, first and
    last offset, oldest and newest timestamp). :meth:`seal` gives exactly the bytes :func:`encode`
    gives for the same records.
    """

    __slots__ = ("_body", "records", "first_offset", "last_offset", "min_ts", "max_ts")

    def __init__(self) -> None:
        self._body = bytearray(_RESERVED + _TOPIC_MAX)  # the head is written into this room at seal
        self.records = 0
        self.first_offset = self.last_offset = -1
        self.min_ts = self.max_ts = 0

    def add(self, rows: list[tuple]) -> int:
        """Append a run of records, in offset order (tuples of ``StoredRecord``'s fields); return the
        run's newest timestamp."""
        start = len(self._body)
        _encoder.encode_into(rows, self._body, start)  # the run as an array ...
        del self._body[start:start + _array_header_size(self._body[start])]  # ... minus its header
        timestamps = [r[1] for r in rows]
        low, high = min(timestamps), max(timestamps)
        if not self.records:
            self.first_offset, self.min_ts, self.max_ts = rows[0][0], low, high
        else:
            self.min_ts, self.max_ts = min(self.min_ts, low), max(self.max_ts, high)
        self.last_offset = rows[-1][0]
        self.records += len(rows)
        return high

    def seal(self, topic: str, partition: int, algorithm: str) -> tuple[bytes, int]:
        """Return (stored bytes, uncompressed size), as :func:`encode` does for the same records."""
        head = bytearray(_encoder.encode((FORMAT_VERSION, topic, partition)))
        head[0] = 0x94  # four fields: the records follow
        head += _array_header(self.records)
        room = _RESERVED + _TOPIC_MAX
        if len(head) > room:  # a longer name than Kafka allows: no room kept, so one copy
            raw = memoryview(bytes(head) + self._body[room:])
        else:
            self._body[room - len(head):room] = head
            raw = memoryview(self._body)[room - len(head):]
        with raw:  # released after: the buffer can be resized again
            return compress(raw, algorithm), len(raw)


def decode(data: bytes, algorithm: str, size: int | None = None) -> Segment:
    """``size``: the recorded uncompressed size, which bounds decompression (see :func:`decompress`)."""
    try:
        segment = _decoder.decode(decompress(data, algorithm, size))
    except (msgspec.DecodeError, msgspec.ValidationError, cramjam.DecompressionError) as err:
        raise CorruptSegment(str(err)) from None
    if segment.version > FORMAT_VERSION:
        raise CorruptSegment(f"segment format {segment.version} is newer than this reader ({FORMAT_VERSION})")
    return segment
