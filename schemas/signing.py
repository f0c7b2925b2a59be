"""Optional HMAC signatures on telemetry records, so only holders of a shared key can feed the fleet.

With ``telemetry.signing_key_file`` set, every worker signs each record it produces (a header
``kafka-backup-sig`` holding HMAC-SHA256 over the record key and value) and the aggregator and
``kafka-backup replay`` refuse records whose signature is missing or wrong, counted as
``kafka_backup_telemetry_invalid_events_total{reason="bad_signature"}``. Kafka ACLs decide who
may write the topic at all (docs/security.md); the signature proves which writes came from a
holder of the key, whatever the topic's ACLs.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

from kafka_backup.schemas.config import ConfigError

HEADER = "kafka-backup-sig"
MIN_KEY_BYTES = 16

# A record's headers as the clients hand them over: (name, value) pairs (confluent-kafka, recorded
# logs) or a mapping (Faust); a name may arrive as bytes, a value may be None.
Headers = Iterable[tuple[str | bytes, bytes | None]] | Mapping[str, bytes | None] | Mapping[bytes, bytes | None]
# A record's headers as a producer is handed them: confluent-kafka's Producer.produce takes a list of
# (name, value) pairs, a value being str, bytes or None (a list is invariant: the pairs are declared so).
ProducedHeaders = list[tuple[str, str | bytes | None]]


def load_key(path: str) -> bytes | None:
    """The key in ``path`` (its bytes, without a trailing newline); None when no path is configured."""
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            key = fh.read().rstrip(b"\r\n")
    except OSError as err:
        raise ConfigError(f"telemetry.signing_key_file: cannot read {path}: {err.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"telemetry.signing_key_file: {path} holds {len(key)} bytes; use at least "
                          f"{MIN_KEY_BYTES} random bytes (e.g. head -c 32 /dev/urandom | base64 > {path})")
    return key


def sign(key: bytes, record_key: bytes | None, value: bytes | None) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    mac.update(len(record_key or b"").to_bytes(4, "big"))  # length-prefixed: no key/value boundary games
    mac.update(record_key or b"")
    mac.update(value or b"")
    return b"sha256=" + mac.hexdigest().encode()


def headers(key: bytes | None, record_key: bytes | None, value: bytes | None) -> ProducedHeaders | None:
    """The headers a worker adds to a record (None without a key)."""
    return None if key is None else [(HEADER, sign(key, record_key, value))]


def signature_of(record_headers: Headers | None) -> bytes | None:
    if not record_headers:
        return None
    items = record_headers.items() if isinstance(record_headers, Mapping) else record_headers
    for name, value in items:
        if (name.decode() if isinstance(name, bytes) else name) == HEADER:
            return bytes(value) if value is not None else None
    return None


def verified(key: bytes | None, record_key: bytes | None, value: bytes | None,
             record_headers: Headers | None) -> bool:
    """True without a key (signing off), else only for a record signed with that key."""
    if key is None:
        return True
    got = signature_of(record_headers)
    return got is not None and hmac.compare_digest(got, sign(key, record_key, value))
