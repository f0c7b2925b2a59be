"""Signed audit evidence: Ed25519 signatures over the reports ``kafka-backup replay`` writes.

A report is a pure function of the telemetry log, so anyone with read access can recompute it
and compare bytes; a signature adds who vouched for a given copy, and proves that not one byte
of it changed since. Keys are standard PEM files (``openssl genpkey -algorithm ed25519``); the
signature file holds the 64-byte signature, base64-encoded, on one line.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kafka_backup.schemas.config import ConfigError


def _read(path: str, field: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as err:
        raise ConfigError(f"{field}: cannot read {path}: {err.strerror}") from None


def load_private_key(path: str, field: str = "--sign-key") -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, field), password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{field}: {path} is not an unencrypted PEM private key ({err}); make one with "
                          "openssl genpkey -algorithm ed25519 -out key.pem") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{field}: {path} is not an Ed25519 key; make one with "
                          "openssl genpkey -algorithm ed25519 -out key.pem")
    return key


def load_public_key(path: str, field: str = "--public-key") -> Ed25519PublicKey:
    data = _read(path, field)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:  # a private key file holds the public key too
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError):
            raise ConfigError(f"{field}: {path} is not a PEM public key; export one with "
                              "openssl pkey -in key.pem -pubout -out key.pub") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{field}: {path} is not an Ed25519 public key")
    return key


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The signature file's content for ``data``."""
    return base64.b64encode(key.sign(data)) + b"\n"


def verify(public_key: Ed25519PublicKey, data: bytes, signature_file: bytes) -> bool:
    try:
        signature = base64.b64decode(signature_file.strip(), validate=True)
        public_key.verify(signature, data)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def verify_files(report: str, signature: str, public_key: str) -> bool:
    return verify(load_public_key(public_key), _read(report, "--verify-report"), _read(signature, "--signature"))
