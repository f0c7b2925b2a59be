"""``metrics.web_config_file``: Prometheus exporter-toolkit's web configuration, re-read when it changes.

The format is the one every official exporter reads with ``--web.config.file``
(https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md)::

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file's directory
      key_file: server.key
      client_ca_file: clients-ca.crt # with client_auth_type: RequireAndVerifyClientCert, mutual TLS
      client_auth_type: RequireAndVerifyClientCert
      min_version: TLS12             # TLS10 .. TLS13; max_version likewise
    http_server_config:
      headers: {Strict-Transport-Security: max-age=31536000}
    basic_auth_users:
      prom: $2y$10$...               # bcrypt hashes only

Like the toolkit, the file and the files it names are looked at again for every new connection
(a few ``stat`` calls): a renewed certificate (cert-manager, a rotated Secret) is served to the
next client without a restart. A change that does not load (half-written file, key not matching
the certificate) is logged once and the previous configuration stays in force; at start-up the
same mistake is a one-line configuration error.

Not supported, refused by name rather than silently ignored: inline ``cert``/``key``/``client_ca``,
``cipher_suites``, ``curve_preferences``, ``prefer_server_cipher_suites``, ``client_allowed_sans``,
``rate_limit``, and the client-auth types that accept unverified certificates.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import ssl
import threading
from typing import Any

import bcrypt

from kafka_backup.schemas.config import ConfigError, read_yaml

log = logging.getLogger("kafka_backup.exporter")

KEY = "metrics.web_config_file"
BCRYPT_HASH = re.compile(rb"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
               "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
UNSUPPORTED_AUTH = ("RequestClientCert", "RequireAnyClientCert")  # would accept unverified certificates
TLS_KEYS = ("cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version")
TLS_UNSUPPORTED = ("cert", "key", "client_ca", "cipher_suites", "curve_preferences", "prefer_server_cipher_suites",
                   "client_allowed_sans")
HEADERS = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options", "X-XSS-Protection",
           "Strict-Transport-Security")


class CachedBasicAuth:
    """Basic authentication: the ``Authorization`` header parsed, and credentials that passed once
    remembered by their SHA-256 (never in clear), as exporter-toolkit does: a bcrypt check costs tens
    of milliseconds by design, and a wrong password pays it every time. Subclasses say whether a
    user and password are right (:meth:`_verify`). Credentials are compared as bytes:
    ``hmac.compare_digest`` refuses ``str`` with non-ASCII characters.
    """

    CACHE_MAX = 64

    def __init__(self) -> None:
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()

    def check(self, header: str) -> str | None:
        """None when ``header`` (the Authorization value) holds a right user and password, else the reason."""
        if not header:
            return "missing"
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return "malformed"
        try:
            raw = base64.b64decode(token.strip(), validate=True)
        except binascii.Error:
            return "malformed"
        user, sep, password = raw.partition(b":")
        if not sep:
            return "malformed"
        fingerprint = hashlib.sha256(raw).digest()
        with self._lock:
            if fingerprint in self._verified:
                return None
        reason = self._verify(user, password)
        if reason is None:
            with self._lock:
                if len(self._verified) >= self.CACHE_MAX:
                    self._verified.clear()
                self._verified.add(fingerprint)
        return reason

    def _verify(self, user: bytes, password: bytes) -> str | None:
        raise NotImplementedError


class UsersAuth(CachedBasicAuth):
    """basic_auth_users: several users, each with a bcrypt hash; same ``check`` as server.BasicAuth.

    An unknown user costs a bcrypt check too (against a throw-away hash), so response times do not
    tell which user names exist.
    """

    _dummy: bytes | None = None

    def __init__(self, users: dict[str, bytes]) -> None:
        super().__init__()
        self._users = {u.encode("utf-8"): h for u, h in users.items()}

    @classmethod
    def _dummy_hash(cls) -> bytes:
        if cls._dummy is None:
            cls._dummy = bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(10))
        return cls._dummy

    def _verify(self, user: bytes, password: bytes) -> str | None:
        hashed = next((h for u, h in self._users.items() if hmac.compare_digest(u, user)), None)
        try:
            ok = bcrypt.checkpw(password, hashed or self._dummy_hash())
        except ValueError:  # bcrypt >= 5 refuses passwords longer than 72 bytes
            ok = False
        if hashed is None:
            return "unknown_user"
        return None if ok else "wrong_password"


class Loaded:
    """One loaded configuration: a TLS context (or None: plain HTTP), an authenticator, extra headers."""

    def __init__(self, tls: ssl.SSLContext | None, auth: UsersAuth | None, headers: dict[str, str],
                 files: tuple[str, ...]) -> None:
        self.tls, self.auth, self.headers, self.files = tls, auth, headers, files


def _fail(path: str, field: str, message: str) -> ConfigError:
    return ConfigError(f"{KEY}: {path}: {field or 'top level'}: {message}")


def _mapping(path: str, field: str, value: Any, allowed: tuple[str, ...], unsupported: tuple[str, ...] = ()
             ) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, field, "must be a mapping")
    for k in value:
        name = f"{field}.{k}" if field else str(k)
        if k in unsupported:
            raise _fail(path, name, f"not supported by this exporter; remove it (supported: {', '.join(allowed)})")
        if k not in allowed:
            raise _fail(path, name, f"unknown key; valid keys here: {', '.join(allowed)}")
    return value


def _string(path: str, field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, field, "must be a non-empty string")
    return value


def load(path: str) -> Loaded:
    """Read and check the file; raise :class:`ConfigError` naming the field on any mistake."""
    raw = read_yaml(path, KEY)
    top = _mapping(path, "", raw, ("tls_server_config", "http_server_config", "basic_auth_users"),
                   ("rate_limit",))
    here = os.path.dirname(os.path.abspath(path))
    files: list[str] = [path]

    def file_of(field: str, value: Any) -> str:
        name = os.path.join(here, _string(path, field, value))
        if not os.path.isfile(name):
            raise _fail(path, field, f"{name} does not exist")
        files.append(name)
        return name

    tls = None
    t = _mapping(path, "tls_server_config", top.get("tls_server_config"), TLS_KEYS, TLS_UNSUPPORTED)
    if t:
        if "cert_file" not in t or "key_file" not in t:
            missing = "key_file" if "cert_file" in t else "cert_file"
            raise _fail(path, f"tls_server_config.{missing}", "required: TLS needs both cert_file and key_file")
        cert = file_of("tls_server_config.cert_file", t["cert_file"])
        key = file_of("tls_server_config.key_file", t["key_file"])
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        for bound in ("min_version", "max_version"):
            if bound in t:
                version = TLS_VERSIONS.get(t[bound])
                if version is None:
                    raise _fail(path, f"tls_server_config.{bound}", f"{t[bound]!r} is not one of "
                                f"{', '.join(TLS_VERSIONS)}")
                setattr(tls, "minimum_version" if bound == "min_version" else "maximum_version", version)
            elif bound == "min_version":
                tls.minimum_version = ssl.TLSVersion.TLSv1_2  # the toolkit's default
        try:
            tls.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as err:
            raise _fail(path, "tls_server_config.cert_file", f"cannot load {cert} with key {key}: "
                        f"{getattr(err, 'reason', None) or err}") from None
        auth_type = t.get("client_auth_type", "NoClientCert")
        if auth_type in UNSUPPORTED_AUTH:
            raise _fail(path, "tls_server_config.client_auth_type", f"{auth_type} accepts unverified client "
                        "certificates and is not supported; use RequireAndVerifyClientCert")
        if auth_type not in CLIENT_AUTH:
            raise _fail(path, "tls_server_config.client_auth_type", f"{auth_type!r} is not one of "
                        f"{', '.join(CLIENT_AUTH)}")
        if "client_ca_file" in t:
            if auth_type == "NoClientCert":
                raise _fail(path, "tls_server_config.client_auth_type", "client_ca_file is set without a client "
                            "auth policy; set client_auth_type: RequireAndVerifyClientCert")
            ca = file_of("tls_server_config.client_ca_file", t["client_ca_file"])
            try:
                tls.load_verify_locations(cafile=ca)
            except (OSError, ssl.SSLError) as err:
                raise _fail(path, "tls_server_config.client_ca_file", f"cannot load {ca}: "
                            f"{getattr(err, 'reason', None) or err}") from None
        elif auth_type != "NoClientCert":
            raise _fail(path, "tls_server_config.client_ca_file", f"required with client_auth_type: {auth_type}")
        tls.verify_mode = CLIENT_AUTH[auth_type]
    headers: dict[str, str] = {}
    h = _mapping(path, "http_server_config", top.get("http_server_config"), ("headers", "http2"))
    if "http2" in h and not isinstance(h["http2"], bool):
        raise _fail(path, "http_server_config.http2", "must be true or false (HTTP/2 is never served here)")
    for name, value in _mapping(path, "http_server_config.headers", h.get("headers"), HEADERS).items():
        value = _string(path, f"http_server_config.headers.{name}", value)
        if any(c in value for c in "\r\n"):
            raise _fail(path, f"http_server_config.headers.{name}", "must be one line")
        headers[name] = value
    auth = None
    users = top.get("basic_auth_users")
    if users is not None:
        if not isinstance(users, dict):
            raise _fail(path, "basic_auth_users", "must be a mapping of user: bcrypt hash")
        hashes = {}
        for user, hashed in users.items():
            field = f"basic_auth_users.{user}"
            raw = _string(path, field, hashed).strip().encode()
            try:
                valid = BCRYPT_HASH.fullmatch(raw) is not None and bcrypt.checkpw(b"", raw) in (True, False)
            except ValueError:
                valid = False
            if not valid:
                raise _fail(path, field, "not a bcrypt hash ($2y$...); make one with "
                            "htpasswd -nbBC 10 \"\" \"$PASSWORD\" | cut -d: -f2")
            hashes[str(user)] = raw
        auth = UsersAuth(hashes) if hashes else None
    return Loaded(tls, auth, headers, tuple(files))


def _signature(files: tuple[str, ...]) -> tuple[tuple[int, int, int] | None, ...]:
    """What tells a changed file: (inode, size, mtime) of each, None for one that cannot be read."""
    out: list[tuple[int, int, int] | None] = []
    for name in files:
        try:
            st = os.stat(name)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


class WebConfig:
    """The current configuration, reloaded when the file or a file it names changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._loaded = load(path)  # a mistake at start-up is a configuration error
        self._seen = _signature(self._loaded.files)
        self._failed: tuple | None = None
        self.reloads = 0

    def current(self) -> Loaded:
        """Called for every new connection, on the event loop: a few stat calls when nothing changed."""
        seen = _signature(self._loaded.files)
        if seen == self._seen or seen == self._failed:
            return self._loaded
        try:
            loaded = load(self.path)
        except ConfigError as err:
            self._failed = seen
            log.error("%s; keeping the previous web configuration", err)
            return self._loaded
        self._loaded, self._seen, self._failed = loaded, _signature(loaded.files), None
        self.reloads += 1
        log.warning("%s: reloaded %s", KEY, self.path)
        return loaded
