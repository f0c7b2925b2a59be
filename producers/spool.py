"""A local disk spool for telemetry the producer queue cannot hold.

When the telemetry cluster is away longer than the in-memory queue lasts, the
emitter appends encoded events here instead of dropping them, and feeds them
back, oldest first, as the queue drains. While anything is spooled, new events
are spooled too, so one job's events keep their order. The file survives a
crash: the next worker of the same job sends what is left (the events keep
their original worker and sequence number, so a resend is deduplicated).

Format: repeated ``[4-byte big-endian length][payload]``; a read offset is kept
in memory and persisted by rewriting the file only when it is fully drained
(truncate) — simple, and bounded by ``max_bytes``.
"""

from __future__ import annotations

import os
import struct

_LEN = struct.Struct(">I")


class Spool:
    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._fh = open(path, "a+b")  # noqa: SIM115 - held open for the emitter's life
        self._read_at = 0
        self._size = self._fh.seek(0, os.SEEK_END)
        self.pending = self._count()

    def _count(self) -> int:
        n, pos = 0, 0
        self._fh.seek(0)
        while pos + _LEN.size <= self._size:
            (length,) = _LEN.unpack(self._fh.read(_LEN.size))
            if pos + _LEN.size + length > self._size:
                break  # a torn last record (crash mid-append): ignore it
            self._fh.seek(length, os.SEEK_CUR)
            pos += _LEN.size + length
            n += 1
        self._size = pos
        self._fh.truncate(pos)
        return n

    def append(self, payload: bytes) -> bool:
        """False when the spool is full (the caller counts the event as dropped)."""
        if self._size + _LEN.size + len(payload) > self.max_bytes:
            return False
        self._fh.seek(0, os.SEEK_END)
        self._fh.write(_LEN.pack(len(payload)) + payload)
        self._fh.flush()
        self._size += _LEN.size + len(payload)
        self.pending += 1
        return True

    def peek(self) -> bytes | None:
        if not self.pending:
            return None
        self._fh.seek(self._read_at)
        (length,) = _LEN.unpack(self._fh.read(_LEN.size))
        return self._fh.read(length)

    def pop(self) -> None:
        """Drop the event ``peek`` returned (it is now in the producer's queue)."""
        self._fh.seek(self._read_at)
        (length,) = _LEN.unpack(self._fh.read(_LEN.size))
        self._read_at += _LEN.size + length
        self.pending -= 1
        if not self.pending:
            self._fh.truncate(0)
            self._fh.flush()
            self._read_at = self._size = 0

    def close(self) -> None:
        """Keep only what is still pending, so a later worker resends exactly that."""
        if self.pending and self._read_at:
            self._fh.seek(self._read_at)
            rest = self._fh.read()
            self._fh.seek(0)
            self._fh.truncate(0)
            self._fh.write(rest)
            self._fh.flush()
        self._fh.close()
        if not self.pending:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
