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


def compress(data: bytes, algorithm: str) -> bytes:
    if algorithm == "none":
        return data
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


def decode(data: bytes, algorithm: str, size: int | None = None) -> Segment:
    """``size``: the recorded uncompressed size, which bounds decompression (see :func:`decompress`)."""
    try:
        segment = _decoder.decode(decompress(data, algorithm, size))
    except (msgspec.DecodeError, msgspec.ValidationError, cramjam.DecompressionError) as err:
        raise CorruptSegment(str(err)) from None
    if segment.version > FORMAT_VERSION:
        raise CorruptSegment(f"segment format {segment.version} is newer than this reader ({FORMAT_VERSION})")
    return segment
